"""The CORS decision: request facts in, a :class:`Decision` with a machine-readable reason out, and the exact set of
CORS response headers that decision calls for.

Owns classification (Fetch ``#http-requests``), policies and routes in compiled form, origin resolution against an
:class:`OriginSet`, and header construction (CORS-RULES 7-14). Header values that do not depend on the request are
computed once when a :class:`Policy` is built (the Starlette shape); the request path only copies them.

Must not import aiohttp or lmdb: the shell turns a request into arguments and a decision into headers, and the origin
set is anything with a ``find`` method (the LMDB store, or the in-memory set a route lists).
"""

from __future__ import annotations

import enum
import posixpath
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol
from urllib.parse import unquote

from corsproxy.header_list import is_token, parse_request_header_names
from corsproxy.origin import ANY_ORIGIN, NULL_ORIGIN, RequestOrigin, lookup_keys, parse_request_origin

__all__ = [
    "SAFE_METHODS",
    "BlockMode",
    "CorsEngine",
    "CorsHeaders",
    "Decision",
    "DecisionCache",
    "Found",
    "Kind",
    "Mode",
    "OriginSet",
    "Policy",
    "Reason",
    "Route",
    "StaticOriginSet",
    "actual_headers",
    "merge_vary",
    "normalize_path",
    "preflight_headers",
]


class Kind(enum.StrEnum):
    PREFLIGHT = "preflight"
    ACTUAL = "actual"  # has an Origin header, is not a preflight
    NON_CORS = "non_cors"  # no Origin header at all


class Reason(enum.StrEnum):
    """Why a request was (not) allowed; the code logs, metrics and ``explain`` use."""

    ALLOWED = "allowed"
    NO_ORIGIN = "no_origin"
    SAME_ORIGIN = "same_origin"
    ORIGIN_MALFORMED = "origin_malformed"
    ORIGIN_NULL = "origin_null"
    ORIGIN_NOT_ALLOWED = "origin_not_allowed"
    ORIGIN_EXPIRED = "origin_expired"
    POLICY_UNKNOWN = "policy_unknown"
    ORIGIN_UNSAFE_FOR_POLICY = "origin_unsafe_for_policy"
    METHOD_MALFORMED = "method_malformed"
    METHOD_NOT_ALLOWED = "method_not_allowed"
    HEADERS_MALFORMED = "headers_malformed"
    HEADER_NOT_ALLOWED = "header_not_allowed"
    PRIVATE_NETWORK_NOT_ALLOWED = "private_network_not_allowed"


class Mode(enum.StrEnum):
    ENFORCE = "enforce"
    REPORT_ONLY = "report-only"


class BlockMode(enum.StrEnum):
    """Server-side blocking of refused origins (CORS-RULES 17: CORS alone is not access control)."""

    OFF = "off"
    UNSAFE_METHODS = "unsafe_methods"
    ALL = "all"


#: RFC 9110 §9.2.1 safe methods; ``block_disallowed: unsafe_methods`` lets these through.
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


@dataclass(frozen=True, slots=True)
class Policy:
    """One compiled CORS policy. Every header value that does not depend on the request is prepared here."""

    name: str
    allow_methods: frozenset[str]  # compared case-sensitively (RFC 9110 §9.1)
    allow_headers: frozenset[str]  # lowercase
    expose_headers: tuple[str, ...]  # lowercase, never set-cookie
    allow_credentials: bool
    max_age: int | None
    allow_private_network: bool = False
    preflight_status: int = 204
    any_method: bool = False  # "*" in allow_methods
    any_header: bool = False  # "*" in allow_headers; never covers authorization (CORS-RULES 9)
    expose_all: bool = False  # "*" in expose_headers
    # Prepared header values.
    methods_value: str = field(init=False)
    max_age_value: str | None = field(init=False)
    expose_value: str | None = field(init=False)

    def __post_init__(self) -> None:
        set_ = object.__setattr__
        set_(self, "methods_value", ", ".join(sorted(self.allow_methods)))
        set_(self, "max_age_value", None if self.max_age is None else str(self.max_age))
        expose: str | None = ", ".join(self.expose_headers) or None
        if self.expose_all and not self.allow_credentials:
            expose = "*"  # without credentials "*" is the wildcard (Fetch #cors-protocol-and-credentials)
        set_(self, "expose_value", expose)

    def allows_method(self, method: str) -> bool:
        return self.any_method or method in self.allow_methods

    def refused_header(self, names: Sequence[str]) -> str | None:
        """The first requested header name this policy does not allow, or ``None``."""
        for name in names:
            if name in self.allow_headers:
                continue
            if self.any_header and name != "authorization":
                continue
            return name
        return None


