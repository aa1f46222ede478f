"""Configuration: one YAML file in, an immutable :class:`~corsproxy.core.settings.Config` (with a compiled
:class:`~corsproxy.core.decision.CorsEngine`) out.

Owns the public key layout, defaults, environment overrides and every validation rule. Validation collects *all*
problems, each with its YAML path, what is wrong and how to fix it (the jub0bs/cors shape), and refuses dangerous
configurations (an origin entry that would let any site in, see :mod:`corsproxy.core.safety`) unless the policy names
the matching ``dangerously_*`` opt-in, which then warns on every start.
"""

from __future__ import annotations

import ipaddress
import math
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import yaml

from corsproxy.core.decision import BlockMode, CorsEngine, Mode, Policy, Route, StaticOriginSet, path_readings
from corsproxy.core.header_list import is_token
from corsproxy.core.origin import EntryError, is_loopback_host, parse_origin_entry, parse_request_origin
from corsproxy.core.problems import Problem, field_of
from corsproxy.core.safety import check_origin_entry, entry_checker
from corsproxy.core.settings import (
    DEFAULT_POLICY,
    DEFAULT_STORE_PATH,
    Admin,
    AuditRetention,
    Config,
    ConfiguredOrigin,
    Forwarding,
    Limits,
    Listen,
    Logging,
    OriginsFile,
    PolicySafety,
    PostgresSource,
    Store,
    Upstream,
    parse_duration,
    parse_expiry,
    redact_dsn,
    similar,
    unknown_policy_problem,
)

__all__ = ["DEFAULT_CONFIG_PATH", "ConfigError", "Problem", "load_config", "parse_config", "store_path_problem"]

DEFAULT_CONFIG_PATH = "/etc/corsproxy/config.yaml"

#: Methods a browser can never send (Fetch ``#forbidden-method``); listing one is a mistake or a probe.
FORBIDDEN_METHODS = frozenset({"CONNECT", "TRACE", "TRACK"})
#: Chromium caps Access-Control-Max-Age at 7200 s, Firefox at 86400 s (a longer value is silently capped).
MAX_AGE_WARN = 7200
MAX_AGE_LIMIT = 86400


class ConfigError(Exception):
    """The configuration is refused; ``problems`` lists every reason as a :class:`Problem` (its ``str()`` is
    ``path: what — how to fix``, what the operator reads)."""

    def __init__(self, problems: Sequence[Problem], source: str = "configuration"):
        self.problems: tuple[Problem, ...] = tuple(problems)
        self.source = source
        super().__init__(
            f"{source} has {len(self.problems)} problem(s):\n" + "\n".join(f"  - {p}" for p in self.problems)
        )


def store_path_problem(message: str, code: str = "store_unusable") -> Problem:
    """A problem of ``store.path`` found by checking the location or opening the store (the store names no YAML
    key of its own: it must not know the configuration's layout, so its ``store.path:`` prefix is taken off)."""
    return Problem("store.path", "path", code, message.removeprefix("store.path: "))


# -- small typed readers ------------------------------------------------------------------------------------------


class _Problems:
    def __init__(self) -> None:
        self.errors: list[Problem] = []
        self.warnings: list[str] = []

    def error(self, code: str, path: str, message: str) -> None:
        self.add(Problem(path, field_of(path), code, message))

    def add(self, problem: Problem) -> None:
        # A value several policies inherit is checked once per policy but reported once, where it was written.
        if problem not in self.errors:
            self.errors.append(problem)

    def warn(self, path: str, message: str) -> None:
        if (line := f"{path}: {message}") not in self.warnings:
            self.warnings.append(line)


def _section(data: Mapping[str, Any], key: str, path: str, p: _Problems, allowed: set[str]) -> dict[str, Any]:
    value = data.get(key)
    where = f"{path}.{key}" if path else key
    if value is None:
        return {}
    if not isinstance(value, dict):
        p.error("not_mapping", where, f"must be a mapping, got {type(value).__name__}")
        return {}
    _unknown_keys(value, where, p, allowed)
    return value


def _unknown_keys(data: Mapping[str, Any], path: str, p: _Problems, allowed: set[str]) -> None:
    for key in data:
        if key in allowed:
            continue
        where = f"{path}.{key}" if path else str(key)
        if key == "allow_origin_regex":
            p.error(
                "regex_not_supported",
                where,
                "corsproxy takes no regex (an unanchored or unescaped one is the classic CORS hole); list exact "
                'origins and patterns in allow_origins instead: "https://app.example.com", "https://*.example.com" '
                '(any subdomain), "http://localhost:*" (any port). `corsproxy origins import-regex` converts one.',
            )
            continue
        close = [k for k in sorted(allowed) if similar(str(key), k)]
        hint = f' — did you mean "{close[0]}"?' if close else f" — allowed keys: {', '.join(sorted(allowed))}"
        p.error("unknown_key", where, f"unknown key{hint}")


