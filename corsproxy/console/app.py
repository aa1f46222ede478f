"""The operator console at ``/console/`` on the admin listener: its pages, its JSON endpoints and its own sign-in.

Security model. The admin API answers tools (a bearer token, no page). The console is the one page it answers, and
only on its own origin:

- Sign-in exchanges an admin token for a session: a random id in an ``HttpOnly; SameSite=Strict; Path=/console/``
  cookie (``Secure`` on TLS), stored only as its SHA-256 in the shared console environment, with an expiry, bound to
  the ``Host`` it was issued for and to the token (a token removed from the configuration ends its sessions).
- Every request a browser marks as coming from another site (``Sec-Fetch-Site`` other than ``same-origin``/``none``,
  or an ``Origin`` that is not the console's own) is refused, except a top-level navigation to ``/console/`` itself,
  which shows nothing but the sign-in shell. Every write also needs the session's CSRF token in ``X-CSRF-Token``,
  a value only a same-origin script can read (``GET /console/api/session``); sign-out deletes the session.
- Every response carries a strict ``Content-Security-Policy`` (scripts and styles from the console's own files only,
  no inline code, ``frame-ancestors 'none'``), ``X-Content-Type-Options: nosniff`` and ``Referrer-Policy: no-referrer``.
- The console's writes run the admin API's own handlers (same validation, safety checks, ownership conflicts and
  audit), with the actor ``admin:<token name>`` of the token the session was signed in with.

:func:`console_gate` is an admin-app middleware placed before the admin API's own authentication: it takes every
``/console`` request, authenticates it by session, and calls the route's handler itself; every other path goes on to
the admin API's bearer-token check unchanged, so a session cookie opens nothing there.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import heapq
import hmac
import json
import logging
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from aiohttp import web

from corsproxy.config import ConfigError, load_config
from corsproxy.console.db import SERIES_STEP, ConsoleDB, console_db_path
from corsproxy.core.decision import Reason
from corsproxy.core.origin_lines import parse_entry
from corsproxy.core.problems import ProblemError
from corsproxy.core.settings import Config
from corsproxy.ops import admin
from corsproxy.origins.file import applied as origins_file_applied
from corsproxy.origins.writes import DECLARED_SOURCES, Declarations, DeclaredElsewhere
from corsproxy.store import OriginRecord, OriginStore

__all__ = ["CONSOLE", "SESSION_COOKIE", "SESSION_TTL", "ConsoleState", "console_gate", "mount_console"]

log = logging.getLogger("corsproxy.console")

SESSION_COOKIE = "corsproxy_console"
#: Seconds a sign-in lasts; then the token is asked for again.
SESSION_TTL = 8 * 3600
CSRF_HEADER = "X-CSRF-Token"
PREFIX = "/console/"
_API = PREFIX + "api/"
#: A console request body is a small JSON object; the admin API's own limit is for imports.
_MAX_BODY = 64 << 10
_PAGE_DEFAULT, _PAGE_MAX = 50, 500
#: The actor filter reads at most this many of the newest audit events (the store indexes the trail by time only).
_AUDIT_SCAN = 5000

CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; "
    "form-action 'self'; base-uri 'none'; frame-ancestors 'none'"
)
_SECURITY_HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    "Cross-Origin-Opener-Policy": "same-origin",
    "Cross-Origin-Resource-Policy": "same-origin",
}
_CONTENT_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
}
#: Refusals an origin-store entry can fix; the Refusals screen offers "Allow…" for these.
_ALLOWABLE = frozenset({Reason.ORIGIN_NOT_ALLOWED.value, Reason.ORIGIN_EXPIRED.value})
_NOT_REFUSALS = frozenset({Reason.ALLOWED.value, Reason.NO_ORIGIN.value, Reason.SAME_ORIGIN.value})
#: Key names whose values are secrets wherever they appear (the configuration has none today: tokens come from the
#: environment or a file, credentials in the upstream URL are refused; this is the guard if one is added).
_SECRET_WORDS = ("token", "tokens", "secret", "password", "passwd", "api_key")


@dataclass
class ConsoleState:
    """Per admin app: the shared environment (open while the app runs) and the console's files, read once."""

    db: ConsoleDB | None = None
    files: dict[str, tuple[bytes, str]] = field(default_factory=dict)
    token_hashes: dict[str, str] = field(default_factory=dict)  # sha256(token) hex -> token name


