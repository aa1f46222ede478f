"""The forwarding fast path: ordinary requests relayed from the connection protocol to a pooled upstream connection,
below aiohttp's request machinery (no ``web.Request``, no handler task for a body-less request, no client session).

The connection protocol (:mod:`corsproxy.http.protocol`) offers each complete request head to :class:`Forwarder`;
it takes only what the ordinary handler would forward unchanged — an HTTP/1.1 keep-alive request with an origin-form
target, a method in :data:`FORWARDED`, no ``Expect``, no upgrade, not preflight, not report-only, not blocked, not
refused by :func:`~corsproxy.http.app.refused_target`, within the head and body limits — and returns ``None`` for
anything else, which the ordinary handler then answers. The rules themselves are not restated here: the decision
comes from the same :class:`~corsproxy.core.decision.DecisionCache`, the upstream's header lines from
:func:`~corsproxy.core.forwarding.request_headers`, the client's from
:func:`~corsproxy.core.forwarding.response_headers`, :func:`~corsproxy.core.decision.actual_headers` and
:func:`~corsproxy.core.decision.merge_vary`; this module only writes them as the ordinary path's aiohttp writes them
(header order, framing, ``Date``), with the bytes received kept exactly (names' spelling, repeated lines, values).
"""

from __future__ import annotations

import asyncio
import http
import logging
import ssl
import time
from typing import TYPE_CHECKING, Any, NamedTuple, TypeVar

from aiohttp import web
from aiohttp.http_parser import RawRequestMessage
from aiohttp.streams import EMPTY_PAYLOAD, StreamReader

from corsproxy.core.answer import TEXT_PLAIN, error_answer
from corsproxy.core.decision import (
    CorsHeaders,
    CorsRequest,
    Decision,
    DecisionCache,
    Kind,
    Reason,
    actual_headers,
    merge_vary,
)
from corsproxy.core.forwarding import ForwardContext, host_header, request_headers, response_headers
from corsproxy.core.log_limit import PROXY_LINES
from corsproxy.core.settings import Config
from corsproxy.http.app import STATE, ProxyState, observe, oversized_head, peer, refused_target
from corsproxy.http.fastpath import DateLine, plain_message
from corsproxy.http.upstream import UpstreamConnection, UpstreamPool

if TYPE_CHECKING:
    from corsproxy.http.protocol import GuardedRequestHandler

__all__ = ["FORWARDED", "Exchange", "Forwarder"]

#: Request and response heads kept per forwarder (see Forwarder.__init__).
_HEADS_KEPT = 4096
#: Bytes of request heads the plans may keep in all (their targets and header lines, and the upstream heads made from
#: them), and in one plan: a head within the limits can be 128 lines of ``limits.max_header_size`` each, so a bound on
#: the count alone would let a client make a worker keep gigabytes. Heads clients repeat are a few KiB.
_PLAN_BYTES_KEPT = 1 << 24
_PLAN_BYTES_MAX = 1 << 16

log = logging.getLogger("corsproxy")

#: Methods the fast path forwards; anything else (TRACE, CONNECT, extension methods) takes the ordinary handler.
FORWARDED = frozenset({"GET", "HEAD", "DELETE", "POST", "PUT", "PATCH", "OPTIONS"})
#: Methods the ordinary path's client sends ``Content-Length: 0`` for when they carry no body (aiohttp: all but these).
_NO_LENGTH_WHEN_EMPTY = frozenset({"GET", "HEAD", "OPTIONS", "TRACE"})
#: Methods retried once on a fresh connection when a reused one turns out closed (RFC 9110 §9.2.2 idempotent).
_IDEMPOTENT = frozenset({"GET", "HEAD", "DELETE", "PUT", "OPTIONS"})