def _relative_to(value: Any, base_dir: Path | None) -> Any:
    """A relative path in the config names a file next to the config, whatever directory corsproxy was started in:
    one rule for every path key (store, origins file, TLS files, token file, CA bundle). Non-strings pass through
    for the caller to refuse."""
    if isinstance(value, str) and value and base_dir is not None and not Path(value).is_absolute():
        return str(base_dir / value)
    return value


def _bool(data: Mapping[str, Any], key: str, path: str, p: _Problems, default: bool) -> bool:
    value = data.get(key, default)
    if not isinstance(value, bool):
        p.error("not_boolean", f"{path}.{key}", f"must be true or false, got {value!r}")
        return default
    return value


def _number(
    data: Mapping[str, Any], key: str, path: str, p: _Problems, default: float, *, minimum: float = 0.0
) -> float:
    value = data.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value <= minimum:
        p.error("not_number", f"{path}.{key}", f"must be a number of seconds greater than {minimum:g}, got {value!r}")
        return default
    return float(value)


def _port(value: Any, where: str, p: _Problems, default: int) -> int:
    if isinstance(value, str) and value.isdigit():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 65535:
        p.error("not_port", where, f"must be a port number 0-65535, got {value!r}")
        return default
    return value


def _string_list(data: Mapping[str, Any], key: str, path: str, p: _Problems, default: list[str]) -> list[str]:
    value = data.get(key, default)
    where = f"{path}.{key}" if path else key
    if isinstance(value, str):
        # "GET, POST" is one YAML string; the list the user meant is its comma-separated items.
        items = [item.strip() for item in value.split(",") if item.strip()]
        p.error("not_list", where, f"must be a list, e.g. [{', '.join(items)}]" if items else "must be a list, e.g. []")
        return list(default)
    if not isinstance(value, list):
        p.error("not_list", where, f"must be a list, got {type(value).__name__}")
        return list(default)
    out = []
    for i, item in enumerate(value):
        if not isinstance(item, str):
            p.error("not_string", f"{where}[{i}]", f"must be a string, got {item!r}")
        else:
            out.append(item)
    return out


# -- policies -----------------------------------------------------------------------------------------------------

_POLICY_KEYS = {
    "allow_methods",
    "allow_headers",
    "expose_headers",
    "allow_credentials",
    "max_age",
    "allow_private_network",
    "preflight_status",
    "dangerously_allow_any_origin_with_credentials",
    "dangerously_allow_null_origin",
    "dangerously_allow_http_origins",
    "dangerously_allow_public_suffix_wildcards",
}
_DANGER_FLAGS = sorted(k for k in _POLICY_KEYS if k.startswith("dangerously_"))

#: Starlette's CORSMiddleware defaults, so that a migrated block behaves the same.
_POLICY_DEFAULTS: dict[str, Any] = {
    "allow_methods": ["GET"],
    "allow_headers": [],
    "expose_headers": [],
    "allow_credentials": False,
    "max_age": 600,
    "allow_private_network": False,
    "preflight_status": 204,
    **dict.fromkeys(_DANGER_FLAGS, False),
}


