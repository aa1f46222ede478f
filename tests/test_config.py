"""Configuration validation: every problem reported at once, with its YAML path and a fix; dangerous configurations
refused unless their named opt-in is set (CORS-RULES 15-16)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from corsproxy.config import ConfigError, load_config, parse_config
from tests.support.config import BASE_CONFIG, merge


def _errors(data: dict[str, Any]) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_config(data, env={})
    return [str(problem) for problem in info.value.problems]  # what the operator reads: "path: message"


def _with_origins(*origins: Any, **cors: Any) -> dict[str, Any]:
    return merge(BASE_CONFIG, {"cors": {"allow_origins": list(origins), **cors}})


REFUSED: dict[str, tuple[dict[str, Any], str, str]] = {
    "wildcard not a whole label": (
        _with_origins("https://ok.example.com", "https://ok2.example.com", "https://*example.com"),
        "cors.allow_origins[2]",
        'a wildcard must be a whole label at the start of the host, e.g. "https://*.example.com"',
    ),
    "star with credentials": (
        _with_origins("*"),
        "cors.allow_origins[0]",
        "dangerously_allow_any_origin_with_credentials",
    ),
    "null origin": (_with_origins("null"), "cors.allow_origins[0]", "dangerously_allow_null_origin"),
    "http on a credentialed policy": (
        _with_origins("http://app.example.com"),
        "cors.allow_origins[0]",
        "use 'https://app.example.com'",
    ),
    "public suffix wildcard": (_with_origins("https://*.co.uk"), "cors.allow_origins[0]", "public suffix"),
    "shared hosting wildcard": (_with_origins("https://*.github.io"), "cors.allow_origins[0]", "public suffix"),
    "tld wildcard": (_with_origins("https://*.com"), "cors.allow_origins[0]", "public suffix"),
    "regex key": (
        merge(BASE_CONFIG, {"cors": {"allow_origin_regex": "^https://.*\\.example\\.com$"}}),
        "cors.allow_origin_regex",
        '"https://*.example.com"',
    ),
    "regex as an origin": (
        _with_origins("^https://.*\\.example\\.com$"),
        "cors.allow_origins[0]",
        "regular expression",
    ),
    "unknown key with suggestion": (
        merge(BASE_CONFIG, {"cors": {"allow_credential": True}}),
        "cors.allow_credential",
        'did you mean "allow_credentials"',
    ),
    "unknown top-level key": (merge(BASE_CONFIG, {"upsteam": {}}), "upsteam", 'did you mean "upstream"'),
    "forbidden method": (
        _with_origins("https://a.example.com", allow_methods=["GET", "TRACE"]),
        "cors.allow_methods[1]",
        "forbidden",
    ),
    "set-cookie exposed": (
        _with_origins("https://a.example.com", expose_headers=["Set-Cookie"]),
        "cors.expose_headers[0]",
        "Set-Cookie",
    ),
    "max age too high": (_with_origins("https://a.example.com", max_age=90000), "cors.max_age", "86400"),
    "negative max age": (_with_origins("https://a.example.com", max_age=-1), "cors.max_age", ">= 0"),
    "trailing slash": (_with_origins("https://a.example.com/"), "cors.allow_origins[0]", "no trailing slash"),
    "duplicate after canonicalisation": (
        _with_origins("https://a.example.com", "HTTPS://A.example.com:443"),
        "cors.allow_origins[1]",
        "listed twice",
    ),
    "unknown policy": (
        _with_origins({"origin": "https://a.example.com", "policy": "nope"}),
        "cors.allow_origins[0].policy",
        "unknown policy 'nope'",
    ),
    "bad upstream scheme": (
        merge(BASE_CONFIG, {"upstream": {"url": "ftp://x"}}),
        "upstream.url",
        "http:// or https://",
    ),
    "list given as a string": (
        _with_origins("https://a.example.com", allow_methods="GET"),
        "cors.allow_methods",
        "must be a list",
    ),
    "bad port": (merge(BASE_CONFIG, {"listen": {"port": 70000}}), "listen.port", "0-65535"),
    "route that can never match": (
        merge(BASE_CONFIG, {"routes": [{"path": "/api"}, {"path": "/api/v2", "mode": "report-only"}]}),
        "routes[1].path",
        "can never match",
    ),
    "route policy without origins": (
        merge(BASE_CONFIG, {"routes": [{"path": "/x", "policy": "default"}]}),
        "routes[0].policy",
        "allow_origins",
    ),
    "bad mode": (merge(BASE_CONFIG, {"mode": "enforcing"}), "mode", "enforce, report-only"),
    "admin on a public address without token": (
        merge(BASE_CONFIG, {"admin": {"listen": {"host": "0.0.0.0", "port": 9090}}}),
        "admin.listen.host",
        "CORSPROXY_ADMIN_TOKEN",
    ),
    "admin on the proxied port": (
        merge(BASE_CONFIG, {"listen": {"port": 8080}, "admin": {"listen": {"port": 8080}}}),
        "admin.listen.port",
        "also the proxied port",
    ),
    "expiry without timezone": (
        _with_origins({"origin": "https://a.example.com", "expires": "2026-12-31T00:00:00"}),
        "cors.allow_origins[0].expires",
        "no timezone",
    ),
}


@pytest.mark.parametrize(("data", "path", "message"), REFUSED.values(), ids=REFUSED.keys())
def test_refused_with_path_and_fix(data: dict[str, Any], path: str, message: str) -> None:
    problems = _errors(data)
    assert any(p.startswith(f"{path}:") and message in p for p in problems), problems


def test_every_problem_is_reported_at_once() -> None:
    data = merge(
        BASE_CONFIG,
        {
            "upstream": {"url": "nope"},
            "cors": {"allow_origins": ["*", "null", "https://*example.com"], "max_age": "ten"},
            "typo": 1,
        },
    )
    problems = _errors(data)
    paths = sorted({p.split(":", 1)[0] for p in problems})
    assert paths == [
        "cors.allow_origins[0]",
        "cors.allow_origins[1]",
        "cors.allow_origins[2]",
        "cors.max_age",
        "typo",
        "upstream.url",
    ]


OPT_INS = {
    "star with credentials": ("*", "dangerously_allow_any_origin_with_credentials"),
    "null": ("null", "dangerously_allow_null_origin"),
    "http": ("http://app.example.com", "dangerously_allow_http_origins"),
    "public suffix": ("https://*.github.io", "dangerously_allow_public_suffix_wildcards"),
}


@pytest.mark.parametrize(("origin", "flag"), OPT_INS.values(), ids=OPT_INS.keys())
def test_dangerous_opt_in_accepts_and_warns(origin: str, flag: str) -> None:
    config = parse_config(_with_origins(origin, **{flag: True}), env={})
    assert any(flag in w for w in config.warnings)


def test_opt_in_is_per_policy() -> None:
    data = merge(
        BASE_CONFIG,
        {
            "cors": {"allow_origins": [{"origin": "null", "policy": "sandbox"}, "null"]},
            "policies": {"sandbox": {"dangerously_allow_null_origin": True, "allow_credentials": False}},
        },
    )
    problems = _errors(data)
    assert [p.split(":", 1)[0] for p in problems] == ["cors.allow_origins[1]"]


WARNED = {
    "credentialed subdomain wildcard": ("https://*.example.org", "every subdomain"),
    "code hosting": ("https://codepen.io", "anyone can publish"),
    "loopback http allowed with credentials": ("http://localhost:*", None),
}


@pytest.mark.parametrize(("origin", "warning"), WARNED.values(), ids=WARNED.keys())
def test_warnings(origin: str, warning: str | None) -> None:
    config = parse_config(_with_origins(origin), env={})
    if warning is None:
        assert config.warnings == ()
    else:
        assert any(warning in w for w in config.warnings), config.warnings


def test_max_age_above_chromium_cap_warns() -> None:
    config = parse_config(_with_origins("https://a.example.com", max_age=86400), env={})
    assert any("Chromium" in w for w in config.warnings)


def test_canonical_keys_and_policy_inheritance() -> None:
    data = merge(
        BASE_CONFIG,
        {
            "cors": {
                "allow_origins": ["HTTPS://Bücher.Example:443", {"origin": "https://p.example.com", "policy": "p"}]
            },
            "policies": {"p": {"allow_methods": ["GET"]}},
        },
    )
    config = parse_config(data, env={})
    assert sorted(config.origins) == ["https://p.example.com", "https://xn--bcher-kva.example"]
    assert config.origins["https://p.example.com"].policy == "p"
    partner = config.engine.policies["p"]
    assert partner.allow_methods == frozenset({"GET"})
    assert partner.allow_credentials is True  # inherited from the cors block
    assert partner.allow_headers == frozenset({"content-type", "authorization", "x-api-key"})


def test_environment_overrides() -> None:
    env = {"CORSPROXY_PORT": "9999", "CORSPROXY_UPSTREAM": "https://api.internal:8443/v1/"}
    config = parse_config(BASE_CONFIG, env=env)
    assert config.listen.port == 9999
    assert (config.upstream.scheme, config.upstream.host, config.upstream.port) == ("https", "api.internal", 8443)
    assert config.upstream.base_path == "/v1"


def test_bad_environment_override_names_the_variable() -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(BASE_CONFIG, env={"CORSPROXY_PORT": "eighty"})
    assert [(p.path, p.field, p.code) for p in info.value.problems] == [
        ("env CORSPROXY_PORT", "CORSPROXY_PORT", "not_port")
    ]


def test_yaml_syntax_error_has_line_and_column(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("listen:\n  port: [8080\n")
    with pytest.raises(ConfigError) as info:
        load_config(path, env={})
    (problem,) = info.value.problems
    assert problem.code == "invalid_yaml" and ("line 3" in problem.message or "line 2" in problem.message)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read the config file"):
        load_config(tmp_path / "absent.yaml", env={})


def test_config_path_from_environment(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("upstream: {url: 'http://127.0.0.1:1234'}\n")
    config = load_config(None, env={"CORSPROXY_CONFIG": str(path)})
    assert config.upstream.port == 1234
    assert config.store.path == str(tmp_path / "var/origins.lmdb")  # relative to the config file


def test_yaml_off_means_off() -> None:
    config = parse_config(merge(BASE_CONFIG, {"block_disallowed": False}), env={})
    assert config.engine.block_disallowed.value == "off"


def test_example_config_is_valid() -> None:
    config = load_config(Path(__file__).parent.parent / "config.example.yaml", env={})
    assert len(config.origins) == 3