class Forwarder:
    """The forwarding fast path of one application; owns its upstream pool.

    What it works out for a request head — whether the fast path takes it, its decision and CORS headers, the request
    head for the upstream — is a pure function of the head's bytes, the connection's client address and scheme, the
    configuration and the origin set, and clients send the same heads request after request. So it is kept per head
    (a :class:`_Plan`), under the decision cache's rules: dropped when the configuration, the engine or the origin
    set's generation changes, not used past the matched entry's expiry, bounded in count and in bytes (cleared whole
    when full; a head too large to be one clients repeat is not kept).
    """

    def __init__(self, app: web.Application) -> None:
        self._app = app
        self._pool: UpstreamPool | None = None
        self._pool_key: tuple[Any, ...] | None = None
        self._pool_config: Config | None = None
        self.date_line = DateLine()  # called by the exchanges: the Date line of a response written now
        self._plans: dict[tuple[Any, ...], _Plan] = {}
        self._plans_bytes = 0  # see _PLAN_BYTES_KEPT
        self._response_heads: dict[tuple[Any, ...], tuple[bytes, bool, bool, bool]] = {}
        self._plans_config: Config | None = None  # what the plans were made against
        self._plans_decider: DecisionCache | None = None
        self._generation = -1

    def __call__(
        self, message: RawRequestMessage, payload: StreamReader, protocol: GuardedRequestHandler
    ) -> Exchange | None:
        method = message.method
        if method not in FORWARDED or not plain_message(message):
            return None
        state = self._app.get(STATE)
        if state is None:
            return None
        config = state.config
        pool = self._pool if config is self._pool_config else self._pool_for(config)
        if pool is None:
            return None
        started = time.monotonic()
        now = time.time()
        decider = state.decider()
        generation = state.store.generation()
        if config is not self._plans_config or decider is not self._plans_decider or generation != self._generation:
            self._plans.clear()
            self._plans_bytes = 0
            self._response_heads.clear()
            self._plans_config, self._plans_decider, self._generation = config, decider, generation
        has_body = payload is not EMPTY_PAYLOAD
        key = (method, message.path, message.raw_headers, message.chunked, has_body, protocol.forward_identity())
        plan = self._plans.get(key)
        if plan is None or now >= plan.until:
            plan = self._plan(message, state, config, decider, protocol, has_body, now)
            if plan.until > now:  # not what the decision cache does not memoise either (several Origin lines)
                self._keep(key, plan, message)
        if plan.head is None:
            return None
        return Exchange(self, state, pool, protocol, message, payload if has_body else None, plan.decision,
                        plan.cors_headers, plan.head, started)  # fmt: skip

    def _keep(self, key: tuple[Any, ...], plan: _Plan, message: RawRequestMessage) -> None:
        size = len(message.path) + len(plan.head or b"") + sum(len(name) + len(value) for name, value in key[2])
        if size > _PLAN_BYTES_MAX:
            return  # not a head clients repeat: made again if it comes again
        if len(self._plans) >= _HEADS_KEPT or self._plans_bytes + size > _PLAN_BYTES_KEPT:
            self._plans.clear()
            self._plans_bytes = 0
        self._plans[key] = plan
        self._plans_bytes += size

    def _plan(
        self,
        message: RawRequestMessage,
        state: ProxyState,
        config: Config,
        decider: DecisionCache,
        protocol: GuardedRequestHandler,
        has_body: bool,
        now: float,
    ) -> _Plan:
        """Whether the fast path takes this head (``head`` ``None``: the ordinary path answers it), and with what."""
        method, path, headers = message.method, message.path, message.headers
        if not path.startswith("/"):
            return _ORDINARY  # an absolute-form target: the ordinary path reduces it to path and query
        limits = config.limits
        if oversized_head(method, path, message.raw_headers, limits.max_header_size) is not None:
            return _ORDINARY  # 414/431 from the ordinary path
        asked = CorsRequest.from_fields(method, path, lambda name: headers.getall(name, ()))
        decision, cors_headers, until = decider.judge_until(asked, state.store, now)
        engine = decider.engine
        if (
            decision.kind is Kind.PREFLIGHT
            or engine.report_only(decision)
            or engine.blocks(decision, method)
            or refused_target(path, path, decision, config) is not None
        ):
            return _Plan(None, decision, cors_headers, until)
        if has_body and limits.max_body_size and not message.chunked:
            declared = headers.get("Content-Length")
            if declared is None or not declared.isdigit() or int(declared) > limits.max_body_size:
                # 413 (and the close that keeps the unread body from being parsed) from the ordinary path
                return _Plan(None, decision, cors_headers, until)
        head = _upstream_head(message, config, protocol, has_body)
        return _Plan(head, decision, cors_headers, until)

    def _pool_for(self, config: Config) -> UpstreamPool:
        upstream = config.upstream
        limit = config.limits.max_upstream_connections
        key = (upstream.scheme, upstream.host, upstream.port, upstream.ca_bundle, limit)
        self._pool_config = config
        pool = self._pool
        if pool is not None and key == self._pool_key:
            return pool
        if pool is not None:
            pool.close()  # a reload changed the upstream: new connections only
        tls: ssl.SSLContext | None = None
        if upstream.scheme == "https":
            tls = ssl.create_default_context(cafile=upstream.ca_bundle)
        self._pool = pool = UpstreamPool(
            upstream.host.strip("[]"), upstream.port, tls, limit, asyncio.get_running_loop()
        )
        self._pool_key = key
        return pool

    def response_head(
        self, method: str, status: int, reason: bytes, raw: list[tuple[bytes, bytes]], exchange: Exchange
    ) -> tuple[bytes, bool, bool, bool]:
        """The client's response head without ``Date``, whether a ``Date`` line must be added, whether the body is
        re-chunked and whether there is a body at all — cached per response head and decision."""
        cors = exchange.cors_headers
        if cors is None:
            return exchange.client_head(status, reason, raw)  # its CORS headers depend on this response's names
        key = (method, status, reason, tuple(raw), cors)
        made = self._response_heads.get(key)
        if made is None:
            made = _kept(self._response_heads, key, exchange.client_head(status, reason, raw))
        return made

    def close(self) -> None:
        if self._pool is not None:
            self._pool.close()
            self._pool = None
            self._pool_config = None