def _compile_policy(
    name: str, data: Mapping[str, Any], base: Mapping[str, Any], path: str, p: _Problems, base_path: str = "cors"
) -> tuple[Policy, PolicySafety]:
    merged = {**base, **{k: v for k, v in data.items() if k in _POLICY_KEYS}}

    def at(key: str) -> str:
        """Where the user wrote ``key``'s value: this policy, or the block it inherits from (``cors``)."""
        return path if key in data else base_path

    methods = _string_list(merged, "allow_methods", at("allow_methods"), p, ["GET"])
    clean_methods: set[str] = set()
    for i, method in enumerate(methods):
        where = f"{at('allow_methods')}.allow_methods[{i}]"
        if method == "*":
            continue
        if not is_token(method):
            p.error("not_method", where, f"{method!r} is not a method name (a token such as GET or PATCH)")
        elif method.upper() in FORBIDDEN_METHODS:
            p.error(
                "forbidden_method",
                where,
                f"{method!r} is a forbidden method (browsers never send it, and TRACE leaks headers) — remove it",
            )
        else:
            if method != method.upper() and method.upper() in {"GET", "HEAD", "POST", "PUT", "DELETE", "OPTIONS"}:
                p.warn(where, f"{method!r}: methods are case-sensitive and browsers send {method.upper()!r}")
            clean_methods.add(method)

    headers = _string_list(merged, "allow_headers", at("allow_headers"), p, [])
    clean_headers: set[str] = set()
    for i, header in enumerate(headers):
        if header != "*" and not is_token(header):
            p.error("not_header_name", f"{at('allow_headers')}.allow_headers[{i}]", f"{header!r} is not a header name")
        elif header != "*":
            clean_headers.add(header.lower())

    expose = _string_list(merged, "expose_headers", at("expose_headers"), p, [])
    clean_expose: list[str] = []
    for i, header in enumerate(expose):
        where = f"{at('expose_headers')}.expose_headers[{i}]"
        if header != "*" and not is_token(header):
            p.error("not_header_name", where, f"{header!r} is not a header name")
        elif header.lower() in {"set-cookie", "set-cookie2"}:
            p.error(
                "set_cookie_exposed",
                where,
                "Set-Cookie is never readable by scripts (Fetch forbidden response header) — remove it",
            )
        elif header != "*" and header.lower() not in clean_expose:
            clean_expose.append(header.lower())

    credentials = _bool(merged, "allow_credentials", at("allow_credentials"), p, False)
    max_age_raw = merged.get("max_age")
    max_age: int | None = None
    if max_age_raw is not None:
        if isinstance(max_age_raw, bool) or not isinstance(max_age_raw, int) or max_age_raw < 0:
            p.error(
                "invalid_max_age",
                f"{at('max_age')}.max_age",
                f"must be a whole number of seconds >= 0 (or null to omit), got {max_age_raw!r}",
            )
        elif max_age_raw > MAX_AGE_LIMIT:
            p.error(
                "max_age_too_high",
                f"{at('max_age')}.max_age",
                f"{max_age_raw} is above {MAX_AGE_LIMIT} (Firefox's cap; Chromium's is 7200)",
            )
        else:
            max_age = max_age_raw
            if max_age_raw > MAX_AGE_WARN:
                p.warn(
                    f"{at('max_age')}.max_age",
                    f"{max_age_raw} is above Chromium's cap of {MAX_AGE_WARN}; Chromium uses 7200",
                )
    status = merged.get("preflight_status", 204)
    if status not in (200, 204):
        p.error(
            "invalid_preflight_status",
            f"{at('preflight_status')}.preflight_status",
            f"must be 204 (the default) or 200 (for old clients), got {status!r}",
        )
        status = 204
    policy = Policy(
        name=name,
        allow_methods=frozenset(clean_methods),
        allow_headers=frozenset(clean_headers),
        expose_headers=tuple(clean_expose),
        allow_credentials=credentials,
        max_age=max_age,
        allow_private_network=_bool(merged, "allow_private_network", at("allow_private_network"), p, False),
        preflight_status=int(status),
        any_method="*" in methods,
        any_header="*" in headers,
        expose_all="*" in expose,
    )
    flags = {flag: _bool(merged, flag, at(flag), p, False) for flag in _DANGER_FLAGS}
    safety = PolicySafety(name=name, allow_credentials=credentials, **flags)
    return policy, safety


# -- origin lists -------------------------------------------------------------------------------------------------

_ENTRY_KEYS = {"origin", "policy", "expires", "note"}


def _origin_list(
    items: Any,
    path: str,
    p: _Problems,
    safety: Mapping[str, PolicySafety],
    default_policy: str,
    allow_policy_field: bool = True,
) -> dict[str, ConfiguredOrigin]:
    out: dict[str, ConfiguredOrigin] = {}
    if items is None:
        return out
    if not isinstance(items, list):
        p.error("not_list", path, f"must be a list of origins, got {type(items).__name__}")
        return out
    for i, item in enumerate(items):
        where = f"{path}[{i}]"
        policy_name, expires, note = default_policy, None, ""
        if isinstance(item, dict):
            _unknown_keys(item, where, p, _ENTRY_KEYS if allow_policy_field else {"origin", "note"})
            text = item.get("origin")
            if "policy" in item and allow_policy_field:
                policy_name = item["policy"]
                if policy_name not in safety:
                    p.add(unknown_policy_problem(policy_name, safety).at(f"{where}.policy"))
                    continue
            if item.get("expires") is not None:
                try:
                    expires = parse_expiry(item["expires"])
                except ValueError as exc:
                    p.error("invalid_expires", f"{where}.expires", str(exc))
            note = str(item.get("note") or "")
        else:
            text = item
        if not isinstance(text, str):
            p.add(
                Problem(
                    where,
                    "origin",
                    "origin_not_string",
                    f'an origin must be a string such as "https://app.example.com", got {text!r}',
                )
            )
            continue
        try:
            entry = parse_origin_entry(text)
        except EntryError as exc:
            p.add(exc.problem.at(where))
            continue
        errors, warnings = check_origin_entry(entry, safety[policy_name])
        for problem in errors:
            p.add(problem.at(where))
        for problem in warnings:
            p.warn(where, problem.message)
        if errors:
            continue
        if entry.key in out:
            message = f"{text!r} is listed twice (as {entry.key!r}); keep one entry"
            p.add(Problem(where, "origin", "duplicate_origin", message))
            continue
        out[entry.key] = ConfiguredOrigin(entry.key, policy_name, expires, note)
    return out


# -- the whole file -----------------------------------------------------------------------------------------------

_TOP_KEYS = {
    "listen",
    "upstream",
    "store",
    "cors",
    "policies",
    "routes",
    "mode",
    "block_disallowed",
    "public_origins",
    "debug_reason_header",
    "forwarding",
    "limits",
    "admin",
    "logging",
    "origins_file",
}


def _enum(value: Any, kind: type[Mode] | type[BlockMode], where: str, p: _Problems) -> Any:
    if value is False and kind is BlockMode:
        value = "off"  # YAML 1.1 reads a bare `off` as false
    try:
        return kind(value)
    except ValueError:
        p.error("not_choice", where, f"must be one of {', '.join(m.value for m in kind)}, got {value!r}")
        return next(iter(kind))


