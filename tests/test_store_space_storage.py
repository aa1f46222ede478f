"""The store when space runs out: a full map, a full disk, audit retention, compaction.

Real LMDB environments in ``tmp_path``; the full-disk cases run on a real 2 MiB tmpfs (root only, skipped otherwise),
since what they guard against — SIGBUS from a write through a memory map — only happens on a filesystem that is
really full.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from corsproxy.core.settings import AuditRetention
from corsproxy.store import (
    DiskFullError,
    OriginRecord,
    OriginStore,
    StoreError,
    StoreFullError,
    compact,
    removal_reserve,
)
from tests.support.config import REPO

SMALL_MAP = 1 << 20  # store.map_size_mb: 1, the smallest the config accepts
NOTE = "n" * 100


def _batch(start: int, count: int) -> list[tuple[str, OriginRecord]]:
    return [(f"https://h{i}.example.com", OriginRecord(note=NOTE)) for i in range(start, start + count)]


def _fill(store: OriginStore, batch: int = 50) -> int:
    """Add entries until the store refuses; the number added."""
    added = 0
    with pytest.raises(StoreFullError) as refused:
        while True:
            store.put_many(_batch(added, batch), "cli:test")
            added += batch
            assert added < 100_000, "the store never filled up"
    message = str(refused.value)
    assert "store.map_size_mb" in message and "Nothing was written" in message
    return added


def test_a_full_store_refuses_additions_with_the_setting_to_change(tmp_path: Path) -> None:
    with OriginStore(tmp_path / "db", map_size=SMALL_MAP) as store:
        added = _fill(store)
        assert len(store) == added  # the refused batch left nothing behind
        with pytest.raises(StoreFullError, match=r"store\.map_size_mb"):
            store.put_many(_batch(added, 50), "cli:test")  # the same again: still refused
        usage = store.usage()
        assert usage.map_size_bytes == SMALL_MAP
        assert usage.limit_bytes == SMALL_MAP - removal_reserve(SMALL_MAP)
        assert usage.used_bytes <= usage.limit_bytes
        assert not usage.writable
        assert any("full" in problem and "store.map_size_mb" in problem for problem in usage.problems())


def test_a_store_with_room_says_so(tmp_path: Path) -> None:
    with OriginStore(tmp_path / "db", map_size=SMALL_MAP) as store:
        store.put_many(_batch(0, 300), "cli:test")  # about a third of the 1 MiB map
        usage = store.usage()
        assert 0.2 * SMALL_MAP < usage.used_bytes < 0.5 * SMALL_MAP
        assert usage.writable and usage.problems() == []


def test_removals_always_fit_in_a_full_store(tmp_path: Path) -> None:
    """Each removal writes an audit record; once the store is full, the oldest audit records pay for it, so every
    entry can be removed one by one, and the space is then usable again. (Here each removal's record is a page of
    its own — a long actor name — so the removals outgrow the reserve after about 60 of them.)"""
    actor = "cli:" + "a" * 3000
    with OriginStore(tmp_path / "db", map_size=SMALL_MAP) as store:
        added = _fill(store)
        assert added * 4096 > removal_reserve(SMALL_MAP)
        for i in range(added):
            assert store.remove(f"https://h{i}.example.com", actor) is not None
        assert len(store) == 0
        assert store.history(limit=1)[0].action == "remove"  # the newest records are kept
    # The audit trail now fills the store; a lower store.audit_retention (what the error suggests) makes room.
    with OriginStore(tmp_path / "db", map_size=SMALL_MAP, audit_retention=AuditRetention(max_events=10)) as store:
        store.prune_expired(time.time(), "cli:test")  # any write applies the retention
        store.put_many(_batch(0, 50), "cli:test")


def test_prune_fits_in_a_full_store(tmp_path: Path) -> None:
    with OriginStore(tmp_path / "db", map_size=SMALL_MAP) as store:
        soon = time.time() + 3600
        store.put_many(
            [(f"https://old{i}.example.com", OriginRecord(expires=soon, note=NOTE)) for i in range(300)], "cli:test"
        )
        _fill(store)
        assert len(store.prune_expired(soon + 1, "cli:test")) == 300


def test_reconcile_applies_removals_even_when_its_additions_do_not_fit(tmp_path: Path) -> None:
    """A revocation from the config or the origins file must never wait for space."""
    with OriginStore(tmp_path / "db", map_size=SMALL_MAP) as store:
        store.reconcile({"https://revoked.example.com": OriginRecord(source="file")}, source="file")
        _fill(store)
        wanted = {f"https://new{i}.example.com": OriginRecord(source="file", note=NOTE) for i in range(2000)}
        with pytest.raises(StoreFullError, match="removed all the same"):
            store.reconcile(wanted, source="file")
        assert store.get("https://revoked.example.com") is None
        assert store.get("https://new0.example.com") is None  # the additions: all or nothing


def test_audit_retention_by_count_and_by_age(tmp_path: Path) -> None:
    with OriginStore(tmp_path / "db", audit_retention=AuditRetention(max_age=None, max_events=10)) as store:
        for i in range(25):
            store.put(f"https://h{i}.example.com", OriginRecord(), "cli:test")
        events = store.history(limit=100)
        assert [e.origin for e in events] == [f"https://h{i}.example.com" for i in range(15, 25)]
        assert store.usage().audit_events == 10
    # Reopened with an age bound: the next write drops everything older than it.
    with OriginStore(tmp_path / "db", audit_retention=AuditRetention(max_age=0.5, max_events=None)) as store:
        time.sleep(0.6)  # the events above are now older than max_age (a bound, not a timing assertion)
        store.put("https://fresh.example.com", OriginRecord(), "cli:test")
        assert [e.origin for e in store.history(limit=100)] == ["https://fresh.example.com"]


def test_the_default_retention_is_bounded(tmp_path: Path) -> None:
    with OriginStore(tmp_path / "db") as store:
        assert store.audit_retention.max_events is not None and store.audit_retention.max_age is not None


def test_compact_shrinks_the_file_and_keeps_every_entry(tmp_path: Path) -> None:
    path = tmp_path / "db"
    with OriginStore(path) as store:
        store.put_many(_batch(0, 3000), "cli:test")
        for i in range(0, 3000, 2):
            store.remove(f"https://h{i}.example.com", "cli:test")
        kept = dict(store.iter_all())
        history = store.history(limit=10)
    before, after = compact(path)
    assert after < before
    assert (path / "data.mdb").stat().st_size == after
    assert not (path / "compact.tmp").exists()
    with OriginStore(path) as store:
        assert dict(store.iter_all()) == kept
        assert store.history(limit=10) == history
        store.put("https://after.example.com", OriginRecord(), "cli:test")


def test_compact_is_refused_while_another_process_has_the_store_open(store_held_open: Path) -> None:
    size = (store_held_open / "data.mdb").stat().st_size
    with pytest.raises(StoreError, match="open in another process"):
        compact(store_held_open)
    assert (store_held_open / "data.mdb").stat().st_size == size


# -- a really full filesystem -------------------------------------------------------------------------------------


_FILL_DISK = """
import sys
from corsproxy.store import OriginRecord, OriginStore, StoreSpaceError
store = OriginStore(sys.argv[1])  # the default 1 GiB map, on a 2 MiB filesystem
i = 0
try:
    while True:
        store.put_many([(f"https://h{i}-{j}.example.com", OriginRecord(note="n" * 100)) for j in range(50)], "t")
        i += 1
