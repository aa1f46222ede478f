"""The LMDB origin store, on a real LMDB environment in tmp_path, with real processes where crashes matter."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from corsproxy.core.origin import lookup_keys, parse_request_origin
from corsproxy.store import OriginRecord, OriginStore


@pytest.fixture
def store(tmp_path: Path) -> Iterator[OriginStore]:
    with OriginStore(tmp_path / "db") as s:
        yield s


def _find(store: OriginStore, origin: str, now: float = 1000.0) -> tuple[str, bool] | None:
    parsed = parse_request_origin(origin)
    assert parsed is not None
    found = store.find(lookup_keys(parsed), now)
    return None if found is None else (found.key, found.expired)


def test_put_get_remove_and_audit(store: OriginStore) -> None:
    assert store.put("https://a.example.com", OriginRecord(note="first"), "cli:test") is True
    assert store.put("https://a.example.com", OriginRecord(policy="p", note="second"), "cli:test") is False
    record = store.get("https://a.example.com")
    assert record is not None and (record.policy, record.note, record.source) == ("p", "second", "cli")
    assert store.remove("https://a.example.com", "cli:test") is not None
    assert store.remove("https://a.example.com", "cli:test") is None
    actions = [(e.action, e.actor) for e in store.history()]
    assert actions == [("add", "cli:test"), ("replace", "cli:test"), ("remove", "cli:test")]
    replaced = store.history()[1]
    assert replaced.old is not None and replaced.old["note"] == "first"
    assert replaced.new is not None and replaced.new["note"] == "second"


def test_most_specific_entry_wins(store: OriginStore) -> None:
    store.put("https://*.example.com", OriginRecord(policy="wide"), "t")
    store.put("https://a.example.com", OriginRecord(policy="exact"), "t")
    assert _find(store, "https://a.example.com") == ("https://a.example.com", False)
    assert _find(store, "https://b.a.example.com") == ("https://*.example.com", False)
    assert _find(store, "https://example.com") is None


def test_expired_entry_is_skipped_for_a_wider_live_one(store: OriginStore) -> None:
    store.put("https://a.example.com", OriginRecord(expires=500.0), "t")
    assert _find(store, "https://a.example.com", now=1000.0) == ("https://a.example.com", True)
    assert _find(store, "https://a.example.com", now=100.0) == ("https://a.example.com", False)
    store.put("https://*.example.com", OriginRecord(), "t")
    assert _find(store, "https://a.example.com", now=1000.0) == ("https://*.example.com", False)


def test_prune_expired_is_audited(store: OriginStore) -> None:
    store.put("https://old.example.com", OriginRecord(expires=10.0), "t")
    store.put("https://new.example.com", OriginRecord(expires=10_000.0), "t")
    assert store.prune_expired(1000.0, "cli:x") == ["https://old.example.com"]
    assert len(store) == 1
    assert store.history()[-1].action == "expire"


def test_reconcile_takes_over_or_defers_and_leaves_unwanted_entries_alone(store: OriginStore) -> None:
    store.put("https://cli.example.com", OriginRecord(source="cli", note="kept?"), "cli")
    store.put("https://conf.example.com", OriginRecord(source="config"), "config")
    store.put("https://other.example.com", OriginRecord(source="cli"), "cli")
    wanted = {
        "https://a.example.com": OriginRecord(source="file"),
        "https://cli.example.com": OriginRecord(source="file", policy="other"),
        "https://conf.example.com": OriginRecord(source="file", policy="other"),
    }
    result = store.reconcile(wanted, source="file", defer_to=("config",))
    assert result == (
        ["https://a.example.com", "https://cli.example.com"],
        [],
        ["https://conf.example.com"],
        [("https://cli.example.com", "cli")],
    )
    taken = store.get("https://cli.example.com")
    assert taken is not None
    assert taken == OriginRecord("other", None, "file", taken.added, "")
    assert store.get("https://conf.example.com").source == "config"  # type: ignore[union-attr]
    # Unchanged: nothing written (no audit noise on every start).
    before = len(store.history())
    assert store.reconcile(wanted, source="file", defer_to=("config",)) == ([], [], ["https://conf.example.com"], [])
    assert len(store.history()) == before
    # Dropped: the source's own entries are removed; other sources' unwanted entries stay.
    assert store.reconcile({}, source="file").removed == ["https://a.example.com", "https://cli.example.com"]
    assert [k for k, _ in store.items()] == ["https://conf.example.com", "https://other.example.com"]


def test_items_paging_and_filter(store: OriginStore) -> None:
    store.put_many(((f"https://o{i:02d}.example.com", OriginRecord()) for i in range(25)), "t")
    first = store.items(limit=10)
    second = store.items(after=first[-1][0], limit=10)
    assert len(first) == 10 and len(second) == 10 and first[-1][0] < second[0][0]
    assert [k for k, _ in store.items(contains="o1")] == [f"https://o1{i}.example.com" for i in range(10)]


def test_record_round_trip() -> None:
    record = OriginRecord("partners", 1_900_000_000.0, "admin:ops", 1_800_000_000.5, "trial — ünïcode")
    assert OriginRecord.decode(record.encode()) == record


def test_other_process_writes_are_seen_without_reopening(store: OriginStore, tmp_path: Path) -> None:
    assert _find(store, "https://late.example.com") is None
    code = textwrap.dedent(
        f"""
        from corsproxy.store import OriginRecord, OriginStore
        with OriginStore({str(tmp_path / "db")!r}) as s:
            s.put("https://late.example.com", OriginRecord(), "other-process")
        """
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=30)
    assert _find(store, "https://late.example.com") == ("https://late.example.com", False)


def test_killed_writer_loses_nothing_committed(tmp_path: Path) -> None:
    """SIGKILL a process in the middle of a large import transaction: the store opens, every entry committed before
    is intact, and the interrupted transaction left nothing half-written."""
    path = tmp_path / "db"
    with OriginStore(path) as s:
        s.put_many(((f"https://keep{i}.example.com", OriginRecord()) for i in range(1000)), "setup")
    code = textwrap.dedent(
        f"""
        import sys
        from corsproxy.store import OriginRecord, OriginStore
        s = OriginStore({str(path)!r})
        def entries():
            for i in range(10_000_000):
                if i == 1000:
                    print("writing", flush=True)
                yield f"https://lost{{i}}.example.com", OriginRecord()
        s.put_many(entries(), "doomed")
        """
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "writing"
        time.sleep(0.2)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
        if proc.stdout is not None:
            proc.stdout.close()
    with OriginStore(path) as s:
        keys = [k for k, _ in s.items()]
        assert len(keys) == 1000
        assert all(k.startswith("https://keep") for k in keys)
        assert s.get("https://keep999.example.com") is not None


def test_owner_index_follows_ownership_and_is_rebuilt(tmp_path: Path) -> None:
    path = tmp_path / "db"
    with OriginStore(path) as s:
        s.put("https://a.example.com", OriginRecord(source="cli"), "cli")
        # the config takes over nothing another source owns; a source change by put moves the index entry
        s.put("https://b.example.com", OriginRecord(source="file"), "file")
        s.put("https://b.example.com", OriginRecord(source="config"), "config")
        assert s.reconcile({}, source="file") == ([], [], [], [])
        assert s.reconcile({}, source="config") == ([], ["https://b.example.com"], [], [])
        # a store written before the index existed: drop the index, reopen, it is rebuilt
        with s._env.begin(write=True) as txn:
            txn.drop(s._owners, delete=False)
    with OriginStore(path) as s:
        assert s.reconcile({}, source="cli") == ([], ["https://a.example.com"], [], [])
        assert len(s) == 0


def test_audit_times_are_readable(store: OriginStore) -> None:
    store.put("https://a.example.com", OriginRecord(expires=1_900_000_000.0), "t")
    event = store.history()[0].as_json()
    assert event["new"]["expires"] == "2030-03-17T17:46:40Z"
    assert event["time"].endswith("Z")