def _upstream(data: Mapping[str, Any], p: _Problems, env: Mapping[str, str], base_dir: Path | None) -> Upstream:
    section = _section(data, "upstream", "", p, {"url", "connect_timeout", "read_timeout", "ca_bundle"})
    url = env.get("CORSPROXY_UPSTREAM") or section.get("url")
    where = "env CORSPROXY_UPSTREAM" if env.get("CORSPROXY_UPSTREAM") else "upstream.url"
    if not isinstance(url, str) or not url:
        p.error(
            "upstream_missing",
            "upstream.url",
            'is required, e.g. "http://127.0.0.1:8000" (the API corsproxy forwards to)',
        )
        return Upstream()
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    problems_before = len(p.errors)
    if scheme not in ("http", "https"):
        p.error(
            "upstream_bad_scheme",
            where,
            f'{url!r}: the upstream must be an http:// or https:// URL, e.g. "http://127.0.0.1:8000"',
        )
    try:
        port = parts.port
    except ValueError:
        p.error("upstream_bad_port", where, f"{url!r}: the port is not a number 1-65535")
        port = None
    if not parts.hostname:
        p.error("upstream_no_host", where, f"{url!r}: missing host")
    if parts.username or parts.password:
        p.error(
            "upstream_has_credentials",
            where,
            f"{url!r}: credentials in the URL would be logged; configure the upstream without them",
        )
    if parts.query or parts.fragment:
        p.error("upstream_has_query", where, f"{url!r}: the upstream URL takes no query or fragment")
    ca_bundle = _relative_to(section.get("ca_bundle"), base_dir)
    if ca_bundle is not None and (not isinstance(ca_bundle, str) or not Path(ca_bundle).is_file()):
        p.error("file_unreadable", "upstream.ca_bundle", f"{ca_bundle!r} is not a readable file of PEM certificates")
    if len(p.errors) > problems_before:
        return Upstream()
    host = parts.hostname or ""
    return Upstream(
        url=url,
        scheme=scheme,
        host=f"[{host}]" if ":" in host else host,
        port=port or (443 if scheme == "https" else 80),
        base_path=parts.path.rstrip("/"),
        connect_timeout=_number(section, "connect_timeout", "upstream", p, 5.0),
        read_timeout=_number(section, "read_timeout", "upstream", p, 60.0),
        ca_bundle=ca_bundle,
    )


