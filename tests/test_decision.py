"""The CORS decision as one table of named cases (the rs/cors shape): each case asserts the reason and the *complete*
set of CORS response headers, so an unexpected extra header fails. Pure: no sockets, no LMDB."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pytest

from corsproxy.config import ConfigError, parse_config
from corsproxy.core.decision import Kind, Reason, StaticOriginSet, actual_headers, merge_vary, preflight_headers
from corsproxy.core.settings import Config
from tests.conftest import BASE_CONFIG, merge

CONFIG: dict[str, Any] = merge(
    BASE_CONFIG,
    {
        "cors": {
            "allow_origins": [
                "https://app.example.com",
                "https://*.example.org",
                "http://localhost:*",
                {"origin": "https://x.partner.net", "policy": "partners"},
                {"origin": "https://pna.example.com", "policy": "private"},
                {"origin": "https://star.example.com", "policy": "anyheaders"},
            ]
        },
        "policies": {
            "partners": {"allow_methods": ["GET"], "allow_credentials": False, "max_age": 60, "expose_headers": []},
            "private": {"allow_private_network": True},
            "anyheaders": {"allow_headers": ["*"], "allow_methods": ["*"], "allow_credentials": True},
        },
        "routes": [{"path": "/public/", "allow_origins": ["*"], "policy": "public"}],
    },
)
CONFIG["policies"]["public"] = {"allow_credentials": False, "allow_methods": ["GET", "HEAD"], "max_age": 300}

PREFLIGHT_VARY = "Origin, Access-Control-Request-Method, Access-Control-Request-Headers, " + (
    "Access-Control-Request-Private-Network"
)
ALLOW_DEFAULT = {
    "Vary": PREFLIGHT_VARY,
    "Access-Control-Allow-Credentials": "true",
    "Access-Control-Allow-Methods": "DELETE, GET, POST, PUT",
    "Access-Control-Max-Age": "600",
}
REFUSED = {"Vary": PREFLIGHT_VARY}


@pytest.fixture(scope="module")
def config() -> Config:
    return parse_config(CONFIG, env={})


@dataclass
class Preflight:
    origin: list[str]
    method: list[str]
    headers: list[str] = field(default_factory=list)
    path: str = "/api/x"
    private_network: bool = False


def _run(config: Config, case: Preflight) -> tuple[Reason, dict[str, str]]:
    store = StaticOriginSet({k: e.policy for k, e in config.origins.items()})
    decision = config.engine.decide(
        "OPTIONS", case.origin, case.method, case.headers, case.path, store, 0.0, case.private_network
    )
    assert decision.kind is Kind.PREFLIGHT
    headers = preflight_headers(config.engine, decision)
    as_dict = dict(headers)
    assert len(as_dict) == len(headers), "a CORS header appears twice"
    return decision.reason, as_dict


def _allow(origin: str, **extra: str) -> dict[str, str]:
    return {**ALLOW_DEFAULT, "Access-Control-Allow-Origin": origin, **extra}


PREFLIGHTS: dict[str, tuple[Preflight, Reason, dict[str, str]]] = {
    "exact origin": (
        Preflight(["https://app.example.com"], ["PUT"], ["content-type"]),
        Reason.ALLOWED,
        _allow("https://app.example.com", **{"Access-Control-Allow-Headers": "content-type"}),
    ),
    "subdomain pattern": (
        Preflight(["https://a.b.example.org"], ["DELETE"]),
        Reason.ALLOWED,
        _allow("https://a.b.example.org"),
    ),
    "port pattern": (Preflight(["http://localhost:5173"], ["POST"]), Reason.ALLOWED, _allow("http://localhost:5173")),
    "headers with spaces, empties, two lines, mixed case": (
        Preflight(["https://app.example.com"], ["POST"], [" Content-Type ,, ", "X-Api-Key,authorization"]),
        Reason.ALLOWED,
        _allow("https://app.example.com", **{"Access-Control-Allow-Headers": "authorization, content-type, x-api-key"}),
    ),
    "look-alike suffix": (Preflight(["https://app.example.com.evil.net"], ["GET"]), Reason.ORIGIN_NOT_ALLOWED, REFUSED),
    "look-alike prefix": (Preflight(["https://evilapp.example.com"], ["GET"]), Reason.ORIGIN_NOT_ALLOWED, REFUSED),
    "look-alike dot": (Preflight(["https://appxexample.com"], ["GET"]), Reason.ORIGIN_NOT_ALLOWED, REFUSED),
    "other scheme": (Preflight(["http://app.example.com"], ["GET"]), Reason.ORIGIN_NOT_ALLOWED, REFUSED),
    "other port": (Preflight(["https://app.example.com:8443"], ["GET"]), Reason.ORIGIN_NOT_ALLOWED, REFUSED),
    "pattern apex": (Preflight(["https://example.org"], ["GET"]), Reason.ORIGIN_NOT_ALLOWED, REFUSED),
    "pattern look-alike": (Preflight(["https://evilexample.org"], ["GET"]), Reason.ORIGIN_NOT_ALLOWED, REFUSED),
    "two origin lines": (
        Preflight(["https://app.example.com", "https://app.example.com"], ["GET"]),
        Reason.ORIGIN_MALFORMED,
        REFUSED,
    ),
    "uppercase origin": (Preflight(["https://APP.example.com"], ["GET"]), Reason.ORIGIN_MALFORMED, REFUSED),
    "null origin": (Preflight(["null"], ["GET"]), Reason.ORIGIN_NULL, REFUSED),
    "method case-sensitive": (Preflight(["https://app.example.com"], ["put"]), Reason.METHOD_NOT_ALLOWED, REFUSED),
    "method not listed": (Preflight(["https://app.example.com"], ["PATCH"]), Reason.METHOD_NOT_ALLOWED, REFUSED),
    "two method lines": (
        Preflight(["https://app.example.com"], ["PUT", "PUT"]),
        Reason.METHOD_MALFORMED,
        REFUSED,
    ),
    "method not a token": (Preflight(["https://app.example.com"], ["P UT"]), Reason.METHOD_MALFORMED, REFUSED),
    "header not allowed": (
        Preflight(["https://app.example.com"], ["PUT"], ["x-other"]),
        Reason.HEADER_NOT_ALLOWED,
        REFUSED,
    ),
    "header not a token": (
        Preflight(["https://app.example.com"], ["PUT"], ["x a"]),
        Reason.HEADERS_MALFORMED,
        REFUSED,
    ),
    "too many empty elements": (
        Preflight(["https://app.example.com"], ["PUT"], ["," * 40]),
        Reason.HEADERS_MALFORMED,
        REFUSED,
    ),
    "too many names": (
        Preflight(["https://app.example.com"], ["PUT"], [",".join(f"x-{i}" for i in range(100))]),
        Reason.HEADERS_MALFORMED,
        REFUSED,
    ),
    "per-origin policy narrows methods": (
        Preflight(["https://x.partner.net"], ["PUT"]),
        Reason.METHOD_NOT_ALLOWED,
        REFUSED,
    ),
    "per-origin policy: no credentials, own max-age": (
        Preflight(["https://x.partner.net"], ["GET"]),
        Reason.ALLOWED,
        {
            "Vary": PREFLIGHT_VARY,
            "Access-Control-Allow-Origin": "https://x.partner.net",
            "Access-Control-Allow-Methods": "GET",
            "Access-Control-Max-Age": "60",
        },
    ),
    "wildcard headers never cover authorization": (
        Preflight(["https://star.example.com"], ["PUT"], ["x-anything", "authorization"]),
        Reason.HEADER_NOT_ALLOWED,
        REFUSED,
    ),
    "wildcards with credentials echo the request": (
        Preflight(["https://star.example.com"], ["PATCH"], ["x-anything"]),
        Reason.ALLOWED,
        {
            **_allow("https://star.example.com"),
            "Access-Control-Allow-Methods": "PATCH",
            "Access-Control-Allow-Headers": "x-anything",
        },
    ),
    "private network not enabled": (
        Preflight(["https://app.example.com"], ["GET"], private_network=True),
        Reason.PRIVATE_NETWORK_NOT_ALLOWED,
        REFUSED,
    ),
    "private network enabled": (
        Preflight(["https://pna.example.com"], ["GET"], private_network=True),
        Reason.ALLOWED,
        _allow("https://pna.example.com", **{"Access-Control-Allow-Private-Network": "true"}),
    ),
    "public route answers * without credentials": (
        Preflight(["https://anyone.example.net"], ["GET"], path="/public/data"),
        Reason.ALLOWED,
        {
            "Vary": PREFLIGHT_VARY,
            "Access-Control-Allow-Origin": "*",
            "Access-Control-Allow-Methods": "GET, HEAD",
            "Access-Control-Max-Age": "300",
        },
    ),
    "public route keeps its own methods": (
        Preflight(["https://anyone.example.net"], ["PUT"], path="/public/data"),
        Reason.METHOD_NOT_ALLOWED,
        REFUSED,
    ),
    "path parameter cannot skip the route": (
        Preflight(["https://anyone.example.net"], ["GET"], path="/public/..;/admin"),
        Reason.PATH_AMBIGUOUS,  # servers read it under /public/ or outside it: refused (400)
        REFUSED,
    ),
    "backslashes are separators": (
        Preflight(["https://anyone.example.net"], ["GET"], path="/public\\..\\admin"),
        Reason.PATH_AMBIGUOUS,  # servers read it under /public/ or outside it: refused (400)
        REFUSED,
    ),
    "dot segments cannot reach another route": (
        Preflight(["https://anyone.example.net"], ["GET"], path="/public/..%2Fadmin"),
        Reason.PATH_AMBIGUOUS,  # servers read it under /public/ or outside it: refused (400)
        REFUSED,
    ),
}


@pytest.mark.parametrize(("case", "reason", "expected"), PREFLIGHTS.values(), ids=PREFLIGHTS.keys())
def test_preflight(config: Config, case: Preflight, reason: Reason, expected: dict[str, str]) -> None:
    got_reason, headers = _run(config, case)
    assert got_reason is reason
    assert headers == expected


def test_debug_reason_header_only_when_enabled() -> None:
    config = parse_config(merge(CONFIG, {"debug_reason_header": True}), env={})
    reason, headers = _run(config, Preflight(["https://evil.example.net"], ["GET"]))
    assert reason is Reason.ORIGIN_NOT_ALLOWED
    assert headers == {**REFUSED, "X-Corsproxy-Reason": "origin_not_allowed"}


ACTUALS: dict[str, tuple[list[str], str, Reason, dict[str, str]]] = {
    "allowed": (
        ["https://app.example.com"],
        "/api",
        Reason.ALLOWED,
        {
            "Access-Control-Allow-Origin": "https://app.example.com",
            "Access-Control-Allow-Credentials": "true",
            "Access-Control-Expose-Headers": "x-request-id",
        },
    ),
    "refused": (["https://evil.example.net"], "/api", Reason.ORIGIN_NOT_ALLOWED, {}),
    "malformed": (["https://app.example.com/"], "/api", Reason.ORIGIN_MALFORMED, {}),
    "partner without credentials": (
        ["https://x.partner.net"],
        "/api",
        Reason.ALLOWED,
        {"Access-Control-Allow-Origin": "https://x.partner.net"},
    ),
    "public route (policy inherits expose_headers from cors)": (
        ["https://anyone.example.net"],
        "/public/x",
        Reason.ALLOWED,
        {"Access-Control-Allow-Origin": "*", "Access-Control-Expose-Headers": "x-request-id"},
    ),
}


@pytest.mark.parametrize(("origins", "path", "reason", "expected"), ACTUALS.values(), ids=ACTUALS.keys())
def test_actual(config: Config, origins: list[str], path: str, reason: Reason, expected: dict[str, str]) -> None:
    store = StaticOriginSet({k: e.policy for k, e in config.origins.items()})
    decision = config.engine.decide("POST", origins, [], [], path, store, 0.0)
    assert decision.kind is Kind.ACTUAL
    assert decision.reason is reason
    assert dict(actual_headers(decision)) == expected


def test_no_origin_is_not_cors(config: Config) -> None:
    decision = config.engine.decide("OPTIONS", [], ["GET"], [], "/", StaticOriginSet({}), 0.0)
    assert decision.kind is Kind.NON_CORS
    assert actual_headers(decision) == []


def test_plain_options_is_an_actual_request(config: Config) -> None:
    store = StaticOriginSet({k: e.policy for k, e in config.origins.items()})
    decision = config.engine.decide("OPTIONS", ["https://app.example.com"], [], [], "/", store, 0.0)
    assert decision.kind is Kind.ACTUAL


def test_expose_all_with_credentials_lists_response_headers_but_never_set_cookie() -> None:
    config = parse_config(merge(CONFIG, {"cors": {"expose_headers": ["*"]}}), env={})
    store = StaticOriginSet({k: e.policy for k, e in config.origins.items()})
    decision = config.engine.decide("GET", ["https://app.example.com"], [], [], "/", store, 0.0)
    names = ["Content-Type", "Set-Cookie", "X-Request-Id", "Access-Control-Allow-Origin"]
    assert dict(actual_headers(decision, names))["Access-Control-Expose-Headers"] == "content-type, x-request-id"


@pytest.mark.parametrize(
    ("existing", "expected"),
    [
        ([], "Origin"),
        (["Accept-Encoding"], "Accept-Encoding, Origin"),
        (["accept-encoding, origin"], "accept-encoding, origin"),
        (["Accept-Encoding", "Cookie"], "Accept-Encoding, Cookie, Origin"),
        (["*"], "*"),
    ],
)
def test_merge_vary(existing: list[str], expected: str) -> None:
    assert merge_vary(existing, ("Origin",)) == expected


def _decide_one(data: dict[str, Any], origin: str, method: str = "GET") -> tuple[Reason, dict[str, str]]:
    config = parse_config(data, env={})
    store = StaticOriginSet({k: e.policy for k, e in config.origins.items()})
    decision = config.engine.decide("OPTIONS", [origin], [method], [], "/", store, 0.0)
    return decision.reason, dict(preflight_headers(config.engine, decision))


def test_star_with_credentials_opt_in_reflects_the_origin_never_star() -> None:
    data = merge(BASE_CONFIG, {"cors": {"allow_origins": ["*"], "dangerously_allow_any_origin_with_credentials": True}})
    reason, headers = _decide_one(data, "https://anyone.example.net")
    assert reason is Reason.ALLOWED
    assert headers["Access-Control-Allow-Origin"] == "https://anyone.example.net"
    assert headers["Access-Control-Allow-Credentials"] == "true"


def test_null_opt_in_allows_and_answers_null() -> None:
    data = merge(
        BASE_CONFIG,
        {"cors": {"allow_origins": ["null"], "allow_credentials": False, "dangerously_allow_null_origin": True}},
    )
    reason, headers = _decide_one(data, "null")
    assert reason is Reason.ALLOWED
    assert headers["Access-Control-Allow-Origin"] == "null"


def test_max_age_null_omits_the_header() -> None:
    data = merge(BASE_CONFIG, {})
    data["cors"]["max_age"] = None  # YAML `max_age: null` (merge() would delete the key)
    reason, headers = _decide_one(data, "https://app.example.com")
    assert reason is Reason.ALLOWED
    assert "Access-Control-Max-Age" not in headers


def test_store_entry_unsafe_under_todays_policy_is_refused() -> None:
    """An entry accepted when the policy had no credentials is refused once it has them (CORS-RULES 15)."""
    config = parse_config(BASE_CONFIG, env={})  # the default policy allows credentials
    for key in ("*", "null", "http://app.example.com", "https://*.github.io"):
        decision = config.engine.decide(
            "GET",
            [
                "http://app.example.com"
                if key.startswith("http:")
                else "null"
                if key == "null"
                else "https://x.github.io"
                if "github" in key
                else "https://evil.example.net"
            ],
            [],
            [],
            "/",
            StaticOriginSet({key: "default"}),
            0.0,
        )
        assert decision.reason is Reason.ORIGIN_UNSAFE_FOR_POLICY, key
        assert actual_headers(decision) == []


def test_code_hosting_wildcards_need_the_opt_in() -> None:
    with pytest.raises(ConfigError, match=r"cors\.allow_origins\[0\].*code-hosting"):
        parse_config(merge(BASE_CONFIG, {"cors": {"allow_origins": ["https://*.codepen.io"]}}), env={})
