"""Fleet mode's replica: copy PostgreSQL's ``corsproxy_origins`` into this host's LMDB store, and keep it in step.

One syncer per host: like the origins-file watcher, the worker holding an exclusive ``flock`` next to the store runs
it, and when that worker dies another takes over at its next try. The syncer follows the change log
(``corsproxy_changes``, see :mod:`corsproxy.origins.postgres`): it reads ``WHERE seq > position`` in batches of
``store.postgresql.batch_size`` and applies each batch together with its new position in one LMDB transaction
(:meth:`~corsproxy.store.OriginStore.replicate`), so a process killed at any point resumes where the last commit left
it, with nothing lost or applied twice. ``LISTEN corsproxy_changes`` wakes it at once; it also polls every
``poll_interval`` seconds, because a notification sent while the listener was disconnected is lost.

An empty replica, one whose position the change log no longer reaches (pruned after ``change_retention``), or one
whose host declarations or policies changed (``cors.allow_origins`` wins over the fleet's rows locally, so a dropped
declaration must hand its origin back to the fleet's row; and each row was checked against the policies, so a row
refused for naming a policy defined since, or one a policy no longer allows, must be checked again) copies a snapshot
instead: every row, read in one REPEATABLE READ
transaction with the change log position it corresponds to, applied in bounded chunks merged in key order with the
store (entries the source no longer has are removed), the position written with the last chunk.

Each row is checked like every other write (:func:`check_row`: the origin parser, canonical form, the policy's
safety rules); a refused row is not applied, and any entry it replaces is removed, since the source no longer asks
for it. Refusals are logged, counted and kept in the replica's state for ``corsproxy check``.

While PostgreSQL is unreachable the store keeps what it has (requests never wait on PostgreSQL) and reconnects back
off up to :data:`MAX_BACKOFF` seconds.

Must not import aiohttp; the store is passed in.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import math
import os
import random
import signal
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from corsproxy.core.origin import EntryError, parse_origin_entry
from corsproxy.core.origin_lines import MAX_NOTE_LENGTH
from corsproxy.core.safety import check_origin_entry
from corsproxy.core.settings import PolicySafety, PostgresSource, unknown_policy
from corsproxy.origins.lead import HostLock, write_status
from corsproxy.origins.postgres import NOTIFY_CHANNEL, SOURCE, SchemaError, check_schema, unavailable
from corsproxy.store import OriginRecord, OriginStore, StoreError

__all__ = [
    "MAX_BACKOFF",
    "PostgresSyncer",
    "ReplicaState",
    "check_row",
    "config_digest",
    "read_status",
    "replica_state",
]

log = logging.getLogger("corsproxy.sync")

#: Longest wait between reconnection attempts while PostgreSQL is unreachable.
MAX_BACKOFF = 10.0
_POSITION = b"position"
_PENDING = b"snapshot_pending"
_DECLARED = b"declared"
_REFUSED = b"refused\0"
#: The owners a replica never touches: this host's own declarations.
_KEEP = ("config",)
#: The longest row origin (bytes) a refusal's state key holds as it is: LMDB keys are at most 511 bytes.
_STORABLE = 400
#: 0001-01-01T00:00:00Z to 9999-12-31T23:59:59Z: the expiries Python's datetime (every display of one) can show.
_FIRST_EXPIRY, _LAST_EXPIRY = -62135596800.0, 253402300799.0


def check_row(
    origin: str, policy: str | None, expires: float | None, note: str | None, safety: Mapping[str, PolicySafety]
) -> tuple[OriginRecord | None, str]:
    """A row as the record to store, or ``(None, why)``: the same parser and safety rules as every write path, and
    the origin must be written canonically (the row's key is the store's key, so a delete always finds its entry)."""
    try:
        entry = parse_origin_entry(origin)
    except EntryError as exc:
        return None, str(exc)
    if entry.key != origin:
        return None, f"{origin!r} is not in canonical form: write it as {entry.key!r}"
    if expires is not None and not _FIRST_EXPIRY <= expires <= _LAST_EXPIRY:
        shown = ("infinity" if expires > 0 else "-infinity") if math.isinf(expires) else "outside the years 1-9999"
        return None, f"expires is {shown}: write a time before 10000-01-01, or NULL for an entry that never expires"
    name = policy or "default"
    flags = safety.get(name)
    if flags is None:
        return None, unknown_policy(name, safety)
    if note is not None and len(note) > MAX_NOTE_LENGTH:
        return None, f"the note is {len(note)} characters long; at most {MAX_NOTE_LENGTH} are kept"
    errors, _warnings = check_origin_entry(entry, flags)
    if errors:
        return None, "; ".join(problem.message for problem in errors)
    return OriginRecord(name, expires, SOURCE, 0.0, note or ""), ""


def _refused_key(origin: str) -> bytes:
    """The state key of a refused row: LMDB keys are at most 511 bytes, and plain SQL can write a longer origin, so
    a long one is named by its beginning and a digest of all of it (the same row always gets the same name)."""
    raw = origin.encode()
    if len(raw) <= _STORABLE:
        return _REFUSED + raw
    return (
        _REFUSED + f"{raw[: _STORABLE - 20].decode(errors='ignore')}...#{hashlib.sha256(raw).hexdigest()[:12]}".encode()
    )


def _seconds(value: Any) -> float | None:
    """``extract(epoch FROM expires)`` as seconds: read as a number, not a ``datetime``, because psycopg cannot
    load ``infinity`` or a year past 9999 as one, and such a row must be refused like any other, not stop the
    syncer (and every later change with it, a revocation included)."""
    return None if value is None else float(value)


def config_digest(declared: Mapping[str, Any], safety: Mapping[str, PolicySafety] | None = None) -> bytes:
    """What of this host's config the replica's content depends on: its declarations, and the policies every row
    was checked against (a row refused for naming a policy defined later, or one a policy's new safety rules no
    longer allow, must be checked again, which a snapshot does)."""
    text = "\n".join(sorted(declared))
    if safety is not None:
        text += "\0" + "\n".join(repr(safety[name]) for name in sorted(safety))
    return hashlib.sha256(text.encode()).hexdigest().encode()


@dataclass(frozen=True, slots=True)
class ReplicaState:
    """What the store says about its copy (durable: written with the rows)."""

    position: int | None  # None: never synced
    snapshot_pending: bool
    refused: tuple[tuple[str, dict[str, Any]], ...]

    @property
    def synced(self) -> bool:
        """A full copy has completed once (readiness): the position is written with a snapshot's last chunk.

        A later snapshot (a replica beyond the log's retention, or changed host declarations) leaves it ready: the
        store holds a complete, if older, set meanwhile, and a reload that changes ``cors.allow_origins`` on every
        host must not take the whole fleet out of the load balancer for the length of a snapshot."""
        return self.position is not None


def replica_state(store: OriginStore, *, with_refused: bool = False) -> ReplicaState:
    raw = store.sync_get(_POSITION)
    refused: list[tuple[str, dict[str, Any]]] = []
    if with_refused:
        for name, value in store.sync_items(_REFUSED):
            refused.append((name[len(_REFUSED) :].decode(), json.loads(value)))
    return ReplicaState(None if raw is None else int(raw), store.sync_get(_PENDING) is not None, tuple(refused))


def read_status(store_dir: Path) -> dict[str, Any]:
    """The syncer's last report (connection, last check), written by whichever worker runs it."""
    try:
        value = json.loads((store_dir / "postgresql-sync.status").read_text())
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


class _Backoff:
    def __init__(self, first: float = 0.2) -> None:
        self.first = first
        self.delay = first

    def reset(self) -> None:
        self.delay = self.first

    def next(self) -> float:
        delay = self.delay
        self.delay = min(self.delay * 2, MAX_BACKOFF)
        return delay * random.uniform(0.8, 1.2)


class PostgresSyncer:
    """Keeps ``store`` a replica of PostgreSQL. ``safety`` and ``declared`` are read on every batch (a reload)."""

    def __init__(
        self,
        source: PostgresSource,
        store: OriginStore,
        safety: Callable[[], Mapping[str, PolicySafety]],
        declared: Callable[[], Mapping[str, Any]],
        config_path: str,
        *,
        on_error: Callable[[str], None] | None = None,
        on_refused: Callable[[int], None] | None = None,
    ) -> None:
        self.source = source
        self.store = store
        self.safety = safety
        self.declared = declared
        self.config_path = config_path
        self.on_error = on_error
        self.on_refused = on_refused
        self.lock = HostLock(store.path / "postgresql-sync.lock")
        self.status_path = store.path / "postgresql-sync.status"
        self._conn: Any = None
        self._caught_up_at = 0.0
        self._last_error = ""
        self._last_prune = 0.0

    # -- leadership ---------------------------------------------------------------------------------------------

    def try_lead(self) -> bool:
        return self.lock.try_acquire(
            lambda: log.info("following PostgreSQL at %s into this host's store", self.source.display)
        )

    def release(self) -> None:
        self._close()
        self.lock.release()

    def _close(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(Exception):  # a broken connection may fail to close; it is dropped anyway
                self._conn.close()
            self._conn = None

    # -- one round: catch up completely ---------------------------------------------------------------------------

    def _connection(self) -> Any:
        import psycopg

        if self._conn is not None and not self._conn.closed:
            return self._conn
        try:
            conn = psycopg.connect(self.source.url, connect_timeout=5, application_name="corsproxy-sync")
        except psycopg.Error as exc:
            raise unavailable(self.source, exc) from None
        try:
            check_schema(conn, self.source, self.config_path)
        except BaseException:
            conn.close()
            raise
        conn.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ
        self._conn = conn
        return conn

    def sync_once(self) -> int:
        """Apply everything PostgreSQL has that this replica lacks; returns the changes (or rows) applied."""
        import psycopg

        try:
            applied = self._catch_up()
            self._caught_up_at = time.time()
            self._maybe_prune()
        except psycopg.Error as exc:
            self._close()
            raise unavailable(self.source, exc) from None
        return applied

    def _catch_up(self) -> int:
        conn = self._connection()
        batch = self.source.batch_size
        applied = 0
        digest = config_digest(self.declared(), self.safety())
        while True:
            state = replica_state(self.store)
            with conn.transaction():
                pruned = int(conn.execute("SELECT pruned_through FROM corsproxy_schema").fetchone()[0])
                reason = ""
                if state.position is None:
                    reason = "this replica is empty"
                elif state.snapshot_pending:
                    reason = "the last snapshot was interrupted"
                elif state.position < pruned:
                    reason = f"its position {state.position} is older than the change log kept ({pruned} pruned)"
                elif self.store.sync_get(_DECLARED) != digest:
                    reason = (
                        "cors.allow_origins or the policies changed (this host's declarations win over the fleet's "
                        "rows, and every row is checked against the policies)"
                    )
                if not reason:
                    rows = conn.execute(
                        "SELECT seq, origin, op, policy, extract(epoch FROM expires), note, actor, "
                        "extract(epoch FROM at) FROM corsproxy_changes WHERE seq > %s ORDER BY seq LIMIT %s",
                        (state.position, batch),
                    ).fetchall()
            if reason:
                applied += self._snapshot(conn, reason, audit=state.position is not None, digest=digest)
                continue
            if not rows:
                return applied
            self._apply_changes(rows)
            applied += len(rows)
            if len(rows) < batch:
                return applied

    def _apply_changes(self, rows: list[tuple[Any, ...]]) -> None:
        safety = self.safety()
        changes: list[tuple[str, OriginRecord | None, str]] = []
        state: dict[bytes, bytes | None] = {}
        refused = 0
        for seq, origin, op, policy, expires, note, actor, _at in rows:
            if op == "delete":
                changes.append((origin, None, actor))
                state[_refused_key(origin)] = None
                continue
            record, why = check_row(origin, policy, _seconds(expires), note, safety)
            if record is None:
                refused += 1
                self._log_refused(origin, why, seq)
                state[_refused_key(origin)] = _refusal(seq, why, policy, actor)
                changes.append((origin, None, actor))  # whatever it replaces: the source no longer asks for it
            else:
                state[_refused_key(origin)] = None
                changes.append((origin, record, actor))
        state[_POSITION] = str(rows[-1][0]).encode()
        self.store.replicate(changes, keep_sources=_KEEP, state=state)
        if refused and self.on_refused is not None:
            self.on_refused(refused)

    def _snapshot(self, conn: Any, reason: str, *, audit: bool, digest: bytes) -> int:
        log.info("copying a snapshot of PostgreSQL at %s: %s", self.source.display, reason)
        started = time.monotonic()
        safety = self.safety()
        chunk = self.source.batch_size
        rows_seen = refused = 0
        with conn.transaction():
            position = int(
                conn.execute(
                    "SELECT greatest((SELECT coalesce(max(seq), 0) FROM corsproxy_changes), "
                    "(SELECT pruned_through FROM corsproxy_schema))"
                ).fetchone()[0]
            )
            # Until the last chunk commits, the store says so: a restart snapshots again instead of following the
            # log from a position the half-copied rows are already past.
            self.store.replicate([], keep_sources=_KEEP, state={_PENDING: b"1"}, clear_prefix=_REFUSED)
            after = ""
            with conn.cursor(name="corsproxy_snapshot") as cursor:
                cursor.itersize = chunk
                cursor.execute(
                    "SELECT origin, policy, extract(epoch FROM expires), note FROM corsproxy_origins ORDER BY origin"
                )
                while True:
                    rows = cursor.fetchmany(chunk)
                    if not rows:
                        break
                    changes: list[tuple[str, OriginRecord | None, str]] = []
                    state: dict[bytes, bytes | None] = {}
                    for origin, policy, expires, note in rows:
                        record, why = check_row(origin, policy, _seconds(expires), note, safety)
                        if record is None:
                            refused += 1
                            self._log_refused(origin, why, position)
                            state[_refused_key(origin)] = _refusal(position, why, policy, "snapshot")
                            changes.append((origin, None, "postgresql:snapshot"))
                        else:
                            changes.append((origin, record, "postgresql:snapshot"))
                    upto = rows[-1][0]
                    self.store.replicate(
                        changes, keep_sources=_KEEP, state=state, remove_between=(after, upto), audit=audit
                    )
                    after = upto
                    rows_seen += len(rows)
            final = {_POSITION: str(position).encode(), _PENDING: None, _DECLARED: digest}
            self.store.replicate([], keep_sources=_KEEP, state=final, remove_between=(after, None), audit=audit)
        if refused and self.on_refused is not None:
            self.on_refused(refused)
        log.info(
            "snapshot applied: %d rows (%d refused) at change log position %d in %.1fs",
            rows_seen,
            refused,
            position,
            time.monotonic() - started,
        )
        return rows_seen

    def _log_refused(self, origin: str, why: str, seq: int) -> None:
        log.error("PostgreSQL row %r (change %d) refused, not applied on this host: %s", origin[:200], seq, why[:500])

    def _maybe_prune(self) -> None:
        """Drop changes older than ``change_retention`` (always keeping the newest, so the position stays known);
        ``pruned_through`` records how far, so a replica further behind knows to copy a snapshot."""
        import psycopg

        retention = self.source.change_retention
        now = time.monotonic()
        if now - self._last_prune < min(60.0, max(retention / 4, 0.5)):
            return
        self._last_prune = now
        conn = self._connection()
        try:
            with conn.transaction():
                conn.execute(
                    "WITH gone AS (DELETE FROM corsproxy_changes WHERE at < now() - make_interval(secs => %s) "
                    "AND seq < (SELECT max(seq) FROM corsproxy_changes) RETURNING seq) "
                    "UPDATE corsproxy_schema SET pruned_through = "
                    "greatest(pruned_through, (SELECT max(seq) FROM gone)) "
                    "WHERE EXISTS (SELECT 1 FROM gone)",
                    (retention,),
                )
        except psycopg.errors.SerializationFailure:
            pass  # another host pruned at the same moment: the work is done

    # -- status, for /readyz, metrics and corsproxy check --------------------------------------------------------

    def write_status(self, connected: bool, error: str = "") -> None:
        state = replica_state(self.store)
        status = {
            "connected": connected,
            "error": error,
            "caught_up_at": self._caught_up_at,
            "position": state.position,
            "pid": os.getpid(),
            "time": time.time(),
        }
        write_status(self.status_path, json.dumps(status))

    # -- the loop -----------------------------------------------------------------------------------------------

    async def run(self) -> None:
        """Lead when possible and follow PostgreSQL until cancelled."""
        try:
            while True:
                if await asyncio.to_thread(self.try_lead):
                    await self._lead()
                await asyncio.sleep(self.source.poll_interval)
        finally:
            await asyncio.to_thread(self.release)

    async def _lead(self) -> None:
        wake = asyncio.Event()
        listener = asyncio.create_task(self._listen(wake))
        backoff = _Backoff()
        try:
            while True:
                wake.clear()
                try:
                    await asyncio.to_thread(self.sync_once)
                except (StoreError, OSError) as exc:
                    kind = "schema" if isinstance(exc, SchemaError) else "sync"
                    if not str(exc).startswith("source of truth unavailable") and kind == "sync":
                        kind = "store"
                    self._error(kind, str(exc))
                    await asyncio.to_thread(self.write_status, False, str(exc))
                    await asyncio.sleep(backoff.next())
                    continue
                except Exception as exc:
                    log.exception("PostgreSQL sync failed; retrying")
                    self._error("sync", f"{type(exc).__name__}: {exc}")
                    await asyncio.sleep(backoff.next())
                    continue
                if self._last_error:
                    log.warning("PostgreSQL at %s reachable again: replica caught up", self.source.display)
                    self._last_error = ""
                backoff.reset()
                await asyncio.to_thread(self.write_status, True)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(wake.wait(), self.source.poll_interval)
        finally:
            listener.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await listener

    def _error(self, kind: str, message: str) -> None:
        if self.on_error is not None:
            self.on_error(kind)
        if message != self._last_error:  # one line per distinct problem, not one per retry
            log.error("%s; serving the last synced origin set, retrying", message)
            self._last_error = message

    async def _listen(self, wake: asyncio.Event) -> None:
        import psycopg

        backoff = _Backoff(0.5)
        while True:
            try:
                conn = await psycopg.AsyncConnection.connect(
                    self.source.url, autocommit=True, connect_timeout=5, application_name="corsproxy-listen"
                )
                async with conn:
                    await conn.execute(f"LISTEN {NOTIFY_CHANNEL}")
                    backoff.reset()
                    wake.set()  # whatever was notified while this connection was down
                    async for _notify in conn.notifies():
                        wake.set()
            except (psycopg.Error, OSError) as exc:
                if self.on_error is not None:
                    self.on_error("listen")
                log.debug(
                    "LISTEN connection to %s lost (%s); polling meanwhile",
                    self.source.display,
                    self.source.scrub(str(exc)),
                )
            await asyncio.sleep(backoff.next())


def _refusal(seq: int, why: str, policy: str | None, actor: str) -> bytes:
    return json.dumps({"seq": seq, "reason": why, "policy": policy, "actor": actor, "time": time.time()}).encode()


# -- its own process ----------------------------------------------------------------------------------------------


class SyncSupervisor:
    """What a serving worker runs in fleet mode: lead the host's syncer (the ``flock``), and run it in a child
    process of its own, restarted when it exits.

    Not in the worker itself: parsing, checking and writing a burst of rows is CPU work, and on the worker's threads
    it would hold the GIL against the event loop (a W1 preflight load fell to 0.44-0.61x while bursts of 10,000
    changes were applied in-process; bursts applied by another replica left it unchanged). The child exits when its
    worker does (it watches its parent), so the lock and the work always go together.
    """

    def __init__(self, config_path: str, store_dir: Path, on_exit: Callable[[int], None] | None = None) -> None:
        self.config_path = config_path
        self.lock = HostLock(store_dir / "postgresql-sync.lock")
        self.on_exit = on_exit

    def try_lead(self) -> bool:
        return self.lock.try_acquire()

    def release(self) -> None:
        self.lock.release()

    async def run(self, poll_interval: float) -> None:
        import sys

        backoff = _Backoff(0.5)
        child: asyncio.subprocess.Process | None = None
        try:
            while True:
                if not await asyncio.to_thread(self.try_lead):
                    await asyncio.sleep(poll_interval)
                    continue
                started = time.monotonic()
                child = await asyncio.create_subprocess_exec(
                    sys.executable, "-m", "corsproxy.origins.sync", "--config", self.config_path, "--parent",
                    str(os.getpid()),
                )  # fmt: skip
                code = await child.wait()
                child = None
                if self.on_exit is not None:
                    self.on_exit(code)
                log.warning("the PostgreSQL syncer process exited with %s; starting it again", code)
                if time.monotonic() - started > 30:
                    backoff.reset()
                await asyncio.sleep(backoff.next())
        finally:
            if child is not None and child.returncode is None:
                child.terminate()
                try:
                    await asyncio.wait_for(child.wait(), 10)
                except TimeoutError:
                    child.kill()
                    await child.wait()
            self.release()


def main(argv: list[str] | None = None) -> int:
    """The syncer process: ``python -m corsproxy.origins.sync --config FILE --parent PID``."""
    import argparse
    import logging.config

    from corsproxy.config import load_config
    from corsproxy.ops.request_log import log_dict_config

    parser = argparse.ArgumentParser(prog="corsproxy-sync")
    parser.add_argument("--config", required=True)
    parser.add_argument("--parent", type=int, required=True)
    args = parser.parse_args(argv)
    config = load_config(args.config)
    logging.config.dictConfig(log_dict_config(config.logging))
    # Background work: where cores are scarce, the serving workers come first (a burst applies a little later).
    with contextlib.suppress(OSError):
        os.nice(10)
    source = config.store.postgresql
    if source is None:
        log.error("%s no longer sets store.postgresql: the syncer stops", config.source)
        return 0
    from corsproxy.ops.metrics import Metrics

    metrics = Metrics()
    store = OriginStore(
        config.store.path, map_size=config.store.map_size_mb << 20, audit_retention=config.store.audit_retention
    )
    syncer = PostgresSyncer(
        source,
        store,
        lambda: config.safety,
        lambda: config.origins,
        config.source,
        on_error=lambda kind: metrics.sync_errors.labels(kind).inc(),
        on_refused=metrics.sync_rows_refused.inc,
    )
    syncer.lock.held_by_parent()

    async def follow() -> None:
        stop = asyncio.Event()
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
        task = asyncio.create_task(syncer._lead())
        # Ends with the worker that leads it (a SIGKILLed worker included: its child is re-parented).
        while os.getppid() == args.parent and not task.done() and not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 0.2)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    try:
        asyncio.run(follow())
    finally:
        syncer.release()
        store.close()
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(main())