def parse_config(
    data: Any, *, source: str = "configuration", env: Mapping[str, str] | None = None, base_dir: Path | None = None
) -> Config:
    """Validate a parsed YAML document; raise :class:`ConfigError` listing every problem."""
    env = os.environ if env is None else env
    p = _Problems()
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(
            [Problem("", "", "not_mapping", f"the top level must be a mapping of sections, got {type(data).__name__}")],
            source,
        )
    _unknown_keys(data, "", p, _TOP_KEYS)

    listen_section = _section(data, "listen", "", p, {"host", "port", "tls_cert", "tls_key"})
    port_value = env.get("CORSPROXY_PORT") or listen_section.get("port", 8080)
    port_where = "env CORSPROXY_PORT" if env.get("CORSPROXY_PORT") else "listen.port"
    host = listen_section.get("host", "0.0.0.0")
    if not isinstance(host, str) or not host:
        p.error("invalid_address", "listen.host", f"must be an address such as 0.0.0.0 or 127.0.0.1, got {host!r}")
        host = "0.0.0.0"
    tls_cert = _relative_to(listen_section.get("tls_cert"), base_dir)
    tls_key = _relative_to(listen_section.get("tls_key"), base_dir)
    for key, value in (("tls_cert", tls_cert), ("tls_key", tls_key)):
        if value is not None and (not isinstance(value, str) or not Path(value).is_file()):
            p.error("file_unreadable", f"listen.{key}", f"{value!r} is not a readable PEM file")
    if (tls_cert is None) != (tls_key is None):
        p.error("tls_incomplete", "listen", "tls_cert and tls_key go together: give both for HTTPS, or neither")
    listen = Listen(host=host, port=_port(port_value, port_where, p, 8080), tls_cert=tls_cert, tls_key=tls_key)

    upstream = _upstream(data, p, env, base_dir)

    store_section = _section(data, "store", "", p, {"path", "map_size_mb", "audit_retention", "postgresql"})
    store_path = store_section.get("path", DEFAULT_STORE_PATH)
    if not isinstance(store_path, str) or not store_path:
        p.error("invalid_path", "store.path", f"must be a directory path, got {store_path!r}")
        store_path = DEFAULT_STORE_PATH
    else:
        store_path = _relative_to(store_path, base_dir)
    map_size = store_section.get("map_size_mb", 1024)
    if isinstance(map_size, bool) or not isinstance(map_size, int) or map_size < 1:
        p.error("invalid_map_size", "store.map_size_mb", f"must be a whole number of MiB >= 1, got {map_size!r}")
        map_size = 1024
    store = Store(
        path=store_path,
        map_size_mb=map_size,
        audit_retention=_audit_retention(store_section, p),
        postgresql=_postgresql(store_section, p, env),
    )

    cors = _section(data, "cors", "", p, _POLICY_KEYS | {"allow_origins"})
    policies: dict[str, Policy] = {}
    safety: dict[str, PolicySafety] = {}
    policies[DEFAULT_POLICY], safety[DEFAULT_POLICY] = _compile_policy(
        DEFAULT_POLICY, cors, _POLICY_DEFAULTS, "cors", p
    )
    default_base = {**_POLICY_DEFAULTS, **{k: v for k, v in cors.items() if k in _POLICY_KEYS}}
    named = data.get("policies") or {}
    if not isinstance(named, dict):
        p.error(
            "not_mapping",
            "policies",
            "must be a mapping of name -> policy settings, e.g. {partners: {allow_methods: [GET]}}",
        )
        named = {}
    for name, spec in named.items():
        where = f"policies.{name}"
        if not isinstance(name, str) or not re.fullmatch(r"[a-z0-9][a-z0-9_\-]{0,63}", name):
            p.error("invalid_policy_name", where, "a policy name is 1-64 lowercase letters, digits, '-' or '_'")
            continue
        if name == DEFAULT_POLICY:
            p.error(
                "reserved_policy_name",
                where,
                f"{DEFAULT_POLICY!r} is the name of the cors block's policy; pick another name",
            )
            continue
        if not isinstance(spec, dict):
            p.error(
                "not_mapping", where, "must be a mapping of policy settings, e.g. {allow_methods: [GET], max_age: 60}"
            )
            continue
        _unknown_keys(spec, where, p, _POLICY_KEYS)
        policies[name], safety[name] = _compile_policy(name, spec, default_base, where, p)

    origins = _origin_list(cors.get("allow_origins"), "cors.allow_origins", p, safety, DEFAULT_POLICY)

    routes = _routes(data.get("routes"), p, safety)

    public: set[str] = set()
    for i, text in enumerate(_string_list(data, "public_origins", "", p, [])):
        if parse_request_origin(text) is None:
            p.error(
                "not_exact_origin",
                f"public_origins[{i}]",
                f"{text!r} must be an exact origin as browsers send it, e.g. https://api.example.com",
            )
        else:
            public.add(text)

    debug = data.get("debug_reason_header", False)
    if not isinstance(debug, bool):
        p.error("not_boolean", "debug_reason_header", f"must be true or false, got {debug!r}")
        debug = False
    if debug:
        p.warn("debug_reason_header", "refused preflights carry X-Corsproxy-Reason: turn it off in production")

    forwarding = _forwarding(data, p)
    limits = _limits(data, p)
    admin = _admin(data, p, env, base_dir)
    if admin.port is not None and admin.port == listen.port != 0:
        p.error(
            "admin_port_is_proxy_port",
            "admin.listen.port",
            f"{admin.port} is also the proxied port; every path there belongs to the upstream — pick another port",
        )
    logging_ = _logging(data, p)
    origins_file = _origins_file(data, p, base_dir)
    if store.postgresql is not None and origins_file.path:
        p.error(
            "postgresql_with_origins_file",
            "origins_file",
            "store.postgresql makes PostgreSQL the fleet's source of truth, so the origins file would be a second "
            "one (which wins when they disagree?): remove origins_file and load its lines into PostgreSQL with "
            "`corsproxy origins import FILE --config ...`, or remove store.postgresql",
        )

    # Checked before the first refusal, so that a broken route does not hide a typo here.
    mode = _enum(data.get("mode", "enforce"), Mode, "mode", p)
    block_disallowed = _enum(data.get("block_disallowed", "off"), BlockMode, "block_disallowed", p)
    if p.errors:
        raise ConfigError(p.errors, source)
    engine = CorsEngine(
        policies=policies,
        routes=routes,
        mode=mode,
        block_disallowed=block_disallowed,
        public_origins=frozenset(public),
        private_network=any(policy.allow_private_network for policy in policies.values()),
        debug_reason_header=debug,
        entry_is_safe=entry_checker(safety),
    )
    if p.errors:
        raise ConfigError(p.errors, source)
    for flag in _DANGER_FLAGS:
        # Said once, where it was written: a flag set in cors is inherited by the policies that do not set it.
        inheriting = [n for n, spec in named.items() if n in safety and flag not in spec and getattr(safety[n], flag)]
        if getattr(safety[DEFAULT_POLICY], flag):
            also = f" (inherited by policies {', '.join(inheriting)})" if inheriting else ""
            p.warn("cors", f"{flag} is set{also}")
        for name, spec in named.items():
            if name in safety and flag in spec and getattr(safety[name], flag):
                p.warn(f"policies.{name}", f"{flag} is set")
    return Config(
        listen,
        upstream,
        store,
        engine,
        origins,
        safety,
        forwarding,
        limits,
        admin,
        logging_,
        origins_file,
        tuple(p.warnings),
        source,
        data,
    )


