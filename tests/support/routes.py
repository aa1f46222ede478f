"""The routed configuration the route-escape tests judge paths under, and the wire helpers that ask the real proxy:
raw HTTP/1.1 requests on a fresh loopback connection, each asked twice on it (first on a connection and later on it,
either path of the proxy may answer) and both answers required to be the same."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from tests.support.config import BASE_CONFIG, merge
from tests.support.inprocess import running_proxy

__all__ = ["ROUTED", "ask_twice", "get_request", "preflight_request", "routed_proxy"]

#: The configuration of the report: a public route, a restrictive one, a report-only one; the default policy is
#: credentialed for https://app.example.com.
ROUTED: dict[str, Any] = merge(
    BASE_CONFIG,
    {
        "cors": {"allow_origins": ["https://app.example.com"]},
        "policies": {"public": {"allow_credentials": False}, "admin": {"allow_methods": ["GET", "POST"]}},
        "routes": [
            {"path": "/public/", "allow_origins": ["*"], "policy": "public"},
            {"path": "/admin/", "allow_origins": ["https://admin.example.com"], "policy": "admin"},
            {"path": "/legacy/", "mode": "report-only"},
            {"path": "/api/v2", "allow_origins": ["https://v2.example.com"]},
        ],
    },
)


@contextlib.asynccontextmanager
async def routed_proxy(tmp_path: Path, upstream_port: int, fast: bool, **override: Any) -> AsyncIterator[int]:
    """:data:`ROUTED` (with ``override`` merged) in front of ``upstream_port``, with or without the fast path."""
    data = merge(
        ROUTED,
        {"store": {"path": str(tmp_path / f"db-{fast}")}, "upstream": {"url": f"http://127.0.0.1:{upstream_port}"}},
    )
    async with running_proxy(merge(data, override), fast_preflights=fast) as port:
        yield port


async def ask_twice(port: int, request: str) -> tuple[int, dict[str, str], bytes]:
    """One request on a fresh connection (the first on it: either path may answer), then the same one again on it."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    answers = []
    try:
        for _ in range(2):
            writer.write(request.encode("latin-1"))
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
            lines = head.decode("latin-1").split("\r\n")
            headers = dict(line.split(": ", 1) for line in lines[1:] if line)
            body = await asyncio.wait_for(reader.readexactly(int(headers.get("Content-Length", "0"))), 5)
            answers.append((int(lines[0].split()[1]), headers, body))
    finally:
        writer.close()
        await writer.wait_closed()
    assert answers[0] == (answers[1][0], {**answers[1][1], "Date": answers[0][1]["Date"]}, answers[1][2])
    return answers[0]


def get_request(path: str, origin: str) -> str:
    return f"GET {path} HTTP/1.1\r\nHost: api.example.com\r\nOrigin: {origin}\r\n\r\n"


def preflight_request(path: str, origin: str) -> str:
    return (
        f"OPTIONS {path} HTTP/1.1\r\nHost: api.example.com\r\nOrigin: {origin}\r\n"
        "Access-Control-Request-Method: GET\r\n\r\n"
    )
