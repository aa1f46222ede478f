"""corsproxy's own keep-alive connections to the one upstream: an asyncio protocol per connection, a bounded pool.

Owns connecting (``upstream.connect_timeout``, TLS with ``upstream.ca_bundle``), the pool bound
(``limits.max_upstream_connections``; waiting for a free slot counts against the connect timeout, as on the ordinary
path), the idle close, and parsing response heads and bodies with httptools (llhttp, the C parser Node.js uses). The
parser calls back as bytes arrive, so a response body is relayed from inside ``data_received`` — no buffer, no task
switch per chunk. What a response *means* (which headers go to the client, the CORS headers) is the forwarder's
(:mod:`corsproxy.http.forward`); this module only moves and frames bytes. It uses no aiohttp private name.
"""

from __future__ import annotations

import asyncio
import collections
import ssl
from typing import Protocol, cast

import httptools

__all__ = ["ResponseSink", "UpstreamConnection", "UpstreamPool"]

#: Seconds a pooled connection may sit idle before corsproxy closes it (aiohttp's connector default: most upstreams
#: close theirs after 60-75 s, so reusing a connection idle longer than this would race the upstream's close). The
#: check runs on a timer that is re-armed only when it fires, so a connection is closed 15-30 s after its last use.
IDLE_CLOSE = 15.0
#: Response head limits, aiohttp's client defaults (the ordinary path answers 502 past them): a header line's name and
#: value together, the status line's reason, and the number of header lines.
MAX_FIELD = 8190
MAX_HEADERS = 128
#: Bytes a response head (interim responses included) may take before it is refused: httptools gathers a header
#: value until the line ends, so the per-line check alone would not bound what an upstream makes the proxy hold.
MAX_HEAD = (MAX_HEADERS + 2) * (MAX_FIELD + 4)


class ResponseSink(Protocol):
    """What a connection reports to the exchange that is using it (the forwarder's exchange)."""

    def response_head(self, status: int, reason: bytes, headers: list[tuple[bytes, bytes]]) -> None: ...

    def response_body(self, data: bytes) -> None: ...

    def response_flush(self) -> None: ...  # one read from the upstream is handed over: write what is held

    def response_end(self) -> None: ...

    def upstream_failed(self, exc: BaseException | None) -> None: ...

    def upstream_writable(self) -> None: ...

    def upstream_timed_out(self) -> None: ...


