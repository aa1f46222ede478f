"""The connection protocol: aiohttp's per-connection handler with the guards it lacks, and the runner that serves it.

This is the one module that touches aiohttp's private names (the request queue, the parser, the keep-alive timer, the
read-pause flag, ``AppRunner._make_server``, ``StreamResponse._prepare_headers``): aiohttp has no public hook for
"between requests" or for answering a parsed message without its request machinery. Which of those names the installed
aiohttp has is checked once, when :class:`ProxyRunner` builds its server (:func:`check_internals`); a feature whose
names are missing is turned off with one log line instead of failing on every connection:

* the connection guards (header-read timeout, 414/431 past the parser's ceiling): off, plain aiohttp handling;
* the preflight fast path (:mod:`corsproxy.http.fastpath`): off, preflights take the ordinary handler;
* the forwarding fast path (:mod:`corsproxy.http.forward`): off, every request is forwarded by the ordinary handler.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import re
import time
from dataclasses import dataclass
from typing import Any

from aiohttp import web, web_protocol  # web_protocol: for the request-parser class it uses
from aiohttp.http_exceptions import BadHttpMessage, HttpProcessingError, LineTooLong
from aiohttp.http_parser import RawRequestMessage
from aiohttp.streams import EMPTY_PAYLOAD

from corsproxy.core.decision import CorsRequest, Decision, actual_headers
from corsproxy.core.log_limit import PROXY_LINES
from corsproxy.http.app import CONFIG, STATE, VARY_ONLY, ProxyState, handler_args, peer
from corsproxy.http.fastpath import FastAnswer, PreflightResponder
from corsproxy.http.forward import Exchange, Forwarder

__all__ = ["GuardedRequestHandler", "Internals", "ProxyRunner", "check_internals"]

log = logging.getLogger("corsproxy")

#: Bytes a connection's transport may hold before the fast path stops writing and lets aiohttp apply backpressure.
_FAST_WRITE_HIGH_WATER = 1 << 16

#: aiohttp handler attributes the connection guards read (the request queue and the state around it).
GUARD_NAMES = ("_messages", "_request_in_progress", "_upgraded", "_current_request", "_manager", "_request_count")
#: ... and the ones the fast path also needs: the request loop's waiter, the parsers, the keep-alive timer.
FAST_PATH_NAMES = (
    "_waiter",
    "_payload_parser",
    "_parser",
    "_keepalive",
    "_keepalive_handle",
    "_keepalive_timeout",
    "_next_keepalive_close_time",
    "_loop",
    "_close",
    "_force_close",
)
#: ... and the ones the forwarding fast path also needs: the keep-alive timer it holds off while an exchange runs.
FORWARD_NAMES = ("_process_keepalive",)
#: How aiohttp versions pause reading while their request queue is full, and resume it: (flag, resume method).
#: aiohttp releases without a bounded queue (no ``_max_msg_queue_size``) never pause, so there is nothing to resume.
_QUEUE_RESUMERS = (("_buffer_paused", "_resume_reading_if_drained"), ("_msg_queue_paused", "_resume_msg_queue_reading"))


@dataclass(frozen=True, slots=True)
class Internals:
    """What the installed aiohttp offers of the private names this module uses."""

    missing: tuple[str, ...] = ()  # every name looked for and not found
    guards: bool = True  # the connection guards can run
    fast_path: bool = True  # the preflight fast path can run
    queue_resume: tuple[str, str] | None = None  # (flag, method) to resume a paused request queue; None: never paused
    parser_consumed: bool = True  # the parser counts queued messages: tell it when one is taken off the queue
    forward: bool = True  # the forwarding fast path can run


def check_internals(
    handler: object,
    runner: type = web.AppRunner,
    response: type = web.StreamResponse,
    parser: type = web_protocol.HttpRequestParser,  # type: ignore[attr-defined]
    server: object | None = None,
) -> Internals:
    """Check a freshly made (unconnected) aiohttp connection handler, the runner, response and request-parser classes
    for the private names the guards and the fast path use."""
    missing = [name for name in GUARD_NAMES if not hasattr(handler, name)]
    if not hasattr(runner, "_make_server"):
        missing.append("AppRunner._make_server")
    if server is not None and not hasattr(server, "_connections"):
        missing.append("Server._connections")  # the drain walks the server's connections
    guards = not missing
    missing += [name for name in FAST_PATH_NAMES if not hasattr(handler, name)]
    resume: tuple[str, str] | None = None
    queue_known = True
    consumed = hasattr(parser, "message_consumed")
    if hasattr(handler, "_max_msg_queue_size"):
        found = [pair for pair in _QUEUE_RESUMERS if all(hasattr(handler, name) for name in pair)]
        if found:
            resume = found[0]
        else:
            queue_known = False
            missing.append("/".join(_QUEUE_RESUMERS[0]))
        if not consumed:
            queue_known = False  # a bounded queue whose parser is never told a message left it fills up
            missing.append("HttpRequestParser.message_consumed")
    fast_path = guards and queue_known and all(hasattr(handler, name) for name in FAST_PATH_NAMES)
    missing += [name for name in FORWARD_NAMES if not hasattr(handler, name)]
    forward = fast_path and all(hasattr(handler, name) for name in FORWARD_NAMES)
    if not hasattr(response, "_prepare_headers"):
        missing.append("StreamResponse._prepare_headers")  # only the Server header of bare answers stays
    return Internals(tuple(missing), guards, fast_path, resume, consumed, forward)


class GuardedRequestHandler(web.RequestHandler):
    """aiohttp's per-connection protocol plus the two guards it lacks: a header-read timeout, and 431
    instead of 400 for a head over the parser's ceiling.

    The timeout runs from the accept, and from the first byte of every later request head, until the head is
    complete (nginx's ``client_header_timeout``); an idle keep-alive connection is left to ``keepalive_timeout``
    (``limits.idle_timeout``). A client dribbling a head byte by byte therefore holds one socket for at most
    ``limits.header_read_timeout`` and never blocks anyone else. aiohttp has no public "between requests" state,
    so :meth:`_awaiting_head` reads its private queue; the guard tests pin that behaviour.
    """

    def __init__(
        self,
        manager: web.Server,
        *,
        header_read_timeout: float,
        fast: FastAnswer | None = None,
        forward: Forwarder | None = None,
        internals: Internals = Internals(),
        **kwargs: Any,
    ) -> None:
        super().__init__(manager, **kwargs)
        self._internals = internals
        self._header_read_timeout = header_read_timeout
        self._head_timer: asyncio.TimerHandle | None = None
        self._fast = fast
        self._forward = forward
        self._exchange: Exchange | None = None  # the request the forwarding fast path is relaying, if any
        self._chunk_prefix = b""  # the start of the previous chunk received (bounded), see _keep_refused_head
        self._refused_head = b""  # what arrived of a head the parser refused as too long, for handle_error
        self.draining = False  # the worker is stopping: every answer says Connection: close
        self._partial_head = False  # bytes of a request head arrived that do not make a whole head yet
        self._idle_since: float | None = None  # while draining: when this connection was first seen idle
        self._requests_seen = 0
        self._identity: tuple[str, bool] | None = None  # see forward_identity
        self._deferred: list[bytes] | None = None  # bytes held for one loop turn, see _defer_to_waiting_loop
        self._replaying = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self._arm_head_timer()

    def forward_identity(self) -> tuple[str, bool]:
        """The client address and whether the connection is TLS: what the forwarding fields say of the connection,
        the same for every request on it."""
        identity = self._identity
        if identity is None:
            transport = self.transport
            tls = transport is not None and transport.get_extra_info("sslcontext") is not None
            identity = self._identity = (peer(self), tls)
        return identity

    def connection_lost(self, exc: BaseException | None) -> None:
        self._disarm_head_timer()
        super().connection_lost(exc)
        exchange, self._exchange = self._exchange, None
        if exchange is not None:
            exchange.client_lost()

    def pause_writing(self) -> None:
        super().pause_writing()
        if self._exchange is not None:
            self._exchange.client_paused()  # stop reading the upstream until the client has taken what is buffered

    def resume_writing(self) -> None:
        super().resume_writing()
        if self._exchange is not None:
            self._exchange.client_resumed()

    def _process_keepalive(self) -> None:
        if self._exchange is not None and self._keepalive_timeout > 0:
            # aiohttp's loop looks idle while the fast path relays a response: the idle close must wait for its end.
            self._next_keepalive_close_time = self._loop.time() + self._keepalive_timeout
            self._keepalive_handle = self._loop.call_at(self._next_keepalive_close_time, self._process_keepalive)
            return
        super()._process_keepalive()

    def data_received(self, data: bytes) -> None:
        if self._deferred is not None:
            self._deferred.append(data)  # behind the bytes already held: order is kept
            return
        waiter = self._waiter
        if waiter is None and data and not self._replaying and self._between_requests():
            # (empty data is aiohttp's own re-parse of what it buffered while its queue was full: it runs as it does)
            self._defer_to_waiting_loop(data)
            return
        previous, self._chunk_prefix = self._chunk_prefix, data[:_HEAD_PREFIX]
        if self._exchange is not None and waiter is not None and not waiter.done():
            # An exchange is in progress: feed its body, queue what follows for when it ends (responses stay in order).
            self._parse_quietly(data, waiter, previous)
            return
        if (
            (self._fast is not None or self._forward is not None)
            and waiter is not None
            and not waiter.done()  # aiohttp's loop is idle: every earlier response is written, order is kept
            and not self._messages
            and self._payload_parser is None
            and not self._upgraded
        ):
            self._data_received_fast(data, waiter, self._fast, previous)
            return
        queued = len(self._messages)
        super().data_received(data)
        if len(self._messages) > queued:
            self._fail_body_on_parse_error(self._messages[-1][0])
            self._keep_refused_head(previous, data)
        self._partial_head = self._awaiting_head()  # bytes came, and no whole request yet
        if not self._awaiting_head():
            self._disarm_head_timer()
        elif self._head_timer is None:
            self._arm_head_timer()

    def _between_requests(self) -> bool:
        """Whether aiohttp's request loop has finished its last request (or not begun) and will wait for the next.

        That loop's wait (``_waiter``) exists only while it waits: it is created when the loop first runs (a task
        started one loop turn after ``connection_made`` on Python 3.11) and again after each response the ordinary
        handler wrote, once the handler's task has ended and the loop has run on. Bytes arriving in between would be
        queued for the ordinary handler, and a client sending its next request as soon as it has read a response
        arrives exactly then: one ordinary answer would make every later one on that connection ordinary too."""
        return (
            (self._fast is not None or self._forward is not None)
            and not self._request_in_progress
            and not self._messages
            and self._exchange is None
            and self._payload_parser is None
            and not self._upgraded
            and not self._close
            and not self._force_close
            and self.transport is not None
            and not self.transport.is_closing()
        )

    def _defer_to_waiting_loop(self, data: bytes) -> None:
        """Hold ``data`` for one loop turn: the request loop's own step was scheduled before this callback (the task's
        first step at ``connection_made``, its wake-up when the handler's task ended), so by then it waits, has closed
        the connection, or is reading an unread body — and the bytes are then taken as if they arrived at once."""
        self._deferred = [data]
        self._loop.call_soon(self._replay_deferred)

    def _replay_deferred(self) -> None:
        chunks, self._deferred = self._deferred, None
        if chunks is None or self.transport is None or self.transport.is_closing():
            return  # the request loop closed the connection (its last answer said Connection: close)
        self._replaying = True  # once only: a loop still busy (an unread body) gets the bytes queued as usual
        try:
            self.data_received(b"".join(chunks))
        finally:
            self._replaying = False

    def begin_drain(self) -> None:
        """Stop keeping this connection alive without losing a request on it (a reload or a stop).

        aiohttp closes an idle keep-alive connection at once when its server shuts down; a request the client sent
        just before it saw the close is then lost with no response byte (the client cannot tell whether it was
        processed, so most do not retry it). Instead the connection stays open: the request in progress, or the next
        one to arrive, is answered with ``Connection: close`` (RFC 9112 §9.6), after which both sides know it ends.
        A connection that stays idle is closed by :meth:`drain_tick` once no byte has arrived on it for a while.
        """
        self.draining = True
        self._fast = None  # the ordinary path answers, and its answers carry Connection: close
        self._forward = None
        self._idle_since = None

    def drain_tick(self, now: float, grace: float) -> None:
        """Close this connection if it has been idle, with no byte of a next request received, for ``grace`` s."""
        if self.transport is None:
            return
        if not self._awaiting_head() or self._partial_head or self._request_count != self._requests_seen:
            self._requests_seen = self._request_count
            self._idle_since = None  # busy, or a request began: its answer will close the connection
            return
        if self._idle_since is None:
            self._idle_since = now
        elif now - self._idle_since >= grace:
            self.force_close()

    def _parse_quietly(self, data: bytes, waiter: asyncio.Future[None], previous: bytes) -> None:
        """Parse with aiohttp's parser without waking its request loop (the fast paths decide who answers)."""
        queued = len(self._messages)
        self._waiter = None
        try:
            super().data_received(data)
        finally:
            self._waiter = waiter
        if len(self._messages) > queued:
            self._fail_body_on_parse_error(self._messages[-1][0])
            self._keep_refused_head(previous, data)

    def _data_received_fast(
        self, data: bytes, waiter: asyncio.Future[None], fast: FastAnswer | None = None, previous: bytes = b""
    ) -> None:
        """Parse with aiohttp's parser, answer leading preflights from bytes, wake aiohttp's loop for the rest."""
        self._parse_quietly(data, waiter, previous)
        self._answer_queued(waiter, self._fast if fast is None else fast)

    def _answer_queued(self, waiter: asyncio.Future[None], fast: FastAnswer | None) -> None:
        """Answer the queued messages the fast paths take, in order: preflights from bytes, forwardable requests by
        an exchange (the rest waits until it ends); wake aiohttp's loop at the first message neither takes."""
        messages = self._messages
        answered = False
        while messages:
            message, payload = messages[0]
            if not isinstance(message, RawRequestMessage) or self._upgraded:
                break
            transport = self.transport
            if transport is None or transport.get_write_buffer_size() > _FAST_WRITE_HIGH_WATER:
                # A client that pipelines and does not read: leave the rest to aiohttp's loop, which waits for the
                # transport to drain and stops reading when its queue is full — memory stays bounded.
                break
            answer = None
            if fast is not None and payload is EMPTY_PAYLOAD:
                try:
                    answer = fast(message, self)
                except Exception:
                    log.exception("preflight fast path failed; answering through the ordinary handler")
            if answer is None:
                if self._forward is not None and self._start_exchange(message, payload):
                    return
                break
            messages.popleft()
            if self._parser is not None and self._internals.parser_consumed:
                self._parser.message_consumed()
            if self.transport is None:
                return
            self.transport.write(answer)
            answered = True
        if messages:
            self._partial_head = False
            waiter.set_result(None)
            if not self._awaiting_head():
                self._disarm_head_timer()
            return
        self._partial_head = not answered
        if answered:
            # The answered request counts as activity: push the idle close back, and the head is complete.
            self._kept_alive()
            resume = self._internals.queue_resume
            if resume is not None and getattr(self, resume[0]):
                getattr(self, resume[1])()  # aiohttp paused reading for a full queue: it is empty now
            self._disarm_head_timer()
        elif self._head_timer is None:
            self._arm_head_timer()  # a partial head: the header-read timeout runs from its first byte

    def _start_exchange(self, message: RawRequestMessage, payload: Any) -> bool:
        """Hand ``message`` to the forwarding fast path; False (nothing sent) when the ordinary path must answer."""
        assert self._forward is not None
        try:
            exchange = self._forward(message, payload, self)
        except Exception:
            log.exception("forwarding fast path failed; answering through the ordinary handler")
            return False
        if exchange is None:
            return False
        self._messages.popleft()
        if self._parser is not None and self._internals.parser_consumed:
            self._parser.message_consumed()
        self._exchange = exchange
        self._partial_head = False
        self._disarm_head_timer()
        resume = self._internals.queue_resume
        if resume is not None and getattr(self, resume[0]):
            getattr(self, resume[1])()  # aiohttp paused reading for a full queue: one message left it
        try:
            exchange.start()
        except Exception:
            # Nothing has been written to the client yet only if the exchange never reached its upstream; either way
            # this connection cannot be trusted to be in step any more.
            log.exception("forwarding fast path failed; closing the connection")
            self._exchange = None
            self.force_close()
        return True

    def exchange_done(self, exchange: Exchange, keep_alive: bool) -> None:
        """The fast path's exchange wrote its whole response: continue with what the client sent meanwhile."""
        if self._exchange is not exchange:
            return
        self._exchange = None
        if not keep_alive:
            self.force_close()
            return
        self._kept_alive()
        waiter = self._waiter
        if waiter is not None and not waiter.done() and self.transport is not None and self._messages:
            # Draining turned both fast paths off: the ordinary path then answers, with Connection: close.
            self._answer_queued(waiter, self._fast)

    def _kept_alive(self) -> None:
        """A fast-path answer on a kept-alive connection, as aiohttp's request loop treats one of its own responses:
        the idle close (``limits.idle_timeout``) moves back, and is armed if it is not (aiohttp 3.14.2 arms it only
        after a response it wrote, so a connection answered only by the fast paths would never be closed idle)."""
        if self._keepalive_timeout > 0:
            self._keepalive = True
            self._next_keepalive_close_time = self._loop.time() + self._keepalive_timeout
            if self._keepalive_handle is None:
                self._keepalive_handle = self._loop.call_at(self._next_keepalive_close_time, self._process_keepalive)

    def _keep_refused_head(self, previous: bytes, data: bytes) -> None:
        """Keep what arrived of a head the parser just refused as too long (the previous chunk's start and this
        chunk, bounded): the parser exposes nothing of it, and handle_error needs its request line and Origin."""
        error = getattr(self._messages[-1][0], "exc", None)
        if isinstance(error, LineTooLong) and not self._refused_head:
            self._refused_head = previous + data[:_REFUSED_HEAD_MAX]

    def handle_error(
        self, request: Any, status: int = 500, exc: BaseException | None = None, message: str | None = None
    ) -> web.StreamResponse:
        # A client can send these as fast as it likes: rate-limited per reason, counted exactly in
        # corsproxy_malformed_requests.
        if isinstance(exc, LineTooLong):
            if PROXY_LINES.admit("head_too_large"):
                log.warning("request head over the parser ceiling from %s: %s", request.remote, exc)
            status = 414 if _line_is_target(exc) else 431
            headers: list[tuple[str, str]] = [("Vary", "Origin")]
            judged = _judge_refused_head(self._refused_head, exc, self._app_state())
            if judged is not None:
                status, decision = judged
                headers += actual_headers(decision)
            text = "request line too long\n" if status == 414 else "request header fields too large\n"
            response = _BareResponse(status=status, text=text, headers=headers)
        elif isinstance(exc, HttpProcessingError) and status == 400:
            # A malformed request (smuggling probe, bare LF, bad chunk...): one log line, not a traceback per probe.
            if PROXY_LINES.admit("malformed_request"):
                detail = str(exc.message).strip().splitlines()[0] if exc.message else type(exc).__name__
                log.info("malformed request from %s refused with 400: %s", request.remote, detail)
            response = _BareResponse(status=400, text="malformed request\n", headers=VARY_ONLY)
        elif isinstance(exc, ConnectionResetError | BrokenPipeError) and (
            self.transport is None or self.transport.is_closing()
        ):
            # The client went away while its answer was being written ("Cannot write to closing transport"): an
            # everyday event, counted as a client abort (499) by the observers, not an error with a traceback.
            log.debug("client %s went away mid-response: %s %s: %s", request.remote, request.method, request.path, exc)
            response = _BareResponse(status=500, text="client went away\n", headers=VARY_ONLY)
        else:
            plain = super().handle_error(request, status, exc, message)
            body = plain.body if isinstance(plain, web.Response) else None
            response = _BareResponse(status=plain.status, body=body, headers=plain.headers)
        response.force_close()
        return response

    def _app_state(self) -> ProxyState | None:
        # The server's request handler is the application's bound ``_handle``: the one way to the app from here.
        app = getattr(self._manager.request_handler if self._manager is not None else None, "__self__", None)
        return app.get(STATE) if isinstance(app, web.Application) else None

    def _fail_body_on_parse_error(self, message: Any) -> None:
        """aiohttp's parser, failing mid-body (a bad chunk size), queues a 400 but leaves the running request's body
        stream waiting forever. End that stream with the error, so the forwarder cuts the upstream request at once
        instead of after ``upstream.read_timeout``."""
        if isinstance(message, RawRequestMessage):
            return
        if self._exchange is not None and self._exchange.payload is not None:
            content = self._exchange.payload
        elif self._current_request is not None:
            content = self._current_request.content
        else:
            return
        if not content.is_eof():
            error = getattr(message, "exc", None)
            content.set_exception(error if isinstance(error, Exception) else BadHttpMessage("malformed body"))

    def _awaiting_head(self) -> bool:
        return not (self._request_in_progress or self._messages or self._upgraded or self._exchange is not None)

    def _arm_head_timer(self) -> None:
        if self._header_read_timeout > 0:
            loop = asyncio.get_running_loop()
            self._head_timer = loop.call_later(self._header_read_timeout, self._head_timed_out)

    def _disarm_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if self.transport is not None and self._awaiting_head():
            if PROXY_LINES.admit("head_timeout"):
                log.info("closing a connection that sent no complete request head in %gs", self._header_read_timeout)
            self.force_close()


