"""The preflight fast path keeps serialised answers per request shape; they must follow the origin set exactly like
the decision cache does: a write (add, revoke) from any process and an entry's expiry change the very next answer,
on the same keep-alive connection, and the answer still comes from the fast path."""

from __future__ import annotations

import asyncio
from pathlib import Path

from tests.support import changes
from tests.support.decision_table import CONFIG
from tests.support.inprocess import serve_proxy
from tests.test_fast_preflight import FAST_ANSWERS, count_fast_answers

ORIGIN = "https://tenant.example.net"
PREFLIGHT = (
    f"OPTIONS /v1/items HTTP/1.1\r\nHost: api.example.com\r\nOrigin: {ORIGIN}\r\n"
    "Access-Control-Request-Method: PUT\r\n\r\n"
).encode()


async def _status(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> int:
    writer.write(PREFLIGHT)
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    length = next((int(line[15:]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length:")), 0)
    if length:
        await asyncio.wait_for(reader.readexactly(length), 5)
    return int(head.split()[1])


async def test_cached_fast_answers_follow_writes_and_expiry(tmp_path: Path) -> None:
    data = {**CONFIG, "store": {"path": str(tmp_path / "db")}}
    async with serve_proxy(data) as proxy:
        count_fast_answers(proxy.runner, proxy.port)
        store = proxy.state.store
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
        try:
            await _status(reader, writer)  # the first request of a connection may take either path
            fast = FAST_ANSWERS[proxy.port]
            statuses = []
            expires = None
            for change in changes.CHANGES:
                expires = changes.apply(store, ORIGIN, change) or expires
                before = len(fast)
                statuses.append(await _status(reader, writer))
                assert len(fast) == before + 1  # answered by the fast path, from its cache or not
            assert statuses == [403, 204, 204, 403, 403, 204]
            assert expires is not None
            await changes.until_past(expires)
            before = len(fast)
            assert await _status(reader, writer) == 403  # no write happened: only the expiry changed the answer
            assert len(fast) == before + 1
        finally:
            writer.close()
            await writer.wait_closed()