class _Plan(NamedTuple):
    """What the fast path does with one request head (see :class:`Forwarder`)."""

    head: bytes | None  # the request head for the upstream; None: the ordinary path answers
    decision: Decision
    cors_headers: CorsHeaders | None
    until: float  # not used from the cache at or after this time (the matched entry's expiry)


#: A head the ordinary path answers whatever the origin set holds (absolute-form target, oversized head).
_ORDINARY = _Plan(None, Decision(Kind.NON_CORS, Reason.NO_ORIGIN), None, float("inf"))


class Exchange:
    """One request forwarded on the fast path, from its head to the end of the upstream's response."""

    def __init__(
        self,
        forwarder: Forwarder,
        state: ProxyState,
        pool: UpstreamPool,
        protocol: GuardedRequestHandler,
        message: RawRequestMessage,
        payload: StreamReader | None,
        decision: Decision,
        cors_headers: CorsHeaders | None,
        head: bytes,
        started: float,
    ) -> None:
        self.forwarder = forwarder
        self.state = state
        self.pool = pool
        self.protocol = protocol
        self.message = message
        self.payload = payload
        self.decision = decision
        self.cors_headers = cors_headers
        self.head = head
        self.started = started
        self.method = message.method
        self.client = protocol.forward_identity()[0]
        self.connection: UpstreamConnection | None = None
        self.status = 0  # of the response head written to the client; 0 before
        self.relayed = 0
        self.latency: float | None = None
        self.error: str | None = None
        self.finished = False
        self._held = b""  # the response head, until the end of the upstream read it came in (see response_head)
        self._chunked_out = False
        self._body_out = True
        self._body_task: asyncio.Task[None] | None = None
        self._connect_task: asyncio.Task[None] | None = None
        self._body_sent = payload is None
        self._body_bytes = 0  # of the client's body, as received (before chunk framing)
        self._writable: asyncio.Future[None] | None = None
        self._upstream_paused = False
        self._retried = False
        upstream = state.config.upstream
        self._read_timeout = upstream.read_timeout
        self._connect_timeout = upstream.connect_timeout

    # start
    def start(self) -> None:
        connection = self.pool.idle()
        if connection is not None:
            self._send(connection)
        else:
            self._connect_task = self.pool.loop.create_task(self._connect())

    async def _connect(self) -> None:
        try:
            connection = await self.pool.acquire(self._connect_timeout)
        except TimeoutError:
            self._fail_before_head(504, "upstream timed out", "timeout", "upstream_timeout", "upstream timeout")
            return
        except OSError as exc:
            line = f"upstream unreachable: {exc}"
            self._fail_before_head(502, "upstream unreachable", "connect", "upstream_connect", line)
            return
        finally:
            self._connect_task = None
        if self.finished:
            self.pool.release(connection)
            return
        self._send(connection)

    def _send(self, connection: UpstreamConnection) -> None:
        self.connection = connection
        connection.begin(self, self.method == "HEAD", self._read_timeout)
        if self._upstream_paused or self.protocol.writing_paused:
            # The client was already paused (its buffer between the low- and high-water marks after an earlier
            # answer, or paused while this exchange waited for a connection): no pause_writing will come to say so.
            self._upstream_paused = True
            connection.pause_reading()
        payload = self.payload
        if payload is None or self._body_sent:
            connection.write(self.head)
            return
        # What of the body has arrived with the head (all of a small one) goes out in the same write; a task streams
        # the rest only when there is a rest.
        buffered = self._buffered_body(payload)
        if buffered is None:
            return  # refused (malformed, over the limit): answered
        connection.write(self.head + buffered if buffered else self.head)
        if not self._body_sent:
            self._body_task = self.pool.loop.create_task(self._pump_body(connection, payload))

    def _buffered_body(self, payload: StreamReader) -> bytes | None:
        """The body bytes the payload stream holds now, framed for the upstream (with the last chunk when the body is
        complete, which marks it sent); ``None`` when the body is refused (the answer is written)."""
        try:
            chunk = payload.read_nowait(-1)
        except Exception as exc:
            self._body_failed(400, "malformed request body", "request_body_broken", repr(exc))
            return None
        framed = self._framed(chunk) if chunk else b""
        if framed is None:
            return None
        if payload.at_eof():
            self._body_sent = True
            if self.message.chunked:
                framed += b"0\r\n\r\n"
        return framed

    def _framed(self, chunk: bytes) -> bytes | None:
        """``chunk`` as it is written to the upstream; ``None`` once the body is over ``limits.max_body_size``."""
        self._body_bytes += len(chunk)
        limit = self.state.config.limits.max_body_size
        if limit and self._body_bytes > limit:
            self._body_failed(413, f"request body over {limit} bytes", "request_body_too_large", "")
            return None
        if self.message.chunked:
            return b"%x\r\n" % len(chunk) + chunk + b"\r\n"
        return chunk

    async def _pump_body(self, connection: UpstreamConnection, payload: StreamReader) -> None:
        """Stream the rest of the client's body to the upstream, one chunk at a time: the payload stream pauses the
        client's socket when it holds too much; this waits whenever the upstream's socket buffer is full."""
        try:
            while True:
                try:
                    chunk = await payload.readany()
                except Exception as exc:
                    self._body_failed(400, "malformed request body", "request_body_broken", repr(exc))
                    return
                if not chunk:
                    break
                framed = self._framed(chunk)
                if framed is None:
                    return
                connection.write(framed)
                connection.last_read = self.pool.loop.time()  # bytes are moving: the read timeout starts over
                if connection.writing_paused:
                    self._writable = self.pool.loop.create_future()
                    await self._writable
                    self._writable = None
            if self.message.chunked:
                connection.write(b"0\r\n\r\n")
            self._body_sent = True
        finally:
            self._body_task = None

    def _body_failed(self, status: int, text: str, key: str, detail: str) -> None:
        if self.finished:
            return
        if PROXY_LINES.admit(key):
            log.warning("%s, upstream request cut: %s %s %s", text, self.method, self.message.path, detail)
        if self.connection is not None:
            self.connection.close()
        if self.status:
            self._abort_client()
            return
        self._answer(status, text, close=True)

    # upstream events (ResponseSink)
    def response_head(self, status: int, reason: bytes, headers: list[tuple[bytes, bytes]]) -> None:
        self.latency = time.monotonic() - self.started
        self.status = status
        transport = self.protocol.transport
        if transport is None:
            return
        head, needs_date, self._chunked_out, self._body_out = self.forwarder.response_head(
            self.method, status, reason, headers, self
        )
        # Held until the end of this read from the upstream (response_flush): a small response's body and end come
        # in the same read, and then go out in the head's write — one send to the client, not two or three.
        self._held = head + self.forwarder.date_line() + b"\r\n" if needs_date else head + b"\r\n"

    def client_head(self, status: int, reason: bytes, raw: list[tuple[bytes, bytes]]) -> tuple[bytes, bool, bool, bool]:
        """The response head as the ordinary path writes it (its ``StreamResponse`` and ``_undo_invented_headers``),
        without ``Date`` and the blank line; whether ``Date`` is to be added; re-chunked; with a body."""
        received = [(name.decode("latin-1"), value.decode("latin-1")) for name, value in raw]
        out = [b"HTTP/1.1 %d %s\r\n" % (status, reason)]
        vary: list[str] = []
        has_length = has_date = False
        drop_length = status in (204, 304)
        for name, value in response_headers(received):
            lower = name.lower()
            if lower.startswith("access-control-"):
                continue  # the upstream cannot re-open what the policy closed
            if lower == "vary":
                vary.append(value)
                continue
            if lower == "content-length":
                if drop_length:
                    continue
                has_length = True
            elif lower == "date":
                has_date = True
            out.append(f"{name}: {value}\r\n".encode("latin-1"))
        out.append(b"Vary: " + merge_vary(vary, ("Origin",)).encode("latin-1") + b"\r\n")
        cors = self.cors_headers
        if cors is None:
            cors = tuple(actual_headers(self.decision, (name for name, _ in received)))
        out.extend(f"{name}: {value}\r\n".encode("latin-1") for name, value in cors)
        body_out = self.method != "HEAD" and status not in (204, 304)
        chunked_out = body_out and not has_length
        if chunked_out:
            out.append(b"Transfer-Encoding: chunked\r\n")
        return b"".join(out), not has_date, chunked_out, body_out

    def response_body(self, data: bytes) -> None:
        if not self._body_out:
            return
        transport = self.protocol.transport
        if transport is None:
            return
        held, self._held = self._held, b""
        if self._chunked_out:
            transport.writelines((held, b"%x\r\n" % len(data), data, b"\r\n"))
        elif held:
            transport.writelines((held, data))
        else:
            transport.write(data)
        self.relayed += len(data)

    def response_flush(self) -> None:
        if self._held:
            held, self._held = self._held, b""
            transport = self.protocol.transport
            if transport is not None:
                transport.write(held)

    def response_end(self) -> None:
        if self.finished:
            return
        transport = self.protocol.transport
        held, self._held = self._held, b""
        if transport is not None:
            if self._chunked_out:
                transport.write(held + b"0\r\n\r\n")
            elif held:
                transport.write(held)
        keep_alive = True
        if not self._body_sent:
            # The upstream answered before it had the whole body: its connection cannot be reused, and the rest of the
            # client's body would have to be read and thrown away — close instead, as after any unread body.
            if self.connection is not None:
                self.connection.close()
            keep_alive = False
        self._finish(keep_alive)

    def upstream_failed(self, exc: BaseException | None) -> None:
        if self.finished:
            return
        connection = self.connection
        if (
            not self.status
            and connection is not None
            and connection.reused
            and not connection.received_any
            and not self._retried
            and self.payload is None
            and self.method in _IDEMPOTENT
        ):
            # A pooled connection the upstream had closed (a restart, its idle timeout) and nothing of the response
            # came: the request never reached a server that answered it, so it is sent once more on a new connection.
            self._retried = True
            self.connection = None
            self._connect_task = self.pool.loop.create_task(self._connect())
            return
        self._upstream_broke(exc, timeout=False)

    def upstream_writable(self) -> None:
        if self._writable is not None and not self._writable.done():
            self._writable.set_result(None)

    def _upstream_broke(self, exc: BaseException | None, timeout: bool) -> None:
        self.response_flush()  # what the client would have had of the response before the cut
        if self.connection is not None:
            self.connection.close()
        if self.status:
            # Headers are already sent: the only honest signal left is to cut the connection, so that the client sees
            # an aborted response instead of a silently truncated "complete" one.
            self.error = "disconnect"
            if PROXY_LINES.admit("upstream_disconnect"):
                log.warning("upstream failed mid-response: %s %s: %r", self.method, self.message.path, exc)
            self._abort_client()
        elif timeout:
            self._fail_before_head(504, "upstream timed out", "timeout", "upstream_timeout", "upstream timeout")
        else:
            self._fail_before_head(
                502, "bad response from upstream", "protocol", "upstream_protocol", f"upstream error: {exc!r}"
            )

    # client events (from the connection protocol)
    def upstream_timed_out(self) -> None:
        if not self.finished:
            self._upstream_broke(TimeoutError("upstream read timeout"), timeout=True)

    def client_paused(self) -> None:
        if not self._upstream_paused:
            self._upstream_paused = True  # kept when no connection is there yet: _send applies it
            if self.connection is not None:
                self.connection.pause_reading()

    def client_resumed(self) -> None:
        if self._upstream_paused:
            self._upstream_paused = False
            if self.connection is not None:
                self.connection.last_read = self.pool.loop.time()
                self.connection.resume_reading()

    def client_lost(self) -> None:
        """The client went away: the upstream request is cut (its connection closed, never reused)."""
        if self.finished:
            return
        if self.connection is not None:
            self.connection.close()
        self.status = 499
        self._finish(False, notify=False)

    # endings
    def _fail_before_head(self, status: int, text: str, error: str, key: str, line: str) -> None:
        if self.finished:
            return
        self.error = error
        if PROXY_LINES.admit(key):
            log.warning("%s: %s %s", line, self.method, self.message.path)
        self._answer(status, text, close=not self._body_sent)

    def _answer(self, status: int, text: str, close: bool) -> None:
        """corsproxy's own answer, byte for byte as the ordinary path's ``as_response(error_answer(...))``."""
        answer = error_answer(status, text, self.decision)
        body = (answer.text + "\n").encode("utf-8")
        lines = [b"HTTP/1.1 %d %s\r\n" % (status, http.HTTPStatus(status).phrase.encode("ascii"))]
        lines.append(b"Content-Type: %s\r\n" % TEXT_PLAIN.encode("ascii"))
        lines.extend(f"{name}: {value}\r\n".encode("latin-1") for name, value in answer.headers)
        lines.append(b"Content-Length: %d\r\n" % len(body))
        lines.append(self.forwarder.date_line())
        if close:
            lines.append(b"Connection: close\r\n")
        lines.append(b"\r\n")
        transport = self.protocol.transport
        if transport is not None:
            transport.write(b"".join(lines) + body)
        self.status = status
        self.relayed = len(body)
        self._finish(not close)

    def _abort_client(self) -> None:
        transport = self.protocol.transport
        if transport is not None:
            transport.abort()
        self._finish(False, notify=False)

    def _finish(self, keep_alive: bool, notify: bool = True) -> None:
        if self.finished:
            return
        self.finished = True
        for task in (self._body_task, self._connect_task):
            if task is not None and task is not asyncio.current_task():
                task.cancel()
        if self._writable is not None and not self._writable.done():
            self._writable.cancel()
        observe(
            self.state,
            self.method,
            self.message.path,
            self.client,
            self.decision,
            self.status or 499,
            self.relayed,
            self.started,
            self.latency,
            self.error,
        )
        if notify:
            self.protocol.exchange_done(self, keep_alive)


