"""A raw asyncio upstream for forwarding tests: records the exact bytes each connection delivers and answers with
whatever bytes a test scripts, including answers no real HTTP server would give.

Real sockets on loopback, no HTTP library on this side: what the proxy sent is what ``received`` holds.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from corsproxy.config import parse_config
from corsproxy.http.app import create_app
from corsproxy.http.protocol import ProxyRunner

__all__ = ["OK", "RawConnection", "RawUpstream", "Received", "raw_exchange", "running_proxy"]

OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


@dataclass
class Received:
    """One request as the upstream read it off the wire."""

    head: bytes  # request line and header lines, up to and including the blank line
    body: bytes  # the body with its framing removed
    wire: bytes  # head plus the body exactly as framed on the wire
    complete: bool  # False when the connection ended before the framing said the request was over

    @property
    def request_line(self) -> str:
        return self.head.split(b"\r\n", 1)[0].decode("latin-1")

    @property
    def target(self) -> str:
        return self.request_line.split(" ")[1]

    @property
    def headers(self) -> list[tuple[str, str]]:
        lines = self.head.decode("latin-1").split("\r\n")[1:]
        return [(n, v.strip()) for n, _, v in (line.partition(":") for line in lines if line)]

    def values(self, name: str) -> list[str]:
        return [v for n, v in self.headers if n.lower() == name.lower()]


@dataclass
class RawConnection:
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    upstream: RawUpstream
    closed: asyncio.Event = field(default_factory=asyncio.Event)

    async def read_request(self) -> Received | None:
        """Read one HTTP/1.1 request (Content-Length or chunked framing); None at a clean end of the connection."""
        try:
            head = await self.reader.readuntil(b"\r\n\r\n")
        except asyncio.IncompleteReadError as exc:
            if exc.partial:
                self.upstream.received.append(Received(exc.partial, b"", exc.partial, False))
            return None
        lower = head.lower()
        wire = bytearray(head)
        body = bytearray()
        complete = True
        try:
            if b"\r\ntransfer-encoding: chunked\r\n" in lower:
                while True:
                    size_line = await self.reader.readuntil(b"\r\n")
                    wire += size_line
                    size = int(size_line.split(b";")[0], 16)
                    data = await self.reader.readexactly(size + 2)
                    wire += data
                    body += data[:-2]
                    if size == 0:
                        break
            else:
                for line in lower.split(b"\r\n"):
                    if line.startswith(b"content-length:"):
                        data = await self.reader.readexactly(int(line.split(b":")[1]))
                        wire += data
                        body += data
                        break
        except asyncio.IncompleteReadError as exc:
            wire += exc.partial
            complete = False
        except (ValueError, asyncio.LimitOverrunError):
            complete = False
        received = Received(bytes(head), bytes(body), bytes(wire), complete)
        self.upstream.received.append(received)
        return received if complete else None

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()


Handler = Callable[[RawConnection], Awaitable[None]]


async def answer_ok(connection: RawConnection) -> None:
    """The default: answer every request with a 2-byte 200, keep-alive."""
    while await connection.read_request() is not None:
        await connection.send(OK)


class RawUpstream:
    """``async with RawUpstream(handler) as up``: listening on ``up.port`` until the block ends."""

    def __init__(self, handler: Handler = answer_ok, port: int = 0) -> None:
        self.handler = handler
        self.port = port
        self.received: list[Received] = []
        self.connections: list[RawConnection] = []
        self.active = 0
        self.max_active = 0
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> RawUpstream:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", self.port)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def stop(self) -> None:
        """Stop listening and cut every open connection (an upstream restart, from the proxy's point of view)."""
        if self._server is not None:
            self._server.close()
            for connection in self.connections:
                connection.writer.transport.abort()
            await self._server.wait_closed()
            self._server = None
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def __aenter__(self) -> RawUpstream:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        connection = RawConnection(reader, writer, self)
        self.connections.append(connection)
        self.active += 1
        self.max_active = max(self.max_active, self.active)
        try:
            await self.handler(connection)
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.CancelledError):
            # CancelledError: stop() ends handlers that wait on a test's event; the task then ends normally,
            # which keeps asyncio's stream callback from reporting the cancellation as an error.
            pass
        finally:
            self.active -= 1
            connection.closed.set()
            writer.close()
            self._tasks.discard(task)


async def raw_exchange(port: int, data: bytes, timeout: float = 5.0) -> bytes:
    """Send raw bytes to ``127.0.0.1:port`` and read until the peer closes (or ``timeout``): the client side of a
    smuggling probe."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        await writer.drain()
        chunks = bytearray()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while (left := deadline - loop.time()) > 0:
            try:
                chunk = await asyncio.wait_for(reader.read(65536), left)
            except (TimeoutError, ConnectionError):
                break
            if not chunk:
                break
            chunks += chunk
        return bytes(chunks)
    finally:
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()


@contextlib.asynccontextmanager
async def running_proxy(config: dict[str, Any]) -> AsyncIterator[int]:
    """The real proxy, served by :class:`ProxyRunner` (header-read timeout included) on a loopback port."""
    runner = ProxyRunner(create_app(parse_config(config, env={})), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        yield runner.addresses[0][1]
    finally:
        await runner.cleanup()