#: Bytes of a chunk's start kept between chunks, and of a refused head kept for its answer (see _keep_refused_head).
_HEAD_PREFIX = 8192
_REFUSED_HEAD_MAX = 1 << 18
_REQUEST_LINE_START = re.compile(rb"(?:\A|(?<=\r\n))([A-Z]{1,20}) (?=[/*]|https?://)")


def _line_is_target(exc: LineTooLong) -> bool:
    """Whether the line the parser refused is a request target (414) rather than a header field (431), from the
    start of it that the exception carries: a target begins with "/" or "*", a field name never does."""
    start = _refused_line(exc)
    return start.startswith((b"/", b"*")) or bool(_REQUEST_LINE_START.match(start))


def _refused_line(exc: LineTooLong) -> bytes:
    line = exc.args[0] if exc.args else b""
    return bytes(line) if isinstance(line, bytes | bytearray) else str(line).encode("latin-1", "replace")


def _judge_refused_head(head: bytes, exc: LineTooLong, state: ProxyState | None) -> tuple[int, Decision] | None:
    """For a head over the parser's ceiling: 414 or 431, and the decision for its request line and the header lines
    that arrived complete — so the refusal is readable by an allowed origin like corsproxy's other answers. ``None``
    when no request line is found in what arrived (the answer then varies only)."""
    if state is None or not head:
        return None
    probe = _refused_line(exc).removesuffix(b"...")[:64]
    overflow = head.find(probe) if probe else -1
    if overflow < 0:
        overflow = len(head)
    starts = list(_REQUEST_LINE_START.finditer(head, 0, overflow + 1))
    if not starts:
        return None
    start = starts[-1]
    method = start[1].decode("ascii")
    target_start = start.end()
    line_end = head.find(b"\r\n", target_start)
    if 0 <= line_end < overflow:
        status = 431  # the request line was complete: a header field is too long
        target = head[target_start:line_end].rsplit(b" ", 1)[0]
    else:
        status = 414
        target = head[target_start : head.find(b" ", target_start) if b" " in head[target_start:] else len(head)]
        line_end = head.find(b"\r\n", target_start)
    fields: dict[str, list[str]] = {}
    if line_end >= 0:
        head_end = head.find(b"\r\n\r\n", line_end)
        block = head[line_end + 2 : head_end if head_end >= 0 else len(head)]
        lines = block.split(b"\r\n")
        if head_end < 0:
            lines = lines[:-1]  # the last line may be cut short
        for field in lines:
            name, colon, value = field.partition(b":")
            if colon and len(field) <= 2 * _HEAD_PREFIX:
                fields.setdefault(name.strip().lower().decode("latin-1"), []).append(value.strip().decode("latin-1"))
    asked = CorsRequest.from_fields(method, target.decode("latin-1"), lambda name: fields.get(name.lower(), []))
    decision, _ = state.decider().judge(asked, state.store, time.time())
    return status, decision