class UpstreamConnection(asyncio.Protocol):
    """One connection to the upstream; carries one exchange at a time (no pipelining towards the upstream)."""

    def __init__(self, pool: UpstreamPool) -> None:
        self.pool = pool
        self.transport: asyncio.Transport | None = None
        self.sink: ResponseSink | None = None
        self.reused = False  # it served a response before: the upstream may have closed it meanwhile
        self.received_any = False  # a byte of the current response arrived
        self.last_read = 0.0  # loop time of the last byte from the upstream (the read timeout runs from it)
        self.writing_paused = False
        self.reading_paused = False  # for a client that does not keep up: not the upstream's fault, no timeout
        self.read_timeout = 0.0
        self._idle_since = 0.0
        # One timer per connection, re-armed only when it fires (not per request): it checks the read timeout while
        # an exchange runs, and the idle close while the connection is pooled.
        self._watch_handle: asyncio.TimerHandle | None = None
        self._watch_due = 0.0
        self._parser = httptools.HttpResponseParser(self)
        self._reason = b""
        self._headers: list[tuple[bytes, bytes]] = []
        self._status = 0
        self._head_done = False
        self._until_eof = False  # the response has neither Content-Length nor chunked framing: it ends at close
        self._skip_body = False  # a response to HEAD: no body follows whatever its head says
        self._done = False
        self._head_bytes = 0  # bytes read of the current response before its head completed

    # asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # Not an isinstance check: uvloop's transports (the event loop `corsproxy serve` runs when it is installed)
        # have asyncio.Transport's methods without subclassing it.
        self.transport = cast(asyncio.Transport, transport)

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        self._unwatch()
        self.pool.forget(self)
        sink, self.sink = self.sink, None
        if sink is None:
            return
        if self._head_done and self._until_eof and exc is None and not self._done:
            self._done = True
            sink.response_end()  # a close-delimited body (RFC 9112 §6.3 item 8) ended normally
            return
        sink.upstream_failed(exc)

    def data_received(self, data: bytes) -> None:
        self.received_any = True
        self.last_read = self.pool.loop.time()
        if self.sink is None:
            # Bytes nobody asked for (after a response, or on an idle connection): the connection's framing cannot
            # be trusted any more.
            self.close()
            return
        try:
            if not self._head_done:
                self._head_bytes += len(data)
                if self._head_bytes > MAX_HEAD:
                    raise _Unexpected(f"a response head of more than {MAX_HEAD} bytes")
            self._parser.feed_data(data)
        except (httptools.HttpParserError, _Unexpected) as exc:
            if self.sink is not None and not self._done:
                sink, self.sink = self.sink, None
                sink.upstream_failed(exc)
            self.close()
            return
        sink = self.sink
        if sink is not None:
            sink.response_flush()

    def pause_writing(self) -> None:
        self.writing_paused = True

    def resume_writing(self) -> None:
        self.writing_paused = False
        if self.sink is not None:
            self.sink.upstream_writable()

    # httptools callbacks
    def on_message_begin(self) -> None:
        if self.sink is None or self._done:
            # Another message after the response ended, in the same read (a second response, a body longer than its
            # framing said, a body after a 204/304): the parser would carry it over to the next exchange, which then
            # reads the leftover as the start of its own response. The connection is dropped instead.
            raise _Unexpected("bytes after the end of the response")

    def on_status(self, status: bytes) -> None:
        self._reason += status
        if len(self._reason) > MAX_FIELD:
            raise _Unexpected(f"a status line over {MAX_FIELD} bytes")

    def on_header(self, name: bytes, value: bytes) -> None:
        if len(name) + len(value) > MAX_FIELD:
            raise _Unexpected(f"a response header line over {MAX_FIELD} bytes")
        self._headers.append((name, value))
        if len(self._headers) > MAX_HEADERS:
            raise _Unexpected(f"more than {MAX_HEADERS} response header lines")

    def on_headers_complete(self) -> None:
        status = self._parser.get_status_code()
        if 100 <= status < 200:
            # An interim response (100 Continue, 103 Early Hints): not relayed, as the ordinary path's client drops
            # it; the final response follows on the same connection.
            if status == 101:
                raise _Unexpected("101 Switching Protocols to a request that asked for no upgrade")
            self._reason = b""
            self._headers = []
            return
        self._head_done = True
        self._status = status
        framed = False
        for name, value in self._headers:
            lower = name.lower()
            if lower == b"content-length" or (lower == b"transfer-encoding" and b"chunked" in value.lower()):
                framed = True
        self._until_eof = not framed and status not in (204, 304)
        sink = self.sink
        if sink is not None:
            sink.response_head(status, self._reason, self._headers)
        if self._skip_body and self.sink is not None and (framed or self._until_eof):
            # httptools cannot be told that a response to HEAD has no body; a HEAD response whose head announces one
            # ends here and its connection is not reused (the parser would wait for body bytes that never come).
            self._until_eof = False
            self._end(reusable=False)

    def on_body(self, body: bytes) -> None:
        if self.sink is not None and not self._skip_body and not self._done:
            self.sink.response_body(body)

    def on_message_complete(self) -> None:
        if not self._head_done:
            return  # an interim response ended
        if not self._done:
            self._end(reusable=self._parser.should_keep_alive())

    def _end(self, reusable: bool) -> None:
        self._done = True
        sink, self.sink = self.sink, None
        self.reused = True
        if not reusable:
            self.close()
        if sink is not None:
            sink.response_end()
        if reusable:
            self.pool.release(self)

    # used by the forwarder
    def begin(self, sink: ResponseSink, head_request: bool, read_timeout: float) -> None:
        """Start an exchange: its response goes to ``sink``; ``read_timeout`` bounds each wait for upstream bytes."""
        self.sink = sink
        self.received_any = False
        self.last_read = self.pool.loop.time()
        self._reason = b""
        self._headers = []
        self._head_done = False
        self._until_eof = False
        self._done = False
        self._head_bytes = 0
        self._skip_body = head_request
        self.read_timeout = read_timeout
        if self.reading_paused:
            self.resume_reading()
        # At most IDLE_CLOSE ahead, so that the same timer, left armed, serves the idle close after this exchange.
        self._watch(min(read_timeout, IDLE_CLOSE) if read_timeout > 0 else IDLE_CLOSE)

    def write(self, data: bytes) -> None:
        if self.transport is not None:
            self.transport.write(data)

    def pause_reading(self) -> None:
        self.reading_paused = True
        if self.transport is not None:
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        self.reading_paused = False
        self.last_read = self.pool.loop.time()
        if self.transport is not None:
            self.transport.resume_reading()

    def close(self) -> None:
        """Drop the connection (the client left, the response broke, or it is not reusable)."""
        self.sink = None
        self._unwatch()
        if self.transport is not None:
            self.transport.abort()
            self.transport = None
        self.pool.forget(self)

    def park(self) -> None:
        """Idle in the pool: closed after :data:`IDLE_CLOSE` unless an exchange takes it."""
        self._idle_since = self.pool.loop.time()
        if self.reading_paused:
            # Paused for the previous exchange's slow client, and the response's end arrived in the same read: an
            # idle connection must read, or neither the upstream's close nor the next response would be seen.
            self.resume_reading()
        self._watch(IDLE_CLOSE)

    def _watch(self, delay: float) -> None:
        due = self.pool.loop.time() + delay
        if self._watch_handle is not None:
            if self._watch_due <= due:
                return  # it fires first and checks again
            self._watch_handle.cancel()
        self._watch_due = due
        self._watch_handle = self.pool.loop.call_at(due, self._watched)

    def _unwatch(self) -> None:
        if self._watch_handle is not None:
            self._watch_handle.cancel()
            self._watch_handle = None

    def _watched(self) -> None:
        self._watch_handle = None
        if self.transport is None:
            return
        now = self.pool.loop.time()
        sink = self.sink
        if sink is None:
            idle = now - self._idle_since
            if idle >= IDLE_CLOSE:
                self.close()
            else:
                self._watch(IDLE_CLOSE - idle)
            return
        if self.read_timeout <= 0:
            self._watch(IDLE_CLOSE)
            return
        waited = now - self.last_read
        if self.reading_paused:
            self._watch(min(self.read_timeout, IDLE_CLOSE))
        elif waited >= self.read_timeout:
            sink.upstream_timed_out()
        else:
            self._watch(min(self.read_timeout - waited, IDLE_CLOSE))


