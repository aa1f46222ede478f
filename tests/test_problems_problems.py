"""One wording everywhere: the same bad origin, bad policy, unsafe entry or declared entry is refused with the same
``code`` and ``message`` whether it comes in through the config file, ``corsproxy origins add`` (a real subprocess)
or the admin API of a real ``corsproxy serve`` — each door only says *where* (a YAML path, a CLI argument, a request
location)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from corsproxy.config import ConfigError, parse_config
from corsproxy.core.problems import Problem, ProblemError, field_of
from corsproxy.origins.writes import Declarations, DeclaredElsewhere
from tests.support.config import REPO, merge, run_cli
from tests.support.serve import Server, origin_path
from tests.support.upstream import ThreadedUpstream

APP = "https://app.example.com"  # declared in the base config's cors.allow_origins
NEW = "https://new.example.com"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """One server for the module: every case is refused, so no case changes what another sees."""
    with ThreadedUpstream() as upstream:
        served = Server(tmp_path_factory.mktemp("problems"), upstream.port, workers=1)
        served.start()
        try:
            yield served
        finally:
            served.stop()


def _config_problem(server: Server, entry: Any) -> Problem:
    """The problem the config door finds with ``entry`` as the only item of ``cors.allow_origins``."""
    with pytest.raises(ConfigError) as info:
        parse_config(merge(server.data, {"cors": {"allow_origins": [entry]}}), env={})
    (problem,) = info.value.problems
    return problem


def _cli(server: Server, *args: str) -> str:
    result = run_cli("origins", "add", *args, "-c", str(server.config_path), env={"PYTHONPATH": str(REPO)})
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert "Traceback" not in result.stderr
    return result.stderr


# (config entry, CLI arguments, admin PUT origin and body, YAML path, CLI argument, admin location, code)
CASES = {
    "bad origin": (
        f"{NEW}/",
        [f"{NEW}/"],
        (f"{NEW}/", {}),
        "cors.allow_origins[0]",
        "origin",
        "path.origin",
        "origin_trailing_slash",
    ),
    "regex": (
        "^https://.*$",
        ["^https://.*$"],
        ("^https://.*$", {}),
        "cors.allow_origins[0]",
        "origin",
        "path.origin",
        "origin_regex",
    ),
    "bad policy": (
        {"origin": NEW, "policy": "partnrs"},
        [NEW, "--policy", "partnrs"],
        (NEW, {"policy": "partnrs"}),
        "cors.allow_origins[0].policy",
        "--policy",
        "body.policy",
        "unknown_policy",
    ),
    "unsafe under the policy": (
        "http://plain.example.com",
        ["http://plain.example.com"],
        ("http://plain.example.com", {}),
        "cors.allow_origins[0]",
        "origin",
        "path.origin",
        "http_origin_with_credentials",
    ),
    "null": ("null", ["null"], ("null", {}), "cors.allow_origins[0]", "origin", "path.origin", "null_origin"),
}


@pytest.mark.parametrize(
    ("entry", "cli_args", "put", "yaml_path", "argument", "location", "code"), list(CASES.values()), ids=list(CASES)
)
def test_each_door_refuses_in_the_same_words(
    server: Server,
    entry: Any,
    cli_args: list[str],
    put: tuple[str, dict[str, Any]],
    yaml_path: str,
    argument: str,
    location: str,
    code: str,
) -> None:
    from_config = _config_problem(server, entry)
    assert (from_config.path, from_config.code) == (yaml_path, code)
    assert str(from_config) == f"{yaml_path}: {from_config.message}"  # what `corsproxy check` prints

    assert f"error: {argument}: {from_config.message}\n" in _cli(server, *cli_args)

    origin, body = put
    answer = server.admin("PUT", origin_path(origin), body=body)
    assert answer.status == 400, answer.body
    error = answer.json()
    want = {"path": location, "field": from_config.field, "code": code, "message": from_config.message}
    assert error["problems"] == [want], error
    # The older summary keys repeat the first problem.
    assert (error["field"], error["reason"]) == (from_config.field, from_config.message)
    assert server.admin("GET", f"/origins?filter={origin}").json()["origins"] == []


def test_a_declared_entry_is_refused_in_the_same_words(server: Server) -> None:
    # What the write service says when an operator write reaches an entry cors.allow_origins declares.
    expected = DeclaredElsewhere(APP, "config", Declarations(str(server.config_path)).where("config")).problem
    assert (expected.field, expected.code) == ("origin", "declared_elsewhere")

    assert f"error: origin: {expected.message}\n" in _cli(server, APP, "--note", "mine now")

    answer = server.admin("PUT", origin_path(APP), body={"note": "mine now"})
    assert answer.status == 409, answer.body
    error = answer.json()
    assert error["problems"] == [{**expected.as_json(), "path": "path.origin"}], error
    assert error["declared_in"] == f"cors.allow_origins in {server.config_path}"

    removal = server.admin("DELETE", origin_path(APP))
    assert removal.status == 409 and removal.json()["problems"][0]["code"] == "declared_elsewhere"
    assert server.admin("GET", origin_path(APP)).json()["source"] == "config"


def test_an_import_line_carries_its_problems(server: Server) -> None:
    answer = server.admin(
        "POST", "/origins/import", raw=b"https://ok.example.com\nhttps://new.example.com policy=nope\n"
    )
    assert answer.status == 400, answer.body
    (refused,) = answer.json()["refused"]
    (problem,) = refused["problems"]
    assert (refused["line"], problem["path"], problem["code"]) == (2, "body.line[2].policy", "unknown_policy")
    assert refused["reason"] == problem["message"]


def test_a_refused_reload_answers_the_configs_problems(server: Server) -> None:
    original = server.config_path.read_text()
    server.config_path.write_text(original + "\nmode: enforcing\n")
    try:
        answer = server.admin("POST", "/reload")
    finally:
        server.config_path.write_text(original)
    assert answer.status == 400, answer.body
    error = answer.json()
    assert error["error"] == "configuration refused" and error["field"] == "config"
    (problem,) = error["problems"]
    assert (problem["path"], problem["field"], problem["code"]) == ("mode", "mode", "not_choice")
    assert "got 'enforcing'" in problem["message"]


def test_corsproxy_reload_prints_the_servers_problems_as_check_does(server: Server) -> None:
    original = server.config_path.read_text()
    server.config_path.write_text(original + "\nmode: enforcing\n")
    try:
        env = {"PYTHONPATH": str(REPO), "CORSPROXY_ADMIN_TOKEN": server.env["CORSPROXY_ADMIN_TOKEN"]}
        reload = run_cli("reload", "-c", str(server.config_path), env=env)
        check = run_cli("check", "-c", str(server.config_path), env=env)
    finally:
        server.config_path.write_text(original)
    assert reload.returncode == 1 and check.returncode == 2, (reload.stderr, check.stderr)
    (line,) = [line for line in check.stderr.splitlines() if line.strip().startswith("- mode:")]
    assert line.strip() == "- mode: must be one of enforce, report-only, got 'enforcing'"
    assert f"{line}\n" in reload.stderr, reload.stderr


@pytest.mark.parametrize(
    ("path", "field"),
    [
        ("cors.routes[2].allow_origins[0]", "allow_origins"),
        ("cors.allow_origins[0].policy", "policy"),
        ("body.policy", "policy"),
        ("env CORSPROXY_PORT", "CORSPROXY_PORT"),
        ("mode", "mode"),
        ("", ""),
    ],
)
def test_the_field_is_the_last_name_of_the_path(path: str, field: str) -> None:
    assert field_of(path) == field


def test_a_problem_reads_as_path_and_message_and_moves_whole() -> None:
    unplaced = Problem("", "policy", "unknown_policy", "unknown policy 'x'")
    assert str(unplaced) == "unknown policy 'x'"
    placed = unplaced.at("body.policy")
    assert str(placed) == "body.policy: unknown policy 'x'"
    assert placed.as_json() == {
        "path": "body.policy",
        "field": "policy",
        "code": "unknown_policy",
        "message": "unknown policy 'x'",
    }
    both = ProblemError(unplaced, Problem("", "note", "note_too_long", "too long"))
    assert str(both) == "unknown policy 'x'; too long" and both.problem is unplaced
    with pytest.raises(TypeError):
        ProblemError()


@pytest.mark.parametrize(
    ("method", "path", "status", "code"),
    [
        ("GET", "/nothing-here", 404, "not_found"),
        ("PATCH", "/origins", 405, "method_not_allowed"),
        ("GET", "/origins?limit=0", 400, "out_of_range"),
        ("GET", "/audit?origin=https://a.example.com/x", 400, "origin_has_path"),
    ],
)
def test_every_error_answer_has_the_same_shape(server: Server, method: str, path: str, status: int, code: str) -> None:
    answer = server.admin(method, path)
    assert answer.status == status, answer.body
    error = answer.json()
    (problem,) = error["problems"]
    assert set(problem) == {"path", "field", "code", "message"} and problem["code"] == code, error
    assert error["reason"] == problem["message"]