def _forwarding(data: Mapping[str, Any], p: _Problems) -> Forwarding:
    section = _section(
        data, "forwarding", "", p, {"trusted_proxies", "preserve_host", "websockets", "websocket_origin_check"}
    )
    proxies: list[str] = []
    for i, text in enumerate(_string_list(section, "trusted_proxies", "forwarding", p, [])):
        try:
            proxies.append(str(ipaddress.ip_network(text, strict=False)))
        except ValueError:
            p.error(
                "not_ip_network",
                f"forwarding.trusted_proxies[{i}]",
                f"{text!r} is not an IP address or CIDR, e.g. 10.0.0.0/8",
            )
    return Forwarding(
        trusted_proxies=tuple(proxies),
        preserve_host=_bool(section, "preserve_host", "forwarding", p, False),
        websockets=_bool(section, "websockets", "forwarding", p, True),
        websocket_origin_check=_bool(section, "websocket_origin_check", "forwarding", p, True),
    )


def _count(data: Mapping[str, Any], key: str, path: str, p: _Problems, default: int, minimum: int = 0) -> int:
    value = data.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        p.error("not_count", f"{path}.{key}", f"must be a whole number >= {minimum}, got {value!r}")
        return default
    return value


def _limits(data: Mapping[str, Any], p: _Problems) -> Limits:
    keys = {
        "max_header_size",
        "max_body_size",
        "header_read_timeout",
        "idle_timeout",
        "max_upstream_connections",
        "drain_timeout",
    }
    section = _section(data, "limits", "", p, keys)
    d = Limits()
    return Limits(
        max_header_size=_count(section, "max_header_size", "limits", p, d.max_header_size, 1024),
        max_body_size=_count(section, "max_body_size", "limits", p, d.max_body_size),
        header_read_timeout=_number(section, "header_read_timeout", "limits", p, d.header_read_timeout),
        idle_timeout=_number(section, "idle_timeout", "limits", p, d.idle_timeout),
        max_upstream_connections=_count(section, "max_upstream_connections", "limits", p, d.max_upstream_connections),
        drain_timeout=_number(section, "drain_timeout", "limits", p, d.drain_timeout),
    )


def _audit_retention(store_section: Mapping[str, Any], p: _Problems) -> AuditRetention:
    section = _section(store_section, "audit_retention", "store", p, {"max_age", "max_events"})
    d = AuditRetention()
    max_age = d.max_age
    if "max_age" in section:
        value = section["max_age"]
        if value is None:
            max_age = None
        elif not isinstance(value, str):
            p.error(
                "invalid_duration",
                "store.audit_retention.max_age",
                f"must be a duration such as 90d or 52w (or null), got {value!r}",
            )
        else:
            try:
                max_age = parse_duration(value)
            except ValueError as exc:
                p.error("invalid_duration", "store.audit_retention.max_age", str(exc))
    max_events = d.max_events
    if "max_events" in section:
        value = section["max_events"]
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            p.error(
                "not_count", "store.audit_retention.max_events", f"must be a whole number >= 1 (or null), got {value!r}"
            )
        else:
            max_events = value
    if max_age is None and max_events is None:
        p.warn(
            "store.audit_retention",
            "no bound: the audit trail grows until the store is full (store.map_size_mb); set max_age or max_events",
        )
    return AuditRetention(max_age=max_age, max_events=max_events)


def _admin(data: Mapping[str, Any], p: _Problems, env: Mapping[str, str], base_dir: Path | None) -> Admin:
    section = _section(data, "admin", "", p, {"listen", "token_file", "allow_anonymous_writes", "allowed_hosts"})
    if not section:
        return Admin()
    listen = _section(section, "listen", "admin", p, {"host", "port"})
    host = listen.get("host", "127.0.0.1")
    if not isinstance(host, str) or not host:
        p.error("invalid_address", "admin.listen.host", f"must be an address such as 127.0.0.1, got {host!r}")
        host = "127.0.0.1"
    port = _port(listen.get("port", 9090), "admin.listen.port", p, 9090)
    token_file = _relative_to(section.get("token_file"), base_dir)
    if token_file is not None and (not isinstance(token_file, str) or not Path(token_file).is_file()):
        p.error("file_unreadable", "admin.token_file", f"{token_file!r} is not a readable file holding the admin token")
    has_token = bool(env.get("CORSPROXY_ADMIN_TOKEN")) or token_file is not None
    if not is_loopback_host(host) and not has_token:
        p.error(
            "admin_exposed_without_token",
            "admin.listen.host",
            f"{host!r} is not a loopback address and no admin token is set: anyone who can reach it could change "
            "the origin set — set CORSPROXY_ADMIN_TOKEN or admin.token_file, or listen on 127.0.0.1",
        )
    anonymous_writes = _bool(section, "allow_anonymous_writes", "admin", p, False)
    if anonymous_writes and has_token:
        p.error(
            "anonymous_writes_with_token",
            "admin.allow_anonymous_writes",
            "an admin token is set, so every write needs it; remove allow_anonymous_writes (or the token)",
        )
    hosts = section.get("allowed_hosts") or []
    if not isinstance(hosts, list) or not all(isinstance(h, str) and h and "/" not in h for h in hosts):
        p.error(
            "invalid_host_list",
            "admin.allowed_hosts",
            f"must be a list of host names such as [corsproxy.internal], got {hosts!r}",
        )
        hosts = []
    return Admin(
        host=host,
        port=port,
        token_file=token_file,
        allow_anonymous_writes=anonymous_writes,
        allowed_hosts=tuple(h.lower().rstrip(".") for h in hosts),
    )


