"""Issue 4, hostile input and limits: smuggling probes over raw sockets, head/body limits, slow clients.

Each probe tries to make the upstream see something other than exactly one well-framed request (typically a second
request, ``/smuggled``, hidden in the first one's body). The proxy must refuse it with 400 or normalise it; the
assertions are on the bytes the raw upstream received.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import Callable
from typing import Any

import pytest

from tests.support.inprocess import running_proxy
from tests.support.net import raw_exchange
from tests.support.raw_upstream import RawUpstream

H = b"Host: p\r\n"
SMUGGLED = b"GET /smuggled HTTP/1.1\r\nHost: p\r\n\r\n"

PROBES: dict[str, bytes] = {
    "cl-te": b"POST / HTTP/1.1\r\n" + H + b"Content-Length: 6\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
    + SMUGGLED,
    "te-cl": b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\nContent-Length: 4\r\n\r\n"
    + b"%x\r\n" % len(SMUGGLED) + SMUGGLED + b"\r\n0\r\n\r\n",
    "cl-cl-conflict": b"POST / HTTP/1.1\r\n" + H + b"Content-Length: 0\r\nContent-Length: 37\r\n\r\n" + SMUGGLED,
    "cl-list": b"POST / HTTP/1.1\r\n" + H + b"Content-Length: 0, 37\r\n\r\n" + SMUGGLED,
    "cl-plus": b"POST / HTTP/1.1\r\n" + H + b"Content-Length: +37\r\n\r\n" + SMUGGLED,
    "cl-hex": b"POST / HTTP/1.1\r\n" + H + b"Content-Length: 0x25\r\n\r\n" + SMUGGLED,
    "te-chunked-identity": b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked, identity\r\n\r\n0\r\n\r\n"
    + SMUGGLED,
    "te-xchunked": b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: xchunked\r\n\r\n0\r\n\r\n" + SMUGGLED,
    "te-two-lines": b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\nTransfer-Encoding: identity\r\n\r\n"
    b"0\r\n\r\n" + SMUGGLED,
    "te-space-before-colon": b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding : chunked\r\n\r\n0\r\n\r\n" + SMUGGLED,
    "te-vertical-tab": b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding:\x0bchunked\r\n\r\n0\r\n\r\n" + SMUGGLED,
    "te-obs-fold": b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding:\r\n chunked\r\n\r\n0\r\n\r\n" + SMUGGLED,
    "te-http10": b"POST / HTTP/1.0\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n" + SMUGGLED,
    "obs-fold-other": b"GET / HTTP/1.1\r\n" + H + b"X-A: 1\r\n X-B: 2\r\n\r\n",
    "bare-lf-head": b"GET / HTTP/1.1\n" + H + b"X-A: 1\n\n",
    "bare-cr": b"GET / HTTP/1.1\r\n" + H + b"X-A: 1\rX-B: 2\r\n\r\n",
    "chunk-size-junk": b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\nzz\r\n" + SMUGGLED,
    "chunk-size-overflow": b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\n"
    b"10000000000000025\r\n" + SMUGGLED + b"\r\n0\r\n\r\n",
    "chunk-size-negative": b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\n-25\r\n" + SMUGGLED,
    "chunk-size-0x": b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\n0x25\r\n" + SMUGGLED,
    "chunk-bare-lf": b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\n3\nabc\n0\n\n" + SMUGGLED,
    "chunk-data-longer": b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\n1\r\nabc\r\n0\r\n\r\n"
    + SMUGGLED,
    # Head-only probes: a header injected through a lax line ending or fold must not appear at the upstream.
    "nul-in-header": b"GET / HTTP/1.1\r\n" + H + b"X-A: a\x00b\r\n\r\n",
    "space-in-name": b"GET / HTTP/1.1\r\n" + H + b"X A: 1\r\n\r\n",
    "two-hosts": b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
    "request-line-spaces": b"GET  /  HTTP/1.1\r\n" + H + b"\r\n",
    "http09": b"GET /\r\n\r\n",
}  # fmt: skip


def config(config_data: Callable[..., dict[str, Any]], port: int, **override: Any) -> dict[str, Any]:
    return config_data(upstream={"url": f"http://127.0.0.1:{port}"}, **override)


def statuses(answer: bytes) -> list[int]:
    """The status codes of every response in ``answer`` (aiohttp writes its own parse errors as HTTP/1.0)."""
    return [int(code) for code in re.findall(rb"HTTP/1\.[01] (\d{3}) ", answer)]


@pytest.mark.parametrize("name", list(PROBES))
async def test_smuggling_probe_never_reaches_upstream_as_two_requests(
    config_data: Callable[..., dict[str, Any]], name: str
) -> None:
    async with RawUpstream() as up, running_proxy(config(config_data, up.port)) as port:
        answer = await raw_exchange(port, PROBES[name], timeout=2)
        # The proxy is still healthy for the next client.
        after = await raw_exchange(port, b"GET /after HTTP/1.1\r\nHost: p\r\nConnection: close\r\n\r\n")
    assert after.startswith(b"HTTP/1.1 200")
    seen = [r for r in up.received if r.target != "/after"]
    codes = statuses(answer)
    assert all(r.target != "/smuggled" for r in seen), f"{name}: smuggled request reached upstream: {codes}"
    assert all(r.complete for r in seen), f"{name}: upstream saw a half request"
    assert len(seen) <= 1
    assert all(not r.values("X-B") for r in seen), f"{name}: a header was injected"
    if not seen:
        assert codes and codes[0] == 400, f"{name}: refused without a 400: {answer[:80]!r}"
    for request in seen:  # normalised: one request, exactly one framing header
        framing = request.values("Content-Length") + request.values("Transfer-Encoding")
        assert len(framing) <= 1
        assert request.values("Transfer-Encoding") in ([], ["chunked"])


async def test_duplicate_identical_content_length_is_one_request(config_data: Callable[..., dict[str, Any]]) -> None:
    probe = b"POST / HTTP/1.1\r\n" + H + b"Content-Length: 3\r\nContent-Length: 3\r\nConnection: close\r\n\r\nabc"
    async with RawUpstream() as up, running_proxy(config(config_data, up.port)) as port:
        answer = await raw_exchange(port, probe)
    assert statuses(answer)[:1] in ([200], [400])
    assert len(up.received) <= 1
    for request in up.received:
        assert request.values("Content-Length") == ["3"]
        assert request.body == b"abc"


async def test_chunked_body_broken_midway_never_completes_upstream(
    config_data: Callable[..., dict[str, Any]],
) -> None:
    """A valid start, then a bad chunk size: the upstream's request must stay incomplete (no terminating chunk)."""
    async with RawUpstream() as up, running_proxy(config(config_data, up.port)) as port:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\n4\r\nabcd\r\n")
        await writer.drain()
        for _ in range(50):  # bounded wait until the upstream has the head
            if up.connections:
                break
            await asyncio.sleep(0.05)
        writer.write(b"zz\r\n" + SMUGGLED)
        answer = await asyncio.wait_for(reader.read(), 10)
        writer.close()
        await asyncio.wait_for(up.connections[0].closed.wait(), 10)
    assert statuses(answer)[:1] in ([], [400])
    assert [r.complete for r in up.received] == [False]
    assert all(r.target != "/smuggled" for r in up.received)


