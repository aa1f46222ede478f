"""The settings corsproxy runs with, as values: what a configuration compiles to, and the small parsers and messages
every reader of settings shares (durations, expiry times, the unknown-policy message).

Pure: no YAML, no sockets, no store. Loading and validating a file is :mod:`corsproxy.config`.
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from corsproxy.core.decision import CorsEngine
from corsproxy.core.forwarding import TrustedProxies
from corsproxy.core.problems import Problem

#: The name of the policy the ``cors`` block defines.
DEFAULT_POLICY = "default"


@dataclass(frozen=True, slots=True)
class ConfiguredOrigin:
    """An origin entry as configured: its canonical key, policy, expiry (Unix time) and note."""

    key: str
    policy: str = DEFAULT_POLICY
    expires: float | None = None
    note: str = ""


@dataclass(frozen=True, slots=True)
class PolicySafety:
    """The parts of a policy that decide whether an origin entry under it is safe."""

    name: str
    allow_credentials: bool
    dangerously_allow_any_origin_with_credentials: bool = False
    dangerously_allow_null_origin: bool = False
    dangerously_allow_http_origins: bool = False
    dangerously_allow_public_suffix_wildcards: bool = False


@dataclass(frozen=True, slots=True)
class Listen:
    host: str = "0.0.0.0"
    port: int = 8080
    tls_cert: str | None = None  # PEM certificate chain; with tls_key, the listener speaks HTTPS
    tls_key: str | None = None


@dataclass(frozen=True, slots=True)
class Upstream:
    url: str = "http://127.0.0.1:8000"
    scheme: str = "http"
    host: str = "127.0.0.1"
    port: int = 8000
    base_path: str = ""  # no trailing slash
    connect_timeout: float = 5.0
    read_timeout: float = 60.0
    ca_bundle: str | None = None

    @property
    def origin(self) -> str:
        return f"{self.scheme}://{self.host}:{self.port}"


@dataclass(frozen=True, slots=True)
class Forwarding:
    """What goes to the upstream besides the request itself."""

    trusted_proxies: tuple[str, ...] = ()  # CIDRs whose X-Forwarded-* headers are kept (and appended to)
    preserve_host: bool = False  # send the client's Host instead of the upstream's own
    websockets: bool = True  # pass WebSocket upgrades through
    websocket_origin_check: bool = True  # refuse a handshake whose Origin the policy refuses (CSWSH)
    #: ``trusted_proxies`` compiled when the settings are made, so a request never parses a CIDR.
    trusted: TrustedProxies = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "trusted", TrustedProxies.parse(self.trusted_proxies))


@dataclass(frozen=True, slots=True)
class Limits:
    """Bounds on what one client can make the proxy hold."""

    max_header_size: int = 16384  # bytes of one header line / request line; over it: 431
    max_body_size: int = 100 << 20  # bytes; over it: 413 (0 = no limit)
    header_read_timeout: float = 10.0  # seconds to receive a request's head
    idle_timeout: float = 75.0  # seconds a keep-alive connection may sit idle
    max_upstream_connections: int = 100  # pooled connections to the upstream per worker (0 = no limit)
    drain_timeout: float = 30.0  # seconds in-flight requests get on SIGTERM


@dataclass(frozen=True, slots=True)
class Admin:
    """The separate admin listener; disabled when ``port`` is None."""

    host: str = "127.0.0.1"
    port: int | None = None
    token_file: str | None = None  # else the CORSPROXY_ADMIN_TOKEN environment variable
    # Without a token (loopback only), writes are refused unless the operator opts in: any local user or process
    # could otherwise change the origin set.
    allow_anonymous_writes: bool = False
    # Host names (besides loopback names and IP literals) the token-free endpoints /healthz and /readyz answer to:
    # a DNS-rebinding page reaches them under its own name, which is never one of these.
    allowed_hosts: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Logging:
    format: str = "auto"  # auto (JSON unless stderr is a TTY) | json | text
    level: str = "info"
    sample_allowed: float = 1.0  # fraction of allowed requests logged; refusals are always logged (but see below)
    # Lines a client can cause (refusals, malformed requests, upstream failures): at most this many per reason and
    # per worker in each window, then one summary line per reason; 0 logs every one. Metrics count them all.
    per_reason_lines: int = 5
    per_reason_window: float = 10.0  # seconds


@dataclass(frozen=True, slots=True)
class OriginsFile:
    """Fleet mode: a file that is the source of truth for the ``file``-owned entries."""

    path: str | None = None
    poll_interval: float = 2.0


DEFAULT_STORE_PATH = "./var/origins.lmdb"


@dataclass(frozen=True, slots=True)
class AuditRetention:
    """How much of the audit trail the store keeps; the oldest events beyond either bound are dropped on each write.

    The defaults keep a year, and at most 500,000 events, about a quarter of the default 1 GiB map (bench/RESULTS.md
    has the size of an event); ``None`` lifts a bound."""

    max_age: float | None = 365 * 86400.0  # seconds
    max_events: int | None = 500_000


def redact_dsn(dsn: str) -> str:
    """A PostgreSQL URL or ``key=value`` connection string with any password replaced by ``***``: what logs, errors
    and ``corsproxy check`` show (a password must never reach a log line)."""
    if "://" in dsn:
        scheme, _, rest = dsn.partition("://")
        authority, slash, tail = rest.partition("/")
        if "@" in authority:
            userinfo, _, hostport = authority.rpartition("@")
            user, colon, _password = userinfo.partition(":")
            authority = f"{user}:***@{hostport}" if colon else f"{user}@{hostport}"
        tail = re.sub(r"(?i)(password=)[^&]*", r"\1***", tail)
        return f"{scheme}://{authority}{slash}{tail}"
    return re.sub(r"(?i)(password\s*=\s*)('(?:[^'\\]|\\.)*'|\S+)", r"\1***", dsn)


def dsn_secrets(dsn: str) -> list[str]:
    """The password(s) a connection string holds, as written and percent-decoded, longest first: what
    :func:`scrub_secrets` takes out of a message about it (libpq quotes a token it cannot parse, and in a URL with
    a bad ``%`` escape in its password, that token is the password)."""
    from urllib.parse import unquote

    found: list[str] = []
    if "://" in dsn:
        authority = dsn.partition("://")[2].partition("/")[0]
        if "@" in authority:
            userinfo = authority.rpartition("@")[0]
            _user, colon, password = userinfo.partition(":")
            if colon:
                found.append(password)
        found.extend(m.group(1) for m in re.finditer(r"(?i)password=([^&]*)", dsn.partition("?")[2]))
    else:
        for m in re.finditer(r"(?i)password\s*=\s*('(?:[^'\\]|\\.)*'|\S+)", dsn):
            value = m.group(1)
            found.extend([value, value[1:-1]] if value.startswith("'") else [value])
    secrets = {s for raw in found for s in (raw, unquote(raw)) if s}
    return sorted(secrets, key=len, reverse=True)


def scrub_secrets(text: str, dsn: str) -> str:
    """``text`` (an error message, e.g. libpq's) with every password of ``dsn`` replaced by ``***``."""
    for secret in dsn_secrets(dsn):
        text = text.replace(secret, "***")
    return text


@dataclass(frozen=True, slots=True)
class PostgresSource:
    """The fleet's source of truth: a PostgreSQL database each host copies into its own store (its replica)."""

    url: str = field(repr=False)  # may hold a password: never logged, see ``display``
    poll_interval: float = 1.0  # seconds between polls of the change log (NOTIFY wakes the syncer sooner)
    change_retention: float = 7 * 86400.0  # seconds of change log kept; a replica further behind copies a snapshot
    batch_size: int = 5000  # changes (or snapshot rows) applied per LMDB transaction

    @property
    def display(self) -> str:
        return redact_dsn(self.url)

    def scrub(self, text: str) -> str:
        """``text`` without the URL's password, wherever in it a driver may have quoted it."""
        return scrub_secrets(text, self.url)


@dataclass(frozen=True, slots=True)
class Store:
    path: str = DEFAULT_STORE_PATH
    map_size_mb: int = 1024
    audit_retention: AuditRetention = AuditRetention()
    postgresql: PostgresSource | None = None  # fleet mode: PostgreSQL is the source of truth, this store its replica


@dataclass(frozen=True, slots=True)
class Config:
    listen: Listen
    upstream: Upstream
    store: Store
    engine: CorsEngine
    origins: Mapping[str, ConfiguredOrigin]  # cors.allow_origins, canonical key -> entry
    safety: Mapping[str, PolicySafety]  # per policy name, for validating later writes
    forwarding: Forwarding = Forwarding()
    limits: Limits = Limits()
    admin: Admin = Admin()
    logging: Logging = Logging()
    origins_file: OriginsFile = OriginsFile()
    warnings: tuple[str, ...] = ()
    source: str = "configuration"
    raw: Mapping[str, Any] = field(default_factory=dict, repr=False)


def similar(a: str, b: str) -> bool:
    a, b = a.lower(), b.lower()
    if a == b or a.replace("-", "_") == b:
        return True
    if abs(len(a) - len(b)) > 2:
        return False
    # Cheap edit-distance check: a typo of one or two characters.
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1] <= 2


