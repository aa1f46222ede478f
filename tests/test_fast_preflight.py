"""The preflight fast path (PreflightResponder) must answer exactly like the ordinary handler: the same bytes (the
``Date`` value aside) — status line, header names, values and order, body — for every case of the decision table and
for hostile targets, whether a request is the first on its connection or a later one; and keep HTTP/1.1 semantics:
pipelined requests answered in order, keep-alive kept, observers told."""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.http_parser import RawRequestMessage

from corsproxy.core.outcome import Outcome
from corsproxy.http.fastpath import FastAnswer
from tests.support.decision_table import CONFIG, PREFLIGHTS, Preflight
from tests.support.inprocess import serve_proxy

Runner = Callable[..., Any]
#: The answers each fast-path proxy (by port) wrote from the fast path itself, so a test can tell which path answered.
FAST_ANSWERS: dict[int, list[bytes]] = {}


def count_fast_answers(runner: web.AppRunner, port: int) -> None:
    """Record every answer the runner's preflight fast path writes (the responder is wrapped, not replaced)."""
    server: Any = runner.server
    fast: FastAnswer = server._fast
    answers = FAST_ANSWERS[port] = []

    def counting(message: RawRequestMessage, protocol: web.RequestHandler) -> bytes | None:
        answer = fast(message, protocol)
        if answer is not None:
            answers.append(answer)
        return answer

    server._fast = counting


@pytest.fixture
async def proxies(tmp_path: Path) -> AsyncIterator[tuple[int, int, list[Outcome]]]:
    """The same config served twice: with the fast path (as `serve` does) and without it."""
    seen: list[Outcome] = []
    async with contextlib.AsyncExitStack() as stack:
        ports: list[int] = []
        for fast in (True, False):
            data = {**CONFIG, "store": {"path": str(tmp_path / f"db-{fast}")}, "debug_reason_header": True}
            proxy = await stack.enter_async_context(serve_proxy(data, fast_preflights=fast))
            ports.append(proxy.port)
            if fast:
                proxy.state.observers.append(seen.append)
                count_fast_answers(proxy.runner, proxy.port)
        yield ports[0], ports[1], seen


async def _exchange(port: int, payload: bytes, responses: int = 1) -> list[tuple[bytes, dict[str, str], bytes]]:
    """Send raw bytes on one connection; read ``responses`` complete responses (status line, headers, body)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(payload)
        await writer.drain()
        out = []
        for _ in range(responses):
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
            status, *lines = head.decode("latin-1").split("\r\n")[:-2]
            headers: dict[str, str] = {}
            for line in lines:
                name, _, value = line.partition(": ")
                assert name.lower() not in {k.lower() for k in headers}, f"{name} twice"
                headers[name] = value
            length = int(headers.get("Content-Length", "0"))
            body = await asyncio.wait_for(reader.readexactly(length), 5) if length else b""
            out.append((status.encode(), headers, body))
        return out
    finally:
        writer.close()
        await writer.wait_closed()


def _request(case: Preflight) -> bytes:
    lines = [f"OPTIONS {case.path} HTTP/1.1", "Host: api.example.com"]
    lines += [f"Origin: {o}" for o in case.origin]
    lines += [f"Access-Control-Request-Method: {m}" for m in case.method]
    lines += [f"Access-Control-Request-Headers: {h}" for h in case.headers]
    if case.private_network:
        lines.append("Access-Control-Request-Private-Network: true")
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


_DATE = re.compile(rb"\r\nDate: [^\r]*\r\n")


async def _raw_answers(port: int, payload: bytes, responses: int) -> list[bytes]:
    """The exact bytes of ``responses`` answers on one connection, each with its ``Date`` value blanked."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(payload)
        await writer.drain()
        out = []
        for _ in range(responses):
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
            match = re.search(rb"\r\nContent-Length: (\d+)\r\n", head, re.IGNORECASE)
            body = await asyncio.wait_for(reader.readexactly(int(match[1])), 5) if match else b""
            assert len(_DATE.findall(head)) == 1, head
            out.append(_DATE.sub(b"\r\nDate: -\r\n", head) + body)
        return out
    finally:
        writer.close()
        await writer.wait_closed()