CONSOLE = web.AppKey("console", ConsoleState)
_SESSION = web.RequestKey("console_session", dict)


def _token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def _session_key(session_id: str) -> bytes:
    return hashlib.sha256(session_id.encode()).digest()


def _load_files() -> dict[str, tuple[bytes, str]]:
    files: dict[str, tuple[bytes, str]] = {}
    root = resources.files("corsproxy.console") / "static"
    for entry in root.iterdir():
        suffix = Path(entry.name).suffix
        if entry.is_file() and suffix in _CONTENT_TYPES:
            files[entry.name] = (entry.read_bytes(), _CONTENT_TYPES[suffix])
    return files


# -- the gate -----------------------------------------------------------------------------------------------------


def _refuse(reason: str) -> admin.AdminError:
    return admin.AdminError(403, "forbidden", reason)


def _own_origin(request: web.Request) -> str:
    return f"{request.scheme}://{request.host}"


@web.middleware
async def console_gate(request: web.Request, handler: admin.Handler) -> web.StreamResponse:
    path = request.path
    if path != "/console" and not path.startswith(PREFIX):
        return await handler(request)
    try:
        response = await _dispatch(request)
    except admin.AdminError as exc:
        response = exc.response()
    except web.HTTPException as exc:
        if exc.status == 405:
            reason = f"{request.method} is not allowed here; allowed: {exc.headers.get('Allow', '')}"
        elif exc.status == 404:
            reason = f"nothing at {request.path}"
        else:
            reason = exc.text or ""
        response = web.json_response({"error": exc.reason, "reason": reason}, status=exc.status)
    except asyncio.CancelledError:
        raise
    except Exception:
        log.exception("console %s %s failed", request.method, request.path)
        response = web.json_response({"error": "internal error", "reason": "see the corsproxy log"}, status=500)
    for name, value in _SECURITY_HEADERS.items():
        response.headers[name] = value
    response.headers.setdefault("Cache-Control", "no-store")
    return response


async def _dispatch(request: web.Request) -> web.StreamResponse:
    path = request.path
    if path == "/console":
        return web.Response(status=308, headers={"Location": PREFIX})
    ctx = request.app[admin.ADMIN]
    navigation = request.method in ("GET", "HEAD") and path == PREFIX
    # A page on another site may link here (a top-level navigation: the Strict cookie is not sent, so it gets the
    # sign-in shell); it may not embed, fetch or post anything.
    fetch_site = request.headers.get("Sec-Fetch-Site")
    if fetch_site not in (None, "same-origin", "none") and not navigation:
        raise _refuse("the console answers only its own pages (Sec-Fetch-Site: " + fetch_site + ")")
    origin = request.headers.get("Origin")
    if origin is not None and origin != _own_origin(request):
        raise _refuse(f"Origin {origin!r} is not the console's own origin {_own_origin(request)!r}")
    write = request.method not in ("GET", "HEAD", "OPTIONS")
    if write and origin is None:
        raise _refuse("console writes come from the console's page, which sends Origin; use the admin API from tools")
    if not ctx.tokens and not admin._loopback_host(request.host):
        raise _refuse(f"Host {request.host!r} is not a loopback name; without a token only loopback is served")
    # GET session answers "signed out" itself (the page asks it on load; a 401 would be a console error each time).
    public = (
        navigation
        or path.startswith(PREFIX + "static/")
        or (path == _API + "session" and request.method in ("GET", "HEAD", "POST"))
    )
    if not public:
        session = await _session(request)
        if write and not hmac.compare_digest(request.headers.get(CSRF_HEADER, "").encode(), session["csrf"].encode()):
            raise _refuse(f"missing or wrong {CSRF_HEADER} header: reload the console page")
        request[_SESSION] = session
        request[admin._ACTOR] = f"admin:{session['name']}"
    if write and (request.content_length or 0) > _MAX_BODY:
        raise admin.AdminError(413, "request body too large", f"console requests are at most {_MAX_BODY} bytes")
    # The route's own handler, past the admin API's bearer-token middleware: this request was authenticated above.
    return await request.match_info.handler(request)


def _db(request: web.Request) -> ConsoleDB:
    db = request.app[CONSOLE].db
    if db is None:
        raise admin.AdminError(503, "console unavailable", "the console's data could not be opened: see the log")
    return db


