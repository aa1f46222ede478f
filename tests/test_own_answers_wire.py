"""corsproxy's own refusals (417, 414, 431) are readable by an allowed origin, like every other answer of any status
(CORS-RULES 12), so the browser shows the real error instead of "CORS error"; a refused origin gets no CORS header."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support.inprocess import running_proxy
from tests.support.net import raw_exchange
from tests.support.raw_upstream import RawUpstream

ALLOWED = "https://app.example.com"
REFUSED = "https://evil.example.net"


def _config(tmp_path: Path, upstream_port: int) -> dict[str, object]:
    from tests.support.config import BASE_CONFIG, merge

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


LONG = 40_000  # over the parser's ceiling (twice limits.max_header_size, 16 KiB by default)
SOFT = 20_000  # over max_header_size, under the ceiling: judged by the handler


def _allowed_cors(headers: dict[str, str]) -> dict[str, str]:
    return {k: v for k, v in headers.items() if k.startswith("Access-Control-")}


ALLOWED_CORS = {
    "Access-Control-Allow-Origin": ALLOWED,
    "Access-Control-Allow-Credentials": "true",
    "Access-Control-Expose-Headers": "x-request-id",
}


@pytest.mark.parametrize("size", [SOFT, LONG], ids=["over the limit", "over the parser ceiling"])
@pytest.mark.parametrize("origin", [ALLOWED, REFUSED, None])
@pytest.mark.parametrize("where", ["header line", "request line"])
async def test_oversized_heads_get_414_or_431_with_cors_headers(
    tmp_path: Path, size: int, origin: str | None, where: str
) -> None:
    """A long request line is 414, a long header line 431, at any size; both readable by an allowed origin whether
    its Origin line comes before or after the long line."""
    async with RawUpstream() as upstream, running_proxy(_config(tmp_path, upstream.port)) as port:
        origin_line = f"Origin: {origin}\r\n" if origin else ""
        if where == "request line":
            request = f"GET /{'a' * size} HTTP/1.1\r\nHost: a\r\n{origin_line}Connection: close\r\n\r\n"
        else:
            request = f"GET /x HTTP/1.1\r\nHost: a\r\nConnection: close\r\n{origin_line}Cookie: {'c' * size}\r\n\r\n"
        status, headers = _head(await raw_exchange(port, request.encode()))
        assert status == (414 if where == "request line" else 431)
        assert headers["Vary"] == "Origin"
        assert _allowed_cors(headers) == (ALLOWED_CORS if origin == ALLOWED else {})
        assert "Server" not in headers
        assert upstream.received == []


async def test_origin_after_a_long_header_line_still_counts(tmp_path: Path) -> None:
    async with RawUpstream() as upstream, running_proxy(_config(tmp_path, upstream.port)) as port:
        request = f"GET /x HTTP/1.1\r\nHost: a\r\nCookie: {'c' * LONG}\r\nOrigin: {ALLOWED}\r\n\r\n"
        status, headers = _head(await raw_exchange(port, request.encode()))
        assert status == 431
        assert _allowed_cors(headers) == ALLOWED_CORS


async def test_an_oversized_head_without_a_request_line_varies_only(tmp_path: Path) -> None:
    async with RawUpstream() as upstream, running_proxy(_config(tmp_path, upstream.port)) as port:
        status, headers = _head(await raw_exchange(port, b"X" * LONG + b"\r\n\r\n"))
        assert status in (400, 431)
        assert headers["Vary"] == "Origin" and _allowed_cors(headers) == {}
