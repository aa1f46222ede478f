"""The origin store: allowed origins and patterns in an LMDB environment, with an audit trail of every change.

Owns the on-disk format and every transaction. Readers (each request) open a read-only transaction and make a handful
of exact ``get`` calls, whatever the size of the set (see :func:`corsproxy.origin.lookup_keys`); writers (CLI, admin
API, config and file reconciliation) commit atomically, so a writer killed at any point leaves the last committed state
intact, and every reader sees a commit on its next transaction — no restart, no cache to invalidate. Who may change
which entry is not decided here: every write path goes through :mod:`corsproxy.origin_writes`, which uses the
read-check-write transactions offered here (``apply``, ``remove(guard=)``, ``reconcile(defer_to=)``).

Record value layout, chosen so the request path never parses JSON::

    version (1 byte, =1) | expires (float64 LE, 0 = never) | policy length (1 byte) | policy (ASCII) | JSON metadata

The audit database is keyed by a big-endian nanosecond timestamp, so iteration order is time order. A third
database indexes entries by owner (``source NUL origin``), so reconciling the config's or the origins file's entries
touches only those, not every record of a million-entry store.

Imports lmdb; must not import aiohttp.
"""

from __future__ import annotations

import itertools
import json
import os
import struct
import time
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, NamedTuple

import lmdb

from corsproxy.decision import Found

__all__ = ["AuditEvent", "OriginRecord", "OriginStore", "Reconciled", "StoreError"]

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

    def __init__(self, path: str | os.PathLike[str], *, map_size: int = _DEFAULT_MAP_SIZE, readonly: bool = False):
        self.path = Path(path)
        try:
            if not readonly:
                self.path.mkdir(parents=True, exist_ok=True)
            self._env = lmdb.open(
                str(self.path),
                map_size=map_size,
                max_dbs=4,
                readonly=readonly,
                readahead=False,  # random B-tree reads: read-ahead only evicts useful pages
                writemap=not readonly,
                max_readers=1024,
            )
            self._origins = self._env.open_db(b"origins", create=not readonly)
            self._audit = self._env.open_db(b"audit", create=not readonly)
            self._owners = self._env.open_db(b"by_source", create=not readonly)
            if not readonly:
                self._index_owners()
        except (lmdb.Error, OSError) as exc:
            raise StoreError(f"cannot open the origin store at {self.path}: {exc}") from exc

    def _index_owners(self) -> None:
        """Build the owner index of a store written before it existed (once; a no-op afterwards)."""
        with self._env.begin() as txn:
            if txn.stat(self._owners)["entries"] or not txn.stat(self._origins)["entries"]:
                return
        with self._env.begin(write=True) as txn:
            for raw_key, value in txn.cursor(db=self._origins):
                source = OriginRecord.decode(value).source
                txn.put(_owner_key(source, bytes(raw_key)), b"", db=self._owners)

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
        """LMDB's last committed transaction id: changes on every write by any process, read without a transaction."""
        return int(self._env.info()["last_txnid"])

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

    # -- writes -------------------------------------------------------------------------------------------------

    def put(self, key: str, record: OriginRecord, actor: str) -> bool:
        """Add or replace one entry; ``True`` when it was new."""
        with self._env.begin(write=True) as txn:
            return self._put(txn, key, record, actor, self._stamps(txn))

    def put_many(self, items: Iterable[tuple[str, OriginRecord]], actor: str) -> tuple[int, int]:
        """Add or replace many entries in one transaction: all or nothing. Returns (added, replaced)."""
        added = replaced = 0
        with self._env.begin(write=True) as txn:
            stamps = self._stamps(txn)
            for key, record in items:
                if self._put(txn, key, record, actor, stamps):
                    added += 1
                else:
                    replaced += 1
        return added, replaced

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
        added = replaced = 0
        with self._env.begin(write=True) as txn:
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

    def remove(
        self,
        key: str,
        actor: str,
        action: str = "remove",
        guard: Callable[[OriginRecord], None] | None = None,
    ) -> OriginRecord | None:
        """Remove one entry; ``guard(stored)`` may raise to refuse, in the same transaction."""
        with self._env.begin(write=True) as txn:
            if guard is not None:
                stored = txn.get(key.encode(), db=self._origins)
                if stored is not None:
                    guard(OriginRecord.decode(stored))
            return self._remove(txn, key, actor, self._stamps(txn), action)

    def prune_expired(self, now: float, actor: str, keep_sources: Collection[str] = ()) -> list[str]:
        """Remove expired entries (their lookups already fail), except those owned by ``keep_sources``; each removal
        is audited as ``expire``."""
        with self._env.begin(write=True) as txn:
            stale = [
                bytes(k).decode()
                for k, v in txn.cursor(db=self._origins)
                if (record := OriginRecord.decode(v)).is_expired(now) and record.source not in keep_sources
            ]
            stamps = self._stamps(txn)
            for key in stale:
                self._remove(txn, key, actor, stamps, "expire")
        return stale

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
        source is taken over (which source yields to which is :mod:`corsproxy.origin_writes`' rule). Unwanted
        entries of other sources are never touched. Only ``source``'s own entries are read (the owner index), whatever
        the size of the store.
        """
        changed: list[str] = []
        removed: list[str] = []
        skipped: list[str] = []
        taken_over: list[tuple[str, str]] = []
        actor = actor or source
        with self._env.begin(write=True) as txn:
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