@dataclass(frozen=True, slots=True)
class Found:
    """What an origin set answered for a request origin."""

    key: str  # the entry that matched
    policy: str  # its policy's name
    expired: bool
    expires: float | None = None  # when a live match stops matching (its entry's expiry)


class OriginSet(Protocol):
    """Anything that can say which entry, if any, covers one of ``keys`` (tried in order, first live entry wins)."""

    def find(self, keys: Iterable[str], now: float) -> Found | None:
        """The first non-expired entry among ``keys``; else the first expired one; else ``None``."""
        ...

    def generation(self) -> int:
        """A number that changes whenever the set changes (answers cached under another number are stale)."""
        ...


@dataclass(frozen=True, slots=True)
class StaticOriginSet:
    """An in-memory origin set: a route's own ``allow_origins`` list. Same lookup keys as the store."""

    entries: Mapping[str, str]  # key -> policy name

    def find(self, keys: Iterable[str], now: float) -> Found | None:
        entries = self.entries
        for key in keys:
            policy = entries.get(key)
            if policy is not None:
                return Found(key, policy, expired=False)
        return None

    def generation(self) -> int:
        return 0  # immutable


@dataclass(frozen=True, slots=True)
class Route:
    """A path prefix with its own origin list and policy, or only its own mode (see the README's truth table)."""

    prefix: str
    origins: StaticOriginSet | None  # None: the route uses the store, with each entry's own policy
    mode: Mode
    index: int

    def matches(self, path: str) -> bool:
        prefix = self.prefix
        if not path.startswith(prefix):
            # "/admin/" also covers "/admin" itself: upstreams serve that path (or redirect it to "/admin/") as the
            # same resource, so leaving it to a more permissive route or the default policy would be a way around.
            if len(prefix) > 1 and prefix.endswith("/"):
                stem = prefix[:-1]
                return path == stem or (path.startswith(stem) and path[len(stem)] == "?")
            return False
        # Segment-aware: "/admin" covers "/admin" and "/admin/x", never "/administrator".
        return prefix.endswith("/") or len(path) == len(prefix) or path[len(prefix)] in "/?"


@dataclass(frozen=True, slots=True)
class Decision:
    kind: Kind
    reason: Reason
    origin: str | None = None  # the request's origin, only when well-formed
    matched: str | None = None  # the origin entry that matched
    policy: Policy | None = None  # set whenever an entry matched and its policy exists
    route: Route | None = None
    request_method: str | None = None
    request_headers: tuple[str, ...] = ()
    private_network: bool = False
    detail: str = ""  # for a refusal: the offending value (method, header name...)

    @property
    def allowed(self) -> bool:
        return self.reason is Reason.ALLOWED

    @property
    def mode(self) -> Mode:
        return Mode.ENFORCE if self.route is None else self.route.mode


