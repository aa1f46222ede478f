"""The I/O shell: an aiohttp application that answers preflights itself and streams everything else to the upstream.

Owns the request handler, the forwarder and the lifetime of the resources a running proxy holds (the LMDB store and
one pooled ``ClientSession``, via ``cleanup_ctx``). All CORS judgement is delegated to :mod:`corsproxy.decision`;
this module turns requests into its arguments and decisions into headers.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from aiohttp import web
from multidict import CIMultiDict
from yarl import URL

from corsproxy.config import Config
from corsproxy.decision import (
    CorsEngine,
    Decision,
    Kind,
    Mode,
    actual_headers,
    merge_vary,
    preflight_headers,
)
from corsproxy.store import OriginRecord, OriginStore

__all__ = ["DECISION", "STATE", "Observer", "Outcome", "ProxyState", "create_app", "reconcile_config_origins"]

log = logging.getLogger("corsproxy")

#: RFC 9110 §7.6.1 hop-by-hop fields, plus the non-standard ones proxies have used; dropped in both directions.
HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "proxy-authorization",
        "proxy-authenticate",
    }
)

_VARY_ORIGIN = ("Origin",)
_STREAM_CHUNK = 1 << 16


@dataclass(frozen=True, slots=True)
class Outcome:
    """One finished request, as observers (metrics, request log) see it."""

    method: str
    path: str
    client: str
    decision: Decision
    status: int
    bytes_sent: int
    duration: float  # seconds, whole request
    upstream_latency: float | None  # seconds to the upstream's response head; None when not forwarded
    upstream_error: str | None = None  # "timeout" | "connect" | "protocol" | "disconnect"


Observer = Callable[[Outcome], None]


@dataclass
class ProxyState:
    """What a running proxy holds. ``config`` is replaced whole on reload; the rest lives as long as the app."""

    config: Config
    store: OriginStore
    session: aiohttp.ClientSession
    upstream_base: str  # scheme://host:port/base-path, no trailing slash
    observers: list[Observer] = field(default_factory=list)

    def observe(self, outcome: Outcome) -> None:
        for observer in self.observers:
            observer(outcome)


STATE = web.AppKey("state", ProxyState)
DECISION = web.RequestKey("cors_decision", Decision)
UPSTREAM_LATENCY = web.RequestKey("upstream_latency", float)
UPSTREAM_ERROR = web.RequestKey("upstream_error", str)
_CONFIG = web.AppKey("config", Config)


def reconcile_config_origins(store: OriginStore, config: Config) -> tuple[list[str], list[str], list[str]]:
    """Make the store's ``config``-owned entries exactly ``cors.allow_origins`` (issue 2: declarative part)."""
    wanted = {
        key: OriginRecord(policy=entry.policy, expires=entry.expires, source="config", note=entry.note)
        for key, entry in config.origins.items()
    }
    return store.reconcile(wanted, source="config")


def _hop_by_hop(headers: Any) -> set[str]:
    """The hop-by-hop names of a message: the fixed list plus every name its ``Connection`` field lists."""
    names = set(HOP_BY_HOP)
    for line in headers.getall("Connection", ()):
        names.update(item.strip().lower() for item in line.split(",") if item.strip())
    return names


def _upstream_request_headers(request: web.Request, state: ProxyState) -> CIMultiDict[str]:
    drop = _hop_by_hop(request.headers)
    drop.add("host")
    headers: CIMultiDict[str] = CIMultiDict()
    for name, value in request.headers.items():
        if name.lower() not in drop:
            headers.add(name, value)
    upstream = state.config.upstream
    if state.config.forwarding.preserve_host and "Host" in request.headers:
        headers["Host"] = request.headers["Host"]
    else:
        headers["Host"] = upstream.host if upstream.port in (80, 443) else f"{upstream.host}:{upstream.port}"
    peer = request.remote or ""
    prior = ", ".join(request.headers.getall("X-Forwarded-For", ()))
    headers["X-Forwarded-For"] = f"{prior}, {peer}" if prior else peer
    headers["X-Forwarded-Proto"] = request.scheme
    if request.host:
        headers["X-Forwarded-Host"] = request.headers.get("Host", request.host)
    return headers


def _text_response(status: int, text: str, headers: Iterable[tuple[str, str]]) -> web.Response:
    response = web.Response(status=status, text=text + "\n", content_type="text/plain")
    for name, value in headers:
        response.headers.add(name, value)
    return response


def _error_response(status: int, text: str, decision: Decision) -> web.Response:
    """corsproxy's own 4xx/5xx: readable by an allowed origin, so the browser shows the real error (CORS-RULES 12)."""
    return _text_response(status, text, [("Vary", "Origin"), *actual_headers(decision)])


def preflight_response(engine: CorsEngine, decision: Decision) -> web.Response:
    headers = preflight_headers(engine, decision)
    if decision.allowed:
        assert decision.policy is not None
        response = web.Response(status=decision.policy.preflight_status)
        for name, value in headers:
            response.headers.add(name, value)
        return response
    return _text_response(403, "CORS preflight refused", headers)


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
            state.observe(
                Outcome(
                    method=request.method,
                    path=request.raw_path,
                    client=request.remote or "",
                    decision=decision,
                    status=response.status if response is not None else 499,
                    bytes_sent=response.body_length if response is not None else 0,
                    duration=time.monotonic() - start,
                    upstream_latency=request.get(UPSTREAM_LATENCY),
                    upstream_error=request.get(UPSTREAM_ERROR),
                )
            )