@pytest.mark.parametrize(
    ("size", "status"),
    [(1000, 200), (3000, 431), (10000, 431)],
    ids=["under", "over-soft-limit", "over-parser-ceiling"],
)
async def test_header_too_large_is_431(config_data: Callable[..., dict[str, Any]], size: int, status: int) -> None:
    async with (
        RawUpstream() as up,
        running_proxy(config(config_data, up.port, limits={"max_header_size": 2048})) as port,
    ):
        answer = await raw_exchange(
            port, b"GET / HTTP/1.1\r\n" + H + b"X-Big: " + b"a" * size + b"\r\nConnection: close\r\n\r\n"
        )
    assert statuses(answer)[:1] == [status]
    assert len(up.received) == (1 if status == 200 else 0)


async def test_request_line_too_long_is_refused(config_data: Callable[..., dict[str, Any]]) -> None:
    async with (
        RawUpstream() as up,
        running_proxy(config(config_data, up.port, limits={"max_header_size": 2048})) as port,
    ):
        answer = await raw_exchange(port, b"GET /" + b"a" * 3000 + b" HTTP/1.1\r\n" + H + b"Connection: close\r\n\r\n")
    assert statuses(answer)[:1] == [414]
    assert up.received == []


async def test_declared_body_over_limit_is_413_before_upstream(config_data: Callable[..., dict[str, Any]]) -> None:
    async with RawUpstream() as up, running_proxy(config(config_data, up.port, limits={"max_body_size": 1000})) as port:
        answer = await raw_exchange(port, b"POST / HTTP/1.1\r\n" + H + b"Content-Length: 1001\r\n\r\n" + b"x" * 1001)
        fine = await raw_exchange(
            port, b"POST / HTTP/1.1\r\n" + H + b"Content-Length: 1000\r\nConnection: close\r\n\r\n" + b"x" * 1000
        )
    assert statuses(answer)[:1] == [413]
    assert statuses(fine)[:1] == [200]
    assert [len(r.body) for r in up.received] == [1000]