class _Unexpected(Exception):
    """An upstream message corsproxy does not relay (raised inside a parser callback, reported as a bad response)."""


class UpstreamPool:
    """Keep-alive connections to one upstream address, at most ``limit`` at once (0: no bound)."""

    def __init__(
        self, host: str, port: int, tls: ssl.SSLContext | None, limit: int, loop: asyncio.AbstractEventLoop
    ) -> None:
        self.host = host
        self.port = port
        self.tls = tls
        self.limit = limit
        self.loop = loop
        self._idle: collections.deque[UpstreamConnection] = collections.deque()
        self._open: set[UpstreamConnection] = set()
        self._connecting = 0
        self._waiters: collections.deque[asyncio.Future[None]] = collections.deque()
        self.closed = False

    def idle(self) -> UpstreamConnection | None:
        """A pooled connection ready for a request, or ``None`` (most recently used first: the warmest)."""
        idle = self._idle
        while idle:
            connection = idle.pop()
            if connection.transport is not None and not connection.transport.is_closing():
                return connection
        return None

    async def acquire(self, timeout: float) -> UpstreamConnection:
        """A pooled connection, or a new one; raises ``TimeoutError`` when none is free or connected in ``timeout``,
        ``OSError`` when connecting fails."""
        async with asyncio.timeout(timeout):
            while True:
                connection = self.idle()
                if connection is not None:
                    return connection
                if not self.limit or len(self._open) + self._connecting < self.limit:
                    break
                waiter = self.loop.create_future()
                self._waiters.append(waiter)
                try:
                    await waiter
                finally:
                    if waiter in self._waiters:
                        self._waiters.remove(waiter)
            self._connecting += 1
            try:
                _, protocol = await self.loop.create_connection(
                    lambda: UpstreamConnection(self),
                    self.host,
                    self.port,
                    ssl=self.tls,
                    server_hostname=self.host if self.tls is not None else None,
                )
            finally:
                self._connecting -= 1
                self._wake()
        if self.closed:
            protocol.close()
            raise ConnectionError("the proxy is stopping")
        self._open.add(protocol)
        return protocol

    def release(self, connection: UpstreamConnection) -> None:
        """A connection whose response ended cleanly goes back to the pool."""
        if self.closed or connection.transport is None or connection.transport.is_closing():
            connection.close()
            return
        connection.park()
        self._idle.append(connection)
        self._wake()

    def forget(self, connection: UpstreamConnection) -> None:
        if connection in self._open:
            self._open.discard(connection)
            self._wake()

    def _wake(self) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return

    def close(self) -> None:
        self.closed = True
        for connection in list(self._open):
            connection.close()
        self._idle.clear()
