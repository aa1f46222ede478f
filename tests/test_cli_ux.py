"""What a new user types: --version, --config on either side of the verb, a positional origin for explain, help for
every argument, `corsproxy reload`, errors that name the setting to change, and a demo that runs outside the checkout.
Real subprocesses, real sockets on loopback, a real store in tmp_path."""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tomllib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import corsproxy
from corsproxy.cli import DEMO_CONFIG, _parser
from tests.test_workers_harness import TOKEN, Server, ThreadedUpstream, upstream_thread, wait_until

__all__ = ["upstream_thread"]

REPO = Path(__file__).resolve().parent.parent


def _cli(*args: str, cwd: Path | None = None, env: dict[str, str] | None = None, timeout: float = 60) -> Any:
    return subprocess.run(
        [sys.executable, "-m", "corsproxy", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**{k: v for k, v in os.environ.items() if not k.startswith("CORSPROXY_")}, **(env or {})},
        cwd=cwd,
        check=False,
    )


@pytest.fixture
def occupied() -> Iterator[int]:
    """A loopback port some other program listens on."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock.getsockname()[1]


# -- arguments ------------------------------------------------------------------------------------------------------


def test_version() -> None:
    result = _cli("--version")
    assert result.returncode == 0
    assert result.stdout.strip() == f"corsproxy {corsproxy.__version__}"


@pytest.mark.parametrize(
    "argv",
    [
        ["--config", "{c}", "check"],
        ["-c", "{c}", "check"],
        ["check", "--config", "{c}"],
        ["--config", "{c}", "origins", "list"],
        ["origins", "list", "-c", "{c}"],
    ],
    ids=["long before", "short before", "after", "before a nested verb", "after a nested verb"],
)
def test_config_before_or_after_the_verb(write_config: Callable[..., Path], argv: list[str]) -> None:
    path = str(write_config())
    result = _cli(*(a.format(c=path) for a in argv))
    assert result.returncode == 0, result.stderr


def test_config_after_the_verb_wins(write_config: Callable[..., Path], tmp_path: Path) -> None:
    result = _cli("--config", str(tmp_path / "missing.yaml"), "check", "--config", str(write_config()))
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize(
    "argv", [["explain", "https://app.example.com"], ["explain", "--origin", "https://app.example.com"]]
)
def test_explain_takes_the_origin_positionally_or_as_an_option(
    write_config: Callable[..., Path], argv: list[str]
) -> None:
    result = _cli(*argv, "--method", "PUT", "-c", str(write_config()))
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("decision: allowed")
    assert "preflight for PUT / from https://app.example.com" in result.stdout


def test_explain_without_an_origin_says_how(write_config: Callable[..., Path]) -> None:
    result = _cli("explain", "-c", str(write_config()))
    assert result.returncode == 2
    assert "corsproxy explain https://app.example.com" in result.stderr


def _arguments(parser: argparse.ArgumentParser, where: str) -> Iterator[tuple[str, argparse.Action]]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _arguments(sub, f"{where} {name}")
        elif not isinstance(action, argparse._HelpAction):
            yield f"{where} {'/'.join(action.option_strings) or action.dest}", action


def test_every_argument_has_help() -> None:
    missing = [name for name, action in _arguments(_parser(), "corsproxy") if not action.help]
    assert missing == []


# -- errors that name the setting -------------------------------------------------------------------------------


def test_an_invalid_workers_variable_is_an_error(write_config: Callable[..., Path]) -> None:
    for value in ("abc", "0", "-2", "1.5"):
        result = _cli("serve", "-c", str(write_config()), env={"CORSPROXY_WORKERS": value}, timeout=30)
        assert result.returncode == 2
        assert f"CORSPROXY_WORKERS={value!r}" in result.stderr


def test_the_proxy_port_in_use_fails_at_once_naming_the_key(write_config: Callable[..., Path], occupied: int) -> None:
    result = _cli("serve", "-c", str(write_config(listen={"host": "127.0.0.1", "port": occupied})), timeout=30)
    assert result.returncode == 2
    assert f"listen.port: 127.0.0.1:{occupied} is already in use" in result.stderr
    assert "Retrying" not in result.stderr and "Can't connect" not in result.stderr


def test_the_admin_port_in_use_names_the_key(write_config: Callable[..., Path], occupied: int) -> None:
    path = write_config(admin={"listen": {"host": "127.0.0.1", "port": occupied}})
    result = _cli("serve", "-c", str(path), env={"CORSPROXY_ADMIN_TOKEN": TOKEN}, timeout=30)
    assert result.returncode == 2
    assert f"admin.listen.port: 127.0.0.1:{occupied} is already in use" in result.stderr
    assert "error: : " not in result.stderr


def test_an_unwritable_store_names_store_path_and_a_fix(write_config: Callable[..., Path], tmp_path: Path) -> None:
    (tmp_path / "a-file").write_text("not a directory")
    result = _cli("serve", "-c", str(write_config(store={"path": str(tmp_path / "a-file" / "store")})), timeout=30)
    assert result.returncode == 2
    assert f"store.path: {tmp_path / 'a-file' / 'store'}: {tmp_path / 'a-file'} is not a directory" in result.stderr
    assert "set store.path to a directory corsproxy may create and write" in result.stderr


def test_the_credentialed_wildcard_warning_is_said_where_it_matters(write_config: Callable[..., Path]) -> None:
    path = str(write_config())  # BASE_CONFIG allows https://*.example.org with credentials
    assert "every subdomain" in _cli("check", "-c", path).stderr
    for argv in (["origins", "list"], ["origins", "export"], ["explain", "https://app.example.com"]):
        result = _cli(*argv, "-c", path)
        assert result.returncode == 0, result.stderr
        assert "every subdomain" not in result.stderr, argv


# -- demo -----------------------------------------------------------------------------------------------------------


def test_the_demo_config_ships_with_the_package() -> None:
    package_data = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    assert DEMO_CONFIG in package_data["corsproxy"]
    assert (Path(corsproxy.__file__).parent / DEMO_CONFIG).is_file()


def test_demo_port_taken_fails_before_starting(occupied: int, tmp_path: Path) -> None:
    result = _cli("demo", "--port", str(occupied), cwd=tmp_path, timeout=30)
    assert result.returncode == 2
    assert f"cannot listen on 127.0.0.1:{occupied}" in result.stderr and "--port" in result.stderr
    assert "listening" not in result.stdout + result.stderr
    assert "Unclosed" not in result.stderr


def test_demo_runs_outside_the_checkout(tmp_path: Path) -> None:
    from tests.test_workers_harness import free_port, request

    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "corsproxy", "demo", "--port", str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=tmp_path,
    )
    try:

        def answered() -> Any:
            assert proc.poll() is None, proc.communicate()[0]
            try:
                return request(
                    port,
                    "OPTIONS",
                    "/x",
                    headers={"Origin": "https://app.example.com", "Access-Control-Request-Method": "GET"},
                )
            except OSError:
                return None

        response = wait_until(answered, timeout=30, what="the demo")
        assert response.status == 204
    finally:
        proc.terminate()
        output, _ = proc.communicate(timeout=20)
    assert "Unclosed" not in output
    assert not (tmp_path / "var").exists()  # the demo's store is a temporary one


# -- reload ---------------------------------------------------------------------------------------------------------


@pytest.fixture
def server(tmp_path: Path, upstream_thread: ThreadedUpstream) -> Iterator[Server]:
    s = Server(tmp_path, upstream_thread.port, workers=1).start()
    yield s
    assert s.stop() == 0


def test_reload_applies_a_good_config(server: Server) -> None:
    data = dict(server.data)
    data["cors"] = {**data["cors"], "allow_methods": [*data["cors"]["allow_methods"], "PATCH"]}
    server.write_config(data)
    result = _cli("reload", "-c", str(server.config_path), env={"CORSPROXY_ADMIN_TOKEN": TOKEN})
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"reloaded {server.config_path}")
    # "reloaded" is said once the new workers serve: the very next request is judged by the new config.
    headers = {"Origin": "https://app.example.com", "Access-Control-Request-Method": "PATCH"}
    assert server.proxy("OPTIONS", "/api", headers=headers).status == 204


def test_reload_reports_the_refusal(server: Server) -> None:
    server.write_config({**server.data, "cors": {**server.data["cors"], "allow_origins": ["null"]}})
    result = _cli("reload", "-c", str(server.config_path), env={"CORSPROXY_ADMIN_TOKEN": TOKEN})
    assert result.returncode == 1
    assert "reload refused" in result.stderr and "the running configuration stays" in result.stderr
    assert "cors.allow_origins[0]" in result.stderr


def test_reload_with_a_wrong_token_is_refused(server: Server) -> None:
    result = _cli("reload", "-c", str(server.config_path), env={"CORSPROXY_ADMIN_TOKEN": "x" * 32})
    assert result.returncode == 1 and "(401)" in result.stderr


def test_reload_without_an_admin_listener_says_what_to_do(write_config: Callable[..., Path]) -> None:
    result = _cli("reload", "-c", str(write_config()))
    assert result.returncode == 2
    assert "admin.listen" in result.stderr and "SIGHUP" in result.stderr


def test_reload_with_nothing_running_says_so(write_config: Callable[..., Path]) -> None:
    from tests.test_workers_harness import free_port

    path = write_config(admin={"listen": {"host": "127.0.0.1", "port": free_port()}})
    result = _cli("reload", "-c", str(path), env={"CORSPROXY_ADMIN_TOKEN": TOKEN})
    assert result.returncode == 2 and "is `corsproxy serve` running?" in result.stderr
