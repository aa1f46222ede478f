"""Route escapes on the wire: the real proxy (with and without the preflight fast path) in front of a raw upstream
that records every byte. An ambiguous path or a fragment is answered 400 by corsproxy, in enforce and report-only
mode, for preflights and actual requests alike, and never reaches the upstream."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from corsproxy.config import parse_config
from corsproxy.http.app import create_app
from corsproxy.http.protocol import ProxyRunner
from tests.conftest import merge
from tests.raw_upstream import RawUpstream
from tests.test_route_escape import ROUTED

EVIL = "https://evil.com"
APP = "https://app.example.com"


@contextlib.asynccontextmanager
async def proxy(tmp_path: Path, upstream_port: int, fast: bool, **override: Any) -> AsyncIterator[int]:
    data = merge(
        ROUTED,
        {"store": {"path": str(tmp_path / f"db-{fast}")}, "upstream": {"url": f"http://127.0.0.1:{upstream_port}"}},
    )
    runner = ProxyRunner(
        create_app(parse_config(merge(data, override), env={})),
        fast_preflights=fast,
        access_log=None,
        handle_signals=False,
    )
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    try:
        yield runner.addresses[0][1]
    finally:
        await runner.cleanup()


async def _ask(port: int, request: str) -> tuple[int, dict[str, str], bytes]:
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


def _get(path: str, origin: str) -> str:
    return f"GET {path} HTTP/1.1\r\nHost: api.example.com\r\nOrigin: {origin}\r\n\r\n"


def _preflight(path: str, origin: str) -> str:
    return (
        f"OPTIONS {path} HTTP/1.1\r\nHost: api.example.com\r\nOrigin: {origin}\r\n"
        "Access-Control-Request-Method: GET\r\n\r\n"
    )


ESCAPES = [
    ("/admin/..;/public/", EVIL),
    ("/admin/..;/x", APP),
    ("/admin/..%5cpublic/", EVIL),
    ("/admin/..%2fpublic/", EVIL),
    ("/admin/%2e%2e/public/", EVIL),
    ("/legacy/..;/admin/x", APP),
    ("/public/..;/admin/x", EVIL),
    ("//admin/x", APP),
    ("/ADMIN/x", APP),
    ("/admin%20/x", APP),
    ("/admin/#x", APP),
    ("/public#/../admin/x", EVIL),
    ("/admin/x#y", EVIL),
]


@pytest.mark.parametrize("fast", [True, False], ids=["fast path", "handler only"])
@pytest.mark.parametrize("mode", ["enforce", "report-only"])
@pytest.mark.parametrize(("path", "origin"), ESCAPES)
async def test_escapes_are_refused_and_never_forwarded(
    tmp_path: Path, fast: bool, mode: str, path: str, origin: str
) -> None:
    async with RawUpstream() as upstream, proxy(tmp_path, upstream.port, fast, mode=mode) as port:
        for request in (_get(path, origin), _preflight(path, origin)):
            status, headers, body = await _ask(port, request)
            assert status == 400, (request, status, body)
            assert headers["Vary"] == "Origin"
            assert not [name for name in headers if name.lower().startswith("access-control-")]  # refused here
            assert "Server" not in headers
            assert b"fragment" in body if "#" in path else b"ambiguous request path" in body
        assert upstream.received == []


async def test_an_origin_allowed_under_every_reading_can_read_the_400(tmp_path: Path) -> None:
    """/public/..;/x is /public/ (``*``) to some servers and the default policy (credentialed app origin) to others:
    the app origin may read corsproxy's 400 under either, so it gets the least-privileged CORS headers."""
    async with RawUpstream() as upstream, proxy(tmp_path, upstream.port, True) as port:
        status, headers, _ = await _ask(port, _get("/public/..;/x", APP))
        assert status == 400
        assert {k: v for k, v in headers.items() if k.startswith("Access-Control-")} == {
            "Access-Control-Allow-Origin": "*",
            "Access-Control-Expose-Headers": "x-request-id",
        }
        assert headers["Vary"] == "Origin"
        assert upstream.received == []


@pytest.mark.parametrize("target", ["/public/a%2Fb?x=/../admin", "/admin/x;v=1", "/admin//x", "/api/x%20y", "/x/..;/y"])
async def test_unambiguous_paths_are_forwarded_byte_for_byte(tmp_path: Path, target: str) -> None:
    async with RawUpstream() as upstream, proxy(tmp_path, upstream.port, True) as port:
        status, _, _ = await _ask(port, _get(target, "https://admin.example.com"))
        assert status == 200
        assert [received.target for received in upstream.received] == [target, target]


async def test_a_fragment_is_refused_without_routes_too(tmp_path: Path) -> None:
    async with RawUpstream() as upstream, proxy(tmp_path, upstream.port, True, routes=None) as port:
        status, headers, body = await _ask(port, _get("/api/x#frag", APP))
        assert status == 400 and b"fragment" in body
        assert headers["Access-Control-Allow-Origin"] == APP  # corsproxy's own error, readable by an allowed origin
        assert upstream.received == []


@pytest.mark.parametrize("target", ["http://api.example.com/..;/secret", "http://api.example.com/a/..;/..;/secret"])
async def test_an_absolute_form_target_cannot_climb_above_the_base_path(tmp_path: Path, target: str) -> None:
    """An absolute-form target is forwarded as its path: that path is what the climb check reads."""
    async with RawUpstream() as upstream:
        override = {"upstream": {"url": f"http://127.0.0.1:{upstream.port}/base"}, "routes": None}
        async with proxy(tmp_path, upstream.port, True, **override) as port:
            status, _, body = await _ask(port, _get(target, APP))
            assert status == 400 and b"climbs above" in body
            assert upstream.received == []
