"""The console's shared state and the per-worker recorder, on a real LMDB environment in ``tmp_path``: what the
request path buffers (refusals only, bounded, no query strings), how batches from several workers merge, how the
chart buckets age out, and sessions expiring."""

from __future__ import annotations

import asyncio
import multiprocessing
import time
from pathlib import Path

from corsproxy.console.db import MAX_REFUSALS, SERIES_RETENTION, ConsoleDB
from corsproxy.console.recorder import MAX_PENDING, ConsoleRecorder
from corsproxy.core.decision import Decision, Kind, Reason
from corsproxy.core.outcome import Outcome


def outcome(reason: Reason, origin: str | None = "https://a.example.net", *, path: str = "/p?key=secret") -> Outcome:
    kind = Kind.NON_CORS if reason is Reason.NO_ORIGIN else Kind.PREFLIGHT
    decision = Decision(kind, reason, origin=origin)
    return Outcome("OPTIONS", path, "127.0.0.1", decision, 403, 0, 0.001, None)


def test_only_refusals_are_buffered_and_paths_lose_their_query(tmp_path: Path) -> None:
    db = ConsoleDB.shared(tmp_path / "console")
    try:
        recorder = ConsoleRecorder(db)
        for reason in (Reason.ALLOWED, Reason.NO_ORIGIN, Reason.SAME_ORIGIN):
            recorder.observe(outcome(reason))
        assert recorder._refusals == {}
        for _ in range(3):
            recorder.observe(outcome(Reason.ORIGIN_NOT_ALLOWED))
        recorder.observe(outcome(Reason.ORIGIN_MALFORMED, origin=None))
        recorder.flush()
        rows = {(r.origin, r.path, r.reason): r.count for r in db.refusals()}
        assert rows == {
            ("https://a.example.net", "/p", "origin_not_allowed"): 3,
            ("", "/p", "origin_malformed"): 1,
        }
    finally:
        db.release()


def test_the_per_worker_buffer_is_bounded(tmp_path: Path) -> None:
    db = ConsoleDB.shared(tmp_path / "console")
    try:
        recorder = ConsoleRecorder(db)
        for n in range(MAX_PENDING + 10):
            recorder.observe(outcome(Reason.ORIGIN_NOT_ALLOWED, f"https://o{n}.example.net"))
        recorder.observe(outcome(Reason.ORIGIN_NOT_ALLOWED, "https://o0.example.net"))  # a buffered row still counts
        assert len(recorder._refusals) == MAX_PENDING
        assert recorder.dropped == 10
        assert (
            recorder._refusals[("https://o0.example.net", "preflight", "OPTIONS", "/p", "origin_not_allowed", "")][0]
            == 2
        )
    finally:
        db.release()


def _worker(path: str, origin: str, count: int) -> None:
    db = ConsoleDB.shared(Path(path))
    recorder = ConsoleRecorder(db)
    for _ in range(count):
        recorder.observe(outcome(Reason.ORIGIN_NOT_ALLOWED, origin))
    recorder.flush()
    db.release()


def test_batches_of_several_processes_merge(tmp_path: Path) -> None:
    path = str(tmp_path / "console")
    context = multiprocessing.get_context("spawn")  # a fresh interpreter: no LMDB environment crosses a fork
    workers = [context.Process(target=_worker, args=(path, "https://same.example.net", n)) for n in (2, 5)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(60)
        assert worker.exitcode == 0
    db = ConsoleDB.shared(Path(path))
    try:
        (row,) = db.refusals()
        assert (row.origin, row.count) == ("https://same.example.net", 7)
    finally:
        db.release()


def test_the_refusal_list_keeps_the_newest_rows(tmp_path: Path) -> None:
    db = ConsoleDB.shared(tmp_path / "console")
    try:
        now = time.time()
        key = ("https://x.example.net", "actual", "GET", "/", "origin_not_allowed", "")
        batch = {(f"https://o{n}.example.net", *key[1:]): [1, now + n, now + n] for n in range(MAX_REFUSALS + 5)}
        db.add_refusals(batch)
        rows = db.refusals(limit=MAX_REFUSALS + 10)
        assert len(rows) == MAX_REFUSALS
        assert rows[0].origin == f"https://o{MAX_REFUSALS + 4}.example.net"  # newest first
        assert "https://o0.example.net" not in {r.origin for r in rows}  # the oldest went
    finally:
        db.release()


def test_chart_buckets_merge_and_age_out(tmp_path: Path) -> None:
    db = ConsoleDB.shared(tmp_path / "console")
    try:
        now = int(time.time())
        old = now - SERIES_RETENTION - 60
        db.add_series({old: {"r": {"preflight|allowed": 1}}}, old)
        db.add_series({now: {"r": {"preflight|allowed": 2}, "s": {"2xx": 1}, "u": [1, 0, 0.5]}}, now)
        db.add_series({now: {"r": {"preflight|allowed": 3}, "u": [0, 2, 1.0]}}, now)
        assert db.series(0) == [(now, {"r": {"preflight|allowed": 5}, "s": {"2xx": 1}, "u": [1, 2, 1.5]})]
    finally:
        db.release()


def test_sessions_expire(tmp_path: Path) -> None:
    db = ConsoleDB.shared(tmp_path / "console")
    try:
        now = time.time()
        db.put_session(b"live", {"expires": now + 60})
        db.put_session(b"over", {"expires": now - 1})
        assert db.get_session(b"live", now) == {"expires": now + 60}
        assert db.get_session(b"over", now) is None
        db.put_session(b"over", {"expires": now - 1})
        assert db.purge_sessions(now) == 1
        assert db.get_session(b"live", now) is not None
    finally:
        db.release()


def test_the_recorder_flushes_on_its_own_and_once_more_when_stopped(tmp_path: Path) -> None:
    async def scenario() -> int:
        db = ConsoleDB.shared(tmp_path / "console")
        recorder = ConsoleRecorder(db)
        task = asyncio.create_task(recorder.run())
        recorder.observe(outcome(Reason.ORIGIN_NOT_ALLOWED))
        for _ in range(100):  # bounded: the periodic flush writes it
            if db.refusals():
                break
            await asyncio.sleep(0.05)
        assert db.refusals(), "the periodic flush did not write the refusal"
        recorder.observe(outcome(Reason.ORIGIN_NOT_ALLOWED))
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        count = db.refusals()[0].count
        db.release()
        return count

    assert asyncio.run(scenario()) == 2


def test_hostile_long_requests_still_fit_an_lmdb_key(tmp_path: Path) -> None:
    db = ConsoleDB.shared(tmp_path / "console")
    try:
        recorder = ConsoleRecorder(db)
        origin = "https://" + "a" * 250 + ".example.net"
        recorder.observe(outcome(Reason.ORIGIN_NOT_ALLOWED, origin, path="/" + "é" * 5000))
        recorder.flush()
        (row,) = db.refusals()  # written, not lost to a "key too long" error
        assert row.origin == origin and row.path.startswith("/éé") and row.count == 1
    finally:
        db.release()
