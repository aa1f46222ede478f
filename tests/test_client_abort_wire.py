"""A client that goes away mid-response is an everyday event: no error-level traceback ("Cannot write to closing
transport"), one debug line at most, and the request is counted as a client abort (499) like any other."""

from __future__ import annotations

import asyncio
import logging
import socket
import struct
from pathlib import Path

import pytest

from corsproxy.core.outcome import Outcome
from tests.support.config import BASE_CONFIG, merge
from tests.support.inprocess import serve_proxy
from tests.support.raw_upstream import RawConnection, RawUpstream


async def test_client_reset_while_its_answer_is_written_is_no_error(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    started = asyncio.Event()

    async def slow_body(connection: RawConnection) -> None:
        await connection.read_request()
        await connection.send(b"HTTP/1.1 200 OK\r\nContent-Length: 1000000\r\n\r\nfirst")
        started.set()
        await connection.closed.wait()  # the test writes the rest itself

    caplog.set_level(logging.DEBUG)
    async with RawUpstream(slow_body) as upstream:
        data = merge(
            BASE_CONFIG,
            {"store": {"path": str(tmp_path / "db")}, "upstream": {"url": f"http://127.0.0.1:{upstream.port}"}},
        )
        async with serve_proxy(data) as proxy:
            seen: list[Outcome] = []
            proxy.state.observers.append(seen.append)
            loop = asyncio.get_running_loop()
            client = socket.socket()
            client.setblocking(False)
            try:
                await loop.sock_connect(client, ("127.0.0.1", proxy.port))
                await loop.sock_sendall(
                    client, b"GET /big HTTP/1.1\r\nHost: a\r\nOrigin: https://app.example.com\r\n\r\n"
                )
                received = b""
                while b"first" not in received:
                    received += await asyncio.wait_for(loop.sock_recv(client, 65536), 5)
                await asyncio.wait_for(started.wait(), 5)
                # In one step, with nothing run in between: more body arrives from the upstream, then the client resets
                # its connection. The proxy's loop sees both in one poll, the body first, so the relay writes to a
                # transport that is already closing (the connection-lost callback has not run yet).
                upstream.connections[0].writer.write(b"x" * 1000)
                client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                client.close()
                for _ in range(200):  # bounded: until the proxy has finished the request
                    if seen:
                        break
                    await asyncio.sleep(0.01)
            finally:
                client.close()
    assert [outcome.status for outcome in seen] == [499]
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]
    assert errors == [], [r.getMessage() for r in errors]