@pytest.mark.parametrize("case", [c for c, _, _ in PREFLIGHTS.values()], ids=PREFLIGHTS.keys())
async def test_fast_path_answers_like_the_handler(proxies: tuple[int, int, list[Outcome]], case: Preflight) -> None:
    fast_port, plain_port, seen = proxies
    # Twice on one connection: the first request of a connection can reach either path (aiohttp's request loop
    # may not be waiting yet), a later one takes the fast path whenever it can.
    fast = await _raw_answers(fast_port, _request(case) * 2, 2)
    plain = await _raw_answers(plain_port, _request(case) * 2, 2)
    assert fast == plain  # byte for byte: status line, every header in order, body
    assert b"\r\nServer:" not in fast[0]  # neither path names aiohttp's or Python's version
    refused_target = fast[0].startswith(b"HTTP/1.1 400")
    assert bool(FAST_ANSWERS[fast_port]) is not refused_target  # a refused target is left to the ordinary path
    assert len(seen) == 2 and seen[0].status == int(fast[0].split()[1])  # observers see fast answers too


async def test_pipelined_requests_are_answered_in_order(proxies: tuple[int, int, list[Outcome]]) -> None:
    fast_port, _, _ = proxies
    preflight = _request(Preflight(["https://app.example.com"], ["PUT"]))
    refused = _request(Preflight(["https://evil.example.net"], ["PUT"]))
    plain_get = b"GET /x HTTP/1.1\r\nHost: a\r\nOrigin: https://app.example.com\r\n\r\n"  # upstream is down: 502
    answers = await _exchange(fast_port, preflight + plain_get + refused + preflight, responses=4)
    assert [status.split()[1] for status, _, _ in answers] == [b"204", b"502", b"403", b"204"]
    assert answers[1][1]["Access-Control-Allow-Origin"] == "https://app.example.com"


async def test_keep_alive_survives_fast_answers(tmp_path: Path) -> None:
    """The header-read timer must not treat an answered, idle keep-alive connection as a slow head."""
    data = {**CONFIG, "store": {"path": str(tmp_path / "db")}, "limits": {"header_read_timeout": 0.3}}
    async with serve_proxy(data) as proxy:
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
        request = _request(Preflight(["https://app.example.com"], ["PUT"]))
        for _ in range(3):
            writer.write(request)
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
            assert head.startswith(b"HTTP/1.1 204")
            await asyncio.sleep(0.5)  # longer than header_read_timeout, shorter than idle_timeout
        writer.close()
        await writer.wait_closed()


async def test_unusual_preflights_take_the_ordinary_path(proxies: tuple[int, int, list[Outcome]]) -> None:
    fast_port, _, _ = proxies
    http10 = b"OPTIONS /x HTTP/1.0\r\nOrigin: https://app.example.com\r\nAccess-Control-Request-Method: PUT\r\n\r\n"
    ((status, headers, _),) = await _exchange(fast_port, http10)
    assert status.startswith(b"HTTP/1.0 204") and not FAST_ANSWERS[fast_port]  # aiohttp answered it
    close = _request(Preflight(["https://app.example.com"], ["PUT"])).replace(
        b"\r\n\r\n", b"\r\nConnection: close\r\n\r\n"
    )
    ((status, headers, _),) = await _exchange(fast_port, close)
    assert status.startswith(b"HTTP/1.1 204") and headers.get("Connection") == "close"


