"""The console's shared state: sign-in sessions, recent refusals and the charts' time series, in a small LMDB
environment of its own beside the origin store (``<store.path>/console``).

Any worker may answer any console request, and a reload replaces every worker, so none of this can live in one
worker's memory. A separate environment (not a database inside the origin store) keeps the console's once-a-second
writes away from the origin store's writer lock, map size and audit trail. It is opened without ``fsync`` on commit:
a process crash loses nothing, an operating-system crash may lose the last second of chart data or a session, which
costs a sign-in, never the origin set.

Imports lmdb; must not import aiohttp.
"""

from __future__ import annotations

import json
import os
import struct
import threading
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, ClassVar

import lmdb

__all__ = ["SERIES_RETENTION", "SERIES_STEP", "ConsoleDB", "RefusalKey", "console_db_path"]

#: Seconds per stored chart bucket; the hour view sums six of them per point.
SERIES_STEP = 5
#: Buckets older than this are dropped on the next flush: the longest chart shows the last hour.
SERIES_RETENTION = 3600 + 5 * 60
#: The refusal list keeps the most recently seen (origin, method, path, reason) rows, this many at most.
MAX_REFUSALS = 2000
_MAP_SIZE = 64 << 20
_BUCKET_KEY = struct.Struct(">Q")

#: ``(origin, kind, method, path, reason, request headers)`` of a refused request: origin "" when it was malformed;
#: for a preflight, the method and headers it asked for (what Explain needs to replay it).
RefusalKey = tuple[str, str, str, str, str, str]


def console_db_path(store_path: str | os.PathLike[str]) -> Path:
    return Path(store_path) / "console"


@dataclass(frozen=True, slots=True)
class Refusal:
    origin: str
    kind: str
    method: str
    path: str
    reason: str
    headers: str
    count: int
    first: float
    last: float

    def as_json(self) -> dict[str, Any]:
        return asdict(self)


#: LMDB's largest key (its default build); a longer one would fail the whole write.
_MAX_KEY = 511