except StoreSpaceError as exc:
    print(type(exc).__name__, i, exc, flush=True)
store.remove("https://h0-0.example.com", "t")
print("removed", len(store), flush=True)
"""


def test_a_full_disk_is_an_error_not_a_signal(tiny_fs: Path) -> None:
    """With the 1 GiB default map on a 2 MiB filesystem, writes end in DiskFullError; the process lives on (a
    SIGBUS would show as returncode -7) and can still remove entries."""
    result = subprocess.run(
        [sys.executable, "-c", _FILL_DISK, str(tiny_fs / "db")],
        check=False,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert result.returncode == 0, (result.returncode, result.stderr[-2000:])
    first, second = result.stdout.splitlines()
    name, batches, message = first.split(" ", 2)
    assert name == "DiskFullError" and int(batches) > 0
    assert "store.path" in message and "Nothing was written" in message
    assert second == f"removed {int(batches) * 50 - 1}"
    # The data file is as large as its data, not the map (no sparse 1 GiB file).
    assert (tiny_fs / "db" / "data.mdb").stat().st_size < 2 << 20


def test_the_lock_file_is_allocated_when_the_store_opens(tiny_fs: Path) -> None:
    """Reader slots are written through a shared map of the lock file: its blocks must exist before that."""
    with OriginStore(tiny_fs / "db") as store:
        lock = tiny_fs / "db" / "lock.mdb"
        assert lock.stat().st_blocks * 512 >= lock.stat().st_size
        assert store.usage().disk_free_bytes > 0


def test_opening_on_a_full_disk_is_a_clear_error(tiny_fs: Path) -> None:
    filler = tiny_fs / "filler"
    with open(filler, "wb") as f, pytest.raises(OSError):
        while True:
            f.write(b"\0" * 65536)
            f.flush()
    with pytest.raises(DiskFullError, match=r"store\.path"):
        OriginStore(tiny_fs / "db")


def test_a_write_the_estimate_misses_still_ends_in_an_error(tiny_fs: Path) -> None:
    """Without the free-space check before commit, the write reaches the full disk itself: LMDB (no MDB_WRITEMAP)
    reports the short write from its commit, the store turns it into DiskFullError, and the process lives on."""
    code = _FILL_DISK.replace(
        "store = OriginStore", "OriginStore._check_disk = lambda self, need: None\nstore = OriginStore"
    )
    result = subprocess.run(
        [sys.executable, "-c", code, str(tiny_fs / "db")],
        check=False,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert result.returncode == 0, (result.returncode, result.stderr[-2000:])
    assert result.stdout.startswith("DiskFullError "), result.stdout
    assert result.stdout.splitlines()[1].startswith("removed ")


async def test_an_origins_file_the_store_cannot_hold_is_one_log_line_and_its_revocations_apply(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    import asyncio
    import logging

    from corsproxy.config import parse_config
    from corsproxy.origins.file import OriginsFileWatcher
    from tests.support.config import BASE_CONFIG

    safety = parse_config(BASE_CONFIG, env={}).safety
    listed = tmp_path / "origins.txt"
    listed.write_text("https://revoked.example.com\n")
    with OriginStore(tmp_path / "db", map_size=SMALL_MAP) as store:
        watcher = OriginsFileWatcher(str(listed), store, lambda: safety, 0.05, tmp_path / "watch.lock")
        assert watcher.poll() is not None and store.get("https://revoked.example.com") is not None
        _fill(store)
        listed.write_text("".join(f"https://new{i}.example.com note={NOTE}\n" for i in range(3000)))
        with caplog.at_level(logging.ERROR, logger="corsproxy"):
            task = asyncio.create_task(watcher.run())
            for _ in range(200):  # bounded wait for two failed polls
                await asyncio.sleep(0.05)
                if len([r for r in caplog.records if "not applied" in r.getMessage()]) >= 2:
                    break
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
        failures = [r for r in caplog.records if r.name.startswith("corsproxy")]
        assert failures and all("store.map_size_mb" in r.getMessage() and r.exc_info is None for r in failures)
        assert store.get("https://revoked.example.com") is None
