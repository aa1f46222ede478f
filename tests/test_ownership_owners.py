"""One ownership rule on every write path, over a real 2-worker ``corsproxy serve``, real CLI subprocesses on the same
store and the real admin API: entries declared in ``cors.allow_origins`` or the origins file change only there, an
export read back re-owns nothing, and removing an origin from its declaration (then reloading) revokes it."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.config import merge, run_cli
from tests.support.net import wait_until
from tests.support.serve import Server, origin_path
from tests.support.upstream import ThreadedUpstream

APP = "https://app.example.com"  # in the base config's cors.allow_origins
FLEET = "https://fleet.example.com"  # in the origins file


@pytest.fixture
def server(tmp_path: Path, upstream_thread: ThreadedUpstream) -> Iterator[Server]:
    (tmp_path / "origins.txt").write_text(f"{FLEET} note=from-the-file\n")
    served = Server(
        tmp_path,
        upstream_thread.port,
        origins_file={"path": str(tmp_path / "origins.txt"), "poll_interval": 0.2},
    )
    served.start()
    # Ready (not only up): /readyz says 200 once the origins file is applied, which happens after the workers serve.
    wait_until(lambda: served.admin("GET", "/readyz", token=None).status == 200, timeout=20, what="the file applied")
    yield served
    served.stop()


def _cli(server: Server, *args: str, input: str | None = None) -> Any:
    return run_cli("origins", *args, "-c", str(server.config_path), input=input)


def _source(server: Server, origin: str) -> str | None:
    got = server.admin("GET", origin_path(origin))
    return got.json()["source"] if got.status == 200 else None


def _preflight(server: Server, origin: str) -> int:
    headers = {"Origin": origin, "Access-Control-Request-Method": "GET"}
    return server.proxy("OPTIONS", "/x", headers=headers).status


def _write_file(path: Path, text: str) -> None:
    aside = path.with_suffix(".tmp")
    aside.write_text(text)
    os.replace(aside, path)  # a new inode, as a ConfigMap update does


def _reload(server: Server, data: dict[str, Any]) -> None:
    server.data = data
    server.write_config()
    answer = server.admin("POST", "/reload")  # answers once the new workers serve the new configuration
    assert answer.status == 200 and answer.json()["status"] == "applied", answer.body


def test_cli_and_admin_refuse_declared_entries_naming_where(server: Server) -> None:
    config = str(server.config_path)
    origins_file = str(server.tmp / "origins.txt")
    add = _cli(server, "add", APP, "--note", "mine now")
    assert add.returncode == 2, add.stdout
    assert f"cors.allow_origins in {config}" in add.stderr and "replaced" not in add.stdout
    add_fleet = _cli(server, "add", FLEET, "--policy", "default")
    assert add_fleet.returncode == 2 and f"the origins file {origins_file}" in add_fleet.stderr
    remove = _cli(server, "remove", APP)
    assert remove.returncode == 2 and f"cors.allow_origins in {config}" in remove.stderr
    remove_fleet = _cli(server, "remove", FLEET)
    assert remove_fleet.returncode == 2 and origins_file in remove_fleet.stderr
    # The admin API answers the same writes with 409, naming the same place.
    put = server.admin("PUT", origin_path(APP), body={"note": "mine now"})
    assert put.status == 409 and put.json()["declared_in"] == f"cors.allow_origins in {config}"
    delete = server.admin("DELETE", origin_path(FLEET))
    assert delete.status == 409 and delete.json()["declared_in"] == f"the origins file {origins_file}"
    assert (_source(server, APP), _source(server, FLEET)) == ("config", "file")
    assert server.admin("GET", origin_path(APP)).json()["note"] == ""
    events = server.admin("GET", f"/audit?origin={APP}").json()["events"]
    assert [e["actor"] for e in events] == ["config"]  # nothing but the config ever wrote it


def test_export_then_import_reowns_nothing_and_removal_revokes(server: Server, tmp_path: Path) -> None:
    assert _cli(server, "add", "https://ops.example.com", "--note", "kept").returncode == 0
    exported = _cli(server, "export")
    assert exported.returncode == 0
    assert APP in exported.stdout and FLEET in exported.stdout
    backup = tmp_path / "backup.txt"
    backup.write_text(exported.stdout)

    imported = _cli(server, "import", str(backup))
    assert imported.returncode == 0, imported.stderr
    assert "refused 0" in imported.stdout and "left to them" in imported.stderr
    partial = server.admin("POST", "/origins/import?partial=true", raw=exported.stdout.encode())
    assert partial.status == 200 and {APP, FLEET} <= set(partial.json()["declared"]), partial.body
    whole = server.admin("POST", "/origins/import", raw=exported.stdout.encode())
    assert whole.status == 200 and whole.json()["refused"] == [], whole.body
    assert (_source(server, APP), _source(server, FLEET)) == ("config", "file")
    assert _source(server, "https://ops.example.com") == "cli"  # an import does not re-own an operator entry either

    # Delete both from their declarations: both are revoked.
    assert _preflight(server, APP) == 204 and _preflight(server, FLEET) == 204
    _write_file(tmp_path / "origins.txt", "")
    wait_until(lambda: _preflight(server, FLEET) == 403, timeout=15, what="the file's removal to revoke")
    allowed = [o for o in server.data["cors"]["allow_origins"] if o != APP]
    _reload(server, merge(server.data, {"cors": {"allow_origins": allowed}}))
    wait_until(lambda: _preflight(server, APP) == 403, timeout=15, what="the config's removal to revoke")
    assert _source(server, APP) is None and _source(server, FLEET) is None
    assert _preflight(server, "https://ops.example.com") == 204


def test_declarations_take_over_operator_entries_so_removal_revokes(server: Server, tmp_path: Path) -> None:
    to_file, to_config = "https://to-file.example.com", "https://to-config.example.com"
    assert _cli(server, "add", to_file, "--note", "by hand").returncode == 0
    assert server.admin("PUT", origin_path(to_config), body={"note": "by api"}).status == 201

    _write_file(tmp_path / "origins.txt", f"{FLEET}\n{to_file}\n")
    wait_until(lambda: _source(server, to_file) == "file", timeout=15, what="the file to take over")
    allowed = [*server.data["cors"]["allow_origins"], to_config, FLEET]
    _reload(server, merge(server.data, {"cors": {"allow_origins": allowed}}))
    wait_until(lambda: _source(server, to_config) == "config", timeout=15, what="the config to take over")
    # The config outranks the file: it now owns FLEET too, and the file leaves it alone.
    assert _source(server, FLEET) == "config"
    events = server.admin("GET", f"/audit?origin={to_config}").json()["events"]
    assert [(e["action"], e["actor"], e["new"]["source"]) for e in events] == [
        ("add", "admin:admin", "admin:admin"),
        ("replace", "config", "config"),
    ]

    _write_file(tmp_path / "origins.txt", f"{FLEET}\n")
    wait_until(lambda: _preflight(server, to_file) == 403, timeout=15, what="the file's removal to revoke")
    _reload(server, merge(server.data, {"cors": {"allow_origins": allowed[:-2]}}))
    wait_until(lambda: _preflight(server, to_config) == 403, timeout=15, what="the config's removal to revoke")
    # FLEET left the config but the file still lists it: the file's entry again, once the old workers have drained
    # and a new one took the watcher's lock and polled (seconds; longer on a loaded machine).
    wait_until(lambda: _source(server, FLEET) == "file", timeout=30, what="the file to own FLEET again")
    assert _preflight(server, FLEET) == 204


def test_re_adding_keeps_the_fields_not_given(server: Server) -> None:
    key = "https://partner.example.com"
    assert _cli(server, "add", key, "--note", "contract 42", "--ttl", "30d").returncode == 0
    first = server.admin("GET", origin_path(key)).json()
    again = _cli(server, "add", key)
    assert again.returncode == 0 and again.stdout.startswith(f"unchanged {key}")
    renewed = _cli(server, "add", key, "--expires", "2099-01-01T00:00:00Z")
    assert renewed.returncode == 0 and renewed.stdout.startswith(f"updated {key}"), renewed.stdout
    after = server.admin("GET", origin_path(key)).json()
    assert after["note"] == "contract 42" and after["expires"] == "2099-01-01T00:00:00Z"
    assert after["source"] == "cli" and after["added"] == first["added"]
    # The admin API follows the same rule, and never takes an operator entry over.
    put = server.admin("PUT", origin_path(key), body={"expires": "never"})
    assert put.status == 200 and put.json()["note"] == "contract 42" and put.json()["expires"] is None
    assert put.json()["source"] == "cli"
    cleared = _cli(server, "add", key, "--note", "")
    assert cleared.returncode == 0 and server.admin("GET", origin_path(key)).json()["note"] == ""
    # An import line without a note keeps it too.
    assert _cli(server, "add", key, "--note", "again").returncode == 0
    assert _cli(server, "import", "-", input=f"{key} expires=2098-01-01T00:00:00Z\n").returncode == 0
    assert server.admin("GET", origin_path(key)).json()["note"] == "again"


def test_turning_fleet_mode_off_revokes_the_files_entries(server: Server) -> None:
    assert _preflight(server, FLEET) == 204
    _reload(server, merge(server.data, {"origins_file": None}))
    wait_until(lambda: _preflight(server, FLEET) == 403, timeout=15, what="the file's entries to be revoked")
    assert _source(server, FLEET) is None


def test_prune_leaves_declared_entries_to_their_declaration(write_config: Callable[..., Path]) -> None:
    stale = {"origin": "https://stale-config.example.com", "expires": "2020-01-01T00:00:00Z"}
    path = str(write_config(cors={"allow_origins": ["https://app.example.com", stale]}))
    imported = run_cli(
        "origins", "import", "-", "-c", path, input="https://old.example.com expires=2020-01-01T00:00:00Z\n"
    )
    assert imported.returncode == 0 and "kept as an expired entry" in imported.stderr
    pruned = run_cli("origins", "prune", "-c", path)
    assert pruned.returncode == 0 and pruned.stdout.splitlines() == [
        "removed expired https://old.example.com",
        "pruned 1 expired origin(s)",
    ]
    history = run_cli("origins", "history", "--origin", stale["origin"], "-c", path).stdout.splitlines()
    assert len(history) == 1  # added by the config once; never pruned and re-added
