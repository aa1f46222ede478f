"""The I/O shell: an aiohttp application that answers preflights itself and streams everything else to the upstream.

Owns the request handler, the forwarder and the lifetime of the resources a running proxy holds (the LMDB store and
one pooled ``ClientSession``, via ``cleanup_ctx``). All CORS judgement is delegated to :mod:`corsproxy.core.decision`;
this module turns requests into its arguments and decisions into headers. What a message loses or gains on the way
through is decided by the pure :mod:`corsproxy.core.forwarding`; this module applies it, streams bodies both ways under
``limits``, relays WebSockets, maps upstream failures to 502/504, and adds the connection guards aiohttp lacks
(:class:`GuardedRequestHandler`, served by :class:`ProxyRunner`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from aiohttp import web
from multidict import CIMultiDict, MultiDict
from yarl import URL

from corsproxy.core.answer import Answer, error_answer, preflight_answer
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
from corsproxy.core.forwarding import (
    ForwardContext,
    climbs_above_root,
    host_header,
    is_websocket_upgrade,
    request_headers,
    response_headers,
)
from corsproxy.core.log_limit import PROXY_LINES, configure_line_limits, flush_line_limits
from corsproxy.core.outcome import Outcome
from corsproxy.core.settings import Config, Limits, Upstream
from corsproxy.origins.writes import reconcile_on_start
from corsproxy.store import OriginStore

__all__ = [
    "CONFIG",
    "DECISION",
    "STATE",
    "VARY_ONLY",
    "Observer",
    "ProxyState",
    "as_response",
    "create_app",
    "handler_args",
    "observe",
    "oversized_head",
    "peer",
    "refused_target",
]

log = logging.getLogger("corsproxy")

_VARY_ORIGIN = ("Origin",)
#: corsproxy's answers to messages it could not parse: no CORS headers (nothing was judged), but they still vary.
VARY_ONLY = {"Vary": "Origin"}
#: RFC 6455 §7.4.1: codes that report a closure and must never be sent in a Close frame.
_UNSENDABLE_CLOSE_CODES = frozenset({1005, 1006, 1015})
_STREAM_CHUNK = 1 << 16


Observer = Callable[[Outcome], None]


@dataclass
class ProxyState:
    """What a running proxy holds. ``config`` is replaced whole on reload; the rest lives as long as the app."""

    config: Config
    store: OriginStore
    session: aiohttp.ClientSession
    upstream_base: str  # scheme://host:port/base-path, no trailing slash
    observers: list[Observer] = field(default_factory=list)
    _decisions: DecisionCache | None = None
    _timeout: tuple[Upstream, aiohttp.ClientTimeout] | None = None

    def decider(self) -> DecisionCache:
        """The decision cache of the current engine (a new, empty one after ``config`` was swapped)."""
        cache = self._decisions
        if cache is None or cache.engine is not self.config.engine:
            cache = self._decisions = DecisionCache(self.config.engine)
        return cache

    def upstream_timeout(self) -> aiohttp.ClientTimeout:
        """The client timeouts of the current upstream settings (made again after ``config`` was swapped)."""
        upstream = self.config.upstream
        made = self._timeout
        if made is None or made[0] is not upstream:
            made = self._timeout = (upstream, _client_timeout(upstream))
        return made[1]

    def observe(self, outcome: Outcome) -> None:
        for observer in self.observers:
            observer(outcome)


def _client_timeout(upstream: Upstream) -> aiohttp.ClientTimeout:
    # ``connect`` also bounds the wait for a free pooled connection (limits.max_upstream_connections): a full pool
    # turns into a 504 after connect_timeout instead of an unbounded queue.
    return aiohttp.ClientTimeout(
        total=None,
        connect=upstream.connect_timeout,
        sock_connect=upstream.connect_timeout,
        sock_read=upstream.read_timeout,
    )


STATE = web.AppKey("state", ProxyState)
DECISION = web.RequestKey("cors_decision", Decision)
#: Response body bytes relayed from the upstream (what the request log reports).
_BODY_BYTES = web.RequestKey("body_bytes", int)
#: The decision's CORS headers when they do not depend on the response (from the decision cache).
_CORS_HEADERS = web.RequestKey("cors_headers", tuple)
UPSTREAM_LATENCY = web.RequestKey("upstream_latency", float)
UPSTREAM_ERROR = web.RequestKey("upstream_error", str)
#: Defaults aiohttp fills in at prepare time that the upstream's response did not have (removed again, see below).
_UPSTREAM_LACKS = web.RequestKey("upstream_lacks", frozenset)
#: aiohttp gives every response a ``Content-Type`` (application/octet-stream) and a ``Server`` when none is set; a
#: proxy must not invent them. ``Date`` stays: RFC 9110 §6.6.1 asks a forwarding recipient to add it.
_ADDED_BY_AIOHTTP = ("Content-Type", "Server")
CONFIG = web.AppKey("config", Config)
_RECONCILE = web.AppKey("reconcile_at_start", bool)


def as_response(answer: Answer) -> web.Response:
    """An answer of corsproxy's own as an aiohttp response (the fast path writes the same answer as bytes)."""
    if answer.text:
        response = web.Response(status=answer.status, text=answer.text + "\n", content_type="text/plain")
    else:
        response = web.Response(status=answer.status)
    for name, value in answer.headers:
        response.headers.add(name, value)
    return response