async def test_chunked_body_over_limit_is_cut_and_413(config_data: Callable[..., dict[str, Any]]) -> None:
    """No Content-Length to check up front: the stream is counted, the upstream request cut, the client told 413."""
    async with (
        RawUpstream() as up,
        running_proxy(config(config_data, up.port, limits={"max_body_size": 100_000})) as port,
    ):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"POST /big HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\n")
        chunk = b"%x\r\n" % 10_000 + b"y" * 10_000 + b"\r\n"
        with contextlib.suppress(ConnectionError):
            for _ in range(20):  # 200 kB, twice the limit
                writer.write(chunk)
                await writer.drain()
            writer.write(b"0\r\n\r\n")
            await writer.drain()
        answer = await asyncio.wait_for(reader.read(), 15)
        writer.close()
        for connection in up.connections:
            await asyncio.wait_for(connection.closed.wait(), 10)
    assert statuses(answer)[:1] == [413]
    assert all(not r.complete for r in up.received)
    assert all(len(r.body) <= 100_000 for r in up.received)


async def test_slow_header_client_is_cut_and_does_not_block_others(
    config_data: Callable[..., dict[str, Any]],
) -> None:
    limits = {"header_read_timeout": 1, "idle_timeout": 30}
    async with RawUpstream() as up, running_proxy(config(config_data, up.port, limits=limits)) as port:
        slow_reader, slow_writer = await asyncio.open_connection("127.0.0.1", port)
        slow_writer.write(b"GET /slow HTTP/1.1\r\n")
        # While the slow client dribbles, another client is served normally.
        ok = await raw_exchange(port, b"GET /fast HTTP/1.1\r\nHost: p\r\nConnection: close\r\n\r\n")
        assert ok.startswith(b"HTTP/1.1 200")
        closed = False
        for byte in b"Host: p\r\nX-Drip: " + b"d" * 100:  # one byte every 0.1 s: never a complete head
            try:
                slow_writer.write(bytes([byte]))
                await slow_writer.drain()
            except ConnectionError:
                closed = True
                break
            if slow_reader.at_eof():
                closed = True
                break
            with contextlib.suppress(TimeoutError):
                if await asyncio.wait_for(slow_reader.read(1), 0.1) == b"":
                    closed = True
                    break
        slow_writer.close()
    assert closed, "a client dribbling its head was never cut off"
    assert [r.target for r in up.received] == ["/fast"]


async def test_silent_connection_is_closed_after_header_read_timeout(
    config_data: Callable[..., dict[str, Any]],
) -> None:
    limits = {"header_read_timeout": 0.5, "idle_timeout": 30}
    async with RawUpstream() as up, running_proxy(config(config_data, up.port, limits=limits)) as port:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        assert await asyncio.wait_for(reader.read(), 10) == b""
        writer.close()


#: Answered by the forwarding and the preflight fast path: a connection that only ever saw fast answers is closed
#: when idle too (aiohttp 3.14.2 arms its idle close only after a response of its own).
IDLE_AFTER = {
    "forwarded": (b"GET / HTTP/1.1\r\nHost: p\r\n\r\n", b"ok", b"HTTP/1.1 200"),
    "preflight": (
        b"OPTIONS / HTTP/1.1\r\nHost: p\r\nOrigin: https://app.example.com\r\n"
        b"Access-Control-Request-Method: PUT\r\n\r\n",
        b"\r\n\r\n",
        b"HTTP/1.1 204",
    ),
}


@pytest.mark.parametrize("name", list(IDLE_AFTER))
async def test_idle_keepalive_connection_is_closed_after_idle_timeout(
    config_data: Callable[..., dict[str, Any]], name: str
) -> None:
    request, end, status = IDLE_AFTER[name]
    limits = {"header_read_timeout": 30, "idle_timeout": 0.5}
    async with RawUpstream() as up, running_proxy(config(config_data, up.port, limits=limits)) as port:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            for _ in range(2):  # the second on a connection takes the fast path whenever it can
                writer.write(request)
                answer = await asyncio.wait_for(reader.readuntil(end), 5)
                assert answer.startswith(status)
            assert await asyncio.wait_for(reader.read(), 10) == b""  # closed by the proxy, not by us
        finally:
            writer.close()
