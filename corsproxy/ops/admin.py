"""The admin API: an aiohttp application on its own listener, never on the proxied port (every path there belongs to
the upstream).

Owns the admin endpoints, their bearer-token authentication and their JSON error shape. It shares the running proxy's
state (the config snapshot and the open LMDB store); every write goes through the one write service
(:mod:`corsproxy.origins.writes`: ownership and validation), and explain uses the explain engine. Endpoints::

    GET    /origins?limit=&after=&filter=     page through the store (``next`` is the cursor for ``after``)
    GET    /origins/{origin}                  one entry (origin URL-encoded)
    PUT    /origins/{origin}                  {"policy", "note", "expires" | "ttl"} -> 201 created / 200 replaced
    DELETE /origins/{origin}
    POST   /origins/import[?partial=true]     the CLI's line format; per-line errors in the answer
    GET    /explain?origin=&method=&headers=&path=
    GET    /audit?origin=&limit=
    GET    /healthz   GET /readyz   GET /metrics   POST /reload
    GET    /console/                          the operator console (:mod:`corsproxy.console`, its own sign-in)

Every error is JSON ``{"error", "problems": [{"path", "field", "code", "message"}]}`` (plus ``field`` and ``reason``,
the first problem's, for older clients) with a 4xx status; a write the store has no room for is a 507
naming the setting to change, a store that cannot be written a 503; an unexpected failure is a 500 with no stack
trace (it is logged instead). ``/healthz`` and ``/readyz`` need no token, so probes and ``HEALTHCHECK`` work; like
everything else they answer only Hosts a DNS-rebinding page cannot present (see :func:`_authenticate`).
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import json
import logging
import os
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

from aiohttp import web

from corsproxy.config import ConfigError, load_config
from corsproxy.core.explain import explain
from corsproxy.core.origin import EntryError, is_loopback_host, parse_origin_entry
from corsproxy.core.origin_lines import EntryEdit, parse_edits, parse_expires_field
from corsproxy.core.problems import Problem, ProblemError
from corsproxy.core.settings import Admin, Config
from corsproxy.http.app import STATE, ProxyState
from corsproxy.origins.file import applied as origins_file_applied
from corsproxy.origins.writes import Declarations, DeclaredElsewhere, WriteTarget, remove_entry, write_entries
from corsproxy.store import OriginRecord, StoreError, StoreSpaceError

__all__ = ["ADMIN", "AdminContext", "AdminError", "auth_mode", "create_admin_app", "load_tokens"]

log = logging.getLogger("corsproxy.admin")

_PUBLIC_PATHS = frozenset({"/healthz", "/readyz"})
_MAX_PAGE = 1000
_PUT_FIELDS = frozenset({"policy", "note", "expires", "ttl"})
#: Bytes of a JSON request body (a PUT's is a few short strings; the note is bounded on its own, see origin_lines).
_MAX_JSON_BODY = 64 << 10
_READ_METHODS = frozenset({"GET", "HEAD"})


class AdminError(Exception):
    """An answer the client can act on: status, a short error and the :class:`Problem` s that say where and why.

    ``problems`` come from the layer that found them (origin parsing, the write service, config validation),
    placed at a request location (``path.origin``, ``query.limit``, ``body.policy``; ``config.*`` YAML paths for a
    reload): the admin API never re-validates to learn which field was wrong. Without ``problems``, ``reason`` (and
    ``field``) make the one problem, its code the error's words in snake_case (``forbidden``, ``not_found``).
    ``field`` and ``reason`` stay in the answer as the first problem's field and message, for older clients.
    """

    def __init__(
        self,
        status: int,
        error: str,
        reason: str = "",
        field: str | None = None,
        *,
        problems: Sequence[Problem] = (),
        **extra: Any,
    ) -> None:
        super().__init__(error)
        if not problems and reason:
            problems = (Problem(field or "", field or "", error.replace(" ", "_"), reason),)
        self.status = status
        self.error = error
        self.problems = tuple(problems)
        self.reason = reason or (self.problems[0].message if self.problems else "")
        if field is None and self.problems:
            field = self.problems[0].field or None  # no field at all (a 404 endpoint, a 500): no "field" key
        self.field = field
        self.extra = extra

    def response(self) -> web.Response:
        body: dict[str, Any] = {"error": self.error}
        if self.field is not None:
            body["field"] = self.field
        if self.reason:
            body["reason"] = self.reason
        body["problems"] = [problem.as_json() for problem in self.problems]
        body.update(self.extra)
        response = web.json_response(body, status=self.status)
        if self.status == 401:
            response.headers["WWW-Authenticate"] = 'Bearer realm="corsproxy-admin"'  # RFC 6750 §3
        return response


def load_tokens(admin: Admin, env: Mapping[str, str] | None = None) -> dict[str, str]:
    """Admin tokens by name, from ``CORSPROXY_ADMIN_TOKEN`` and/or ``admin.token_file``.

    Each non-blank, non-``#`` line (or the variable) is ``TOKEN`` (named ``admin``) or ``NAME:TOKEN``; the name is
    what the audit trail records as the actor (``admin:NAME``), so each person or tool can have its own token.
    """
    env = os.environ if env is None else env
    lines: list[str] = []
    if env.get("CORSPROXY_ADMIN_TOKEN"):
        lines.append(env["CORSPROXY_ADMIN_TOKEN"])
    if admin.token_file:
        with open(admin.token_file, encoding="utf-8") as f:
            lines.extend(f.read().splitlines())
    tokens: dict[str, str] = {}
    for raw in lines:
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        name, sep, token = line.partition(":")
        if not sep:
            name, token = "admin", line
        name, token = name.strip(), token.strip()
        if len(token) < 16:
            raise ValueError(f"admin token {name!r} is shorter than 16 characters: use e.g. `openssl rand -hex 32`")
        tokens[token] = name
    return tokens


@dataclass
class AdminContext:
    """What the admin app needs from the process it runs in."""

    proxy: web.Application  # the proxy app, whose STATE (config, store) the admin reads and writes
    tokens: Mapping[str, str]  # token -> name; empty = no auth (only allowed on loopback, checked by the config)
    config_path: str | None = None  # what POST /reload re-reads
    # Apply a validated config (signal the arbiter); may return the arbiter's verdict to wait for: a mapping with
    # "result" ("applied" or "refused") and "reason", or None when it did not come in time.
    request_reload: Callable[[Config], Awaitable[Mapping[str, Any] | None] | None] | None = None
    render_metrics: Callable[[ProxyState], tuple[bytes, str]] | None = None
    on_reload_refused: Callable[[], None] | None = None  # (an accepted reload is counted by the arbiter)
    on_store_write_error: Callable[[str], None] | None = None  # a write refused by the store, by reason
    draining: bool = False
    started: float = field(default_factory=time.time)

    @property
    def state(self) -> ProxyState:
        return self.proxy[STATE]


ADMIN = web.AppKey("admin", AdminContext)
_ACTOR = web.RequestKey("admin_actor", str)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


# -- middlewares --------------------------------------------------------------------------------------------------


@web.middleware
async def _json_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except AdminError as exc:
        return exc.response()
    except StoreError as exc:
        # The store refused the write as a whole (nothing was written): the operator's message, not a 500.
        ctx = request.app[ADMIN]
        # A fleet write PostgreSQL did not take (unreachable: "source of truth unavailable") is a 503 as well.
        reason = str(getattr(exc, "reason", "io"))
        if ctx.on_store_write_error is not None:
            ctx.on_store_write_error(reason)
        log.error("admin %s %s refused by the origin store: %s", request.method, request.path, exc)
        status = 507 if isinstance(exc, StoreSpaceError) else 503  # 507 Insufficient Storage, RFC 4918 §11.5
        return AdminError(status, reason.replace("_", " "), str(exc), field="store").response()
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        reason = ""
        if exc.status == 405:
            reason = f"{request.method} is not allowed here; allowed: {exc.headers.get('Allow', '')}"
        elif exc.status == 404:
            reason = f"no admin endpoint at {request.path}"
        elif exc.status == 413:
            reason = "request body too large"
        code = exc.reason.lower().replace(" ", "_")  # "Method Not Allowed" -> method_not_allowed
        problems = [Problem("", "", code, reason)] if reason else []
        response = AdminError(exc.status, exc.reason, problems=problems).response()
        response.headers.update({k: v for k, v in exc.headers.items() if k in ("Allow", "WWW-Authenticate")})
        return response
    except asyncio.CancelledError:
        raise
    except Exception:
        log.exception("admin %s %s failed", request.method, request.path)
        return AdminError(500, "internal error", "see the corsproxy log").response()


def _loopback_host(host: str) -> bool:
    """Whether a ``Host`` header names this machine's loopback (``localhost``, ``*.localhost``, 127.0.0.0/8, ::1)."""
    try:
        name = urlsplit("//" + host).hostname or ""
    except ValueError:
        return False
    return is_loopback_host(name)