def _error_response(status: int, text: str, decision: Decision) -> web.Response:
    return as_response(error_answer(status, text, decision))


async def handle(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE]
    if not state.observers:
        return await _dispatch(request, state)
    start = time.monotonic()
    response: web.StreamResponse | None = None
    try:
        response = await _dispatch(request, state)
        return response
    finally:
        decision = request.get(DECISION)
        if decision is not None:
            observe(
                state,
                request.method,
                request.raw_path,
                request.remote or "",
                decision,
                response.status if response is not None else 499,
                _bytes_sent(request, response),
                start,
                request.get(UPSTREAM_LATENCY),
                request.get(UPSTREAM_ERROR),
            )


def observe(
    state: ProxyState,
    method: str,
    path: str,
    client: str,
    decision: Decision,
    status: int,
    bytes_sent: int,
    started: float,
    upstream_latency: float | None = None,
    upstream_error: str | None = None,
) -> None:
    """Tell the observers (metrics, request log) how a request ended, whichever path answered it."""
    if state.observers:
        state.observe(
            Outcome(
                method,
                path,
                client,
                decision,
                status,
                bytes_sent,
                time.monotonic() - started,
                upstream_latency,
                upstream_error,
            )
        )


def peer(protocol: web.RequestHandler) -> str:
    """The client address of a connection, as ``request.remote`` gives it on the ordinary path."""
    transport = protocol.transport
    address = transport.get_extra_info("peername") if transport is not None else None
    return str(address[0]) if isinstance(address, tuple) and address else ""


def _bytes_sent(request: web.Request, response: web.StreamResponse | None) -> int:
    """Body bytes of the answer (headers not counted), like nginx's ``$body_bytes_sent``."""
    if isinstance(response, web.Response) and isinstance(response.body, bytes | bytearray):
        return len(response.body)  # corsproxy's own answer, written after the handler returns
    return int(request.get(_BODY_BYTES, 0))


async def _dispatch(request: web.Request, state: ProxyState) -> web.StreamResponse:
    config = state.config  # one snapshot per request: a reload never mixes two configs in one answer
    engine = config.engine
    method = request.method
    decision, cors_headers = _decide(request, state)
    request[DECISION] = decision
    if cors_headers is not None:
        request[_CORS_HEADERS] = cors_headers
    oversized = oversized_head(method, request.raw_path, request.raw_headers, config.limits.max_header_size)
    if oversized is not None:
        return _error_response(*oversized, decision)
    refusal = refused_target(request.raw_path, _request_target(request), decision, config)
    if refusal is not None:
        return _error_response(400, refusal, decision)
    report_only = engine.report_only(decision)
    if decision.kind is Kind.PREFLIGHT and not report_only:
        # never forwarded, even if the upstream would redirect
        return as_response(preflight_answer(engine, decision, cors_headers))
    if engine.blocks(decision, method) and not report_only:
        return _error_response(403, f"request refused: {decision.reason.value}", decision)
    return await forward(request, state, decision, report_only)


