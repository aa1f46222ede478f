"""The forwarding fast path keeps what it works out per request head (decision, CORS headers, the upstream head);
that must follow the origin set exactly like the decision cache does: a write (add, revoke) and an entry's expiry
change the very next forwarded response on the same keep-alive connection, which still comes from the fast path —
and so must a reload that changes what the upstream is sent."""

from __future__ import annotations

import asyncio
from pathlib import Path

from corsproxy.config import parse_config
from corsproxy.http.app import STATE
from corsproxy.http.forward import Exchange
from tests.support import changes
from tests.support.fwd import config_on, count_exchanges
from tests.support.inprocess import serve_proxy
from tests.support.raw_upstream import RawConnection, RawUpstream

ORIGIN = "https://tenant.example.net"
GET = f"GET /v1/items HTTP/1.1\r\nHost: api.example.com\r\nOrigin: {ORIGIN}\r\n\r\n".encode()


async def answer_all(connection: RawConnection) -> None:
    while await connection.read_request() is not None:
        await connection.send(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")


async def _allowed(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
    """One GET on the connection: whether its response lets the origin read it."""
    writer.write(GET)
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    await asyncio.wait_for(reader.readexactly(2), 5)
    assert head.startswith(b"HTTP/1.1 200 ")
    return f"\r\nAccess-Control-Allow-Origin: {ORIGIN}\r\n".encode() in head


async def test_cached_plans_follow_writes_and_expiry(tmp_path: Path) -> None:
    taken: list[Exchange] = []
    async with RawUpstream(answer_all) as upstream, serve_proxy(config_on(tmp_path, upstream.port, "p")) as proxy:
        count_exchanges(proxy.runner, taken)
        store = proxy.state.store
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
        try:
            seen = []
            expires = None
            for change in changes.CHANGES:
                expires = changes.apply(store, ORIGIN, change) or expires
                before = len(taken)
                seen.append(await _allowed(reader, writer))
                assert len(taken) == before + 1  # forwarded by the fast path, from its cache or not
            assert seen == [False, True, True, False, False, True]
            assert expires is not None
            await changes.until_past(expires)
            before = len(taken)
            assert not await _allowed(reader, writer)  # no write happened: only the expiry changed the answer
            assert len(taken) == before + 1
        finally:
            writer.close()
            await writer.wait_closed()


async def test_a_new_configuration_changes_the_next_upstream_head(tmp_path: Path) -> None:
    """The upstream head is kept per request head too: a configuration with another upstream Host must be used by
    the very next request (the ordinary reload swaps ``ProxyState.config``)."""
    taken: list[Exchange] = []
    async with RawUpstream(answer_all) as upstream:
        data = config_on(tmp_path, upstream.port, "c")
        async with serve_proxy(data) as proxy:
            count_exchanges(proxy.runner, taken)
            reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
            try:
                await _allowed(reader, writer)
                state = proxy.app[STATE]
                changed = {**data, "forwarding": {"preserve_host": True}}
                state.config = parse_config(changed, env={})
                await _allowed(reader, writer)
            finally:
                writer.close()
                await writer.wait_closed()
    hosts = [received.values("Host") for received in upstream.received]
    assert hosts == [[f"127.0.0.1:{upstream.port}"], ["api.example.com"]]
    assert len(taken) == 2
