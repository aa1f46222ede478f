"""The origin store: allowed origins and patterns in an LMDB environment, with an audit trail of every change.

Owns the on-disk format and every transaction. Readers (each request) open a read-only transaction and make a handful
of exact ``get`` calls, whatever the size of the set (see :func:`~corsproxy.core.origin.lookup_keys`); writers (CLI,
admin API, config and file reconciliation) commit atomically, so a writer killed at any point leaves the last committed
state intact, and every reader sees a commit on its next transaction — no restart, no cache to invalidate.
Who may change which entry is not decided here: every write path goes through :mod:`corsproxy.origins.writes`,
which uses the read-check-write transactions offered here (``apply``, ``remove(guard=)``, ``reconcile(defer_to=)``).

Record value layout, chosen so the request path never parses JSON::

    version (1 byte, =1) | expires (float64 LE, 0 = never) | policy length (1 byte) | policy (ASCII) | JSON metadata

The audit database is keyed by a big-endian nanosecond timestamp, so iteration order is time order. A third
database indexes entries by owner (``source NUL origin``), so reconciling the config's or the origins file's entries
touches only those, not every record of a million-entry store.

Space. Every write transaction goes through :meth:`OriginStore._write`, which keeps three promises:

* A full map (``store.map_size_mb``) is a :class:`StoreFullError` naming the setting, never a raw ``MDB_MAP_FULL``.
  Writes that grow the store stop short of the map by a reserve (:func:`removal_reserve`) that removals and prunes
  may use; inside it they pay for their own audit record with the oldest ones, so any number of removals fits and
  space can always be freed through corsproxy.
* The audit trail is trimmed to ``store.audit_retention`` (oldest first) in the same transaction as each write.
* A full filesystem is a :class:`DiskFullError`, never a signal. The environment is opened without ``MDB_WRITEMAP``:
  with it, LMDB sizes the file to the whole map (sparse) and writes through the memory map, so the first new page on
  a full disk kills the process with SIGBUS — a serving worker included. Without it, pages are written with
  ``pwrite`` and a full disk is an error from the commit (LMDB reports the short write as ``EIO``); a 200,000-line
  import took the same time either way (2.8 s). Before a growing write commits, the free space is checked against
  what it adds, so that error is the exception. The lock file, which every process does write through a shared
  map, is allocated in full when the store is opened.

Imports lmdb; must not import aiohttp.
"""

from __future__ import annotations

import errno
import fcntl
import itertools
import json
import os
import struct
import time
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, NamedTuple, TypeVar

import lmdb

from corsproxy.core.decision import Found
from corsproxy.core.settings import AuditRetention

__all__ = [
    "AuditEvent",
    "DiskFullError",
    "OriginRecord",
    "OriginStore",
    "Reconciled",
    "StoreError",
    "StoreFullError",
    "StoreSpaceError",
    "StoreUsage",
    "check_location",
    "compact",
    "removal_reserve",
]

_T = TypeVar("_T")

_VERSION = 1
_json_str = json.encoder.encode_basestring_ascii
_HEAD = struct.Struct("<BdB")
_AUDIT_KEY = struct.Struct(">Q")
_DEFAULT_MAP_SIZE = 1 << 30  # 1 GiB of address space; the file only grows as needed


class StoreError(RuntimeError):
    """The store cannot be opened or written; the message says which path and why."""


class Reconciled(NamedTuple):
    """What :meth:`OriginStore.reconcile` did, key lists in write order."""

    changed: list[str]  # added or changed (take-overs included)
    removed: list[str]
    skipped: list[str]  # wanted, but owned by a source this one defers to
    taken_over: list[tuple[str, str]]  # (key, previous owner) now owned by this source


class StoreSpaceError(StoreError):
    """A write refused for lack of space; nothing was written. ``reason`` is a metric label."""

    reason = "space"


class StoreFullError(StoreSpaceError):
    """The LMDB map (``store.map_size_mb``) has no room for this write."""

    reason = "store_full"


class DiskFullError(StoreSpaceError):
    """The filesystem holding the store has no room for this write."""

    reason = "disk_full"


#: Free disk space every growing write leaves untouched, on top of what it is estimated to add; also what removals
#: need at most in practice (a removal rewrites a few pages per database).
_DISK_SLACK = 512 << 10
#: A few pages: what one ordinary addition (an entry, its index key and its audit record) takes.
_SMALL_WRITE = 64 << 10