def _decide(request: web.Request, state: ProxyState) -> tuple[Decision, CorsHeaders | None]:
    headers = request.headers
    asked = CorsRequest.from_fields(request.method, _request_target(request), lambda name: headers.getall(name, ()))
    return state.decider().judge(asked, state.store, time.time())


class _RequestBody:
    """The client's body as the upstream request pulls it: streamed, counted against ``limits.max_body_size``, and
    the ``100 Continue`` sent only once the upstream is connected and asks for the first byte."""

    def __init__(self, request: web.Request, limit: int) -> None:
        self.request = request
        self.limit = limit
        self.sent = 0
        self.too_large = False  # the body outgrew the limit: the upstream request was cut, the answer is 413
        self.client_failed = False  # the client's framing broke mid-body (bad chunk, early close): answer 400

    async def chunks(self) -> AsyncIterator[bytes]:
        if _expects_continue(self.request):
            await self.request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        stream = self.request.content
        while True:
            try:
                chunk = await stream.readany()
            except Exception:
                self.client_failed = True
                raise
            if not chunk:
                return
            self.sent += len(chunk)
            if self.limit and self.sent > self.limit:
                # Raising here makes the client library abort the upstream connection mid-body, so the upstream
                # never sees a complete (and therefore acceptable) request.
                self.too_large = True
                raise _BodyTooLarge(self.sent)
            yield chunk


class _BodyTooLarge(Exception):
    """Raised inside the upstream request's body iterator to cut it; answered as 413."""


def _expects_continue(request: web.Request) -> bool:
    return request.version >= (1, 1) and request.headers.get("Expect", "").lower() == "100-continue"


async def _expect_handler(request: web.Request) -> web.StreamResponse | None:
    """Route-level ``Expect`` handling: unknown expectations get 417 (RFC 9110 §10.1.1); ``100-continue`` is
    answered later, by :class:`_RequestBody`, once the CORS checks passed and the upstream is ready for the body."""
    expect = request.headers.get("Expect", "")
    if expect.lower() != "100-continue":
        decision, _ = _decide(request, request.app[STATE])  # readable by an allowed origin, like every own error
        return _error_response(417, f"unsupported expectation {expect!r}", decision)
    return None


def _request_target(request: web.Request) -> str:
    """The origin-form target (path and query) as received, byte for byte. An absolute-form target
    (``GET http://host/path``, RFC 9112 §3.2.2) is reduced to its path and query, so that neither the route a policy
    is chosen by nor the upstream can be picked by the client: the upstream comes from configuration only."""
    raw = request.raw_path
    return raw if raw.startswith("/") else request.rel_url.raw_path_qs


_FRAGMENT_REFUSED = (
    "the request target holds a fragment (#...), which is not part of an HTTP request target (RFC 9112 §3.2) and "
    "which servers read differently: send the path without it"
)
_AMBIGUOUS_REFUSED = (
    "ambiguous request path: common servers disagree on which resource it names (dot segments, ';' parameters, "
    "backslashes, encoded '/', '\\' or '.', repeated slashes, case...): send it in its plain, normalised form"
)
_CLIMB_REFUSED = "the request path climbs above the upstream's base path"


def refused_target(raw_target: str, target: str, decision: Decision, config: Config) -> str | None:
    """Why a request target is refused with 400 before anything else, or ``None``; for the handler and the preflight
    fast path alike, so both answer the same request the same way. ``target`` is what would be forwarded (see
    :func:`_request_target`), ``raw_target`` the request line's own."""
    if "#" in raw_target:
        return _FRAGMENT_REFUSED
    if decision.reason is Reason.PATH_AMBIGUOUS:
        return _AMBIGUOUS_REFUSED
    if config.upstream.base_path and climbs_above_root(target):
        return _CLIMB_REFUSED
    return None