@dataclass(frozen=True, slots=True)
class CorsEngine:
    """The compiled CORS configuration. Immutable: a reload builds a new engine and swaps the reference."""

    policies: Mapping[str, Policy]
    routes: tuple[Route, ...] = ()
    mode: Mode = Mode.ENFORCE
    block_disallowed: BlockMode = BlockMode.OFF
    public_origins: frozenset[str] = frozenset()
    private_network: bool = False  # any policy enables PNA: preflights then also vary on its request header
    debug_reason_header: bool = False
    #: ``(entry key, policy name) -> is it safe``: the write-time checks (CORS-RULES 15-16) again, for entries written
    #: under an earlier configuration — an entry "*" added while the policy had no credentials must not turn into
    #: "reflect every origin with credentials" when the policy later gains them. Only consulted on a match.
    entry_is_safe: Callable[[str, str], bool] | None = field(default=None, compare=False)
    preflight_vary: tuple[str, ...] = field(init=False)

    def __post_init__(self) -> None:
        vary = ["Origin", "Access-Control-Request-Method", "Access-Control-Request-Headers"]
        if self.private_network:
            vary.append("Access-Control-Request-Private-Network")
        object.__setattr__(self, "preflight_vary", tuple(vary))

    def route_for(self, path: str) -> Route | None:
        path = normalize_path(path)
        for route in self.routes:
            if route.matches(path):
                return route
        return None

    def decide(
        self,
        method: str,
        origins: Sequence[str],
        request_methods: Sequence[str],
        request_headers: Sequence[str],
        path: str,
        store: OriginSet,
        now: float,
        private_network: bool = False,
    ) -> Decision:
        """Classify a request and decide it. ``origins``, ``request_methods`` and ``request_headers`` are the field
        lines of ``Origin``, ``Access-Control-Request-Method`` and ``-Request-Headers`` as received."""
        if not origins:
            return _NO_ORIGIN
        kind = Kind.PREFLIGHT if method == "OPTIONS" and request_methods else Kind.ACTUAL
        route = self.route_for(path) if self.routes else None
        if len(origins) != 1:
            return Decision(kind, Reason.ORIGIN_MALFORMED, route=route)  # exactly one Origin line (CORS-RULES 3)
        origin_value = origins[0]
        if origin_value in self.public_origins:
            return Decision(kind, Reason.SAME_ORIGIN, origin=origin_value, route=route)
        if origin_value == NULL_ORIGIN:
            keys: Iterable[str] = (NULL_ORIGIN,)
        else:
            origin: RequestOrigin | None = parse_request_origin(origin_value)
            if origin is None:
                return Decision(kind, Reason.ORIGIN_MALFORMED, route=route)
            keys = lookup_keys(origin)
        origin_set = store if route is None or route.origins is None else route.origins
        found = origin_set.find(keys, now)
        if found is None or found.expired:
            if found is not None:
                reason = Reason.ORIGIN_EXPIRED
            elif origin_value == NULL_ORIGIN:
                reason = Reason.ORIGIN_NULL
            else:
                reason = Reason.ORIGIN_NOT_ALLOWED
            return Decision(
                kind, reason, origin=origin_value, route=route, matched=found.key if found is not None else None
            )
        policy = self.policies.get(found.policy)
        if policy is None:
            return Decision(kind, Reason.POLICY_UNKNOWN, origin_value, found.key, route=route, detail=found.policy)
        if self.entry_is_safe is not None and not self.entry_is_safe(found.key, found.policy):
            return Decision(
                kind, Reason.ORIGIN_UNSAFE_FOR_POLICY, origin_value, found.key, route=route, detail=found.policy
            )
        if kind is Kind.ACTUAL:
            return Decision(kind, Reason.ALLOWED, origin_value, found.key, policy, route)
        return _decide_preflight(
            origin_value, found.key, policy, route, request_methods, request_headers, private_network
        )

    def blocks(self, decision: Decision, method: str) -> bool:
        """Whether the proxy refuses an actual request itself, before the upstream sees it (CORS-RULES 17)."""
        if decision.kind is not Kind.ACTUAL or decision.allowed or decision.reason is Reason.SAME_ORIGIN:
            return False
        if decision.mode is Mode.REPORT_ONLY or self.block_disallowed is BlockMode.OFF:
            return False
        return self.block_disallowed is BlockMode.ALL or method not in SAFE_METHODS


_NO_ORIGIN = Decision(Kind.NON_CORS, Reason.NO_ORIGIN)


CorsHeaders = tuple[tuple[str, str], ...]