def _refusal_key(key: RefusalKey) -> bytes:
    origin, kind, method, path, reason, headers = key
    parts = [origin[:300], kind, method[:32], path, reason, headers[:100]]
    raw = "\0".join(parts).encode("utf-8", "replace")
    while len(raw) > _MAX_KEY and parts[3]:  # the path gives way (only hostile paths are this long)
        excess = len(raw) - _MAX_KEY  # bytes; a character is 1 to 4 of them, so cut no more than needed
        parts[3] = parts[3][: len(parts[3]) - max(1, excess // 4)]
        raw = "\0".join(parts).encode("utf-8", "replace")
    return raw[:_MAX_KEY]


def merge_bucket(into: dict[str, Any], add: Mapping[str, Any]) -> None:
    """Add one bucket's counts to another: ``{"r": {"kind|reason": n}, "s": {"2xx": n}, "d": hist, "u": hist}``,
    where a histogram is a list of per-bucket counts, then +Inf, then the sum of the observed values."""
    for part in ("r", "s"):
        counts = add.get(part)
        if counts:
            target = into.setdefault(part, {})
            for name, value in counts.items():
                target[name] = target.get(name, 0) + value
    for part in ("d", "u"):
        histogram = add.get(part)
        if histogram:
            target_list = into.get(part)
            if target_list is None or len(target_list) != len(histogram):
                into[part] = list(histogram)
            else:
                for index, value in enumerate(histogram):
                    target_list[index] += value


class ConsoleDB:
    """One open console environment. Use :meth:`shared` so a process opens it once (LMDB's rule)."""

    _open: ClassVar[dict[tuple[int, Path], tuple[ConsoleDB, int]]] = {}
    _lock = threading.Lock()

    def __init__(self, path: Path) -> None:
        self.path = path
        path.mkdir(parents=True, exist_ok=True)
        self._env = lmdb.open(str(path), map_size=_MAP_SIZE, max_dbs=4, sync=False, readahead=False, max_readers=256)
        self._sessions = self._env.open_db(b"sessions")
        self._refusals = self._env.open_db(b"refusals")
        self._series = self._env.open_db(b"series")

    @classmethod
    def shared(cls, path: Path) -> ConsoleDB:
        """The process's one handle on ``path`` (opened on first use, after any fork); pair with :meth:`release`."""
        key = (os.getpid(), path.resolve())
        with cls._lock:
            db, users = cls._open.get(key, (None, 0))
            if db is None:
                db = cls(path)
            cls._open[key] = (db, users + 1)
            return db

    def release(self) -> None:
        key = (os.getpid(), self.path.resolve())
        with self._lock:
            db, users = self._open.get(key, (None, 0))
            if db is not self:
                return
            if users <= 1:
                del self._open[key]
                self._env.close()
            else:
                self._open[key] = (self, users - 1)

    # -- sessions -----------------------------------------------------------------------------------------------

    def put_session(self, key: bytes, session: Mapping[str, Any]) -> None:
        with self._env.begin(write=True, db=self._sessions) as txn:
            txn.put(key, json.dumps(session).encode())

    def get_session(self, key: bytes, now: float) -> dict[str, Any] | None:
        with self._env.begin(db=self._sessions) as txn:
            raw = txn.get(key)
        if raw is None:
            return None
        session: dict[str, Any] = json.loads(bytes(raw))
        if session.get("expires", 0) <= now:
            self.delete_session(key)
            return None
        return session

    def delete_session(self, key: bytes) -> bool:
        with self._env.begin(write=True, db=self._sessions) as txn:
            return bool(txn.delete(key))

    def purge_sessions(self, now: float) -> int:
        with self._env.begin(write=True, db=self._sessions) as txn:
            stale = [bytes(k) for k, v in txn.cursor() if json.loads(bytes(v)).get("expires", 0) <= now]
            for key in stale:
                txn.delete(key)
        return len(stale)

    # -- refusals -----------------------------------------------------------------------------------------------

    def add_refusals(self, batch: Mapping[RefusalKey, list[float]]) -> None:
        """Merge one worker's ``key -> [count, first, last]`` into the shared list, then keep the newest rows."""
        with self._env.begin(write=True, db=self._refusals) as txn:
            for key, (count, first, last) in batch.items():
                raw = _refusal_key(key)
                old = txn.get(raw)
                row = {"count": count, "first": first, "last": last}
                if old is not None:
                    prev = json.loads(bytes(old))
                    row = {
                        "count": count + prev["count"],
                        "first": min(first, prev["first"]),
                        "last": max(last, prev["last"]),
                    }
                txn.put(raw, json.dumps(row).encode())
            if txn.stat(self._refusals)["entries"] > MAX_REFUSALS:
                rows = sorted((json.loads(bytes(v))["last"], bytes(k)) for k, v in txn.cursor())
                for _last, raw in rows[: len(rows) - MAX_REFUSALS]:
                    txn.delete(raw)

    def refusals(self, limit: int = 500) -> list[Refusal]:
        """The most recently seen refusals, newest first."""
        out: list[Refusal] = []
        with self._env.begin(db=self._refusals) as txn:
            for raw_key, value in txn.cursor():
                parts = bytes(raw_key).decode("utf-8", "replace").split("\0")
                if len(parts) != 6:
                    continue
                row = json.loads(bytes(value))
                origin, kind, method, path, reason, headers = parts
                out.append(
                    Refusal(origin, kind, method, path, reason, headers, int(row["count"]), row["first"], row["last"])
                )
        out.sort(key=lambda r: r.last, reverse=True)
        return out[:limit]

    # -- chart series -------------------------------------------------------------------------------------------

    def add_series(self, buckets: Mapping[int, Mapping[str, Any]], now: float) -> None:
        """Add one worker's counts per bucket start (Unix seconds) and drop buckets past the retention."""
        with self._env.begin(write=True, db=self._series) as txn:
            for start, counts in buckets.items():
                raw = _BUCKET_KEY.pack(start)
                old = txn.get(raw)
                merged: dict[str, Any] = {} if old is None else json.loads(bytes(old))
                merge_bucket(merged, counts)
                txn.put(raw, json.dumps(merged, separators=(",", ":")).encode())
            oldest = _BUCKET_KEY.pack(max(0, int(now) - SERIES_RETENTION))
            cursor = txn.cursor()
            while cursor.first() and bytes(cursor.key()) < oldest:
                cursor.delete()

    def series(self, since: float) -> list[tuple[int, dict[str, Any]]]:
        """Buckets that start at or after ``since``, oldest first."""
        out: list[tuple[int, dict[str, Any]]] = []
        with self._env.begin(db=self._series) as txn:
            cursor = txn.cursor()
            if not cursor.set_range(_BUCKET_KEY.pack(max(0, int(since)))):
                return out
            for raw_key, value in cursor:
                out.append((_BUCKET_KEY.unpack(bytes(raw_key))[0], json.loads(bytes(value))))
        return out