def oversized_head(
    method: str, target: str, raw_headers: Iterable[tuple[bytes, bytes]], limit: int
) -> tuple[int, str] | None:
    """The soft head-size limit (431 / 414), for the handler and the preflight fast path alike. aiohttp's parser holds
    the hard ceiling at twice the limit; past that it answers 400 itself, or 431 with :class:`GuardedRequestHandler`."""
    if len(method) + len(target) + 10 > limit:
        return 414, "request line too long"
    for name, value in raw_headers:
        if len(name) + len(value) + 2 > limit:
            return 431, f"request header {name[:64].decode('latin-1')!r} too large"
    return None


def _forward_context(request: web.Request, state: ProxyState) -> ForwardContext:
    config = state.config
    upstream = config.upstream
    return ForwardContext(
        peer=request.remote or "",
        scheme=request.scheme,
        client_host=request.headers.get("Host"),
        upstream_host=host_header(upstream.scheme, upstream.host, upstream.port),
        preserve_host=config.forwarding.preserve_host,
        trusted=config.forwarding.trusted,
    )


def _received_headers(request: web.Request) -> list[tuple[str, str]]:
    return [(name.decode("latin-1"), value.decode("latin-1")) for name, value in request.raw_headers]


class _FieldName(str):
    """A header name that hashes and compares case-insensitively, as field names are (RFC 9110 §5.1).

    ``ClientSession`` rebuilds the headers it is given, replacing a name the first time it sees it and adding it
    after that, but "sees" with a case-sensitive set: ``X-Dup: a``, ``X-Dup: b``, ``x-dup: c`` left one line
    ``x-dup: c``. Wrapped in this class the later spellings count as seen and are added, each line with its own
    spelling, in order. Only names received in more than one spelling are wrapped (aiohttp's own ``Host`` check is
    a case-sensitive set lookup too)."""

    __slots__ = ()

    def __hash__(self) -> int:
        return hash(self.lower())

    def __eq__(self, other: object) -> bool:
        return isinstance(other, str) and self.lower() == other.lower()

    def __ne__(self, other: object) -> bool:
        return not self == other


def _upstream_headers(lines: list[tuple[str, str]]) -> CIMultiDict[str] | MultiDict[str]:
    """The header lines for the upstream request, so that the client library sends every one as given.

    With names in several spellings the lines go in a case-sensitive ``MultiDict``, which keeps the
    :class:`_FieldName` objects (a ``CIMultiDict`` turns keys into its own ``istr``). ``ws_connect`` copies its
    headers into a ``CIMultiDict`` first, so a WebSocket handshake still merges such lines."""
    spellings: dict[str, set[str]] = {}
    for name, _ in lines:
        spellings.setdefault(name.lower(), set()).add(name)
    mixed = {lower for lower, names in spellings.items() if len(names) > 1}
    if not mixed:
        return CIMultiDict(lines)
    return MultiDict((_FieldName(name) if name.lower() in mixed else name, value) for name, value in lines)