async def _session(request: web.Request) -> dict[str, Any]:
    session_id = request.cookies.get(SESSION_COOKIE)
    if not session_id:
        raise admin.AdminError(401, "unauthorized", "sign in with an admin token")
    db = _db(request)
    key = _session_key(session_id)
    session = await asyncio.to_thread(db.get_session, key, time.time())
    if session is None:
        raise admin.AdminError(401, "unauthorized", "the session has ended (expired or signed out): sign in again")
    if session.get("host") != request.host:
        raise admin.AdminError(401, "unauthorized", "this session was signed in on another address: sign in again")
    if session.get("token") not in request.app[CONSOLE].token_hashes:
        await asyncio.to_thread(db.delete_session, key)
        raise admin.AdminError(401, "unauthorized", "the token of this session is no longer configured: sign in again")
    return session


async def _json_object(request: web.Request) -> dict[str, Any]:
    if request.content_type != "application/json":
        raise admin.AdminError(415, "unsupported media type", "send a JSON object with Content-Type: application/json")
    return await admin._json_body(request)


# -- pages --------------------------------------------------------------------------------------------------------


def _file(request: web.Request, name: str) -> web.Response:
    found = request.app[CONSOLE].files.get(name)
    if found is None:
        raise admin.AdminError(404, "not found", f"no console file {name!r}")
    body, content_type = found
    return web.Response(body=body, headers={"Content-Type": content_type, "Cache-Control": "no-cache"})


async def index(request: web.Request) -> web.Response:
    return _file(request, "index.html")


async def static(request: web.Request) -> web.Response:
    return _file(request, request.match_info["name"])


# -- session ------------------------------------------------------------------------------------------------------


def _session_json(session: dict[str, Any]) -> dict[str, Any]:
    return {
        "signed_in": True,
        "actor": f"admin:{session['name']}",
        "csrf": session["csrf"],
        "expires": session["expires"],
    }


async def sign_in(request: web.Request) -> web.Response:
    ctx = request.app[admin.ADMIN]
    body = await _json_object(request)
    presented = body.get("token")
    if not isinstance(presented, str) or not presented:
        raise admin.AdminError(400, "missing token", "type an admin token", field="token")
    if not ctx.tokens:
        raise _refuse(
            "the console needs an admin token: set CORSPROXY_ADMIN_TOKEN or admin.token_file, then restart or reload"
        )
    name = None
    given = presented.strip().encode()
    for token, token_name in ctx.tokens.items():  # every token compared: the time does not tell which one failed
        if hmac.compare_digest(given, token.encode()):
            name = token_name
    if name is None:
        log.warning("console sign-in refused from %s: not a valid admin token", request.remote)
        raise admin.AdminError(401, "unauthorized", "that is not a valid admin token", field="token")
    session_id = secrets.token_urlsafe(32)
    now = time.time()
    session = {
        "name": name,
        "token": _token_hash(presented.strip()),
        "host": request.host,
        "csrf": secrets.token_urlsafe(32),
        "created": now,
        "expires": now + SESSION_TTL,
    }
    await asyncio.to_thread(_db(request).put_session, _session_key(session_id), session)
    log.info("console sign-in by admin:%s from %s", name, request.remote)
    response = web.json_response(_session_json(session), status=201)
    response.set_cookie(
        SESSION_COOKIE,
        session_id,
        max_age=SESSION_TTL,
        path=PREFIX,
        httponly=True,
        samesite="Strict",
        secure=request.secure,
    )
    return response


async def get_session(request: web.Request) -> web.Response:
    try:
        session = await _session(request)
    except admin.AdminError as exc:
        if exc.status != 401:
            raise
        return web.json_response({"signed_in": False, "reason": exc.reason})
    return web.json_response(_session_json(session))


async def sign_out(request: web.Request) -> web.Response:
    session_id = request.cookies.get(SESSION_COOKIE, "")
    await asyncio.to_thread(_db(request).delete_session, _session_key(session_id))
    log.info("console sign-out by %s", request[admin._ACTOR])
    response = web.json_response({"signed_out": True})
    response.del_cookie(SESSION_COOKIE, path=PREFIX)
    return response


# -- overview and charts ------------------------------------------------------------------------------------------