async def _dispatch(request: web.Request, state: ProxyState) -> web.StreamResponse:
    config = state.config  # one snapshot per request: a reload never mixes two configs in one answer
    engine = config.engine
    method = request.method
    headers = request.headers
    origins = headers.getall("Origin", ())
    decision = engine.decide(
        method,
        origins,
        headers.getall("Access-Control-Request-Method", ()) if method == "OPTIONS" else (),
        headers.getall("Access-Control-Request-Headers", ()),
        request.raw_path,
        state.store,
        time.time(),
        private_network=headers.get("Access-Control-Request-Private-Network") == "true",
    )
    request[DECISION] = decision
    report_only = engine.mode is Mode.REPORT_ONLY or decision.mode is Mode.REPORT_ONLY
    if decision.kind is Kind.PREFLIGHT and not report_only:
        return preflight_response(engine, decision)  # never forwarded, even if the upstream would redirect
    if engine.blocks(decision, method) and not report_only:
        return _error_response(403, f"request refused: {decision.reason.value}", decision)
    return await forward(request, state, decision, report_only)


async def forward(request: web.Request, state: ProxyState, decision: Decision, report_only: bool) -> web.StreamResponse:
    """Stream the request to the upstream and its answer back, adding the decision's CORS headers."""
    config = state.config
    url = URL(state.upstream_base + request.raw_path, encoded=True)  # byte-for-byte path and query
    body = request.content if request.body_exists else None
    started = time.monotonic()
    try:
        upstream = await state.session.request(
            request.method,
            url,
            headers=_upstream_request_headers(request, state),
            data=body,
            allow_redirects=False,
            timeout=aiohttp.ClientTimeout(
                total=None,
                connect=config.upstream.connect_timeout,
                sock_read=config.upstream.read_timeout,
            ),
        )
    except TimeoutError:
        request[UPSTREAM_ERROR] = "timeout"
        log.warning("upstream timeout: %s %s", request.method, request.raw_path)
        return _error_response(504, "upstream timed out", decision)
    except aiohttp.ClientConnectorError as exc:
        request[UPSTREAM_ERROR] = "connect"
        log.warning("upstream unreachable: %s %s: %s", request.method, request.raw_path, exc)
        return _error_response(502, "upstream unreachable", decision)
    except aiohttp.ClientError as exc:
        request[UPSTREAM_ERROR] = "protocol"
        log.warning("upstream error: %s %s: %r", request.method, request.raw_path, exc)
        return _error_response(502, "bad response from upstream", decision)
    request[UPSTREAM_LATENCY] = time.monotonic() - started

    try:
        response = web.StreamResponse(status=upstream.status, reason=upstream.reason)
        drop = _hop_by_hop(upstream.headers)
        vary_lines: list[str] = []
        for raw_name, raw_value in upstream.raw_headers:
            name = raw_name.decode("latin-1")
            lower = name.lower()
            if lower in drop:
                continue
            if not report_only:
                if lower.startswith("access-control-"):
                    continue  # the upstream cannot re-open what the policy closed (CORS-RULES 10)
                if lower == "vary":
                    vary_lines.append(raw_value.decode("latin-1"))
                    continue
            response.headers.add(name, raw_value.decode("latin-1"))
        if report_only:
            _report(request, decision, upstream)
        else:
            response.headers["Vary"] = merge_vary(vary_lines, _VARY_ORIGIN)
            for name, value in actual_headers(decision, upstream.headers.keys()):
                response.headers.add(name, value)
        await response.prepare(request)
        if request.method != "HEAD" and upstream.status not in (204, 304):
            async for chunk in upstream.content.iter_chunked(_STREAM_CHUNK):
                await response.write(chunk)
        await response.write_eof()
        return response
    except (aiohttp.ClientError, TimeoutError) as exc:
        # Headers are already sent: the only honest signal left is to cut the connection, so that the client sees
        # an aborted response instead of a silently truncated "complete" one.
        request[UPSTREAM_ERROR] = "disconnect"
        log.warning("upstream failed mid-response: %s %s: %r", request.method, request.raw_path, exc)
        if request.transport is not None:
            request.transport.abort()
        raise
    finally:
        upstream.release()


def _report(request: web.Request, decision: Decision, upstream: aiohttp.ClientResponse) -> None:
    """Report-only mode: log where corsproxy's answer would differ from the upstream's (issue 3)."""
    if decision.kind is Kind.NON_CORS:
        return
    upstream_allows = upstream.headers.get("Access-Control-Allow-Origin") in (decision.origin, "*")
    if decision.kind is Kind.PREFLIGHT:
        upstream_allows = upstream_allows and 200 <= upstream.status < 300
    if upstream_allows != decision.allowed:
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
    config = app[_CONFIG]
    store = OriginStore(config.store.path, map_size=config.store.map_size_mb << 20)
    try:
        changed, removed, skipped = reconcile_config_origins(store, config)
        for key in skipped:
            log.warning("config lists %s, which the CLI already added: the CLI entry stays in charge", key)
        if changed or removed:
            log.info("store reconciled with config: %d added or changed, %d removed", len(changed), len(removed))
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
        )
        upstream = config.upstream
        base = f"{upstream.scheme}://{upstream.host}:{upstream.port}{upstream.base_path}"
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


def _ssl_context(config: Config) -> Any:
    if config.upstream.ca_bundle is None:
        return True  # default verification against the system trust store
    import ssl

    return ssl.create_default_context(cafile=config.upstream.ca_bundle)


def create_app(config: Config) -> web.Application:
    """The proxy as an aiohttp application; the store and client session open when it starts."""
    limits = config.limits
    app = web.Application(
        handler_args={
            "max_field_size": limits.max_header_size,
            "max_line_size": limits.max_header_size,
            "keepalive_timeout": limits.idle_timeout,
        }
    )
    app[_CONFIG] = config
    app.cleanup_ctx.append(_lifetime)
    app.router.add_route("*", "/{tail:.*}", handle)
    return app