async def test_preflight_with_upgrade_or_expect_takes_the_ordinary_path(
    proxies: tuple[int, int, list[Outcome]],
) -> None:
    fast_port, _, _ = proxies
    preflight = _request(Preflight(["https://app.example.com"], ["PUT"]))
    upgrade = preflight.replace(b"\r\n\r\n", b"\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n")
    answers = await _exchange(fast_port, upgrade + preflight, responses=2)
    assert [status.split()[1] for status, _, _ in answers] == [b"204", b"204"]  # the second is not wedged
    expect = preflight.replace(b"\r\n\r\n", b"\r\nExpect: teapot\r\n\r\n")
    ((status, headers, _),) = await _exchange(fast_port, expect)
    assert status.split()[1] == b"417" and headers["Vary"] == "Origin"


async def test_fast_path_respects_write_backpressure(proxies: tuple[int, int, list[Outcome]]) -> None:
    """A client that pipelines preflights and never reads must not make the server buffer without bound."""
    fast_port, _, _ = proxies
    preflight = _request(Preflight(["https://app.example.com"], ["PUT"]))
    _reader, writer = await asyncio.open_connection("127.0.0.1", fast_port)
    writer.transport.set_write_buffer_limits(high=1 << 20)
    sent = 0
    try:
        for _ in range(400):  # bounded: at most ~20 MB offered
            writer.write(preflight * 500)
            sent += len(preflight) * 500
            try:
                await asyncio.wait_for(writer.drain(), 0.2)
            except TimeoutError:
                break  # the server stopped reading: backpressure reached the client
        assert sent < 16 << 20, "the server kept reading while its answers piled up unread"
    finally:
        writer.transport.abort()


async def test_oversized_preflight_head_gets_431_on_both_paths(proxies: tuple[int, int, list[Outcome]]) -> None:
    fast_port, plain_port, _ = proxies
    big = _request(Preflight(["https://app.example.com"], ["PUT"])).replace(
        b"\r\n\r\n", b"\r\nX-Big: " + b"a" * 20000 + b"\r\n\r\n"
    )
    for port in (fast_port, plain_port):
        ((status, headers, _),) = await _exchange(port, big)
        assert status.split()[1] == b"431"
        assert headers["Access-Control-Allow-Origin"] == "https://app.example.com"


@pytest.fixture
async def based_proxies(tmp_path: Path) -> AsyncIterator[tuple[int, int]]:
    """The decision-table config with an upstream base path, served with and without the fast path."""
    async with contextlib.AsyncExitStack() as stack:
        ports: list[int] = []
        for fast in (True, False):
            data = {
                **CONFIG,
                "store": {"path": str(tmp_path / f"db-{fast}")},
                "upstream": {"url": "http://127.0.0.1:9/base"},
            }
            proxy = await stack.enter_async_context(serve_proxy(data, fast_preflights=fast))
            ports.append(proxy.port)
            if fast:
                count_fast_answers(proxy.runner, proxy.port)
        yield ports[0], ports[1]


@pytest.mark.parametrize(
    ("path", "status"),
    [
        ("/../x", b"400"),
        ("/%2e%2e/x", b"400"),
        ("/..;/x", b"400"),
        ("/a/..\\..\\x", b"400"),
        ("/public/..;/x", b"400"),
        ("/api/x#frag", b"400"),
        ("/a/../x", b"204"),
        ("/x", b"204"),
    ],
)
@pytest.mark.parametrize("origin", ["https://app.example.com", "https://evil.example.net"])
async def test_hostile_targets_get_the_same_answer_on_both_paths(
    based_proxies: tuple[int, int], path: str, status: bytes, origin: str
) -> None:
    """First on a connection and later on it, fast path or not: one answer per request (a refused target is
    refused whichever path reads it)."""
    fast_port, plain_port = based_proxies
    warm = _request(Preflight(["https://app.example.com"], ["PUT"]))
    request = _request(Preflight([origin], ["PUT"], path=path))
    fast = await _raw_answers(fast_port, request + warm + request, 3)
    plain = await _raw_answers(plain_port, request + warm + request, 3)
    assert fast == plain
    assert fast[0] == fast[2]
    expected = status if status == b"400" or origin == "https://app.example.com" else b"403"
    assert fast[0].split()[1] == expected
    assert all(b"\r\nServer:" not in answer for answer in fast)
