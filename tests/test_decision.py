"""The CORS decision as one table of named cases (the rs/cors shape): each case asserts the reason and the *complete*
set of CORS response headers, so an unexpected extra header fails. Pure: no sockets, no LMDB."""

from __future__ import annotations

from typing import Any

import pytest

from corsproxy.config import ConfigError, parse_config
from corsproxy.core.decision import (
    CorsRequest,
    Kind,
    Reason,
    StaticOriginSet,
    actual_headers,
    merge_vary,
    preflight_headers,
)
from corsproxy.core.settings import Config
from tests.support.config import BASE_CONFIG, merge
from tests.support.decision_table import CONFIG, PREFLIGHTS, REFUSED, Preflight


@pytest.fixture(scope="module")
def config() -> Config:
    return parse_config(CONFIG, env={})


def _run(config: Config, case: Preflight) -> tuple[Reason, dict[str, str]]:
    store = StaticOriginSet({k: e.policy for k, e in config.origins.items()})
    decision = config.engine.judge(
        CorsRequest(
            "OPTIONS",
            tuple(case.origin),
            tuple(case.method),
            tuple(case.headers),
            case.path,
            private_network=case.private_network,
        ),
        store,
        0.0,
    )
    assert decision.kind is Kind.PREFLIGHT
    headers = preflight_headers(config.engine, decision)
    as_dict = dict(headers)
    assert len(as_dict) == len(headers), "a CORS header appears twice"
    return decision.reason, as_dict


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
    decision = config.engine.judge(CorsRequest("POST", tuple(origins), path=path), store, 0.0)
    assert decision.kind is Kind.ACTUAL
    assert decision.reason is reason
    assert dict(actual_headers(decision)) == expected


def test_no_origin_is_not_cors(config: Config) -> None:
    decision = config.engine.judge(CorsRequest("OPTIONS", (), ("GET",)), StaticOriginSet({}), 0.0)
    assert decision.kind is Kind.NON_CORS
    assert actual_headers(decision) == []


def test_plain_options_is_an_actual_request(config: Config) -> None:
    store = StaticOriginSet({k: e.policy for k, e in config.origins.items()})
    decision = config.engine.judge(CorsRequest("OPTIONS", ("https://app.example.com",)), store, 0.0)
    assert decision.kind is Kind.ACTUAL


def test_expose_all_with_credentials_lists_response_headers_but_never_set_cookie() -> None:
    config = parse_config(merge(CONFIG, {"cors": {"expose_headers": ["*"]}}), env={})
    store = StaticOriginSet({k: e.policy for k, e in config.origins.items()})
    decision = config.engine.judge(CorsRequest("GET", ("https://app.example.com",)), store, 0.0)
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
    decision = config.engine.judge(CorsRequest("OPTIONS", (origin,), (method,)), store, 0.0)
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


@pytest.mark.parametrize(
    ("key", "origin"),
    [
        ("*", "https://evil.example.net"),
        ("null", "null"),
        ("http://app.example.com", "http://app.example.com"),
        ("https://*.github.io", "https://x.github.io"),
    ],
)
def test_store_entry_unsafe_under_todays_policy_is_refused(key: str, origin: str) -> None:
    """An entry accepted when the policy had no credentials is refused once it has them (CORS-RULES 15)."""
    config = parse_config(BASE_CONFIG, env={})  # the default policy allows credentials
    decision = config.engine.judge(CorsRequest("GET", (origin,)), StaticOriginSet({key: "default"}), 0.0)
    assert decision.reason is Reason.ORIGIN_UNSAFE_FOR_POLICY
    assert actual_headers(decision) == []


def test_code_hosting_wildcards_need_the_opt_in() -> None:
    with pytest.raises(ConfigError, match=r"cors\.allow_origins\[0\].*code-hosting"):
        parse_config(merge(BASE_CONFIG, {"cors": {"allow_origins": ["https://*.codepen.io"]}}), env={})