def _host_name(host: str) -> str:
    try:
        return (urlsplit("//" + host).hostname or "").rstrip(".")
    except ValueError:
        return ""


def _ip_literal(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


def _authenticate(request: web.Request, ctx: AdminContext) -> str:
    """Who is asking (the audit trail's actor), or an :class:`AdminError`: every admin request's one gate.

    The admin API serves operators' tools, never browsers. A page on any site can make a browser send a simple
    cross-site POST to 127.0.0.1:9090 (CSRF), or rebind its own name to that address (DNS rebinding) and then read the
    answers as same-origin. So, in this order:

    1. a request a browser marks as made by a page (any ``Origin``, any ``Sec-Fetch-Site`` but ``none``, which is
       what a typed URL or a non-browser client gets) is refused — ``same-origin`` too, since after rebinding the
       attacker's page *is* same-origin;
    2. the ``Host`` must be one a rebinding page cannot present: a loopback name, or one of ``admin.allowed_hosts``;
       with tokens, the token-free ``/healthz`` and ``/readyz`` also accept IP literals (what Kubernetes probes send;
       a rebinding page always comes with its own DNS name), and token-bearing requests need no such check (a page
       cannot know the token);
    3. with tokens, everything else needs ``Authorization: Bearer TOKEN``; without (a loopback listener, checked at
       start), reads are anonymous and writes need ``admin.allow_anonymous_writes: true``.
    """
    admin = ctx.state.config.admin
    fetch_site = request.headers.get("Sec-Fetch-Site", "none")
    if "Origin" in request.headers or fetch_site != "none":
        raise AdminError(
            403, "forbidden", "the admin API does not answer requests made by web pages; use curl or the CLI"
        )
    public = request.path in _PUBLIC_PATHS
    if not ctx.tokens or public:
        host = _host_name(request.host)
        if not (_loopback_host(request.host) or host in admin.allowed_hosts or (ctx.tokens and _ip_literal(host))):
            raise AdminError(
                403,
                "forbidden",
                f"Host {request.host!r} is not a loopback name or one of admin.allowed_hosts"
                + ("" if ctx.tokens else "; without a token only loopback is served"),
            )
    if not ctx.tokens:
        if request.method not in _READ_METHODS and not public and not admin.allow_anonymous_writes:
            raise AdminError(
                403,
                "forbidden",
                "no admin token is configured, so writes are off: set CORSPROXY_ADMIN_TOKEN or admin.token_file "
                "(then send it as `Authorization: Bearer TOKEN`), or allow anonymous writes from this machine with "
                "admin.allow_anonymous_writes: true",
            )
        return "admin:anonymous"
    if public:
        return "admin:anonymous"
    scheme, _, presented = request.headers.get("Authorization", "").partition(" ")
    presented = presented.strip()
    if scheme.lower() != "bearer" or not presented:
        raise AdminError(401, "unauthorized", "send the admin token as `Authorization: Bearer TOKEN`")
    name = None
    given = presented.encode()
    for token, token_name in ctx.tokens.items():  # compare against every token: the time does not tell which failed
        if hmac.compare_digest(given, token.encode()):
            name = token_name
    if name is None:
        raise AdminError(401, "unauthorized", "the admin token is not valid")
    return f"admin:{name}"


@web.middleware
async def _auth(request: web.Request, handler: Handler) -> web.StreamResponse:
    request[_ACTOR] = _authenticate(request, request.app[ADMIN])
    return await handler(request)


def auth_mode(admin: Admin, tokens: Mapping[str, str]) -> str:
    """One line for the start-up log: where the admin API listens and who may do what there."""
    where = f"admin API on {admin.host}:{admin.port}"
    if tokens:
        names = ", ".join(sorted(set(tokens.values())))
        return f"{where}: bearer tokens ({names}); /healthz and /readyz without one"
    if admin.allow_anonymous_writes:
        return (
            f"{where}: no token, loopback Hosts only; reads and writes anonymous (admin.allow_anonymous_writes: any "
            "local user or process can change the origin set)"
        )
    return (
        f"{where}: no token, loopback Hosts only; reads anonymous, writes refused (set CORSPROXY_ADMIN_TOKEN or "
        "admin.token_file, or admin.allow_anonymous_writes: true)"
    )


# -- helpers ------------------------------------------------------------------------------------------------------


def _origin_from_path(request: web.Request) -> str:
    """The ``{origin}`` path segment, percent-decoded from the raw path (``%2F`` must not split the route)."""
    raw = request.raw_path.split("?", 1)[0]
    encoded = raw[len("/origins/") :]
    text = unquote(encoded)
    try:
        return parse_origin_entry(text).key
    except EntryError as exc:
        raise _invalid(exc.problems, "path") from None


def _int_query(request: web.Request, name: str, default: int, low: int, high: int) -> int:
    text = request.query.get(name)
    if text is None or text == "":
        return default
    try:
        value = int(text)
    except ValueError:
        value = low - 1
    if not low <= value <= high:
        problem = Problem(f"query.{name}", name, "out_of_range", f"must be a whole number from {low} to {high}")
        raise AdminError(400, f"invalid {name}", problems=[problem])
    return value


def _record_json(key: str, record: OriginRecord, now: float) -> dict[str, Any]:
    return {"origin": key, **record.as_json(), "expired": record.is_expired(now)}


def _not_stored(key: str) -> Problem:
    return Problem("path.origin", "origin", "not_found", f"{key} is not in the origin store")


def _conflict(exc: DeclaredElsewhere, origin_in: str = "path") -> AdminError:
    return AdminError(
        409, "conflict", problems=[exc.problem.at(f"{origin_in}.origin")], source=exc.source, declared_in=exc.where
    )


def _invalid(problems: Sequence[Problem], origin_in: str = "path") -> AdminError:
    """A 400 for problems found by the layer that owns the rule, placed where the request gave each field: the
    origin in the URL path (or, for the console, the body), everything else in the JSON body."""
    placed = [p.at(f"{origin_in}.origin" if p.field == "origin" else f"body.{p.field}") for p in problems]
    return AdminError(400, f"invalid {placed[0].field}", problems=placed)


async def _json_body(request: web.Request) -> dict[str, Any]:
    if not request.body_exists:
        return {}
    too_large = AdminError(413, "request body too large", f"a JSON body is at most {_MAX_JSON_BODY} bytes", "body")
    invalid = "invalid JSON body"
    if request.content_length is not None and request.content_length > _MAX_JSON_BODY:
        raise too_large
    raw = b""
    while chunk := await request.content.read(_MAX_JSON_BODY + 1 - len(raw)):  # chunked: no length to check first
        raw += chunk
        if len(raw) > _MAX_JSON_BODY:
            raise too_large
    try:
        body = json.loads(raw)
    except RecursionError:
        raise AdminError(
            400, invalid, problems=[Problem("body", "body", "json_too_deep", "nested too deeply")]
        ) from None
    except ValueError as exc:
        raise AdminError(400, invalid, problems=[Problem("body", "body", "invalid_json", str(exc))]) from None
    if not isinstance(body, dict):
        message = 'must be a JSON object such as {"policy": "default"}'
        raise AdminError(400, invalid, problems=[Problem("body", "body", "not_object", message)])
    return body


# -- origins ------------------------------------------------------------------------------------------------------


async def list_origins(request: web.Request) -> web.Response:
    state = request.app[ADMIN].state
    limit = _int_query(request, "limit", 100, 1, _MAX_PAGE)
    after = request.query.get("after", "")
    contains = request.query.get("filter", "")
    items = await asyncio.to_thread(state.store.items, contains=contains, after=after, limit=limit + 1)
    more = len(items) > limit
    items = items[:limit]
    now = time.time()
    return web.json_response(
        {
            "origins": [_record_json(key, record, now) for key, record in items],
            "next": items[-1][0] if more else None,
        }
    )


async def get_origin(request: web.Request) -> web.Response:
    key = _origin_from_path(request)
    record = request.app[ADMIN].state.store.get(key)
    if record is None:
        raise AdminError(404, "not found", problems=[_not_stored(key)])
    return web.json_response(_record_json(key, record, time.time()))


def _validate_put(body: Mapping[str, Any]) -> dict[str, Any]:
    """The JSON shape of a PUT (known fields, strings): what only JSON can get wrong. The values are checked by the
    layers that own their rules (:func:`~corsproxy.core.origin_lines.parse_expires_field`, the write service), so
    a policy, note or expiry is refused in the same words as from the CLI or the config."""
    for name in body:
        if name not in _PUT_FIELDS:
            message = f"unknown field; allowed: {', '.join(sorted(_PUT_FIELDS))}"
            raise AdminError(400, "invalid field", problems=[Problem(f"body.{name}", name, "unknown_field", message)])
    for name in _PUT_FIELDS:
        value = body.get(name)
        if value is not None and not isinstance(value, str):
            problem = Problem(f"body.{name}", name, "not_string", f"must be a string, got {type(value).__name__}")
            raise AdminError(400, f"invalid {name}", problems=[problem])
    # A field left out (or null) keeps the stored value: a PUT that only renews the note keeps policy and expiry.
    return {name: body.get(name) for name in ("policy", "note", "expires", "ttl")}


def _write_target(state: ProxyState) -> WriteTarget:
    """Where operator writes go: the local store, or in fleet mode PostgreSQL (never the local store only)."""
    source = state.config.store.postgresql
    if source is None:
        return state.store
    from corsproxy.origins.postgres import PostgresOrigins

    return PostgresOrigins(source, state.config.origins)


#: How long a fleet write waits for this host's replica to apply it, so that the answer (and the next read here)
#: shows it; the write itself is already committed in PostgreSQL.
REPLICA_WAIT = 5.0


async def _read_your_write(state: ProxyState, target: WriteTarget) -> None:
    from corsproxy.origins.postgres import PostgresOrigins
    from corsproxy.origins.sync import replica_state

    if not isinstance(target, PostgresOrigins):
        return
    loop = asyncio.get_running_loop()
    deadline = loop.time() + REPLICA_WAIT
    while loop.time() < deadline:
        position = replica_state(state.store).position
        if position is not None and position >= target.last_seq:
            return
        await asyncio.sleep(0.005)
    log.warning("change %d is in PostgreSQL but not yet applied on this host after %gs", target.last_seq, REPLICA_WAIT)


async def put_origin(request: web.Request) -> web.Response:
    ctx = request.app[ADMIN]
    state = ctx.state
    config = state.config
    key = _origin_from_path(request)
    options = _validate_put(await _json_body(request))
    try:
        expires, _ = parse_expires_field(options["expires"], options["ttl"], time.time(), allow_past=False)
    except ProblemError as exc:
        raise _invalid(exc.problems) from None
    edit = EntryEdit(parse_origin_entry(key), options["policy"], expires, options["note"])
    actor = request[_ACTOR]
    target = _write_target(state)
    report = await asyncio.to_thread(
        write_entries,
        target,
        [edit],
        safety=config.safety,
        declarations=Declarations.of(config),
        actor=actor,
        owner=actor,
    )
    if report.conflicts:
        raise _conflict(report.conflicts[0])
    if report.refused:
        raise _invalid(report.refused[0][1])
    await _read_your_write(state, target)
    stored = state.store.get(key)
    if stored is None or stored.source == "config":  # not applied here yet: what PostgreSQL has
        stored = getattr(target, "written", {}).get(key)
    assert stored is not None
    created = bool(report.added)
    warnings = [warning for _, warning in report.warnings]
    body = {**_record_json(key, stored, time.time()), "created": created, "warnings": warnings}
    headers = {"Location": f"/origins/{request.raw_path.split('?', 1)[0][len('/origins/') :]}"} if created else None
    return web.json_response(body, status=201 if created else 200, headers=headers)


async def delete_origin(request: web.Request) -> web.Response:
    state = request.app[ADMIN].state
    key = _origin_from_path(request)
    target = _write_target(state)
    try:
        old = await asyncio.to_thread(
            remove_entry, target, key, declarations=Declarations.of(state.config), actor=request[_ACTOR]
        )
    except DeclaredElsewhere as exc:
        raise _conflict(exc) from None
    await _read_your_write(state, target)
    if old is None:
        raise AdminError(404, "not found", problems=[_not_stored(key)])
    return web.json_response({"removed": key, "old": old.as_json()})


async def import_origins(request: web.Request) -> web.Response:
    state = request.app[ADMIN].state
    config = state.config
    partial = request.query.get("partial", "").lower() in ("1", "true", "yes")
    try:
        text = await request.text()
    except UnicodeDecodeError as exc:
        problem = Problem("body", "body", "not_utf8", f"not UTF-8 text: {exc}")
        raise AdminError(400, "invalid body", problems=[problem]) from None
    # Lines end at "\n" only: str.splitlines() would also break at U+2028, U+0085 and other separators a note may hold.
    parsed = await asyncio.to_thread(parse_edits, text.split("\n"))
    refused: list[dict[str, Any]] = [{"line": n, "reason": reason} for n, reason in parsed.errors]
    warnings = [{"line": n, "warning": w} for n, w in parsed.warnings]
    actor = request[_ACTOR]
    target = _write_target(state)
    report = await asyncio.to_thread(
        write_entries,
        target,
        parsed.edits,
        safety=config.safety,
        declarations=Declarations.of(config),
        actor=actor,
        owner=actor,
        batch=True,
        all_or_nothing=not partial,
        commit=partial or not refused,  # a bad line refuses the whole import; its other problems are reported too
    )
    if report.written:
        await _read_your_write(state, target)
    refused.extend(
        {
            "line": edit.line,
            "origin": edit.key,
            "reason": "; ".join(problem.message for problem in why),
            "problems": [problem.at(f"body.line[{edit.line}].{problem.field}").as_json() for problem in why],
        }
        for edit, why in report.refused
    )
    refused.sort(key=lambda item: item["line"] or 0)
    warnings.extend({"line": edit.line, "warning": w} for edit, w in report.warnings)
    if not report.written:
        raise AdminError(
            400,
            "import refused",
            f"{len(refused)} line(s) refused, nothing imported; fix them, or add ?partial=true to import the rest",
            field="body",
            refused=refused,
            warnings=warnings,
        )
    return web.json_response(
        {
            "added": len(report.added),
            "replaced": len(report.updated),
            "unchanged": len(report.unchanged),
            "declared": report.declared,
            "refused": refused,
            "warnings": warnings,
        }
    )


# -- explain, audit -----------------------------------------------------------------------------------------------


async def explain_request(request: web.Request) -> web.Response:
    state = request.app[ADMIN].state
    origin = request.query.get("origin")
    if not origin:
        problem = Problem("query.origin", "origin", "missing_origin", "give ?origin= as the browser would send it")
        raise AdminError(400, "missing origin", problems=[problem])
    method = request.query.get("method") or None
    path = request.query.get("path") or "/"
    if not path.startswith("/"):
        raise AdminError(
            400, "invalid path", problems=[Problem("query.path", "path", "invalid_path", 'must start with "/"')]
        )
    result = explain(state.config, state.store, origin, method, request.query.get("headers", ""), path)
    return web.json_response(result.as_json())


async def audit(request: web.Request) -> web.Response:
    state = request.app[ADMIN].state
    limit = _int_query(request, "limit", 100, 1, _MAX_PAGE)
    origin = request.query.get("origin") or None
    if origin is not None:
        try:
            origin = parse_origin_entry(origin).key
        except EntryError as exc:
            raise AdminError(400, "invalid origin", problems=[exc.problem.at("query.origin")]) from None
    events = await asyncio.to_thread(state.store.history, origin=origin, limit=limit)
    return web.json_response({"events": [event.as_json() for event in events]})


# -- health, metrics, reload --------------------------------------------------------------------------------------


async def healthz(request: web.Request) -> web.Response:
    body: dict[str, Any] = {"status": "ok", "pid": os.getpid()}
    try:
        problems = request.app[ADMIN].state.store.usage().problems()
    except Exception as exc:
        problems = [f"origin store unreadable: {exc}"]
    if problems:
        body["warnings"] = problems  # still alive: reads are served, and a restart would not free any space
    return web.json_response(body)


async def readyz(request: web.Request) -> web.Response:
    ctx = request.app[ADMIN]
    if ctx.draining:
        return web.json_response({"ready": False, "reason": "shutting down"}, status=503)
    state = ctx.state
    try:
        entries = len(state.store)
        usage = state.store.usage()
    except Exception as exc:
        return web.json_response({"ready": False, "reason": f"origin store unreadable: {exc}"}, status=503)
    watched = state.config.origins_file.path
    if watched and not await asyncio.to_thread(origins_file_applied, watched, Path(state.config.store.path)):
        reason = f"the origins file {watched} has not been applied yet (missing, or refused: see the log)"
        return web.json_response({"ready": False, "reason": reason}, status=503)
    sync: dict[str, Any] | None = None
    if state.config.store.postgresql is not None:
        from corsproxy.origins.sync import read_status, replica_state

        replica = await asyncio.to_thread(replica_state, state.store)
        status = await asyncio.to_thread(read_status, state.store.path)
        sync = {
            "position": replica.position,
            "connected": bool(status.get("connected")),
            "error": status.get("error") or None,
        }
        if not replica.synced:
            # A new replica must not join the load balancer with a partial origin set. Once synced, an outage of
            # PostgreSQL leaves it ready: it serves what it has, and requests never wait on PostgreSQL.
            reason = f"the first sync from PostgreSQL ({state.config.store.postgresql.display}) has not completed"
            return web.json_response({"ready": False, "reason": reason, "sync": sync}, status=503)
    upstream = state.config.upstream
    timeout = min(upstream.connect_timeout, 2.0)
    try:
        _reader, writer = await asyncio.wait_for(asyncio.open_connection(upstream.host, upstream.port), timeout)
    except TimeoutError:
        reason = f"upstream {upstream.host}:{upstream.port} did not accept a connection within {timeout:g}s"
        return web.json_response({"ready": False, "reason": reason}, status=503)
    except OSError as exc:
        reason = f"upstream {upstream.host}:{upstream.port} unreachable: {exc.strerror or exc}"
        return web.json_response({"ready": False, "reason": reason}, status=503)
    writer.close()
    # A full store or disk leaves this worker serving every request from what is stored (only writes are refused,
    # with their own error), so it stays ready; "store" says so, for the operator and for alerts.
    body: dict[str, Any] = {"ready": True, "origins": entries, "upstream": upstream.url, "store": usage.as_json()}
    if sync is not None:
        body["sync"] = sync
    return web.json_response(body)


async def metrics(request: web.Request) -> web.Response:
    ctx = request.app[ADMIN]
    if ctx.render_metrics is None:
        raise AdminError(404, "not found", "metrics are not enabled in this process")
    body, content_type = await asyncio.to_thread(ctx.render_metrics, ctx.state)
    return web.Response(body=body, headers={"Content-Type": content_type})


async def reload(request: web.Request) -> web.Response:
    ctx = request.app[ADMIN]
    path = ctx.config_path or ctx.state.config.source
    try:
        config = await asyncio.to_thread(load_config, path)
    except ConfigError as exc:
        log.error("reload refused, the running configuration stays: %s", exc)
        if ctx.on_reload_refused is not None:
            ctx.on_reload_refused()
        # The reason stays the summary older clients print; the problems are the config's own, with their YAML paths.
        error = AdminError(400, "configuration refused", "the running configuration stays", "config")
        error.problems = exc.problems
        raise error from None
    verdict: Mapping[str, Any] | None = None
    if ctx.request_reload is None:
        ctx.state.config = config  # no arbiter: swap the snapshot; the next request uses it
    else:
        log.info("reload of %s requested by admin (%s)", path, request[_ACTOR])
        pending = ctx.request_reload(config)
        verdict = None if pending is None else await pending
    if verdict is not None and verdict.get("result") == "refused":
        # Valid YAML the new workers could not run (their store cannot be opened, it is full...): nothing changed.
        raise AdminError(409, "reload refused", str(verdict.get("reason", "")), field="config")
    if verdict is not None:
        return web.json_response({"status": "applied", "config": path, "warnings": list(config.warnings)})
    return web.json_response({"status": "reloading", "config": path, "warnings": list(config.warnings)}, status=202)


# -- the app ------------------------------------------------------------------------------------------------------


def create_admin_app(ctx: AdminContext, max_body: int = 64 << 20) -> web.Application:
    from corsproxy import console  # imports this module: loaded here, not at the top

    # console_gate takes /console/ (authenticated by its own session and CSRF token) before _auth sees it.
    app = web.Application(middlewares=[_json_errors, console.console_gate, _auth], client_max_size=max_body)
    app[ADMIN] = ctx
    r = app.router
    r.add_get("/origins", list_origins)
    r.add_post("/origins/import", import_origins)
    r.add_get("/origins/{origin:.+}", get_origin)
    r.add_put("/origins/{origin:.+}", put_origin)
    r.add_delete("/origins/{origin:.+}", delete_origin)
    r.add_get("/explain", explain_request)
    r.add_get("/audit", audit)
    r.add_get("/healthz", healthz)
    r.add_get("/readyz", readyz)
    r.add_get("/metrics", metrics)
    r.add_post("/reload", reload)
    console.mount_console(app)  # the operator console at /console/
    return app