class _BareResponse(web.Response):
    """corsproxy's answer to a message it could not handle (unparsable, or a handler that failed). The app's
    ``on_response_prepare`` never runs for those, so aiohttp's ``Server`` header (Python and aiohttp versions) is
    removed here, where aiohttp fills in its defaults."""

    async def _prepare_headers(self) -> None:
        await super()._prepare_headers()
        self.headers.popall("Server", None)


#: Seconds a connection must stay idle, with no byte of a next request received, before a draining worker closes it.
#: A client under load sends its next request within milliseconds of a response, so it gets a ``Connection: close``
#: answer instead; only connections nobody is using are closed, and the old worker exits soon after a reload.
DRAIN_IDLE_GRACE = 2.0
_DRAIN_TICK = 0.05
_DRAIN_SETTLE = 0.25


async def _close_when_draining(request: web.Request, response: web.StreamResponse) -> None:
    """A draining worker's answers end their connection, so no client sends a request into a closing socket."""
    protocol = request.protocol
    if isinstance(protocol, GuardedRequestHandler) and protocol.draining and response.status != 101:
        response.force_close()
        response.headers["Connection"] = "close"


class _GuardedServer(web.Server):
    """A :class:`web.Server` whose connections are :class:`GuardedRequestHandler`."""

    def __init__(
        self,
        plain: web.Server,
        header_read_timeout: float,
        handler_kwargs: dict[str, Any],
        fast: FastAnswer | None,
        internals: Internals,
        forward: Forwarder | None = None,
    ) -> None:
        loop = asyncio.get_running_loop()
        super().__init__(
            plain.request_handler,
            request_factory=plain.request_factory,
            handler_cancellation=plain.handler_cancellation,
            loop=loop,
            **handler_kwargs,
        )
        self._fast = fast  # read per connection: a test may wrap it to see which path answered
        self._forward = forward
        self._new_handler = functools.partial(
            GuardedRequestHandler,
            self,
            loop=loop,
            header_read_timeout=header_read_timeout,
            internals=internals,
            **handler_kwargs,
        )
        self._guard_draining = False

    def __call__(self) -> web.RequestHandler:
        handler = self._new_handler(fast=self._fast, forward=self._forward)
        if self._guard_draining:
            # Accepted just before the listening socket closed, connected after the drain began: it drains too
            # (else its keep-alive answers would keep it busy until the drain timeout cut it mid-request).
            handler.begin_drain()
        return handler

    def pre_shutdown(self) -> None:
        # Called once the listening sockets stopped accepting. aiohttp would close every idle connection here, racing
        # the requests clients are sending on them; drain them instead (GuardedRequestHandler.begin_drain).
        self._guard_draining = True
        for connection in self._connections:
            if isinstance(connection, GuardedRequestHandler):
                connection.begin_drain()
            else:  # pragma: no cover - every connection of this server is guarded
                connection.close()

    async def shutdown(self, timeout: float | None = None) -> None:
        """Wait, up to ``timeout`` (``limits.drain_timeout``), for every connection to end on its own: after its
        ``Connection: close`` answer, or idle for :data:`DRAIN_IDLE_GRACE`; then aiohttp's shutdown cancels what is
        left."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + (timeout if timeout is not None else 0.0)
        quiet_since: float | None = None
        while (now := loop.time()) < deadline:
            if not self._connections:
                # A connection the kernel handed over just before the listening socket closed may not have reached
                # connection_made yet (the event loop builds its transport a few iterations later): exiting now
                # would reset it with its request unread. Stay until no connection has appeared for a moment.
                if quiet_since is None:
                    quiet_since = now
                elif now - quiet_since >= _DRAIN_SETTLE:
                    break
            else:
                quiet_since = None
            for connection in list(self._connections):
                if isinstance(connection, GuardedRequestHandler):
                    if not connection.draining:
                        connection.begin_drain()
                    connection.drain_tick(now, DRAIN_IDLE_GRACE)
            await asyncio.sleep(_DRAIN_TICK)
        await super().shutdown(max(0.0, deadline - loop.time()))


class ProxyRunner(web.AppRunner):
    """``web.AppRunner`` for :func:`create_app` that also applies ``limits.header_read_timeout`` and answers 431 past
    the parser's ceiling. Use it instead of ``web.run_app``/``web.AppRunner`` where corsproxy is served."""

    def __init__(
        self, app: web.Application, *, fast_preflights: bool = True, fast_forwarding: bool = True, **kwargs: Any
    ) -> None:
        super().__init__(app, **kwargs)
        self._fast_forwarding = fast_forwarding
        self._forwarder: Forwarder | None = None
        if _close_when_draining not in app.on_response_prepare:
            app.on_response_prepare.append(_close_when_draining)  # only guarded connections drain
        self._fast_preflights = fast_preflights
        self._runner_kwargs = {k: v for k, v in kwargs.items() if k not in ("handle_signals", "shutdown_timeout")}

    async def _make_server(self) -> web.Server:
        plain = await super()._make_server()  # runs the app's startup exactly as AppRunner does
        internals = _checked_once(plain)
        if not internals.guards:
            return plain
        app = self.app
        handler_kwargs: dict[str, Any] = dict(self._runner_kwargs)
        handler_kwargs.update(handler_args(app[CONFIG].limits))  # as aiohttp merges them: the app's win
        fast = PreflightResponder(app) if self._fast_preflights and internals.fast_path else None
        if self._fast_forwarding and internals.forward:
            self._forwarder = Forwarder(app)
        return _GuardedServer(
            plain, app[CONFIG].limits.header_read_timeout, handler_kwargs, fast, internals, self._forwarder
        )

    async def _cleanup_server(self) -> None:
        # After the drain (in-flight exchanges ended or were cut): the pool's upstream connections close.
        if self._forwarder is not None:
            self._forwarder.close()
        await super()._cleanup_server()


_CHECKED: list[Internals] = []


def _checked_once(server: web.Server) -> Internals:
    """The check of this process's aiohttp, made (and its one log line written) on the first server built."""
    if not _CHECKED:
        import aiohttp

        internals = check_internals(server(), server=server)
        _CHECKED.append(internals)
        if internals.missing:
            features = (
                ("connection guards", internals.guards),
                ("preflight fast path", internals.fast_path),
                ("forwarding fast path", internals.forward),
            )
            off = [name for name, on in features if not on]
            log.warning(
                "aiohttp %s lacks %s: %s off (corsproxy still serves every request, through aiohttp's ordinary path)",
                aiohttp.__version__,
                ", ".join(internals.missing),
                " and ".join(off) or "nothing",
            )
    return _CHECKED[0]
