"""Issue 4, upstream faults: refused, silent, lying and dying upstreams; pool limits and an upstream restart."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import aiohttp
import pytest

from tests.support.inprocess import running_proxy
from tests.support.net import raw_exchange
from tests.support.raw_upstream import OK, RawConnection, RawUpstream

GET = b"GET /x HTTP/1.1\r\nHost: p\r\nConnection: close\r\n\r\n"


def config(config_data: Callable[..., dict[str, Any]], port: int, **upstream: Any) -> dict[str, Any]:
    return config_data(upstream={"url": f"http://127.0.0.1:{port}", **upstream})


def scripted(*replies: bytes, then_close: bool = True) -> Callable[[RawConnection], Any]:
    """Read one request, send ``replies`` in order, then close (or hold the connection open until the peer leaves)."""

    async def handler(connection: RawConnection) -> None:
        if await connection.read_request() is None:
            return
        for reply in replies:
            await connection.send(reply)
        if not then_close:
            await connection.reader.read()  # returns when the proxy closes its side

    return handler


async def healthy_after(port: int) -> None:
    """corsproxy keeps serving: a new request on a new connection gets an answer (here the failing upstream's)."""
    answer = await raw_exchange(port, GET)
    assert answer.startswith(b"HTTP/1.")


async def test_connection_refused_is_502_and_service_continues(config_data: Callable[..., dict[str, Any]]) -> None:
    async with running_proxy(config(config_data, 9)) as port:
        for _ in range(3):
            answer = await raw_exchange(port, GET)
            assert answer.startswith(b"HTTP/1.1 502")


async def test_silent_upstream_is_504(config_data: Callable[..., dict[str, Any]]) -> None:
    async with (
        RawUpstream(scripted(then_close=False)) as up,
        running_proxy(config(config_data, up.port, read_timeout=0.5)) as port,
    ):
        answer = await raw_exchange(port, GET)
        assert answer.startswith(b"HTTP/1.1 504")
        await healthy_after(port)


BAD_REPLIES = {
    "not-http": b"SSH-2.0-OpenSSH_9.0\r\n\r\n",
    "bad-status": b"HTTP/1.1 2x0 OK\r\nContent-Length: 0\r\n\r\n",
    "two-content-lengths": b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\nokk",
    "cl-and-te": b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n",
    "bad-header": b"HTTP/1.1 200 OK\r\nBad Header\r\nContent-Length: 2\r\n\r\nok",
    "closed-before-reply": b"",
}


@pytest.mark.parametrize("name", list(BAD_REPLIES))
async def test_invalid_upstream_reply_is_502(config_data: Callable[..., dict[str, Any]], name: str) -> None:
    async with RawUpstream(scripted(BAD_REPLIES[name])) as up, running_proxy(config(config_data, up.port)) as port:
        answer = await raw_exchange(port, GET)
        assert answer.startswith(b"HTTP/1.1 502"), answer[:100]
        await healthy_after(port)


@pytest.mark.parametrize(
    "partial",
    [
        b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n" + b"x" * 50,
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n32\r\n" + b"x" * 50 + b"\r\n",
    ],
    ids=["content-length", "chunked"],
)
async def test_upstream_dying_mid_response_aborts_the_client(
    config_data: Callable[..., dict[str, Any]], partial: bytes
) -> None:
    """Never a hang, never a truncated body presented as complete."""
    async with RawUpstream(scripted(partial)) as up, running_proxy(config(config_data, up.port)) as port:
        async with aiohttp.ClientSession() as session:
            with pytest.raises(aiohttp.ClientPayloadError):
                async with session.get(f"http://127.0.0.1:{port}/x") as response:
                    assert response.status == 200
                    await asyncio.wait_for(response.read(), 10)
        raw = await raw_exchange(port, GET)
        head, _, body = raw.partition(b"\r\n\r\n")
        if b"content-length: 100" in head.lower():
            assert len(body) < 100
        else:
            assert not body.endswith(b"0\r\n\r\n")  # no last-chunk: the client knows it is incomplete
        await healthy_after(port)


async def test_upstream_restart_mid_run(config_data: Callable[..., dict[str, Any]]) -> None:
    """Pooled keep-alive connections to a restarted upstream are dropped, not reused into 502s."""
    first = await RawUpstream().start()
    port_number = first.port
    async with running_proxy(config(config_data, port_number)) as port, aiohttp.ClientSession() as session:
        url = f"http://127.0.0.1:{port}/x"
        for _ in range(3):
            async with session.get(url) as response:
                assert response.status == 200
        assert len(first.connections) == 1  # pooled: one upstream connection served all three
        await first.stop()
        async with session.get(url) as response:
            assert response.status == 502  # down is down
        second = await RawUpstream(port=port_number).start()
        try:
            statuses = []
            for _ in range(5):
                async with session.get(url) as response:
                    statuses.append(response.status)
                    await response.read()
            assert statuses == [200] * 5
            assert len(second.received) == 5
        finally:
            await second.stop()


async def test_max_upstream_connections_bounds_the_pool(config_data: Callable[..., dict[str, Any]]) -> None:
    release = asyncio.Event()

    async def held(connection: RawConnection) -> None:
        while await connection.read_request() is not None:
            await release.wait()
            await connection.send(OK)

    async with RawUpstream(held) as up:
        data = config(config_data, up.port, connect_timeout=20)
        data["limits"] = {"max_upstream_connections": 2}
        async with running_proxy(data) as port, aiohttp.ClientSession() as session:

            async def one() -> int:
                async with session.get(f"http://127.0.0.1:{port}/x") as response:
                    await response.read()
                    return response.status

            tasks = [asyncio.create_task(one()) for _ in range(6)]
            for _ in range(100):  # bounded: until the pool is full
                if len(up.received) >= 2:
                    break
                await asyncio.sleep(0.02)
            await asyncio.sleep(0.2)
            assert up.active == 2  # the other four wait for a pooled connection
            release.set()
            assert await asyncio.gather(*tasks) == [200] * 6
    assert up.max_active == 2


async def test_full_pool_waits_at_most_connect_timeout_then_504(config_data: Callable[..., dict[str, Any]]) -> None:
    release = asyncio.Event()

    async def held(connection: RawConnection) -> None:
        while await connection.read_request() is not None:
            await release.wait()
            await connection.send(OK)

    async with RawUpstream(held) as up:
        data = config(config_data, up.port, connect_timeout=0.3)
        data["limits"] = {"max_upstream_connections": 1}
        async with running_proxy(data) as port, aiohttp.ClientSession() as session:
            url = f"http://127.0.0.1:{port}/x"
            first = asyncio.create_task(session.get(url))
            for _ in range(100):
                if up.received:
                    break
                await asyncio.sleep(0.02)
            async with session.get(url) as second:
                assert second.status == 504  # no free pooled connection within connect_timeout
            release.set()
            response = await first
            assert response.status == 200
            response.release()
    assert up.max_active == 1


async def test_first_byte_reaches_client_before_upstream_finishes(
    config_data: Callable[..., dict[str, Any]],
) -> None:
    finish = asyncio.Event()

    async def drip(connection: RawConnection) -> None:
        await connection.read_request()
        await connection.send(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n6\r\nfirst\n\r\n")
        await finish.wait()  # the rest only once the client has proven it already got the first chunk
        await connection.send(b"5\r\nlast\n\r\n0\r\n\r\n")

    async with RawUpstream(drip) as up, running_proxy(config(config_data, up.port)) as port:
        loop = asyncio.get_running_loop()
        started = loop.time()
        async with aiohttp.ClientSession() as session, session.get(f"http://127.0.0.1:{port}/x") as response:
            first = await asyncio.wait_for(response.content.readuntil(b"\n"), 10)
            time_to_first_byte = loop.time() - started
            assert first == b"first\n"
            finish.set()
            assert await asyncio.wait_for(response.content.read(), 10) == b"last\n"
    print(f"time from request to first chunk through the proxy: {time_to_first_byte * 1000:.1f} ms")


async def test_client_disconnect_cancels_upstream_request(config_data: Callable[..., dict[str, Any]]) -> None:
    async def endless(connection: RawConnection) -> None:
        await connection.read_request()
        await connection.send(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n6\r\nfirst\n\r\n")
        await connection.reader.read()  # wait for the proxy to hang up; never send more

    async with RawUpstream(endless) as up, running_proxy(config(config_data, up.port, read_timeout=60)) as port:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /stream HTTP/1.1\r\nHost: p\r\n\r\n")
        await asyncio.wait_for(reader.readuntil(b"first\n"), 10)
        writer.close()  # the client goes away mid-response
        await asyncio.wait_for(up.connections[0].closed.wait(), 10)  # ... and the upstream sees it, not after 60 s
        assert up.active == 0


async def test_client_disconnect_while_upstream_thinks(config_data: Callable[..., dict[str, Any]]) -> None:
    """Before the response head: the pending upstream request is cancelled too."""

    async with (
        RawUpstream(scripted(then_close=False)) as up,
        running_proxy(config(config_data, up.port, read_timeout=60)) as port,
    ):
        _, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /think HTTP/1.1\r\nHost: p\r\n\r\n")
        for _ in range(100):
            if up.received:
                break
            await asyncio.sleep(0.02)
        writer.close()
        await asyncio.wait_for(up.connections[0].closed.wait(), 10)