def _counter_totals(text: str) -> dict[str, dict[str, float]]:
    """``metric name -> {label value -> total}`` for the rare-event counters the overview shows."""
    # Imported here: prometheus-client must not be loaded before serve sets its multiprocess directory.
    from prometheus_client.parser import text_string_to_metric_families

    wanted = {"corsproxy_reloads": "result", "corsproxy_origins_file_syncs": "result"}
    out: dict[str, dict[str, float]] = {name: {} for name in wanted}
    for family in text_string_to_metric_families(text):
        label = wanted.get(family.name)
        if label is None:
            continue
        for sample in family.samples:
            if sample.name.endswith("_total"):
                value = sample.labels.get(label, "")
                out[family.name][value] = out[family.name].get(value, 0.0) + sample.value
    return out


async def overview(request: web.Request) -> web.Response:
    ctx = request.app[admin.ADMIN]
    state = ctx.state
    config = state.config
    entries = await asyncio.to_thread(len, state.store)
    watched = config.origins_file.path
    file_state: dict[str, Any] = {"path": watched}
    if watched:
        file_state["applied"] = await asyncio.to_thread(origins_file_applied, watched, Path(config.store.path))
    counters: dict[str, dict[str, float]] = {}
    if ctx.render_metrics is not None:
        body, _content_type = await asyncio.to_thread(ctx.render_metrics, state)
        counters = _counter_totals(body.decode())
    file_state["syncs"] = counters.get("corsproxy_origins_file_syncs", {})
    return web.json_response(
        {
            "store": {"entries": entries, "path": config.store.path},
            "config": {"source": config.source, "warnings": list(config.warnings), "mode": config.engine.mode.value},
            "worker": {"started": ctx.started, "draining": ctx.draining},
            "reloads": counters.get("corsproxy_reloads", {}),
            "origins_file": file_state,
            "now": time.time(),
        }
    )


def _percentile(histogram: list[float], q: float, bounds: tuple[float, ...]) -> float | None:
    """The q-quantile of a batched histogram (per-bucket counts, +Inf, sum), interpolated inside its bucket as
    Prometheus's ``histogram_quantile`` does; in milliseconds."""
    counts = histogram[: len(bounds) + 1]
    total = sum(counts)
    if total <= 0:
        return None
    target = q * total
    seen = 0.0
    for index, count in enumerate(counts):
        if count and seen + count >= target:
            if index >= len(bounds):
                return bounds[-1] * 1000
            lower = bounds[index - 1] if index else 0.0
            return (lower + (bounds[index] - lower) * (target - seen) / count) * 1000
        seen += count
    return bounds[-1] * 1000


async def series(request: web.Request) -> web.Response:
    from corsproxy.console.db import merge_bucket
    from corsproxy.ops.metrics import _LATENCY_BUCKETS as bounds  # the histograms' bucket bounds, as counted

    window = admin._int_query(request, "window", 900, 60, 3600)
    step = SERIES_STEP if window <= 900 else 6 * SERIES_STEP
    now = int(time.time())
    last = now // step * step
    start = last - window + step
    points = window // step
    merged: list[dict[str, Any]] = [{} for _ in range(points)]
    for bucket_start, counts in await asyncio.to_thread(_db(request).series, start):
        index = (bucket_start - start) // step
        if 0 <= index < points:
            merge_bucket(merged[index], counts)
    requests: dict[str, list[float]] = {}
    refusals: dict[str, list[float]] = {}
    statuses: dict[str, list[float]] = {}
    latency: dict[str, list[float | None]] = {"p50": [], "p95": [], "p99": []}
    duration: dict[str, list[float | None]] = {"p50": [], "p95": [], "p99": []}

    def add(series_map: dict[str, list[float]], name: str, index: int, count: float) -> None:
        values = series_map.setdefault(name, [0.0] * points)
        values[index] += count / step

    for index, bucket in enumerate(merged):
        for name, count in bucket.get("r", {}).items():
            kind, _, reason = name.partition("|")
            if kind == "non_cors":
                add(requests, "non-CORS", index, count)
            else:
                verdict = "allowed" if reason in _NOT_REFUSALS else "refused"
                add(requests, f"{kind} {verdict}", index, count)
                if reason not in _NOT_REFUSALS:
                    add(refusals, reason, index, count)
        for name, count in bucket.get("s", {}).items():
            add(statuses, name, index, count)
        for target, part in ((latency, "u"), (duration, "d")):
            histogram = bucket.get(part)
            for q, name in ((0.5, "p50"), (0.95, "p95"), (0.99, "p99")):
                target[name].append(None if not histogram else _percentile(histogram, q, bounds))
    return web.json_response(
        {
            "window": window,
            "step": step,
            "start": start,
            "end": last + step,
            "requests": dict(sorted(requests.items())),
            "refusals": dict(sorted(refusals.items())),
            "status": dict(sorted(statuses.items())),
            "upstream_latency_ms": latency,
            "duration_ms": duration,
        }
    )


