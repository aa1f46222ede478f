"""Fleet mode: the watched origins file is reconciled into the store (``source="file"``), a broken file keeps the
last good state, and only one process watches."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from corsproxy.config import parse_config
from corsproxy.origins.file import OriginsFileWatcher, applied, parse_origins_file
from corsproxy.store import OriginRecord, OriginStore
from tests.support.config import BASE_CONFIG
from tests.support.net import wait_until
from tests.support.serve import Server, origin_path
from tests.support.upstream import ThreadedUpstream

SAFETY = parse_config(BASE_CONFIG, env={}).safety


@pytest.fixture
def store(tmp_path: Path) -> Iterator[OriginStore]:
    s = OriginStore(tmp_path / "origins.lmdb")
    yield s
    s.close()


def _watcher(path: Path, store: OriginStore, tmp_path: Path) -> OriginsFileWatcher:
    return OriginsFileWatcher(str(path), store, lambda: SAFETY, 0.1, tmp_path / "watch.lock")


def _touch_new(path: Path, text: str) -> None:
    """Replace the file the way a ConfigMap update does: write aside, then rename over it (a new inode)."""
    aside = path.with_suffix(".tmp")
    aside.write_text(text)
    os.replace(aside, path)


# -- parsing ------------------------------------------------------------------------------------------------------


def test_parse_line_format_and_yaml() -> None:
    lines = parse_origins_file(
        Path("origins.txt"), "https://a.example.com note=x\n# c\nhttps://*.b.example.com\n", SAFETY
    )
    assert sorted(lines.entries) == ["https://*.b.example.com", "https://a.example.com"] and not lines.errors
    yaml_text = (
        "origins:\n  - https://a.example.com\n"
        "  - {origin: 'https://c.example.com', expires: 2099-01-01T00:00:00Z, note: partner}\n"
    )
    parsed = parse_origins_file(Path("origins.yaml"), yaml_text, SAFETY)
    assert not parsed.errors
    assert parsed.entries["https://c.example.com"].note == "partner"
    assert parsed.entries["https://c.example.com"].expires == 4070908800.0


@pytest.mark.parametrize(
    ("name", "text", "line"),
    [
        pytest.param("o.txt", "https://ok.example.com\nhttps://bad.example.com/path\n", 2, id="path-in-origin"),
        pytest.param("o.txt", "https://ok.example.com\nnull\n", 2, id="null"),
        pytest.param("o.txt", "https://ok.example.com polcy=x\n", 1, id="unknown-option"),
        pytest.param(
            "o.yaml", "- https://ok.example.com\n- {origin: 'https://x.example.com', colour: red}\n", 2, id="yaml-key"
        ),
        pytest.param("o.yaml", "- https://ok.example.com\n- 42\n", 2, id="yaml-item"),
        pytest.param("o.yaml", "origins: [unclosed\n", 2, id="yaml-syntax"),
        pytest.param("o.yaml", "just: a mapping\n", 1, id="yaml-shape"),
    ],
)
def test_parse_errors_carry_the_line(name: str, text: str, line: int) -> None:
    parsed = parse_origins_file(Path(name), text, SAFETY)
    assert parsed.errors and parsed.errors[0][0] == line


# -- the watcher on a real store ----------------------------------------------------------------------------------


def test_watcher_reconciles_changes(tmp_path: Path, store: OriginStore) -> None:
    path = tmp_path / "origins.txt"
    path.write_text("https://a.example.com\nhttps://b.example.com note=partner\n")
    store.put("https://cli.example.com", OriginRecord(source="cli"), "cli:ops")
    store.put("https://conf.example.com", OriginRecord(source="config"), "config")
    watcher = _watcher(path, store, tmp_path)
    assert not applied(str(path), tmp_path)
    first = watcher.poll()
    assert applied(str(path), tmp_path) and not applied(str(tmp_path / "other.txt"), tmp_path)
    assert (
        first is not None
        and first.applied
        and sorted(first.changed) == ["https://a.example.com", "https://b.example.com"]
    )
    assert watcher.poll() is None  # unchanged: not even read

    listed = (
        "https://b.example.com note=partner\nhttps://c.example.com\nhttps://cli.example.com\nhttps://conf.example.com\n"
    )
    _touch_new(path, listed)
    second = watcher.poll()
    assert second is not None and second.applied
    # The file takes over what an operator added (so removing it from the file revokes it) ...
    assert second.changed == ("https://c.example.com", "https://cli.example.com")
    assert second.removed == ("https://a.example.com",)
    # ... and leaves what cors.allow_origins declares to the config.
    assert second.skipped == ("https://conf.example.com",)
    assert {k: r.source for k, r in store.items()} == {
        "https://b.example.com": "file",
        "https://c.example.com": "file",
        "https://cli.example.com": "file",
        "https://conf.example.com": "config",
    }
    assert [(e.action, e.actor) for e in store.history(origin="https://a.example.com")] == [
        ("add", "file"),
        ("remove", "file"),
    ]

    # Same content, new inode: read and hashed, nothing written.
    before = len(store.history(limit=1000))
    _touch_new(path, listed)
    assert watcher.poll() is None
    assert len(store.history(limit=1000)) == before


def test_a_broken_or_missing_file_keeps_the_last_good_state(
    tmp_path: Path, store: OriginStore, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "origins.txt"
    path.write_text("https://a.example.com\nhttps://b.example.com\n")
    watcher = _watcher(path, store, tmp_path)
    assert watcher.poll() is not None
    good = sorted(store.items())

    _touch_new(path, "https://a.example.com\nhttps://b.example.com/oops\n")  # b's line is broken
    with caplog.at_level("ERROR", logger="corsproxy.origins_file"):
        result = watcher.poll()
    assert result is not None and not result.applied and result.errors[0][0] == 2
    assert sorted(store.items()) == good  # b is still allowed: a typo must not cut a partner off
    assert any("origins.txt:2: refused" in r.getMessage() for r in caplog.records)
    assert watcher.poll() is None  # the same broken content is not re-reported every poll

    path.unlink()
    assert watcher.poll() is None
    assert sorted(store.items()) == good

    _touch_new(path, "https://a.example.com\n")  # fixed: applied again
    fixed = watcher.poll()
    assert fixed is not None and fixed.applied and fixed.removed == ("https://b.example.com",)


def test_only_one_watcher_leads(tmp_path: Path, store: OriginStore) -> None:
    path = tmp_path / "origins.txt"
    path.write_text("https://a.example.com\n")
    first, second = _watcher(path, store, tmp_path), _watcher(path, store, tmp_path)
    assert first.try_lead()
    assert not second.try_lead()
    first.release()
    assert second.try_lead()
    second.release()


# -- in a running 2-worker server ---------------------------------------------------------------------------------


def test_served_file_changes_reach_every_worker(served: Server) -> None:
    path = served.tmp / "origins.txt"
    new = "https://new-fleet.example.com"
    _touch_new(path, f"https://fleet.example.com note=from-the-file\n{new}\n")
    wait_until(lambda: served.admin("GET", origin_path(new)).status == 200, timeout=10, what="the file to apply")
    assert served.admin("GET", origin_path(new)).json()["source"] == "file"
    for _ in range(10):
        assert served.proxy("GET", "/x", headers={"Origin": new}).headers["Access-Control-Allow-Origin"] == new

    _touch_new(path, f"{new}\nhttps://broken.example.com/path\n")
    wait_until(lambda: "origins.txt:2: refused" in served.log_text(), timeout=10, what="the refusal")
    assert served.admin("GET", origin_path("https://fleet.example.com")).status == 200  # last good state kept

    _touch_new(path, f"{new}\n")
    wait_until(
        lambda: served.admin("GET", origin_path("https://fleet.example.com")).status == 404,
        timeout=10,
        what="the removal to apply",
    )
    events = served.admin("GET", "/audit?origin=https://fleet.example.com").json()["events"]
    assert [(e["action"], e["actor"]) for e in events] == [("add", "file"), ("remove", "file")]
    # One watcher across the two workers: each change was applied once.
    applied = [line for line in served.logs() if "applied:" in line.get("message", "") and line["level"] == "info"]
    assert len({line["pid"] for line in applied}) == 1


def test_not_ready_until_the_file_is_applied(tmp_path: Path, upstream_thread: ThreadedUpstream) -> None:
    path = tmp_path / "origins.txt"
    path.write_text("https://ok.example.com\nhttps://typo.example.com/\n")
    server = Server(tmp_path, upstream_thread.port, workers=1, origins_file={"path": str(path), "poll_interval": 0.2})
    server.start()
    try:
        ready = server.admin("GET", "/readyz", token=None)
        assert ready.status == 503 and "has not been applied" in ready.json()["reason"]
        _touch_new(path, "https://ok.example.com\n")
        wait_until(lambda: server.admin("GET", "/readyz", token=None).status == 200, timeout=10, what="readiness")
    finally:
        assert server.stop() == 0