def _logging(data: Mapping[str, Any], p: _Problems) -> Logging:
    section = _section(
        data, "logging", "", p, {"format", "level", "sample_allowed", "per_reason_lines", "per_reason_window"}
    )
    fmt = section.get("format", "auto")
    if fmt not in ("auto", "json", "text"):
        p.error("not_choice", "logging.format", f"must be auto, json or text, got {fmt!r}")
        fmt = "auto"
    level = section.get("level", "info")
    if not isinstance(level, str) or level.lower() not in ("debug", "info", "warning", "error"):
        p.error("not_choice", "logging.level", f"must be debug, info, warning or error, got {level!r}")
        level = "info"
    sample = section.get("sample_allowed", 1.0)
    if isinstance(sample, bool) or not isinstance(sample, int | float) or not 0 <= sample <= 1:
        p.error("not_fraction", "logging.sample_allowed", f"must be a fraction between 0 and 1, got {sample!r}")
        sample = 1.0
    defaults = Logging()
    lines = section.get("per_reason_lines", defaults.per_reason_lines)
    if isinstance(lines, bool) or not isinstance(lines, int) or lines < 0:
        p.error(
            "not_count",
            "logging.per_reason_lines",
            f"must be a whole number of lines (0 = no limit), got {lines!r} — e.g. per_reason_lines: 5",
        )
        lines = defaults.per_reason_lines
    window = section.get("per_reason_window", defaults.per_reason_window)
    if isinstance(window, bool) or not isinstance(window, int | float) or not 0 < window <= 3600:
        p.error(
            "not_number",
            "logging.per_reason_window",
            f"must be a number of seconds above 0 and at most 3600, got {window!r} — e.g. per_reason_window: 10",
        )
        window = defaults.per_reason_window
    return Logging(
        format=fmt,
        level=level.lower(),
        sample_allowed=float(sample),
        per_reason_lines=lines,
        per_reason_window=float(window),
    )


_POSTGRESQL_KEYS = {"url", "poll_interval", "change_retention", "batch_size"}


def _postgresql(store_section: Mapping[str, Any], p: _Problems, env: Mapping[str, str]) -> PostgresSource | None:
    """``store.postgresql``: a URL, or a mapping with ``url`` and the sync settings. ``$CORSPROXY_DATABASE_URL``,
    when set, gives the URL (and turns fleet mode on by itself), so the password can live in a secret."""
    value = store_section.get("postgresql")
    from_env = env.get("CORSPROXY_DATABASE_URL") or None
    if value is None and from_env is None:
        return None
    where = "store.postgresql"
    spec: Mapping[str, Any]
    if value is None or isinstance(value, str):
        spec = {"url": value}
    elif isinstance(value, dict):
        spec = value
        _unknown_keys(spec, where, p, _POSTGRESQL_KEYS)
    else:
        p.error(
            "not_postgresql_source",
            where,
            "must be a PostgreSQL URL, e.g. postgresql://corsproxy@db.internal:5432/corsproxy, or a mapping",
        )
        return None
    url = from_env or spec.get("url")
    if not isinstance(url, str) or not url.strip():
        p.error(
            "postgresql_no_url",
            where,
            "no database: give a URL such as postgresql://corsproxy@db.internal:5432/corsproxy, or set "
            "CORSPROXY_DATABASE_URL",
        )
        return None
    if "://" in url and not url.startswith(("postgresql://", "postgres://")):
        p.error(
            "not_postgresql_url", where, f"{redact_dsn(url)!r} is not a PostgreSQL URL: it starts with postgresql://"
        )
        return None
    d = PostgresSource(url="")
    retention = d.change_retention
    if "change_retention" in spec:
        text = spec["change_retention"]
        try:
            retention = parse_duration(text) if isinstance(text, str) else parse_duration(str(text) + "?")
        except ValueError as exc:
            p.error("invalid_duration", f"{where}.change_retention", f"{exc} (how long the change log is kept)")
    batch = spec.get("batch_size", d.batch_size)
    if isinstance(batch, bool) or not isinstance(batch, int) or not 1 <= batch <= 100_000:
        p.error("not_count", f"{where}.batch_size", f"must be a whole number from 1 to 100000, got {batch!r}")
        batch = d.batch_size
    return PostgresSource(
        url=url.strip(),
        poll_interval=_number(spec, "poll_interval", where, p, d.poll_interval),
        change_retention=retention,
        batch_size=batch,
    )