# -- refusals -----------------------------------------------------------------------------------------------------


async def refusals(request: web.Request) -> web.Response:
    rows = await asyncio.to_thread(_db(request).refusals, 500)
    groups: dict[str, dict[str, Any]] = {}
    for row in rows:  # newest first, so each group's first row is its latest
        group = groups.setdefault(
            row.origin, {"origin": row.origin, "count": 0, "last": row.last, "allowable": False, "requests": []}
        )
        group["count"] += row.count
        allowable = bool(row.origin) and row.reason in _ALLOWABLE
        group["allowable"] = group["allowable"] or allowable
        group["requests"].append({**row.as_json(), "allowable": allowable})
    return web.json_response({"groups": list(groups.values()), "now": time.time()})


# -- origins ------------------------------------------------------------------------------------------------------


def _prefixes(query: str) -> list[str]:
    """What a search box entry matches: the start of an origin, with or without its scheme."""
    if not query or "://" in query or "https://".startswith(query) or "http://".startswith(query):
        return [query]
    return ["http://" + query, "https://" + query]


def _scan(store: OriginStore, prefix: str, after: str, limit: int) -> list[tuple[str, OriginRecord]]:
    """Up to ``limit`` entries whose key starts with ``prefix``, after ``after``: one cursor range scan, so a page
    costs the same at a hundred entries as at a million."""
    out: list[tuple[str, OriginRecord]] = []
    start = after
    if not after or after < prefix:
        start = prefix
        exact = store.get(prefix) if prefix else None  # items() starts *after* its key, so the key itself first
        if exact is not None:
            out.append((prefix, exact))
    for key, record in store.items(after=start, limit=limit) if start else store.items(limit=limit):
        if not key.startswith(prefix):
            break
        out.append((key, record))
    return out[:limit]


def _declared_where(config: Config, source: str) -> str | None:
    if source == "config":
        return f"cors.allow_origins in {config.source}"
    if source == "file":
        return f"the origins file {config.origins_file.path or ''}".rstrip()
    return None


def _origin_json(config: Config, key: str, record: OriginRecord, now: float) -> dict[str, Any]:
    return {
        **admin._record_json(key, record, now),
        "declared_in": _declared_where(config, record.source),
    }


async def list_origins(request: web.Request) -> web.Response:
    state = request.app[admin.ADMIN].state
    config = state.config
    limit = admin._int_query(request, "limit", _PAGE_DEFAULT, 1, _PAGE_MAX)
    after = request.query.get("after", "")
    query = request.query.get("q", "").strip()
    started = time.perf_counter()

    def page() -> tuple[list[tuple[str, OriginRecord]], int]:
        found = [_scan(state.store, prefix, after, limit + 1) for prefix in _prefixes(query)]
        merged = list(heapq.merge(*found, key=lambda item: item[0]))[: limit + 1]
        return merged, len(state.store)

    items, total = await asyncio.to_thread(page)
    more = len(items) > limit
    items = items[:limit]
    now = time.time()
    elapsed_ms = (time.perf_counter() - started) * 1000
    return web.json_response(
        {
            "origins": [_origin_json(config, key, record, now) for key, record in items],
            "next": items[-1][0] if more else None,
            "total": total,
            "query": query,
            "prefixes": _prefixes(query),
            "policies": sorted(config.safety),
            "elapsed_ms": round(elapsed_ms, 3),
        }
    )