class DecisionCache:
    """Memoises decisions and their CORS headers per request shape, for one engine and one origin-set generation.

    The request path of a busy proxy sees the same few (origin, method, headers) shapes over and over; answering
    them from a dict skips origin parsing, the store lookups and header building (issue 6). Correctness rules:
    entries are dropped whenever the origin set's generation changes (any committed write, from any process) or
    the engine is replaced (a reload), an allowed answer is not used past its entry's expiry, and the dict is
    bounded (cleared when full), so hostile requests with ever-new origins cannot grow it.
    """

    __slots__ = ("_entries", "_generation", "engine", "max_entries")

    def __init__(self, engine: CorsEngine, max_entries: int = 8192) -> None:
        self.engine = engine
        self.max_entries = max_entries
        self._entries: dict[tuple[object, ...], tuple[Decision, CorsHeaders | None, float]] = {}
        self._generation = -1

    def decide(
        self,
        method: str,
        origins: Sequence[str],
        request_methods: Sequence[str],
        request_headers: Sequence[str],
        path: str,
        store: OriginSet,
        now: float,
        private_network: bool = False,
    ) -> tuple[Decision, CorsHeaders | None]:
        """The decision and, when they do not depend on the response, its CORS headers (else ``None``)."""
        engine = self.engine
        if len(origins) != 1:
            decision = engine.decide(
                method, origins, request_methods, request_headers, path, store, now, private_network
            )
            return decision, self._headers(decision)
        generation = store.generation()
        if generation != self._generation:
            self._entries.clear()
            self._generation = generation
        preflight = method == "OPTIONS" and bool(request_methods)
        route = engine.route_for(path) if engine.routes else None
        key: tuple[object, ...] = (
            origins[0],
            route.index if route is not None else -1,
            preflight,
            tuple(request_methods) if preflight else (),
            tuple(request_headers) if preflight else (),
            private_network and preflight,
        )
        hit = self._entries.get(key)
        if hit is not None and now < hit[2]:
            return hit[0], hit[1]
        decision = engine.decide(method, origins, request_methods, request_headers, path, store, now, private_network)
        headers = self._headers(decision)
        valid_until = float("inf")
        if decision.matched is not None:
            found = store.find((decision.matched,), now)
            if found is not None and found.expires is not None:
                valid_until = found.expires
        if len(self._entries) >= self.max_entries:
            self._entries.clear()
        self._entries[key] = (decision, headers, valid_until)
        return decision, headers

    def _headers(self, decision: Decision) -> CorsHeaders | None:
        if decision.kind is Kind.PREFLIGHT:
            return tuple(preflight_headers(self.engine, decision))
        policy = decision.policy
        if decision.allowed and policy is not None and policy.expose_all and policy.allow_credentials:
            return None  # depends on the response's header names
        return tuple(actual_headers(decision))


def normalize_path(raw_path: str) -> str:
    """The path a route is matched on: query dropped, percent-decoded, ``;`` path parameters and backslashes treated
    as the servlet containers and IIS-style servers behind many APIs treat them, dot segments and repeated slashes
    resolved — so ``/public/..%2Fadmin``, ``/public/..;/admin``, ``/admin;x/y`` or ``/public\\..\\admin`` are judged
    by the route the upstream will actually serve."""
    path = unquote(raw_path.split("?", 1)[0]).replace("\\", "/")
    if ";" in path:
        path = "/".join(segment.split(";", 1)[0] for segment in path.split("/"))
    if "/." not in path and "//" not in path:
        return path
    normal = posixpath.normpath("/" + path.lstrip("/"))
    return normal + "/" if path.endswith("/") and normal != "/" else normal


def _decide_preflight(
    origin: str,
    matched: str,
    policy: Policy,
    route: Route | None,
    request_methods: Sequence[str],
    request_header_lines: Sequence[str],
    private_network: bool,
) -> Decision:
    def refuse(reason: Reason, detail: str = "", method: str | None = None) -> Decision:
        return Decision(Kind.PREFLIGHT, reason, origin, matched, policy, route, method, detail=detail)

    if len(request_methods) != 1 or not is_token(request_methods[0]):
        return refuse(Reason.METHOD_MALFORMED, ",".join(request_methods)[:64])
    method = request_methods[0]
    if not policy.allows_method(method):
        return refuse(Reason.METHOD_NOT_ALLOWED, method, method)
    names = parse_request_header_names(request_header_lines)
    if names is None:
        return refuse(Reason.HEADERS_MALFORMED, ",".join(request_header_lines)[:64], method)
    refused = policy.refused_header(names)
    if refused is not None:
        return refuse(Reason.HEADER_NOT_ALLOWED, refused, method)
    if private_network and not policy.allow_private_network:
        return refuse(Reason.PRIVATE_NETWORK_NOT_ALLOWED, method=method)
    return Decision(Kind.PREFLIGHT, Reason.ALLOWED, origin, matched, policy, route, method, names, private_network)