def removal_reserve(map_size: int) -> int:
    """Bytes of the map that only removals may use: 2 % of it, at least 1 MiB and at most 32 MiB, never over a
    quarter of a tiny map. A removal rewrites a handful of pages per database, so this is room for thousands of
    them even before they start paying with old audit records."""
    return min(max(map_size // 50, 1 << 20), 32 << 20, map_size // 4)


def _mib(size: int) -> str:
    return f"{size / (1 << 20):.1f} MiB"


@dataclass(frozen=True, slots=True)
class StoreUsage:
    """How much room the store has, for metrics, ``/readyz`` and ``corsproxy check``."""

    used_bytes: int  # pages holding live data (what a compacted copy would take)
    file_bytes: int  # the data file's high-water mark (freed pages inside it are reused)
    map_size_bytes: int  # store.map_size_mb
    limit_bytes: int  # where growing writes stop: the map less the removal reserve
    disk_free_bytes: int  # free space on the filesystem holding the store, for this user
    audit_events: int

    @property
    def map_full(self) -> bool:
        """Under a small write's worth of room before the limit (removals fit for longer: they may use the reserve)."""
        return self.used_bytes + min(_DISK_SLACK, self.limit_bytes // 8) >= self.limit_bytes

    @property
    def disk_full(self) -> bool:
        """Under the disk slack plus a small write: additions are refused."""
        return self.disk_free_bytes < _DISK_SLACK + _SMALL_WRITE

    @property
    def writable(self) -> bool:
        """Whether an ordinary addition fits in the map and on the disk."""
        return not (self.map_full or self.disk_full)

    def as_json(self) -> dict[str, Any]:
        return {"writable": self.writable, **asdict(self), "problems": self.problems()}

    def problems(self) -> list[str]:
        """What stops (or will soon stop) writes; empty when there is room."""
        out: list[str] = []
        if self.map_full:
            out.append(
                f"the origin store is full ({_mib(self.used_bytes)} of store.map_size_mb "
                f"{self.map_size_bytes >> 20}): additions are refused, removals still work; raise store.map_size_mb"
            )
        elif self.used_bytes >= 0.9 * self.limit_bytes:
            out.append(f"the origin store is over 90 % full ({_mib(self.used_bytes)} of {_mib(self.limit_bytes)})")
        if self.disk_full:
            out.append(
                f"the filesystem holding the origin store has {_mib(self.disk_free_bytes)} free: additions are "
                "refused until space is freed (or store.path moves to a larger volume)"
            )
        elif self.disk_free_bytes < 4 * _DISK_SLACK:
            out.append(f"the filesystem holding the origin store has only {_mib(self.disk_free_bytes)} free")
        return out


@dataclass(frozen=True, slots=True)
class OriginRecord:
    policy: str = "default"
    expires: float | None = None  # Unix time; None = never
    source: str = "cli"  # config | cli | admin:<token name> | file
    added: float = 0.0
    note: str = ""

    def encode(self) -> bytes:
        policy = self.policy.encode("ascii")
        # Hand-assembled JSON (the C string escaper, no dict): this runs once per entry of a million-line import.
        meta = f'{{"source":{_json_str(self.source)},"added":{self.added!r},"note":{_json_str(self.note)}}}'
        return _HEAD.pack(_VERSION, self.expires or 0.0, len(policy)) + policy + meta.encode("ascii")

    @classmethod
    def decode(cls, value: bytes | memoryview) -> OriginRecord:
        _version, expires, length = _HEAD.unpack_from(value)
        start = _HEAD.size
        policy = bytes(value[start : start + length]).decode("ascii")
        meta = json.loads(bytes(value[start + length :]))
        return cls(policy, expires or None, str(meta["source"]), float(meta["added"]), str(meta.get("note", "")))

    def is_expired(self, now: float) -> bool:
        return self.expires is not None and self.expires <= now

    def same_rule(self, other: OriginRecord) -> bool:
        """Same effect on requests (metadata such as when it was added aside)."""
        return (self.policy, self.expires, self.note) == (other.policy, other.expires, other.note)

    def fields(self) -> dict[str, Any]:
        """The record as stored in the audit trail (times as Unix floats; :func:`_readable` formats them)."""
        return {
            "policy": self.policy,
            "expires": self.expires,
            "source": self.source,
            "added": self.added,
            "note": self.note,
        }

    def as_json(self) -> dict[str, Any]:
        out = _readable(self.fields())
        assert out is not None
        return out


def _iso(ts: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))


def _readable(fields: dict[str, Any] | None) -> dict[str, Any] | None:
    if fields is None:
        return None
    out = dict(fields)
    for name in ("expires", "added"):
        if isinstance(out.get(name), int | float):
            out[name] = _iso(out[name])
    return out


@dataclass(frozen=True, slots=True)
class AuditEvent:
    time: float
    action: str  # add | replace | remove | expire
    origin: str
    actor: str
    old: dict[str, Any] | None
    new: dict[str, Any] | None

    def as_json(self) -> dict[str, Any]:
        return {
            "time": _iso(self.time),
            "action": self.action,
            "origin": self.origin,
            "actor": self.actor,
            "old": _readable(self.old),
            "new": _readable(self.new),
        }


def _read_head(value: bytes) -> tuple[float, str]:
    """Expiry and policy name without decoding the JSON metadata (the request path)."""
    _version, expires, length = _HEAD.unpack_from(value)
    start = _HEAD.size
    return expires, bytes(value[start : start + length]).decode("ascii")


class OriginStore:
    """An open LMDB environment holding the origin set. One per process, opened after any fork."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        map_size: int = _DEFAULT_MAP_SIZE,
        readonly: bool = False,
        audit_retention: AuditRetention | None = None,
    ):
        self.path = Path(path)
        self.map_size = map_size
        self.audit_retention = AuditRetention() if audit_retention is None else audit_retention
        self._limit = map_size - removal_reserve(map_size)
        try:
            if not readonly:
                self.path.mkdir(parents=True, exist_ok=True)
                _allocate_lock_file(self.path / "lock.mdb")
            self._env = lmdb.open(
                str(self.path),
                map_size=map_size,
                max_dbs=8,
                readonly=readonly,
                readahead=False,  # random B-tree reads: read-ahead only evicts useful pages
                writemap=False,  # see the module docstring: a write must never be able to SIGBUS the process
                max_readers=1024,
            )
            self._page = int(self._env.stat()["psize"])
            self._main = self._env.open_db()
            self._origins = self._env.open_db(b"origins", create=not readonly)
            self._audit = self._env.open_db(b"audit", create=not readonly)
            self._owners = self._env.open_db(b"by_source", create=not readonly)
            # Fleet mode's replica state (change log position, rows refused), written with the rows it covers.
            self._sync = (
                self._env.open_db(b"sync", create=not readonly) if not readonly or self._has_db(b"sync") else None
            )
            if not readonly:
                self._index_owners()
        except StoreError:
            self._close_quietly()
            raise
        except (lmdb.Error, OSError) as exc:
            self._close_quietly()
            if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
                raise DiskFullError(
                    f"cannot open the origin store at {self.path}: the filesystem is full; free space there or move "
                    "store.path to a larger volume"
                ) from exc
            raise StoreError(f"cannot open the origin store at {self.path}: {exc}") from exc

    def _has_db(self, name: bytes) -> bool:
        with self._env.begin() as txn:
            return txn.get(name) is not None

    def _close_quietly(self) -> None:
        env = getattr(self, "_env", None)
        if env is not None:
            env.close()

    def _index_owners(self) -> None:
        """Build the owner index of a store written before it existed (once; a no-op afterwards)."""
        with self._env.begin() as txn:
            if txn.stat(self._owners)["entries"] or not txn.stat(self._origins)["entries"]:
                return

        def index(txn: lmdb.Transaction) -> None:
            for raw_key, value in txn.cursor(db=self._origins):
                source = OriginRecord.decode(value).source
                txn.put(_owner_key(source, bytes(raw_key)), b"", db=self._owners)

        self._write(index, grows=True)

    def close(self) -> None:
        self._env.close()

    def __enter__(self) -> OriginStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- reads --------------------------------------------------------------------------------------------------

    def find(self, keys: Iterable[str], now: float) -> Found | None:
        """The first live entry among ``keys`` (most specific first), else the first expired one, else ``None``."""
        expired: Found | None = None
        with self._env.begin(db=self._origins) as txn:
            get = txn.get
            for key in keys:
                value = get(key.encode())
                if value is None:
                    continue
                expires, policy = _read_head(value)
                if expires and expires <= now:
                    if expired is None:
                        expired = Found(key, policy, expired=True)
                    continue
                return Found(key, policy, expired=False, expires=expires or None)
        return expired

    def generation(self) -> int:
        """The id of the snapshot a read transaction begun now sees: changes on every write by any process.

        Not ``env.info()``'s ``last_txnid``: that is read from the meta page, which a committing writer updates a
        moment before it publishes the new snapshot to readers, so a lookup in that window saw the old set under the
        new number, and the decision cache kept that stale answer until the next write (found by bench/fleet.py:
        a preflight probing every millisecond while a write landed stayed refused). A read transaction's own id can
        only be older than what the next lookup sees, never newer; it is also cheaper (no dict)."""
        with self._env.begin() as txn:
            return int(txn.id())

    def get(self, key: str) -> OriginRecord | None:
        with self._env.begin(db=self._origins) as txn:
            value = txn.get(key.encode())
        return None if value is None else OriginRecord.decode(value)

    def __len__(self) -> int:
        with self._env.begin() as txn:
            return int(txn.stat(self._origins)["entries"])

    def items(self, *, contains: str = "", after: str = "", limit: int | None = None) -> list[tuple[str, OriginRecord]]:
        """Entries in key order, optionally only those whose key contains ``contains``, starting after ``after``."""
        out: list[tuple[str, OriginRecord]] = []
        with self._env.begin(db=self._origins) as txn:
            cursor = txn.cursor()
            positioned = cursor.set_range(after.encode()) if after else cursor.first()
            if not positioned:
                return out
            for raw_key, value in cursor:
                key = bytes(raw_key).decode()
                if key == after or (contains and contains not in key):
                    continue
                out.append((key, OriginRecord.decode(value)))
                if limit is not None and len(out) >= limit:
                    break
        return out

    def iter_all(self) -> Iterator[tuple[str, OriginRecord]]:
        with self._env.begin(db=self._origins) as txn:
            for raw_key, value in txn.cursor():
                yield bytes(raw_key).decode(), OriginRecord.decode(value)

    def history(self, *, origin: str | None = None, limit: int = 100) -> list[AuditEvent]:
        """The newest ``limit`` audit events, oldest first, optionally for one origin."""
        events: list[AuditEvent] = []
        with self._env.begin(db=self._audit) as txn:
            cursor = txn.cursor()
            if not cursor.last():
                return events
            for _key, value in cursor.iterprev():
                event = json.loads(bytes(value))
                if origin is not None and event["origin"] != origin:
                    continue
                events.append(AuditEvent(**event))
                if len(events) >= limit:
                    break
        events.reverse()
        return events

    def usage(self) -> StoreUsage:
        """Room left in the map and on the disk (a few LMDB statistics and a ``statvfs``: cheap enough per scrape)."""
        with self._env.begin() as txn:
            live = self._live_pages(txn)
            events = int(txn.stat(self._audit)["entries"])
        file_bytes = (int(self._env.info()["last_pgno"]) + 1) * self._page
        return StoreUsage(live * self._page, file_bytes, self.map_size, self._limit, _disk_free(self.path), events)

    # -- writes -------------------------------------------------------------------------------------------------

    def put(self, key: str, record: OriginRecord, actor: str) -> bool:
        """Add or replace one entry; ``True`` when it was new."""
        return self._write(lambda txn: self._put(txn, key, record, actor, self._stamps(txn)), grows=True)

    def put_many(self, items: Iterable[tuple[str, OriginRecord]], actor: str) -> tuple[int, int]:
        """Add or replace many entries in one transaction: all or nothing. Returns (added, replaced)."""

        def work(txn: lmdb.Transaction) -> tuple[int, int]:
            added = replaced = 0
            stamps = self._stamps(txn)
            for key, record in items:
                if self._put(txn, key, record, actor, stamps):
                    added += 1
                else:
                    replaced += 1
            return added, replaced

        return self._write(work, grows=True)

    def apply(
        self,
        keys: Iterable[str],
        resolve: Callable[[str, OriginRecord | None], OriginRecord | None],
        actor: str,
        finish: Callable[[], None] | None = None,
    ) -> tuple[int, int]:
        """Read-modify-write in one transaction: ``resolve(key, stored)`` returns the record to write, or ``None`` to
        leave the key alone; it (or ``finish``, called before the commit) raises to abort everything. Returns
        (added, replaced). The check and the write see the same state, whatever other processes write."""

        def work(txn: lmdb.Transaction) -> tuple[int, int]:
            added = replaced = 0
            stamps = self._stamps(txn)
            for key in keys:
                stored = txn.get(key.encode(), db=self._origins)
                record = resolve(key, None if stored is None else OriginRecord.decode(stored))
                if record is None:
                    continue
                if self._put(txn, key, record, actor, stamps):
                    added += 1
                else:
                    replaced += 1
            if finish is not None:
                finish()
            return added, replaced

        return self._write(work, grows=True)

    def remove(
        self,
        key: str,
        actor: str,
        action: str = "remove",
        guard: Callable[[OriginRecord], None] | None = None,
    ) -> OriginRecord | None:
        """Remove one entry; ``guard(stored)`` may raise to refuse, in the same transaction."""

        def work(txn: lmdb.Transaction) -> OriginRecord | None:
            if guard is not None:
                stored = txn.get(key.encode(), db=self._origins)
                if stored is not None:
                    guard(OriginRecord.decode(stored))
            return self._remove(txn, key, actor, self._stamps(txn), action)

        return self._write(work, grows=False)

    def prune_expired(self, now: float, actor: str, keep_sources: Collection[str] = ()) -> list[str]:
        """Remove expired entries (their lookups already fail), except those owned by ``keep_sources``; each removal
        is audited as ``expire``."""

        def work(txn: lmdb.Transaction) -> list[str]:
            stale = [
                bytes(k).decode()
                for k, v in txn.cursor(db=self._origins)
                if (record := OriginRecord.decode(v)).is_expired(now) and record.source not in keep_sources
            ]
            stamps = self._stamps(txn)
            for key in stale:
                self._remove(txn, key, actor, stamps, "expire")
            return stale

        return self._write(work, grows=False)

    # -- fleet mode: the replica of PostgreSQL -------------------------------------------------------------------

    def sync_get(self, name: bytes) -> bytes | None:
        """One value of the replica's state (``None`` when never written, or outside fleet mode)."""
        if self._sync is None:
            return None
        with self._env.begin(db=self._sync) as txn:
            value = txn.get(name)
        return None if value is None else bytes(value)

    def sync_items(self, prefix: bytes) -> list[tuple[bytes, bytes]]:
        """The replica's state values whose names start with ``prefix``, in name order."""
        out: list[tuple[bytes, bytes]] = []
        if self._sync is None:
            return out
        with self._env.begin(db=self._sync) as txn:
            cursor = txn.cursor()
            if cursor.set_range(prefix):
                for name, value in cursor:
                    if not bytes(name).startswith(prefix):
                        break
                    out.append((bytes(name), bytes(value)))
        return out

    def replicate(
        self,
        changes: Iterable[tuple[str, OriginRecord | None, str]],
        *,
        keep_sources: Collection[str],
        state: Mapping[bytes, bytes | None],
        clear_prefix: bytes | None = None,
        remove_between: tuple[str, str | None] | None = None,
        audit: bool = True,
    ) -> tuple[int, int]:
        """Apply a batch copied from the source of truth, and the replica's ``state`` (its position: ``None``
        values delete), in one transaction, so a process killed at any point has applied the batch with its
        position or neither. Returns (entries written, entries removed).

        ``changes``: ``(key, record, actor)``, in order; a ``None`` record removes the key. Entries owned by
        ``keep_sources`` (this host's declarations) are never touched. ``remove_between=(after, upto)`` (a snapshot
        chunk, keys in order): also remove every other entry with ``after < key <= upto`` (``upto`` ``None``: to
        the end), except ``keep_sources``' — they are not in the source any more. ``clear_prefix``: first delete
        the state values whose names start with it. Unchanged entries write nothing (no audit event either).
        """
        assert self._sync is not None

        def work(txn: lmdb.Transaction) -> tuple[int, int]:
            written = removed = 0
            stamps = self._stamps(txn)
            if clear_prefix is not None:
                cursor = txn.cursor(db=self._sync)
                if cursor.set_range(clear_prefix):
                    while bytes(cursor.key()).startswith(clear_prefix):
                        if not cursor.delete() or not cursor.key():
                            break
            seen: set[str] = set()
            for key, record, actor in changes:
                seen.add(key)
                stored = txn.get(key.encode(), db=self._origins)
                current = None if stored is None else OriginRecord.decode(stored)
                if current is not None and current.source in keep_sources:
                    continue
                if record is None:
                    if current is not None:
                        self._remove_quiet(txn, key, actor, stamps, audit)
                        removed += 1
                    continue
                if current is not None and current.source == record.source and current.same_rule(record):
                    continue
                self._put_quiet(txn, key, record, actor, stamps, audit)
                written += 1
            if remove_between is not None:
                after, upto = remove_between
                cursor = txn.cursor(db=self._origins)
                stale: list[str] = []
                positioned = cursor.set_range(after.encode()) if after else cursor.first()
                while positioned:
                    key = bytes(cursor.key()).decode()
                    if upto is not None and key > upto:
                        break
                    if (
                        key != after
                        and key not in seen
                        and OriginRecord.decode(cursor.value()).source not in keep_sources
                    ):
                        stale.append(key)
                    positioned = cursor.next()
                for key in stale:
                    self._remove_quiet(txn, key, "postgresql:snapshot", stamps, audit)
                    removed += 1
            for name, value in state.items():
                if value is None:
                    txn.delete(name, db=self._sync)
                else:
                    txn.put(name, value, db=self._sync)
            return written, removed

        return self._write(work, grows=True)

    def _put_quiet(
        self, txn: lmdb.Transaction, key: str, record: OriginRecord, actor: str, stamps: Iterator[int], audit: bool
    ) -> None:
        if audit:
            self._put(txn, key, record, actor, stamps)
            return
        # A cold start copies a whole snapshot: one audit event per row would only push the trail's real
        # history out (store.audit_retention), for rows whose writers the snapshot does not know.
        raw = key.encode()
        old = txn.get(raw, db=self._origins)
        if old is not None:
            txn.delete(_owner_key(OriginRecord.decode(old).source, raw), db=self._owners)
        if record.added == 0.0:
            record = replace(record, added=time.time())
        txn.put(raw, record.encode(), db=self._origins)
        txn.put(_owner_key(record.source, raw), b"", db=self._owners)

    def _remove_quiet(self, txn: lmdb.Transaction, key: str, actor: str, stamps: Iterator[int], audit: bool) -> None:
        if audit:
            self._remove(txn, key, actor, stamps, "remove")
            return
        raw = key.encode()
        old = txn.pop(raw, db=self._origins)
        if old is not None:
            txn.delete(_owner_key(OriginRecord.decode(old).source, raw), db=self._owners)

    def reconcile(
        self,
        wanted: Mapping[str, OriginRecord],
        *,
        source: str,
        actor: str | None = None,
        defer_to: Collection[str] = (),
    ) -> Reconciled:
        """Make the entries owned by ``source`` exactly ``wanted``, in one transaction.

        A wanted key owned by a source in ``defer_to`` is left alone and reported as skipped; one owned by any other
        source is taken over (which source yields to which is :mod:`corsproxy.origins.writes`' rule). Unwanted
        entries of other sources are never touched. Only ``source``'s own entries are read (the owner index), whatever
        the size of the store.

        When the additions do not fit (:class:`StoreSpaceError`), the removals are still applied on their own — a
        revocation must never wait for space — and the error is raised after them.
        """
        actor = actor or source

        def work(txn: lmdb.Transaction, removals_only: bool) -> Reconciled:
            changed: list[str] = []
            removed: list[str] = []
            skipped: list[str] = []
            taken_over: list[tuple[str, str]] = []
            stamps = self._stamps(txn)
            prefix = _owner_key(source, b"")
            cursor = txn.cursor(db=self._owners)
            if cursor.set_range(prefix):
                for raw_owner_key in cursor.iternext(values=False):
                    owner_key = bytes(raw_owner_key)
                    if not owner_key.startswith(prefix):
                        break
                    key = owner_key[len(prefix) :].decode()
                    if key not in wanted:
                        removed.append(key)
            for key in removed:
                self._remove(txn, key, actor, stamps, "remove")
            if removals_only:
                return Reconciled(changed, removed, skipped, taken_over)
            for key, record in wanted.items():
                stored = txn.get(key.encode(), db=self._origins)
                current = None if stored is None else OriginRecord.decode(stored)
                if current is not None and current.source != source:
                    if current.source in defer_to:
                        skipped.append(key)
                        continue
                    taken_over.append((key, current.source))
                elif current is not None and current.same_rule(record):
                    continue
                owned = record if record.source == source else replace(record, source=source)
                self._put(txn, key, owned, actor, stamps)
                changed.append(key)
            return Reconciled(changed, removed, skipped, taken_over)

        try:
            return self._write(lambda txn: work(txn, False), grows=True)
        except StoreSpaceError as exc:
            removed = self._write(lambda txn: work(txn, True), grows=False).removed
            raise type(exc)(
                f"{exc} ({len(removed)} entr{'y' if len(removed) == 1 else 'ies'} no longer listed for {source} "
                "removed all the same)"
            ) from None

    def _write(self, work: Callable[[lmdb.Transaction], _T], *, grows: bool) -> _T:
        """Run ``work`` in one write transaction, trim the audit trail, and commit — or raise a
        :class:`StoreSpaceError` and write nothing. ``grows``: the write may add data, so it must leave the removal
        reserve and the disk slack untouched (removals and prunes pass ``False`` and may use them)."""
        if grows:
            self._check_disk(0)
        try:
            with self._env.begin(write=True) as txn:
                before = self._live_pages(txn)
                result = work(txn)
                self._trim_audit(txn)
                after = self._live_pages(txn)
                if grows and after > before:
                    if after * self._page > self._limit:
                        raise self._full_error(after * self._page)
                    # New pages, and as many again for the copies of the pages the transaction rewrote.
                    self._check_disk(2 * (after - before) * self._page)
                elif not grows and after > before and after * self._page > self._limit:
                    # A removal inside the reserve: its audit record is paid for with the oldest ones, so any
                    # number of removals fits, not just as many as the reserve holds.
                    self._drop_oldest_audit(txn, before)
            return result
        except lmdb.MapFullError:
            raise self._full_error(None) from None
        except lmdb.Error as exc:
            # A write that runs out of disk reaches LMDB as a short write, which it reports as EIO.
            if not any(text in str(exc) for text in ("Input/output error", "No space left on device")):
                raise
            free = _disk_free(self.path)
            if free < 2 * _DISK_SLACK:
                raise self._disk_error(None, free) from None
            raise StoreError(f"cannot write the origin store at {self.path}: {exc}. Nothing was written") from exc

    def _live_pages(self, txn: lmdb.Transaction) -> int:
        """Pages holding data as this transaction sees it (its own writes included), the two meta pages counted."""
        dbs = [self._origins, self._audit, self._owners, self._main]
        if self._sync is not None:
            dbs.append(self._sync)
        return 2 + sum(_pages(txn.stat(db)) for db in dbs)

    def _trim_audit(self, txn: lmdb.Transaction) -> None:
        """Drop the oldest audit events beyond ``store.audit_retention`` (time order is key order)."""
        retention = self.audit_retention
        excess = 0
        if retention.max_events is not None:
            excess = int(txn.stat(self._audit)["entries"]) - retention.max_events
        cutoff = b""
        if retention.max_age is not None:
            cutoff = _AUDIT_KEY.pack(max(0, time.time_ns() - int(retention.max_age * 1e9)))
        cursor = txn.cursor(db=self._audit)
        if not cursor.first():
            return
        while excess > 0 or bytes(cursor.key()) < cutoff:
            if not cursor.delete() or not cursor.key():
                break
            excess -= 1

    def _drop_oldest_audit(self, txn: lmdb.Transaction, pages: int) -> None:
        """Delete the oldest audit events until the store is back to ``pages`` (or the trail is empty)."""
        cursor = txn.cursor(db=self._audit)
        if not cursor.first():
            return
        while True:
            for _ in range(16):  # a page holds several events: count pages every few deletions
                if not cursor.delete() or not cursor.key():
                    return
            if self._live_pages(txn) <= pages:
                return

    def _full_error(self, used: int | None) -> StoreFullError:
        """``used``: what the refused write would have taken the store to; ``None`` when LMDB itself ran out."""
        if used is None:
            with self._env.begin() as txn:
                now = self._live_pages(txn) * self._page
            size = f"{_mib(now)} in use and this write does not fit in"
        else:
            size = f"this write would take it to {_mib(used)} of"
        return StoreFullError(
            f"the origin store at {self.path} is full: {size} the {self.map_size >> 20} MiB map (store.map_size_mb), "
            f"whose last {_mib(self.map_size - self._limit)} are kept for removals. Nothing was written. Raise "
            "store.map_size_mb and restart corsproxy, or free space: remove entries (removals always fit), or lower "
            "store.audit_retention"
        )

    def _disk_error(self, need: int | None, free: int) -> DiskFullError:
        needs = f"; this write needs about {_mib(need + _DISK_SLACK)}" if need is not None else ""
        return DiskFullError(
            f"the filesystem holding the origin store at {self.path} is full ({_mib(free)} free{needs}). Nothing "
            "was written. Free space there or move store.path to a larger volume (`corsproxy store compact`, with "
            "corsproxy stopped, gives back the space freed inside the store)"
        )

    def _check_disk(self, need: int) -> None:
        free = _disk_free(self.path)
        if free < need + _DISK_SLACK:
            raise self._disk_error(need, free)

    def _stamps(self, txn: lmdb.Transaction) -> Iterator[int]:
        """Audit keys for one write transaction: nanosecond times, strictly increasing and unique across processes
        (LMDB serialises writers, so reading the newest key once per transaction is enough)."""
        cursor = txn.cursor(db=self._audit)
        newest = _AUDIT_KEY.unpack(bytes(cursor.key()))[0] if cursor.last() else 0
        return itertools.count(max(time.time_ns(), newest + 1))

    def _put(self, txn: lmdb.Transaction, key: str, record: OriginRecord, actor: str, stamps: Iterator[int]) -> bool:
        raw = key.encode()
        stamp = next(stamps)
        old = txn.get(raw, db=self._origins)
        old_record = None if old is None else OriginRecord.decode(old)
        if record.added == 0.0:
            added = old_record.added if old_record else stamp / 1e9
            record = OriginRecord(record.policy, record.expires, record.source, added, record.note)
        txn.put(raw, record.encode(), db=self._origins)
        if old_record is not None and old_record.source != record.source:
            txn.delete(_owner_key(old_record.source, raw), db=self._owners)
        txn.put(_owner_key(record.source, raw), b"", db=self._owners)
        self._audit_event(
            txn,
            stamp,
            "add" if old_record is None else "replace",
            key,
            actor,
            old_record.fields() if old_record else None,
            record.fields(),
        )
        return old_record is None

    def _remove(
        self, txn: lmdb.Transaction, key: str, actor: str, stamps: Iterator[int], action: str
    ) -> OriginRecord | None:
        raw = key.encode()
        old = txn.pop(raw, db=self._origins)
        if old is None:
            return None
        record = OriginRecord.decode(old)
        txn.delete(_owner_key(record.source, raw), db=self._owners)
        self._audit_event(txn, next(stamps), action, key, actor, record.fields(), None)
        return record

    def _audit_event(
        self,
        txn: lmdb.Transaction,
        stamp: int,
        action: str,
        key: str,
        actor: str,
        old: dict[str, Any] | None,
        new: dict[str, Any] | None,
    ) -> None:
        event = {"time": stamp / 1e9, "action": action, "origin": key, "actor": actor, "old": old, "new": new}
        txn.put(_AUDIT_KEY.pack(stamp), json.dumps(event, separators=(",", ":")).encode(), db=self._audit)


def _owner_key(source: str, raw_key: bytes) -> bytes:
    return source.encode() + b"\0" + raw_key


def _disk_free(path: Path) -> int:
    """Bytes this (unprivileged) user may still write on the filesystem holding ``path``."""
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


#: What LMDB's lock file takes for ``max_readers=1024`` (64-byte reader slots and the header), rounded up to pages.
_LOCK_FILE_SIZE = 1024 * 64 + 8192


def _allocate_lock_file(path: Path) -> None:
    """Give the lock file real blocks before LMDB maps it. Every process writes its reader slot through a shared
    map of this file; LMDB only ``ftruncate``s it, so on a full filesystem the first write to a new page of it would
    be a SIGBUS. Done before ``lmdb.open``: closing a descriptor of the lock file drops every ``fcntl`` lock this
    process holds on it, LMDB's included."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        size = max(os.fstat(fd).st_size, _LOCK_FILE_SIZE)
        os.posix_fallocate(fd, 0, size)
    finally:
        os.close(fd)


def check_location(path: str, map_size: int) -> tuple[list[str], list[str]]:
    """What can be known about ``store.path`` without opening it for writing: (errors, warnings), each naming the
    setting and a fix. Used by ``corsproxy check`` and before ``serve`` forks its workers."""
    errors: list[str] = []
    warnings: list[str] = []
    wanted = Path(path)
    probe = wanted
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent  # the nearest existing ancestor: where the directory would be created
    uid = os.getuid()
    fix = "set store.path to a directory corsproxy may create and write, e.g. /var/lib/corsproxy/origins.lmdb"
    if not probe.is_dir():
        errors.append(f"store.path: {wanted}: {probe} is not a directory, so the store cannot be created there; {fix}")
        return errors, warnings
    if not os.access(probe, os.W_OK | os.X_OK):
        st = os.statvfs(probe)
        why = "is on a read-only filesystem" if st.f_flag & os.ST_RDONLY else f"is not writable by uid {uid}"
        errors.append(f"store.path: {probe} {why}; {fix}, or make it writable")
        return errors, warnings
    for name in ("data.mdb", "lock.mdb"):
        file = wanted / name
        if file.exists() and not os.access(file, os.R_OK | os.W_OK):
            errors.append(f"store.path: {file} is not readable and writable by uid {uid}; fix its owner or mode")
    free = _disk_free(probe)
    data = wanted / "data.mdb"
    held = data.stat().st_blocks * 512 if data.exists() else 0  # what the store already occupies on disk
    if map_size > free + held:
        warnings.append(
            f"store.map_size_mb: {map_size >> 20} MiB, but the filesystem holding store.path has {_mib(free)} free "
            f"(the store takes {_mib(held)}): writes will fail with 'disk full' before the store is full; lower "
            "store.map_size_mb or give the store a larger volume"
        )
    if free < 2 * _DISK_SLACK:
        warnings.append(f"store.path: only {_mib(free)} free on its filesystem: writes to the store are refused")
    return errors, warnings


def compact(path: str | os.PathLike[str]) -> tuple[int, int]:
    """Rewrite the store's data file without its free pages (LMDB's compacting copy, then an atomic rename);
    returns the file's (old, new) size in bytes.

    Only with the store closed everywhere: a running worker keeps the old file mapped and would go on using it.
    An exclusive lock on the byte of the lock file where every LMDB process holds a shared one proves nobody has
    it open, and is held to the end, so a process that opens the store meanwhile waits for the compacted file.
    """
    directory = Path(path)
    data = directory / "data.mdb"
    if not data.is_file():
        raise StoreError(f"no origin store at {directory} (store.path): nothing to compact")
    with open(directory / "lock.mdb", "a+b") as lock:
        try:
            fcntl.lockf(lock, fcntl.LOCK_EX | fcntl.LOCK_NB, 1, 0)
        except OSError:
            raise StoreError(
                f"the origin store at {directory} is open in another process (a running corsproxy, or a CLI "
                "command): stop corsproxy, then run `corsproxy store compact` again"
            ) from None
        old_size = data.stat().st_size
        staging = directory / "compact.tmp"
        if staging.exists():
            for leftover in staging.iterdir():
                leftover.unlink()
        else:
            staging.mkdir()
        try:
            # lock=False: LMDB must not touch the lock file, whose exclusive lock this process holds.
            env = lmdb.open(str(directory), readonly=True, lock=False, max_dbs=4, readahead=False)
            try:
                with env.begin() as txn:
                    pages = 2 + sum(
                        _pages(txn.stat(env.open_db(name, txn=txn, create=False))) for name in _DBS if txn.get(name)
                    )
                used = int(env.stat()["psize"]) * pages
                free = _disk_free(directory)
                if free < used + _DISK_SLACK:
                    raise DiskFullError(
                        f"compacting {directory} writes a copy of about {_mib(used)}, and its filesystem has "
                        f"{_mib(free)} free: free some space first"
                    )
                env.copy(str(staging), compact=True)
            finally:
                env.close()
            compacted = staging / "data.mdb"
            with open(compacted, "rb") as f:
                os.fsync(f.fileno())
            os.replace(compacted, data)
            dir_fd = os.open(directory, os.O_RDONLY)
            try:
                os.fsync(dir_fd)  # the rename itself survives a crash
            finally:
                os.close(dir_fd)
        except lmdb.Error as exc:
            raise StoreError(f"cannot compact the origin store at {directory}: {exc}") from exc
        finally:
            for leftover in staging.iterdir():
                leftover.unlink()
            staging.rmdir()
        return old_size, data.stat().st_size


_DBS = (b"origins", b"audit", b"by_source", b"sync")


def _pages(stat: Mapping[str, Any]) -> int:
    return int(stat["branch_pages"]) + int(stat["leaf_pages"]) + int(stat["overflow_pages"])
