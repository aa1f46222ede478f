"""Configuration errors say what is wrong, where the user wrote it, and how to fix it (one report, every problem)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from corsproxy.config import DEFAULT_CONFIG_PATH, ConfigError, parse_config
from tests.support.config import BASE_CONFIG, merge, run_cli


def _problems(data: dict[str, Any]) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_config(data, env={})
    return [str(problem) for problem in info.value.problems]  # what the operator reads: "path: message"


LIST_AS_STRING = {
    "two methods": ("GET, POST", "cors.allow_methods: must be a list, e.g. [GET, POST]"),
    "one method": ("GET", "cors.allow_methods: must be a list, e.g. [GET]"),
    "spaces and empty items": (" GET ,, PUT ", "cors.allow_methods: must be a list, e.g. [GET, PUT]"),
}


@pytest.mark.parametrize(("value", "problem"), LIST_AS_STRING.values(), ids=LIST_AS_STRING.keys())
def test_a_list_written_as_a_string_suggests_the_list(value: str, problem: str) -> None:
    assert _problems(merge(BASE_CONFIG, {"cors": {"allow_methods": value}})) == [problem]


def test_the_suggested_list_is_accepted() -> None:
    config = parse_config(merge(BASE_CONFIG, {"cors": {"allow_methods": ["GET", "POST"]}}), env={})
    assert config.engine.policies["default"].allow_methods == frozenset({"GET", "POST"})


def test_errors_elsewhere_are_reported_with_route_errors() -> None:
    data = merge(
        BASE_CONFIG,
        {"routes": [{"path": "admin/"}], "mode": "report_only", "block_disallowed": "yes"},
    )
    paths = sorted(problem.split(":", 1)[0] for problem in _problems(data))
    assert paths == ["block_disallowed", "mode", "routes[0].path"]


def test_inherited_values_are_reported_where_they_were_written() -> None:
    data = merge(
        BASE_CONFIG,
        {
            "cors": {"max_age": 90000, "allow_methods": "GET, POST"},
            "policies": {"public": {"allow_credentials": False}, "partners": {"max_age": -1}},
        },
    )
    problems = _problems(data)
    assert sorted(problem.split(":", 1)[0] for problem in problems) == [
        "cors.allow_methods",
        "cors.max_age",
        "policies.partners.max_age",
    ]
    assert not any(problem.startswith("policies.public") for problem in problems)


def test_an_inherited_warning_is_said_once_under_the_written_key() -> None:
    data = merge(BASE_CONFIG, {"cors": {"max_age": 8000}, "policies": {"public": {"allow_credentials": False}}})
    warnings = [w for w in parse_config(data, env={}).warnings if "Chromium" in w]
    assert len(warnings) == 1 and warnings[0].startswith("cors.max_age: ")


UNKNOWN_POLICY = {
    "route": (
        {
            "policies": {"public": {"allow_credentials": False}},
            "routes": [{"path": "/p/", "allow_origins": ["*"], "policy": "publc"}],
        },
        "routes[0].policy",
    ),
    "origin entry": (
        {
            "policies": {"public": {"allow_credentials": False}},
            "cors": {"allow_origins": [{"origin": "https://a.example.com", "policy": "pubic"}]},
        },
        "cors.allow_origins[0].policy",
    ),
}


@pytest.mark.parametrize(("override", "path"), UNKNOWN_POLICY.values(), ids=UNKNOWN_POLICY.keys())
def test_unknown_policy_names_get_a_did_you_mean(override: dict[str, Any], path: str) -> None:
    (problem,) = _problems(merge(BASE_CONFIG, override))
    assert problem.startswith(f"{path}: unknown policy ")
    assert 'did you mean "public"?' in problem
    assert "defined policies: default, public" in problem


def test_cli_unknown_policy_gets_a_did_you_mean(write_config: Callable[..., Path]) -> None:
    path = write_config(policies={"partners": {"allow_methods": ["GET"]}})
    result = run_cli("origins", "add", "https://a.example.com", "--policy", "partner", "-c", str(path))
    assert result.returncode == 2
    assert 'did you mean "partners"?' in result.stderr


@pytest.mark.skipif(Path(DEFAULT_CONFIG_PATH).exists(), reason=f"{DEFAULT_CONFIG_PATH} exists on this machine")
@pytest.mark.parametrize("argv", [["check"], ["origins", "list"]], ids=["check", "origins-list"])
def test_no_config_anywhere_says_how_to_give_one(tmp_path: Path, argv: list[str]) -> None:
    result = run_cli(*argv, env={"CORSPROXY_CONFIG": ""})
    assert result.returncode == 2
    assert DEFAULT_CONFIG_PATH in result.stderr
    assert "--config FILE" in result.stderr and "CORSPROXY_CONFIG" in result.stderr


def test_a_named_missing_config_gets_no_default_hint(tmp_path: Path) -> None:
    result = run_cli("check", "--config", str(tmp_path / "nope.yaml"))
    assert result.returncode == 2
    assert "nope.yaml" in result.stderr and "No such file" in result.stderr
    assert DEFAULT_CONFIG_PATH not in result.stderr


def test_an_inherited_opt_in_is_warned_once_where_it_was_written() -> None:
    data = merge(
        BASE_CONFIG,
        {
            "cors": {"allow_credentials": False, "dangerously_allow_null_origin": True},
            "policies": {"public": {}, "strict": {"dangerously_allow_null_origin": False}},
        },
    )
    flagged = [w for w in parse_config(data, env={}).warnings if "dangerously_allow_null_origin is set" in w]
    assert flagged == ["cors: dangerously_allow_null_origin is set (inherited by policies public)"]


def test_an_opt_in_set_on_a_policy_is_warned_under_it() -> None:
    data = merge(BASE_CONFIG, {"policies": {"sandbox": {"dangerously_allow_null_origin": True}}})
    flagged = [w for w in parse_config(data, env={}).warnings if "is set" in w]
    assert flagged == ["policies.sandbox: dangerously_allow_null_origin is set"]