def _allow_origin_value(decision: Decision, policy: Policy) -> str:
    # "*" only for a credential-free policy reached through the "*" entry; with credentials a matched "*" (an
    # explicit dangerous opt-in) can only be honoured by reflecting the origin (CORS-RULES 9, 15).
    if decision.matched == ANY_ORIGIN and not policy.allow_credentials:
        return "*"
    assert decision.origin is not None
    return decision.origin


def preflight_headers(engine: CorsEngine, decision: Decision) -> list[tuple[str, str]]:
    """The complete CORS header set of the proxy's answer to a preflight (CORS-RULES 7, 9, 11, 13, 14)."""
    headers = [("Vary", ", ".join(engine.preflight_vary))]
    policy = decision.policy
    if not decision.allowed or policy is None:
        if engine.debug_reason_header:
            headers.append(("X-Corsproxy-Reason", decision.reason.value))
        return headers
    headers.append(("Access-Control-Allow-Origin", _allow_origin_value(decision, policy)))
    if policy.allow_credentials:
        headers.append(("Access-Control-Allow-Credentials", "true"))
    # "*" in Allow-Methods/-Headers is literal with credentials, so a wildcard policy echoes the validated request.
    assert decision.request_method is not None
    headers.append(
        ("Access-Control-Allow-Methods", decision.request_method if policy.any_method else policy.methods_value)
    )
    if decision.request_headers:
        headers.append(("Access-Control-Allow-Headers", ", ".join(decision.request_headers)))
    if policy.max_age_value is not None:
        headers.append(("Access-Control-Max-Age", policy.max_age_value))
    if decision.private_network:
        headers.append(("Access-Control-Allow-Private-Network", "true"))
    return headers


_NEVER_EXPOSED = frozenset({"set-cookie", "set-cookie2"})


def actual_headers(decision: Decision, response_header_names: Iterable[str] = ()) -> list[tuple[str, str]]:
    """The CORS headers for an actual response (CORS-RULES 10); ``[]`` for a refused or non-CORS request.

    ``response_header_names`` is only read for a credentialed policy with ``expose_headers: ["*"]``, where the
    wildcard is literal and the proxy lists the response's own header names instead.
    """
    policy = decision.policy
    if not decision.allowed or policy is None:
        return []
    headers = [("Access-Control-Allow-Origin", _allow_origin_value(decision, policy))]
    if policy.allow_credentials:
        headers.append(("Access-Control-Allow-Credentials", "true"))
    expose = policy.expose_value
    if policy.expose_all and policy.allow_credentials:
        names = sorted({n.lower() for n in response_header_names} - _NEVER_EXPOSED)
        expose = ", ".join(n for n in names if not n.startswith("access-control-")) or None
    if expose is not None:
        headers.append(("Access-Control-Expose-Headers", expose))
    return headers


def merge_vary(existing: Sequence[str], add: Sequence[str]) -> str:
    """Merge ``add`` into the upstream's ``Vary`` field lines without duplicates, keeping ``*`` (RFC 9110 §12.5.5)."""
    seen: list[str] = []
    lowered: set[str] = set()
    for line in existing:
        for item in line.split(","):
            name = item.strip()
            if name == "*":
                return "*"
            if name and name.lower() not in lowered:
                lowered.add(name.lower())
                seen.append(name)
    for name in add:
        if name.lower() not in lowered:
            lowered.add(name.lower())
            seen.append(name)
    return ", ".join(seen)