def _origins_file(data: Mapping[str, Any], p: _Problems, base_dir: Path | None) -> OriginsFile:
    section = data.get("origins_file")
    if section is None:
        return OriginsFile()
    if isinstance(section, str):
        section = {"path": section}
    if not isinstance(section, dict):
        p.error("not_mapping", "origins_file", "must be a path, or a mapping {path: FILE, poll_interval: SECONDS}")
        return OriginsFile()
    _unknown_keys(section, "origins_file", p, {"path", "poll_interval"})
    path = section.get("path")
    if not isinstance(path, str) or not path:
        p.error("invalid_path", "origins_file.path", f"must be the path of the origins file, got {path!r}")
        return OriginsFile()
    path = _relative_to(path, base_dir)
    return OriginsFile(path=path, poll_interval=_number(section, "poll_interval", "origins_file", p, 2.0))


_ROUTE_KEYS = {"path", "allow_origins", "policy", "mode"}


def _routes(items: Any, p: _Problems, safety: Mapping[str, PolicySafety]) -> tuple[Route, ...]:
    if items is None:
        return ()
    if not isinstance(items, list):
        p.error("not_list", "routes", "must be a list of {path: /prefix/, ...} entries")
        return ()
    routes: list[Route] = []
    for i, item in enumerate(items):
        where = f"routes[{i}]"
        if not isinstance(item, dict):
            p.error(
                "not_mapping", where, "must be a mapping such as {path: /public/, allow_origins: ['*'], policy: public}"
            )
            continue
        _unknown_keys(item, where, p, _ROUTE_KEYS)
        prefix = item.get("path")
        if not isinstance(prefix, str) or not prefix.startswith("/") or any(c in prefix for c in "?#* "):
            p.error(
                "invalid_route_path",
                f"{where}.path",
                f'must be a path prefix starting with "/", e.g. "/public/", got {prefix!r}',
            )
            continue
        if path_readings(prefix) != (prefix,):
            p.error(
                "route_path_not_normalised",
                f"{where}.path",
                f"{prefix!r} must be written normalised, as servers route it: no percent-escapes, ';' parameters, "
                "backslashes, repeated slashes, '.'/'..' segments or segments ending in '.' or a space",
            )
            continue
        for earlier in routes:
            if earlier.matches(prefix):
                p.error(
                    "route_shadowed",
                    f"{where}.path",
                    f"{prefix!r} can never match: routes[{earlier.index}] ({earlier.prefix!r}) comes first and covers "
                    "it — put the more specific route first",
                )
                break
            if earlier.matches_folded(prefix.lower()):
                p.error(
                    "route_case_clash",
                    f"{where}.path",
                    f"{prefix!r} differs from routes[{earlier.index}] ({earlier.prefix!r}) only in case: a "
                    "case-insensitive server reads both as one, so every path under it would be ambiguous (refused) "
                    "— keep one spelling",
                )
                break
        policy_name = item.get("policy")
        if policy_name is not None and policy_name not in safety:
            p.add(unknown_policy_problem(policy_name, safety).at(f"{where}.policy"))
            continue
        if policy_name is not None and "allow_origins" not in item:
            p.error(
                "route_policy_without_origins",
                f"{where}.policy",
                "a route's policy applies to the route's own allow_origins list; add allow_origins (origins from "
                "the store keep their own policy)",
            )
            continue
        origins = None
        if "allow_origins" in item:
            listed = _origin_list(
                item["allow_origins"], f"{where}.allow_origins", p, safety, policy_name or DEFAULT_POLICY, False
            )
            origins = StaticOriginSet({key: entry.policy for key, entry in listed.items()})
        mode = _enum(item.get("mode", "enforce"), Mode, f"{where}.mode", p)
        routes.append(Route(prefix, origins, mode, i))
    return tuple(routes)


def load_config(path: str | os.PathLike[str] | None = None, env: Mapping[str, str] | None = None) -> Config:
    """Read and validate a config file (``CORSPROXY_CONFIG``, then :data:`DEFAULT_CONFIG_PATH`, when ``None``)."""
    env = os.environ if env is None else env
    file = Path(path or env.get("CORSPROXY_CONFIG") or DEFAULT_CONFIG_PATH)
    try:
        text = file.read_text(encoding="utf-8")
    except OSError as exc:
        problem = f"cannot read the config file: {exc.strerror or exc}"
        if not path and not env.get("CORSPROXY_CONFIG"):
            # Nothing named a file, so the default was tried: say how to name one.
            problem += (
                f" — no config was given and {DEFAULT_CONFIG_PATH} (the default) is missing; pass --config FILE "
                "or set CORSPROXY_CONFIG=FILE (`corsproxy demo` runs without one)"
            )
        raise ConfigError([Problem("", "", "config_unreadable", problem)], str(file)) from None
    except UnicodeDecodeError:
        raise ConfigError(
            [Problem("", "", "config_not_utf8", "the config file is not UTF-8 text")], str(file)
        ) from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc)
        # No YAML path to name (the document did not parse): the message says the line and column instead.
        raise ConfigError([Problem("", "", "invalid_yaml", f"{where}invalid YAML: {problem}")], str(file)) from None
    return parse_config(data, source=str(file), env=env, base_dir=file.resolve().parent)