async def forward(request: web.Request, state: ProxyState, decision: Decision, report_only: bool) -> web.StreamResponse:
    """Stream the request to the upstream and its answer back, adding the decision's CORS headers."""
    config = state.config
    limits = config.limits
    websocket = is_websocket_upgrade(
        request.method, request.headers.getall("Connection", ()), request.headers.getall("Upgrade", ())
    )
    if websocket and config.forwarding.websockets:
        return await _forward_websocket(request, state, decision, report_only)
    declared = request.content_length
    if limits.max_body_size and declared is not None and declared > limits.max_body_size:
        refusal = _error_response(413, f"request body over {limits.max_body_size} bytes", decision)
        refusal.force_close()  # the unread body must not be parsed as the next request
        return refusal

    url = URL(state.upstream_base + _request_target(request), encoded=True)  # byte-for-byte path and query
    headers = _upstream_headers(request_headers(_received_headers(request), _forward_context(request, state)))
    body = _RequestBody(request, limits.max_body_size) if request.body_exists else None
    started = time.monotonic()
    try:
        upstream = await state.session.request(
            request.method,
            url,
            headers=headers,
            data=body.chunks() if body is not None else None,
            allow_redirects=False,
            timeout=state.upstream_timeout(),
        )
    except (aiohttp.ClientError, TimeoutError) as exc:
        return _upstream_failure(request, decision, exc, body)
    request[UPSTREAM_LATENCY] = time.monotonic() - started

    completed = False
    try:
        response = web.StreamResponse(status=upstream.status, reason=upstream.reason)
        vary_lines: list[str] = []
        received = [(name.decode("latin-1"), value.decode("latin-1")) for name, value in upstream.raw_headers]
        for name, value in response_headers(received):
            lower = name.lower()
            if not report_only:
                if lower.startswith("access-control-"):
                    # the upstream cannot re-open what the policy closed: what it does not expose stays unreadable
                    continue
                if lower == "vary":
                    vary_lines.append(value)
                    continue
            response.headers.add(name, value)
        if report_only:
            _report(request, decision, upstream)
        else:
            response.headers["Vary"] = merge_vary(vary_lines, _VARY_ORIGIN)
            cors_headers = request.get(_CORS_HEADERS)
            if cors_headers is None:
                cors_headers = actual_headers(decision, upstream.headers.keys())
            for name, value in cors_headers:
                response.headers.add(name, value)
        request[_UPSTREAM_LACKS] = frozenset(name for name in _ADDED_BY_AIOHTTP if name not in upstream.headers)
        await response.prepare(request)
        if request.method != "HEAD" and upstream.status not in (204, 304):
            relayed = 0
            while True:
                try:
                    chunk = await upstream.content.readany()
                except (aiohttp.ClientError, TimeoutError) as exc:
                    # Headers are already sent: the only honest signal left is to cut the connection, so that the
                    # client sees an aborted response instead of a silently truncated "complete" one.
                    request[UPSTREAM_ERROR] = "disconnect"
                    request[_BODY_BYTES] = relayed
                    if PROXY_LINES.admit("upstream_disconnect"):
                        log.warning("upstream failed mid-response: %s %s: %r", request.method, request.raw_path, exc)
                    if request.transport is not None:
                        request.transport.abort()
                    return response
                if not chunk:
                    break
                await response.write(chunk)  # waits for the client to drain: memory stays bounded
                relayed += len(chunk)
            request[_BODY_BYTES] = relayed
        await response.write_eof()
        completed = True
        return response
    finally:
        if completed:
            upstream.release()
        else:
            upstream.close()  # the client left or the upstream broke: this connection must not go back to the pool


async def _undo_invented_headers(request: web.Request, response: web.StreamResponse) -> None:
    """``on_response_prepare`` runs after aiohttp filled in its defaults and before the head is written.

    A relayed response loses what the upstream did not send; corsproxy's own answers lose aiohttp's ``Server``
    (it names the Python and aiohttp versions, and the preflight fast path sends none: both paths answer alike)."""
    lacks = request.get(_UPSTREAM_LACKS)
    if lacks is None:
        response.headers.popall("Server", None)
        return
    for name in lacks:
        response.headers.popall(name, None)


def _upstream_failure(
    request: web.Request, decision: Decision, exc: BaseException, body: _RequestBody | None
) -> web.StreamResponse:
    """Map a failure before the upstream's response head to corsproxy's answer, with CORS headers so that an allowed
    page can read the error."""
    method, path = request.method, request.raw_path
    # Every line here can be caused by a client (or by a flood while the upstream is down): rate-limited per reason.
    if body is not None and body.too_large:
        if PROXY_LINES.admit("request_body_too_large"):
            log.warning("request body over the limit, upstream request cut: %s %s", method, path)
        response = _error_response(413, f"request body over {body.limit} bytes", decision)
        response.force_close()
        return response
    if body is not None and body.client_failed:
        if PROXY_LINES.admit("request_body_broken"):
            log.warning("client request body broken, upstream request cut: %s %s: %r", method, path, exc)
        response = _error_response(400, "malformed request body", decision)
        response.force_close()
        return response
    if isinstance(exc, TimeoutError):
        request[UPSTREAM_ERROR] = "timeout"
        if PROXY_LINES.admit("upstream_timeout"):
            log.warning("upstream timeout: %s %s", method, path)
        return _error_response(504, "upstream timed out", decision)
    if isinstance(exc, aiohttp.ClientConnectorError):
        request[UPSTREAM_ERROR] = "connect"
        if PROXY_LINES.admit("upstream_connect"):
            log.warning("upstream unreachable: %s %s: %s", method, path, exc)
        return _error_response(502, "upstream unreachable", decision)
    request[UPSTREAM_ERROR] = "protocol"
    if PROXY_LINES.admit("upstream_protocol"):
        log.warning("upstream error: %s %s: %r", method, path, exc)
    return _error_response(502, "bad response from upstream", decision)