async def check_origin(request: web.Request) -> web.Response:
    """The add form's review step: every check a write makes, nothing written."""
    state = request.app[admin.ADMIN].state
    config = state.config
    body = await _json_object(request)
    origin = body.pop("origin", None)
    if not isinstance(origin, str) or not origin.strip():
        return web.json_response({"ok": False, "field": "origin", "error": "type the origin or pattern to allow"})
    try:
        options = admin._validate_put(body)
        try:
            entry, warnings = parse_entry(
                origin.strip(),
                config.safety,
                policy=options["policy"],
                expires=options["expires"],
                ttl=options["ttl"],
                note=options["note"] or "",
            )
        except ProblemError as exc:
            raise admin._invalid(exc.problems, origin_in="body") from None
        current = state.store.get(entry.key)
        if current is not None and current.source in DECLARED_SOURCES:
            where = Declarations.of(config).where(current.source)
            raise admin._conflict(DeclaredElsewhere(entry.key, current.source, where), origin_in="body")
    except admin.AdminError as exc:
        problems = [problem.as_json() for problem in exc.problems]
        return web.json_response(
            {"ok": False, "field": exc.field, "error": exc.error, "reason": exc.reason, "problems": problems}
        )
    return web.json_response(
        {
            "ok": True,
            "origin": entry.key,
            "policy": entry.policy,
            "warnings": [warning.message for warning in warnings],
            "replaces": None if current is None else current.as_json(),
        }
    )


def _admin_path(request: web.Request) -> str:
    raw = request.raw_path.split("?", 1)[0]
    return "/origins/" + raw[len(_API + "origins/") :]


async def put_origin(request: web.Request) -> web.StreamResponse:
    # The admin API's handler itself: one validation, conflict and audit path for every write.
    return await admin.put_origin(request.clone(rel_url=_admin_path(request)))


async def delete_origin(request: web.Request) -> web.StreamResponse:
    return await admin.delete_origin(request.clone(rel_url=_admin_path(request)))


# -- explain, audit -----------------------------------------------------------------------------------------------


async def explain(request: web.Request) -> web.StreamResponse:
    return await admin.explain_request(request)


async def audit(request: web.Request) -> web.StreamResponse:
    actor = request.query.get("actor", "").strip()
    if not actor:
        return await admin.audit(request)
    state = request.app[admin.ADMIN].state
    limit = admin._int_query(request, "limit", 100, 1, 1000)
    origin = request.query.get("origin") or None
    if origin is not None:
        origin = _canonical(origin)
    events = await asyncio.to_thread(state.store.history, origin=origin, limit=_AUDIT_SCAN)
    matching = [event for event in events if actor in event.actor][-limit:]
    return web.json_response({"events": [event.as_json() for event in matching], "scanned": _AUDIT_SCAN})


def _canonical(origin: str) -> str:
    from corsproxy.core.origin import EntryError, parse_origin_entry

    try:
        return parse_origin_entry(origin).key
    except EntryError as exc:
        raise admin.AdminError(400, "invalid origin", problems=[exc.problem.at("query.origin")]) from None


# -- configuration ------------------------------------------------------------------------------------------------


def _redact(value: Any, secrets_seen: Iterable[str]) -> Any:
    secrets_list = [s for s in secrets_seen if s]

    def walk(item: Any, key: str = "") -> Any:
        name = key.lower()
        if any(name == word or name.endswith("_" + word) for word in _SECRET_WORDS):
            return "(redacted)" if item not in (None, "", [], {}) else item
        if isinstance(item, dict):
            return {k: walk(v, str(k)) for k, v in item.items()}
        if isinstance(item, list | tuple):
            return [walk(v) for v in item]
        if isinstance(item, str):
            for secret in secrets_list:
                item = item.replace(secret, "(redacted)")
        return item

    return walk(value)