def unknown_policy_problem(name: Any, defined: Iterable[str]) -> Problem:
    """:func:`unknown_policy` as an unplaced problem of the field ``policy`` (each door says where)."""
    return Problem("", "policy", "unknown_policy", unknown_policy(name, defined))


def unknown_policy(name: Any, defined: Iterable[str]) -> str:
    """The message for a policy name that is not defined, with a "did you mean" when one is close."""
    names = sorted(defined)
    close = [known for known in names if isinstance(name, str) and similar(name, known)]
    hint = f' — did you mean "{close[0]}"?' if close else ""
    return f"unknown policy {name!r}{hint} (defined policies: {', '.join(names)})"


# -- durations and expiry -----------------------------------------------------------------------------------------

_DURATION = re.compile(r"(\d+)([smhdw])")
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_duration(text: str) -> float:
    """``90s``, ``15m``, ``12h``, ``7d``, ``2w`` (or a combination such as ``1d12h``) in seconds."""
    text = text.strip()
    pos = 0
    total = 0
    for match in _DURATION.finditer(text):
        if match.start() != pos:
            break
        total += int(match.group(1)) * _UNIT_SECONDS[match.group(2)]
        pos = match.end()
    if pos != len(text) or total <= 0:
        raise ValueError(f"{text!r} is not a duration; write e.g. 90s, 15m, 12h, 7d or 2w")
    return float(total)


def parse_expiry(value: Any) -> float:
    """An ISO 8601 timestamp with a timezone (``2026-12-31T00:00:00Z``) as Unix time."""
    if isinstance(value, dt.datetime):
        moment = value
    elif isinstance(value, str):
        try:
            moment = dt.datetime.fromisoformat(value.replace("Z", "+00:00").replace("z", "+00:00"))
        except ValueError:
            raise ValueError(f"{value!r} is not an ISO 8601 time; write e.g. 2026-12-31T00:00:00Z") from None
    else:
        raise ValueError(f"{value!r} is not a time; write e.g. 2026-12-31T00:00:00Z")
    if moment.tzinfo is None:
        if isinstance(value, dt.datetime):  # YAML turns an unquoted "…Z" timestamp into a naive UTC datetime
            moment = moment.replace(tzinfo=dt.UTC)
        else:
            raise ValueError(f"{value!r} has no timezone; add Z for UTC, e.g. 2026-12-31T00:00:00Z")
    return moment.timestamp()