async def _forward_websocket(
    request: web.Request, state: ProxyState, decision: Decision, report_only: bool
) -> web.StreamResponse:
    """Relay a WebSocket: one handshake with the upstream, one with the client, then frames both ways.

    The handshake's ``Origin`` is judged like any CORS request: WebSockets are not covered by CORS, so without this
    check any page could open an authenticated socket with the user's cookies (cross-site WebSocket hijacking).
    """
    config = state.config
    if config.forwarding.websocket_origin_check and decision.refused_cross_origin and not report_only:
        if PROXY_LINES.admit("websocket_refused"):
            log.warning("WebSocket handshake refused: %s origin=%s", decision.reason.value, decision.origin)
        return _error_response(403, f"WebSocket handshake refused: {decision.reason.value}", decision)
    protocols = [
        item.strip()
        for line in request.headers.getall("Sec-WebSocket-Protocol", ())
        for item in line.split(",")
        if item.strip()
    ]
    headers = _upstream_headers(request_headers(_received_headers(request), _forward_context(request, state), True))
    max_size = config.limits.max_body_size
    url = URL(state.upstream_base + _request_target(request), encoded=True)
    started = time.monotonic()
    try:
        upstream = await state.session.ws_connect(
            url,
            headers=headers,
            protocols=protocols,
            max_msg_size=max_size,
            timeout=aiohttp.ClientWSTimeout(ws_receive=None, ws_close=10.0),
        )
    except aiohttp.WSServerHandshakeError as exc:
        request[UPSTREAM_ERROR] = "protocol"
        status = exc.status if 400 <= exc.status < 600 else 502
        if PROXY_LINES.admit("upstream_websocket_refused"):
            log.warning("upstream refused the WebSocket handshake: %s: %s", request.raw_path, exc)
        return _error_response(status, "upstream refused the WebSocket handshake", decision)
    except (aiohttp.ClientError, TimeoutError) as exc:
        return _upstream_failure(request, decision, exc, None)
    request[UPSTREAM_LATENCY] = time.monotonic() - started
    client = web.WebSocketResponse(
        protocols=(upstream.protocol,) if upstream.protocol else (), max_msg_size=max_size, timeout=10.0
    )
    try:
        await client.prepare(request)
        to_upstream = asyncio.create_task(_relay(client, upstream))
        to_client = asyncio.create_task(_relay(upstream, client))
        try:
            await asyncio.wait((to_upstream, to_client), return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (to_upstream, to_client):
                task.cancel()
            await asyncio.gather(to_upstream, to_client, return_exceptions=True)
    finally:
        code = client.close_code or upstream.close_code
        if code is None or code in _UNSENDABLE_CLOSE_CODES:
            code = aiohttp.WSCloseCode.GOING_AWAY
        await upstream.close(code=code)
        await client.close(code=code)
    return client


async def _relay(source: web.WebSocketResponse | aiohttp.ClientWebSocketResponse, sink: Any) -> None:
    """Copy data frames from one side to the other until ``source`` closes; pings are answered per hop."""
    async for message in source:
        if message.type is aiohttp.WSMsgType.TEXT:
            await sink.send_str(message.data)
        elif message.type is aiohttp.WSMsgType.BINARY:
            await sink.send_bytes(message.data)
        else:
            break  # an error frame: end the relay, the finally in _forward_websocket closes both sides


def _report(request: web.Request, decision: Decision, upstream: aiohttp.ClientResponse) -> None:
    """Report-only mode: log where corsproxy's answer would differ from the upstream's."""
    if decision.kind is Kind.NON_CORS:
        return
    upstream_allows = upstream.headers.get("Access-Control-Allow-Origin") in (decision.origin, "*")
    if decision.kind is Kind.PREFLIGHT:
        upstream_allows = upstream_allows and 200 <= upstream.status < 300
    if upstream_allows != decision.allowed and PROXY_LINES.admit("report_only_difference"):
        log.warning(
            "report-only: %s %s origin=%s upstream %s, corsproxy would %s (%s)",
            request.method,
            request.raw_path,
            decision.origin or "(malformed)",
            "allowed" if upstream_allows else "refused",
            "allow" if decision.allowed else "refuse",
            decision.reason.value,
        )


async def _lifetime(app: web.Application) -> AsyncIterator[None]:
    config = app[CONFIG]
    configure_line_limits(config.logging)
    store = OriginStore(
        config.store.path, map_size=config.store.map_size_mb << 20, audit_retention=config.store.audit_retention
    )
    try:
        if app[_RECONCILE]:
            reconcile_and_log(store, config)
        connector = aiohttp.TCPConnector(
            limit=config.limits.max_upstream_connections,
            ssl=_ssl_context(config),
            enable_cleanup_closed=True,
        )
        session = aiohttp.ClientSession(
            connector=connector,
            auto_decompress=False,  # bytes through untouched; Content-Length stays true
            skip_auto_headers=("User-Agent", "Accept", "Accept-Encoding", "Content-Type"),
            cookie_jar=aiohttp.DummyCookieJar(),  # a proxy must not keep one user's cookies for the next
            timeout=_client_timeout(config.upstream),
            # Bigger reads per resumption for bulk bodies (W4); memory stays bounded by the drain per write.
            read_bufsize=1 << 18,
        )
        upstream = config.upstream
        base = f"{upstream.scheme}://{upstream.host}:{upstream.port}{upstream.base_path}"  # IPv6 host is bracketed
        app[STATE] = ProxyState(config, store, session, base)
        scheme = "https" if config.listen.tls_cert else "http"
        log.info(
            "corsproxy listening on %s://%s:%d, upstream %s, %d origin(s) in the store at %s",
            scheme,
            config.listen.host,
            config.listen.port,
            config.upstream.url,
            len(store),
            config.store.path,
        )
        yield
        await session.close()
    finally:
        store.close()
        flush_line_limits()  # the summaries of what was left out since the last window closed


def reconcile_and_log(store: OriginStore, config: Config) -> None:
    """Make the store's config-owned entries ``cors.allow_origins`` (a write transaction: waits for the writer lock)."""
    changed, removed, _, _ = reconcile_on_start(store, config)
    if changed or removed:
        log.info("store reconciled with config: %d added or changed, %d removed", len(changed), len(removed))


def _ssl_context(config: Config) -> Any:
    if config.upstream.ca_bundle is None:
        return True  # default verification against the system trust store
    import ssl

    return ssl.create_default_context(cafile=config.upstream.ca_bundle)


def handler_args(limits: Limits) -> dict[str, Any]:
    """The aiohttp connection settings that enforce ``limits``; passed by :func:`create_app` as ``handler_args``."""
    ceiling = 2 * limits.max_header_size  # past the soft limit (431 from the handler) up to here; then the parser
    return {
        "max_field_size": ceiling,
        "max_line_size": ceiling,
        "keepalive_timeout": limits.idle_timeout,
    }


def create_app(config: Config, *, reconcile: bool = True) -> web.Application:
    """The proxy as an aiohttp application; the store and client session open when it starts.

    ``reconcile=False`` leaves the store's config-owned entries to the caller: ``corsproxy serve`` reconciles in one
    place (before the first worker starts, and once per reload), so that no worker's start waits for LMDB's writer
    lock, which a long import may hold for seconds.

    Served by :class:`ProxyRunner` it also gets the header-read timeout; under a plain ``AppRunner`` everything else
    still holds (a slow head is then bounded by ``limits.idle_timeout``).
    """
    kwargs = handler_args(config.limits)
    # handler_cancellation: a client that disconnects cancels its handler, and with it the upstream request.
    app = web.Application(handler_args={**kwargs, "handler_cancellation": True})
    app[CONFIG] = config
    app[_RECONCILE] = reconcile
    app.cleanup_ctx.append(_lifetime)
    app.on_response_prepare.append(_undo_invented_headers)
    app.router.add_route("*", "/{tail:.*}", handle, expect_handler=_expect_handler)
    return app
