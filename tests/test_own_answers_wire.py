"""corsproxy's own refusals (417, 414, 431) are readable by an allowed origin, like every other answer of any status
(CORS-RULES 12), so the browser shows the real error instead of "CORS error"; a refused origin gets no CORS header."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.raw_upstream import RawUpstream, raw_exchange, running_proxy

ALLOWED = "https://app.example.com"
REFUSED = "https://evil.example.net"


def _config(tmp_path: Path, upstream_port: int) -> dict[str, object]:
    from tests.conftest import BASE_CONFIG, merge

    return merge(
        BASE_CONFIG,
        {"store": {"path": str(tmp_path / "db")}, "upstream": {"url": f"http://127.0.0.1:{upstream_port}"}},
    )


def _head(answer: bytes) -> tuple[int, dict[str, str]]:
    head = answer.split(b"\r\n\r\n", 1)[0].decode("latin-1").split("\r\n")
    return int(head[0].split()[1]), dict(line.split(": ", 1) for line in head[1:])


@pytest.mark.parametrize("origin", [ALLOWED, REFUSED])
async def test_unknown_expectation_417_carries_cors_headers(tmp_path: Path, origin: str) -> None:
    async with RawUpstream() as upstream, running_proxy(_config(tmp_path, upstream.port)) as port:
        request = f"GET /x HTTP/1.1\r\nHost: a\r\nOrigin: {origin}\r\nExpect: teapot\r\nConnection: close\r\n\r\n"
        status, headers = _head(await raw_exchange(port, request.encode()))
        assert status == 417
        assert headers["Vary"] == "Origin"
        cors = {k: v for k, v in headers.items() if k.startswith("Access-Control-")}
        if origin == ALLOWED:
            assert cors == {
                "Access-Control-Allow-Origin": ALLOWED,
                "Access-Control-Allow-Credentials": "true",
                "Access-Control-Expose-Headers": "x-request-id",
            }
        else:
            assert cors == {}
        assert "Server" not in headers
        assert upstream.received == []