_K = TypeVar("_K")
_V = TypeVar("_V")


def _kept(cache: dict[_K, _V], key: _K, value: _V) -> _V:
    """Keep ``value`` under ``key`` in a cache bounded by :data:`_HEADS_KEPT` (cleared when full: heads are built from
    what clients send, so the cache must not grow with them)."""
    if len(cache) >= _HEADS_KEPT:
        cache.clear()
    cache[key] = value
    return value


def _upstream_head(
    message: RawRequestMessage, config: Config, protocol: GuardedRequestHandler, has_body: bool
) -> bytes:
    """The request head for the upstream, laid out as the ordinary path's client writes it: ``Host`` first, the
    received lines in order (minus what :func:`request_headers` drops), the forwarding fields, then framing."""
    upstream = config.upstream
    transport = protocol.transport
    context = ForwardContext(
        peer=peer(protocol),
        scheme="https" if transport is not None and transport.get_extra_info("sslcontext") else "http",
        client_host=message.headers.get("Host"),
        upstream_host=host_header(upstream.scheme, upstream.host, upstream.port),
        preserve_host=config.forwarding.preserve_host,
        trusted=config.forwarding.trusted,
    )
    received = [(name.decode("latin-1"), value.decode("latin-1")) for name, value in message.raw_headers]
    lines = request_headers(received, context)
    parts = [f"{message.method} {upstream.base_path}{message.path} HTTP/1.1\r\n"]
    host_line = ""
    has_length = False
    for name, value in lines:
        if name == "Host":
            host_line = f"Host: {value}\r\n"  # the one request_headers adds (received Host lines are dropped)
            continue
        if name.lower() == "content-length":
            has_length = True
        parts.append(f"{name}: {value}\r\n")
    parts.insert(1, host_line)
    if message.chunked:
        parts.append("Transfer-Encoding: chunked\r\n")
    elif not has_body and not has_length and message.method not in _NO_LENGTH_WHEN_EMPTY:
        parts.append("Content-Length: 0\r\n")
    parts.append("\r\n")
    return "".join(parts).encode("latin-1")
