"""The fast path holds a response head until the end of the upstream read it came in, so that a small response goes
to the client in one write. Holding it any longer would be a defect: a streamed response (server-sent events, a long
poll that sends its head first) must reach the client head first, before the upstream has sent any body byte."""

from __future__ import annotations

import asyncio
from pathlib import Path

from corsproxy.http.forward import Exchange
from tests.support.fwd import config_on, count_exchanges, request
from tests.support.inprocess import serve_proxy
from tests.support.raw_upstream import RawConnection, RawUpstream


async def test_a_head_sent_alone_reaches_the_client_before_any_body(tmp_path: Path) -> None:
    body_may_go = asyncio.Event()

    async def head_first(connection: RawConnection) -> None:
        while await connection.read_request() is not None:
            await connection.send(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nContent-Length: 5\r\n\r\n")
            await asyncio.wait_for(body_may_go.wait(), 10)
            await connection.send(b"data\n")

    taken: list[Exchange] = []
    async with RawUpstream(head_first) as upstream, serve_proxy(config_on(tmp_path, upstream.port, "h")) as proxy:
        count_exchanges(proxy.runner, taken)
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
        try:
            writer.write(request("GET", "/events"))
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)  # no body byte has been sent yet
            assert head.startswith(b"HTTP/1.1 200 OK\r\n")
            body_may_go.set()
            assert await asyncio.wait_for(reader.readexactly(5), 5) == b"data\n"
        finally:
            body_may_go.set()
            writer.close()
            await writer.wait_closed()
    assert len(taken) == 1
