"""The CORS decision: request facts in, a :class:`Decision` with a machine-readable reason out, and the exact set of
CORS response headers that decision calls for.

Owns classification (Fetch ``#http-requests``), policies and routes in compiled form, origin resolution against an
:class:`OriginSet`, and header construction. Header values that do not depend on the request are
computed once when a :class:`Policy` is built (the Starlette shape); the request path only copies them.

Must not import aiohttp or lmdb: the shell turns a request into arguments and a decision into headers, and the origin
set is anything with a ``find`` method (the LMDB store, or the in-memory set a route lists).
"""

from __future__ import annotations

import enum
import posixpath
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Protocol
from urllib.parse import unquote

from corsproxy.core.header_list import is_token, parse_request_header_names
from corsproxy.core.origin import ANY_ORIGIN, NULL_ORIGIN, RequestOrigin, lookup_keys, parse_request_origin

__all__ = [
    "SAFE_METHODS",
    "BlockMode",
    "CorsEngine",
    "CorsHeaders",
    "CorsRequest",
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
    "path_readings",
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
    PATH_AMBIGUOUS = "path_ambiguous"  # servers disagree on which route the path falls under: answered 400


class Mode(enum.StrEnum):
    ENFORCE = "enforce"
    REPORT_ONLY = "report-only"


class BlockMode(enum.StrEnum):
    """Server-side blocking of refused origins: CORS alone is not access control (a refused origin's simple POST still
    reaches the upstream unless the proxy blocks it)."""

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
    any_header: bool = False  # "*" in allow_headers; never covers authorization (the Fetch standard)
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
    folded_prefix: str = field(init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "folded_prefix", self.prefix.lower())

    def matches(self, path: str) -> bool:
        return _prefix_matches(self.prefix, path)

    def matches_folded(self, folded_path: str) -> bool:
        """Whether an already lowercased path falls under this route for a case-insensitive server."""
        return _prefix_matches(self.folded_prefix, folded_path)


def _prefix_matches(prefix: str, path: str) -> bool:
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
class CorsRequest:
    """What the engine judges of a request: its method and target, and the CORS field lines as received.

    A frozen value, so that the decision cache can key on it (see :meth:`shape`) and every door that judges a request
    (the ordinary handler, the preflight fast path, a refused head, ``explain``) builds the same thing."""

    method: str
    origins: tuple[str, ...] = ()  # the ``Origin`` field lines
    request_methods: tuple[str, ...] = ()  # ``Access-Control-Request-Method`` lines (read for OPTIONS only)
    request_headers: tuple[str, ...] = ()  # ``Access-Control-Request-Headers`` lines
    path: str = "/"  # the request target as received
    private_network: bool = False  # ``Access-Control-Request-Private-Network: true``

    @classmethod
    def from_fields(cls, method: str, path: str, field_lines: Callable[[str], Sequence[str]]) -> CorsRequest:
        """The request from ``field_lines(name)``: every line of a header field, by its canonical name."""
        return cls(
            method,
            tuple(field_lines("Origin")),
            tuple(field_lines("Access-Control-Request-Method")) if method == "OPTIONS" else (),
            tuple(field_lines("Access-Control-Request-Headers")),
            path,
            next(iter(field_lines("Access-Control-Request-Private-Network")), None) == "true",
        )

    @property
    def is_preflight(self) -> bool:
        return self.method == "OPTIONS" and bool(self.request_methods)

    def shape(self) -> CorsRequest:
        """The request with what its decision cannot depend on cleared: the path (the routes it reaches stand for it,
        see :class:`DecisionCache`), the method of a non-preflight, and the preflight fields of a non-preflight."""
        if self.is_preflight:
            return CorsRequest(
                "OPTIONS", self.origins, self.request_methods, self.request_headers, "", self.private_network
            )
        return CorsRequest("", self.origins, path="")


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

    @property
    def refused_cross_origin(self) -> bool:
        """An actual request from another origin that the policy does not allow: what blocking mode and the WebSocket
        origin check refuse (a same-origin request carries an ``Origin`` too, and is never refused)."""
        return self.kind is Kind.ACTUAL and not self.allowed and self.reason is not Reason.SAME_ORIGIN


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
    #: ``(entry key, policy name) -> is it safe``: the write-time safety checks again, for entries written
    #: under an earlier configuration — an entry "*" added while the policy had no credentials must not turn into
    #: "reflect every origin with credentials" when the policy later gains them. Only consulted on a match.
    entry_is_safe: Callable[[str, str], bool] | None = field(default=None, compare=False)
    preflight_vary: tuple[str, ...] = field(init=False)
    #: Every route prefix is lowercase: a lowercase reading then matches the same route with and without case.
    _lowercase_prefixes: bool = field(init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        vary = ["Origin", "Access-Control-Request-Method", "Access-Control-Request-Headers"]
        if self.private_network:
            vary.append("Access-Control-Request-Private-Network")
        object.__setattr__(self, "preflight_vary", tuple(vary))
        object.__setattr__(self, "_lowercase_prefixes", all(r.prefix == r.folded_prefix for r in self.routes))

    def route_for(self, path: str) -> Route | None:
        """The route of the fully normalised reading of ``path`` (see :meth:`routes_for` for what is judged)."""
        path = normalize_path(path)
        for route in self.routes:
            if route.matches(path):
                return route
        return None

    def routes_for(self, path: str) -> tuple[Route | None, ...]:
        """Every route (``None``: no route) that some common server's reading of ``path`` falls under, in the order
        found; one element when the path is unambiguous. See :func:`path_readings` for the readings; each is also
        matched ignoring case, as case-insensitive servers (IIS) match it."""
        routes = self.routes
        if not routes:
            return (None,)
        readings = path_readings(path)
        if readings is None:
            return (*routes, None)
        if len(readings) == 1 and readings[0].isascii():
            reading = readings[0]
            route = _first_match(routes, reading)
            if self._lowercase_prefixes and reading.lower() == reading:
                return (route,)  # the common case: one reading, and case changes nothing
            folded = _first_match_folded(routes, reading)
            return (route,) if folded is route else (route, folded)
        reached: list[Route | None] = []
        for reading in readings:
            found = [_first_match(routes, reading), _first_match_folded(routes, reading)]
            if not reading.isascii():
                found.append(_first_match_folded(routes, _simple_fold(reading)))
            for route in found:
                if not any(route is seen for seen in reached):
                    reached.append(route)  # all of them, not just two: the origin must be allowed under each
        return tuple(reached)

    def judge(self, request: CorsRequest, store: OriginSet, now: float) -> Decision:
        """Classify a request and decide it."""
        reached = self.routes_for(request.path) if self.routes else (None,)
        return self._decide(request, reached, store, now)

    def report_only(self, decision: Decision) -> bool:
        """Whether this decision is only reported, not enforced: the whole engine, or the decision's route, is in
        report-only mode."""
        return self.mode is Mode.REPORT_ONLY or decision.mode is Mode.REPORT_ONLY

    def _decide(
        self, request: CorsRequest, reached: tuple[Route | None, ...], store: OriginSet, now: float
    ) -> Decision:
        origins = request.origins
        kind = Kind.PREFLIGHT if origins and request.is_preflight else Kind.ACTUAL
        if len(reached) > 1:
            return self._ambiguous(kind, origins, reached, store, now)
        if not origins:
            return _NO_ORIGIN
        route = reached[0]
        if len(origins) != 1:
            return Decision(kind, Reason.ORIGIN_MALFORMED, route=route)  # browsers send exactly one Origin line
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
            origin_value,
            found.key,
            policy,
            route,
            request.request_methods,
            request.request_headers,
            request.private_network,
        )

    def _ambiguous(
        self, kind: Kind, origins: Sequence[str], reached: tuple[Route | None, ...], store: OriginSet, now: float
    ) -> Decision:
        """The decision for a path that servers read as falling under different routes. It is never forwarded nor
        answered as a preflight (the shell answers 400); its CORS headers are those of an actual request, and only
        when the origin is allowed under every route reached, so the browser can show the 400 to a page that could
        have read any of the readings anyway."""
        detail = " | ".join("(no route)" if route is None else route.prefix for route in reached)
        if not origins:
            return Decision(Kind.NON_CORS, Reason.PATH_AMBIGUOUS, detail=detail)
        as_actual = CorsRequest("GET", tuple(origins))
        judged = [self._decide(as_actual, (route,), store, now) for route in reached]
        origin = judged[0].origin
        if not all(d.allowed for d in judged):
            return Decision(kind, Reason.PATH_AMBIGUOUS, origin=origin, detail=detail)
        # Least privilege among them: an answer without credentials if any route gives one.
        base = min(judged, key=lambda d: d.policy is not None and d.policy.allow_credentials)
        return Decision(kind, Reason.PATH_AMBIGUOUS, origin, base.matched, base.policy, detail=detail)

    def blocks(self, decision: Decision, method: str) -> bool:
        """Whether the proxy refuses an actual request itself, before the upstream sees it (blocking mode)."""
        if not decision.refused_cross_origin:
            return False
        if decision.mode is Mode.REPORT_ONLY or self.block_disallowed is BlockMode.OFF:
            return False
        return self.block_disallowed is BlockMode.ALL or method not in SAFE_METHODS


_NO_ORIGIN = Decision(Kind.NON_CORS, Reason.NO_ORIGIN)


CorsHeaders = tuple[tuple[str, str], ...]


class DecisionCache:
    """Memoises decisions and their CORS headers per request shape, for one engine and one origin-set generation.

    The request path of a busy proxy sees the same few (origin, method, headers) shapes over and over; answering
    them from a dict skips origin parsing, the store lookups and header building. Correctness rules:
    entries are dropped whenever the origin set's generation changes (any committed write, from any process) or
    the engine is replaced (a reload), an allowed answer is not used past its entry's expiry, and the dict is
    bounded (cleared when full), so hostile requests with ever-new origins cannot grow it.
    """

    __slots__ = ("_entries", "_generation", "engine", "max_entries")

    def __init__(self, engine: CorsEngine, max_entries: int = 8192) -> None:
        self.engine = engine
        self.max_entries = max_entries
        self._entries: dict[tuple[CorsRequest, tuple[int, ...]], tuple[Decision, CorsHeaders | None, float]] = {}
        self._generation = -1

    def judge(self, request: CorsRequest, store: OriginSet, now: float) -> tuple[Decision, CorsHeaders | None]:
        """The decision and, when they do not depend on the response, its CORS headers (else ``None``)."""
        decision, headers, _ = self.judge_until(request, store, now)
        return decision, headers

    def judge_until(
        self, request: CorsRequest, store: OriginSet, now: float
    ) -> tuple[Decision, CorsHeaders | None, float]:
        """:meth:`judge`, and the time until which the same request shape gets the same answer while the origin
        set's generation stays the same (the matched entry's expiry; ``-inf`` when the answer is not memoised: a
        request with several ``Origin`` lines). For a cache of serialised answers kept beside this one."""
        engine = self.engine
        if len(request.origins) != 1 or _field_chars(request) > _KEPT_FIELDS_MAX:
            decision = engine.judge(request, store, now)
            return decision, self._headers(decision), float("-inf")
        generation = store.generation()
        if generation != self._generation:
            self._entries.clear()
            self._generation = generation
        key = (request.shape(), route_key(engine, request.path))
        hit = self._entries.get(key)
        if hit is not None and now < hit[2]:
            return hit
        reached = engine.routes_for(request.path) if engine.routes else (None,)
        decision = engine._decide(request, reached, store, now)
        headers = self._headers(decision)
        valid_until = float("inf")
        if decision.matched is not None:
            found = store.find((decision.matched,), now)
            if found is not None and found.expires is not None:
                valid_until = found.expires
        if len(self._entries) >= self.max_entries:
            self._entries.clear()
        made = self._entries[key] = (decision, headers, valid_until)
        return made

    def _headers(self, decision: Decision) -> CorsHeaders | None:
        if decision.kind is Kind.PREFLIGHT:
            return tuple(preflight_headers(self.engine, decision))
        policy = decision.policy
        if decision.allowed and policy is not None and policy.expose_all and policy.allow_credentials:
            return None  # depends on the response's header names
        return tuple(actual_headers(decision))


#: Characters of CORS field values a memoised shape may hold: its key keeps them, and a client can send each up to
#: ``limits.max_header_size`` long, so 8192 shapes of 16 KiB fields would keep hundreds of megabytes. An origin is at
#: most a few hundred characters and a real preflight's header list rarely a few hundred more; longer ones are judged
#: each time (and, as the fast paths' caches follow this one, not kept there either).
_KEPT_FIELDS_MAX = 2048


def _field_chars(request: CorsRequest) -> int:
    fields = (request.origins, request.request_methods, request.request_headers)
    return sum(len(value) for values in fields for value in values)


def route_key(engine: CorsEngine, path: str) -> tuple[int, ...]:
    """The routes every reading of ``path`` reaches (``-1``: no route), as the part of a cache key that stands for the
    path: two targets reaching the same routes get the same decision for the same CORS fields."""
    if not engine.routes:
        return _NO_ROUTE_KEY
    return tuple(-1 if route is None else route.index for route in engine.routes_for(path))


_NO_ROUTE_KEY = (-1,)


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


def _first_match(routes: Sequence[Route], path: str) -> Route | None:
    for route in routes:
        if route.matches(path):
            return route
    return None


def _first_match_folded(routes: Sequence[Route], path: str) -> Route | None:
    """The route a case-insensitive server (IIS, or any on a case-insensitive file system) serves ``path`` under."""
    folded = path.lower()
    for route in routes:
        if route.matches_folded(folded):
            return route
    return None


def _simple_fold(path: str) -> str:
    """``path`` folded one character at a time, as case-insensitive servers compare (Java's ``equalsIgnoreCase``,
    .NET's invariant casing, NTFS's upcase table): "ı" (U+0131) and "ſ" (U+017F) upper-case to "I" and "S", "İ"
    (U+0130) lower-cases to "i" — none of which ``str.lower`` gives."""
    return "".join(map(_fold_char, path))


# Not config-derived, so there is nothing to compile at load: a fixed function of the Unicode tables, applied to the
# characters of untrusted request paths. A table of every cased code point would cost ~0.2 s at every start (and
# str.lower() on the whole path is not the same fold: it applies the final-sigma rule), so the characters requests
# actually send are memoised — bounded, because the keys are the client's: a flood of new characters only churns it.
@lru_cache(maxsize=1024)
def _fold_char(char: str) -> str:
    upper = char.upper()
    lower = (upper if len(upper) == 1 else char).lower()
    return lower[0] if lower else char  # "İ".lower() is "i" + U+0307: the simple mapping is its first character


def _cut_fragment(path: str) -> str:
    # Not part of a request target (RFC 9112 §3.2), so refused by the shell; judged here under both readings, for
    # the CORS headers of that refusal.
    return path.split("#", 1)[0]


def _strip_params(path: str) -> str:
    # Servlet containers (Tomcat, Jetty, Spring) cut ";..." off each segment: "/admin;x/y" is "/admin/y" and
    # "/a/..;/b" is "/a/../b" to them, a plain segment to everyone else.
    return "/".join(segment.split(";", 1)[0] for segment in path.split("/")) if ";" in path else path


def _percent_decode(path: str) -> str:
    return unquote(path) if "%" in path else path


def _percent_u_decode(path: str) -> str:
    # IIS (HTTP.sys accepts "%uXXXX" unless PercentUAllowed is turned off) decodes "%u002e" like "%2e", before it
    # resolves dot segments: "/public/%u002e%u002e/admin" is "/admin" to it.
    return _PERCENT_U.sub(_percent_u_char, path) if "%u" in path or "%U" in path else path


def _percent_u_char(match: re.Match[str]) -> str:
    return chr(int(match[1], 16))


def _backslash_to_slash(path: str) -> str:
    return path.replace("\\", "/")  # IIS and servers on Windows


def _merge_slashes(path: str) -> str:
    return _REPEATED_SLASHES.sub("/", path) if "//" in path else path  # nginx's merge_slashes, Tomcat, Go


def _resolve_dots(path: str) -> str:
    """RFC 3986 §5.2.4 dot-segment removal, clamped at the root (nginx and Tomcat refuse a climb, Go clamps it);
    empty segments stay segments (merging them is a separate reading)."""
    if not path.startswith("/") or not _DOT_SEGMENT.search(path):
        return path
    out: list[str] = []
    segments = path.split("/")
    for i, segment in enumerate(segments[1:], 1):
        last = i == len(segments) - 1
        if segment == ".":
            if last:
                out.append("")
        elif segment == "..":
            if out:
                out.pop()
            if last:
                out.append("")
        else:
            out.append(segment)
    return "/" + "/".join(out)


def _strip_trailing_dots(path: str) -> str:
    # Windows file names ignore trailing dots and spaces: IIS serves "/admin./x" and "/admin%20/x" from "admin".
    if not _TRAILING_DOT.search(path):
        return path
    return "/".join(segment.rstrip(". ") if segment.strip(". ") else segment for segment in path.split("/"))


#: The steps common servers apply to a request path before they route it, in the order they apply them; a server
#: applies some subset (Express and Go's RawPath routers none, Starlette decoding, nginx decoding + merging + dots,
#: Tomcat parameters + decoding + merging + dots, IIS "%u" and "%XX" decoding + backslashes + merging + dots + trailing
#: dots).
#: Decoding (and "%u" decoding) appears twice for servers behind another decoding hop; ``;`` parameters twice for
#: servers that cut them after decoding (``%3b``).
_READING_STEPS: tuple[Callable[[str], str], ...] = (
    _cut_fragment,
    _strip_params,
    _percent_u_decode,
    _percent_decode,
    _percent_u_decode,
    _percent_decode,
    _backslash_to_slash,
    _strip_params,
    _merge_slashes,
    _resolve_dots,
    _strip_trailing_dots,
)
_REPEATED_SLASHES = re.compile(r"//+")
_PERCENT_U = re.compile(r"%[uU]([0-9a-fA-F]{4})")
_DOT_SEGMENT = re.compile(r"/\.\.?(?:/|$)")
_TRAILING_DOT = re.compile(r"[^/.][. ]+(?:/|$)")
#: Characters and sequences any of the steps acts on; a path with none of them has a single reading.
_READING_TRIGGERS = re.compile(r"[%;\\#]|//|(?:^|/)\.|[. ](?:/|$)")
#: Bounds on the work per request: a path with more segments, or more distinct readings, than any real client sends
#: is not read at all but treated as reaching every route (so it is refused).
_MAX_SEGMENTS = 64
_MAX_READINGS = 16
_MAX_ESCAPES = 2048  # percent-escapes decoded per path (Python's unquote costs about half a microsecond each)


def path_readings(target: str) -> tuple[str, ...] | None:
    """Every path a common server may route a request target's path as, the target's own path first; ``None`` for a
    path too convoluted to read within bounds (it may mean anything).

    The path is the target up to ``?``. Each step of :data:`_READING_STEPS` is applied or not, in order, so the
    readings cover every subset of them — nginx, uvicorn/Starlette, Express, Go's net/http, Tomcat/Spring and IIS
    each read one of these.
    """
    path = target.split("?", 1)[0]
    if not _READING_TRIGGERS.search(path):
        return (path,)
    return _cached_readings(path) if len(path) <= 512 else _readings(path)


# Keyed by the request's path, not by configuration: the routes are compiled at load, the readings of a path can
# only be known when it arrives. Paths repeat, so they are memoised; bounded, because the keys are the client's (a
# scan of new paths only churns the cache), and only short ones (hostile paths are long or new), so it stays small.
@lru_cache(maxsize=4096)
def _cached_readings(path: str) -> tuple[str, ...] | None:
    return _readings(path)


def _readings(path: str) -> tuple[str, ...] | None:
    if path.count("/") > _MAX_SEGMENTS:
        return None
    readings = [path]
    seen = {path}
    decoded: dict[str, str] = {}  # both decoding steps meet the same strings: decode each once
    escapes = 0
    for step in _READING_STEPS:
        for reading in readings[:]:
            if step is _percent_decode:
                changed = decoded.get(reading, "")
                if not changed:
                    escapes += reading.count("%")
                    if escapes > _MAX_ESCAPES:
                        return None
                    changed = decoded[reading] = _percent_decode(reading)
            else:
                changed = step(reading)
            if changed not in seen:
                if len(readings) == _MAX_READINGS:
                    return None
                seen.add(changed)
                readings.append(changed)
    return tuple(readings)


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
    # explicit dangerous opt-in) can only be honoured by reflecting the origin (with credentials, "*" is never sent).
    if decision.matched == ANY_ORIGIN and not policy.allow_credentials:
        return "*"
    assert decision.origin is not None
    return decision.origin


def preflight_headers(engine: CorsEngine, decision: Decision) -> list[tuple[str, str]]:
    """The complete CORS header set of the proxy's answer to a preflight."""
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
    """The CORS headers for an actual response; ``[]`` for a refused or non-CORS request.

    ``response_header_names`` is only read for a credentialed policy with ``expose_headers: ["*"]``, where the
    wildcard is literal and the proxy lists the response's own header names instead.
    """
    policy = decision.policy
    if policy is None or not (decision.allowed or decision.reason is Reason.PATH_AMBIGUOUS):
        return []  # an ambiguous path's decision has a policy only when every route it reaches allows the origin
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