def effective_config(config: Config, tokens: Iterable[str] = ()) -> dict[str, Any]:
    """The running configuration as compiled (defaults filled in), with secrets redacted."""
    engine = config.engine
    policies = {
        name: {
            "allow_methods": sorted(policy.allow_methods) + (["*"] if policy.any_method else []),
            "allow_headers": sorted(policy.allow_headers) + (["*"] if policy.any_header else []),
            "expose_headers": list(policy.expose_headers) + (["*"] if policy.expose_all else []),
            "allow_credentials": policy.allow_credentials,
            "max_age": policy.max_age,
            "allow_private_network": policy.allow_private_network,
            "preflight_status": policy.preflight_status,
        }
        for name, policy in sorted(engine.policies.items())
    }
    routes = [
        {
            "path": route.prefix,
            "mode": route.mode.value,
            "allow_origins": sorted(route.origins.entries) if route.origins is not None else "(the origin store)",
        }
        for route in engine.routes
    ]
    data = {
        "source": config.source,
        "listen": dataclasses.asdict(config.listen),
        "upstream": dataclasses.asdict(config.upstream),
        "store": dataclasses.asdict(config.store),
        "cors": {
            "mode": engine.mode.value,
            "block_disallowed": engine.block_disallowed.value,
            "public_origins": sorted(engine.public_origins),
            "debug_reason_header": engine.debug_reason_header,
            "allow_origins": {
                key: {"policy": entry.policy, "expires": entry.expires, "note": entry.note}
                for key, entry in sorted(config.origins.items())
            },
        },
        "policies": policies,
        "routes": routes,
        "forwarding": dataclasses.asdict(config.forwarding),
        "limits": dataclasses.asdict(config.limits),
        "admin": dataclasses.asdict(config.admin),  # where the tokens are read from, never the tokens
        "logging": dataclasses.asdict(config.logging),
        "origins_file": dataclasses.asdict(config.origins_file),
        "warnings": list(config.warnings),
    }
    redacted: dict[str, Any] = _redact(json.loads(json.dumps(data, default=str)), tokens)
    return redacted


async def get_config(request: web.Request) -> web.Response:
    ctx = request.app[admin.ADMIN]
    return web.json_response(effective_config(ctx.state.config, ctx.tokens))


async def check_config(request: web.Request) -> web.Response:
    """Validate the configuration file as a reload would, changing nothing."""
    ctx = request.app[admin.ADMIN]
    path = ctx.config_path or ctx.state.config.source

    def validate() -> Config:
        config = load_config(path)
        from corsproxy.ops.server import check_admin_tokens

        check_admin_tokens(config)
        return config

    try:
        config = await asyncio.to_thread(validate)
    except ConfigError as exc:
        return web.json_response({"ok": False, "config": path, "problems": [p.as_json() for p in exc.problems]})
    return web.json_response({"ok": True, "config": path, "warnings": list(config.warnings), "problems": []})


async def reload(request: web.Request) -> web.StreamResponse:
    return await admin.reload(request)


# -- mounting -----------------------------------------------------------------------------------------------------


def mount_console(app: web.Application) -> None:
    """Add the console's routes to an admin app built with :func:`console_gate` among its middlewares."""
    state = ConsoleState(files=_load_files())
    app[CONSOLE] = state

    async def shared_db(app: web.Application) -> AsyncIterator[None]:
        ctx = app[admin.ADMIN]
        state.token_hashes = {_token_hash(token): name for token, name in ctx.tokens.items()}
        path = console_db_path(ctx.state.config.store.path)
        try:
            state.db = await asyncio.to_thread(ConsoleDB.shared, path)
        except Exception as exc:  # the admin API must keep working without the console
            log.error("console disabled: cannot open %s: %s", path, exc)
        try:
            yield
        finally:
            if state.db is not None:
                state.db.release()
                state.db = None

    app.cleanup_ctx.append(shared_db)
    routes: list[tuple[str, str, Callable[[web.Request], Awaitable[web.StreamResponse]]]] = [
        ("GET", PREFIX, index),
        ("GET", PREFIX + "static/{name}", static),
        ("GET", _API + "session", get_session),
        ("POST", _API + "session", sign_in),
        ("DELETE", _API + "session", sign_out),
        ("GET", _API + "overview", overview),
        ("GET", _API + "series", series),
        ("GET", _API + "refusals", refusals),
        ("GET", _API + "origins", list_origins),
        ("POST", _API + "origins/check", check_origin),
        ("PUT", _API + "origins/{origin:.+}", put_origin),
        ("DELETE", _API + "origins/{origin:.+}", delete_origin),
        ("GET", _API + "explain", explain),
        ("GET", _API + "audit", audit),
        ("GET", _API + "config", get_config),
        ("POST", _API + "config/check", check_config),
        ("POST", _API + "reload", reload),
    ]
    for method, path, handler in routes:
        if method == "GET":
            app.router.add_get(path, handler)  # and HEAD
        else:
            app.router.add_route(method, path, handler)
