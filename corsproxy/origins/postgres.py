"""Fleet mode's source of truth: the origin set in PostgreSQL, its schema, and the write path into it.

corsproxy owns the schema (``corsproxy db migrate`` creates and upgrades it; ``serve`` refuses a version it does not
know). The contract for the operator's own application is the table ``corsproxy_origins`` (``origin`` in canonical
form, ``policy``, ``expires``, ``note``), writable with plain SQL. A trigger records every row change in
``corsproxy_changes`` in the same transaction, with a sequence number and the actor (``SET LOCAL corsproxy.actor``,
else ``sql:<role>``), and wakes the replicas with ``NOTIFY corsproxy_changes``.

Why no change is ever skipped: a replica reads ``WHERE seq > position``, which is only safe if sequence numbers
become visible in order. Two concurrent transactions could otherwise commit 6 before 5, and a reader between the two
commits would move past 5 for good. So every writer takes one transaction-scoped advisory lock before it touches a
row (a statement-level BEFORE trigger, and this module's own writes explicitly), and draws its sequence numbers
after it: transactions that write the table commit one after another, in sequence order. Rolled-back writers leave
gaps, which are harmless (the reader never expects numbers to be contiguous).

Every write corsproxy makes here goes through :mod:`corsproxy.origins.writes` (one ownership and validation rule),
with :class:`PostgresOrigins` in the store's place; replicas apply the rows with :mod:`corsproxy.origins.sync`,
which checks each one again with the same parser and safety rules (plain SQL bypasses this module).

Imports psycopg (the sync API here; the syncer uses its async API for ``LISTEN``); must not import aiohttp.
psycopg 3 rather than asyncpg: libpq's own handling of URLs, ``PGPASSWORD``, ``PGPASSFILE`` and service files (the
operator's usual ways to keep the password out of the config), and one driver for the CLI's sync code and the
syncer's async ``LISTEN``.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Callable, Collection, Iterable, Mapping
from typing import Any

from corsproxy.core.problems import Problem
from corsproxy.core.settings import ConfiguredOrigin, PostgresSource
from corsproxy.store import Finish, Guard, OriginRecord, Resolve, StoreError

__all__ = [
    "ADVISORY_LOCK",
    "NOTIFY_CHANNEL",
    "SCHEMA_VERSION",
    "PostgresOrigins",
    "SchemaError",
    "SourceUnavailable",
    "connect",
    "migrate",
    "schema_version",
]

log = logging.getLogger("corsproxy.postgresql")

SCHEMA_VERSION = 1
#: The advisory lock key every writer of corsproxy_origins holds until it commits ("corsprox" in ASCII).
ADVISORY_LOCK = 0x636F7273_70726F78 - (1 << 63)
NOTIFY_CHANNEL = "corsproxy_changes"
#: The owner of the entries a replica copies from PostgreSQL (what the store records as ``source``).
SOURCE = "postgresql"

_SCHEMA_V1 = f"""
CREATE TABLE corsproxy_schema (
    singleton boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    version integer NOT NULL,
    pruned_through bigint NOT NULL DEFAULT 0
);
INSERT INTO corsproxy_schema (version) VALUES (1);

CREATE TABLE corsproxy_origins (
    origin text COLLATE "C" PRIMARY KEY,
    policy text NOT NULL DEFAULT 'default',
    expires timestamptz,
    note text NOT NULL DEFAULT '',
    updated_at timestamptz NOT NULL DEFAULT now()
);
COMMENT ON TABLE corsproxy_origins IS
    'Origins every corsproxy replica allows. Plain SQL INSERT/UPDATE/DELETE is supported; origin must be canonical '
    '(lowercase, punycode, no default port), policy a policy name from the corsproxy config. TRUNCATE is refused.';

CREATE TABLE corsproxy_changes (
    seq bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    origin text COLLATE "C" NOT NULL,
    op text NOT NULL CHECK (op IN ('upsert', 'delete')),
    policy text,
    expires timestamptz,
    note text,
    actor text NOT NULL,
    at timestamptz NOT NULL DEFAULT clock_timestamp()
);
CREATE INDEX corsproxy_changes_at ON corsproxy_changes (at);

CREATE FUNCTION corsproxy_serialise_writers() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    -- Held to commit: writers commit in the order of the sequence numbers they draw (see corsproxy's docs).
    PERFORM pg_advisory_xact_lock({ADVISORY_LOCK});
    RETURN NULL;
END $$;

CREATE FUNCTION corsproxy_log_change() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    who text := coalesce(nullif(current_setting('corsproxy.actor', true), ''), 'sql:' || session_user);
BEGIN
    IF TG_OP = 'DELETE' OR (TG_OP = 'UPDATE' AND OLD.origin IS DISTINCT FROM NEW.origin) THEN
        INSERT INTO corsproxy_changes (origin, op, actor) VALUES (OLD.origin, 'delete', who);
    END IF;
    IF TG_OP <> 'DELETE' THEN
        INSERT INTO corsproxy_changes (origin, op, policy, expires, note, actor)
        VALUES (NEW.origin, 'upsert', NEW.policy, NEW.expires, NEW.note, who);
    END IF;
    PERFORM pg_notify('{NOTIFY_CHANNEL}', '');  -- one notification per transaction: identical ones are merged
    RETURN NULL;
END $$;

CREATE FUNCTION corsproxy_refuse_truncate() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'TRUNCATE corsproxy_origins would bypass the change log the corsproxy replicas follow'
        USING HINT = 'use DELETE FROM corsproxy_origins';
END $$;

CREATE TRIGGER corsproxy_origins_serialise BEFORE INSERT OR UPDATE OR DELETE ON corsproxy_origins
    FOR EACH STATEMENT EXECUTE FUNCTION corsproxy_serialise_writers();
CREATE TRIGGER corsproxy_origins_log AFTER INSERT OR UPDATE OR DELETE ON corsproxy_origins
    FOR EACH ROW EXECUTE FUNCTION corsproxy_log_change();
CREATE TRIGGER corsproxy_origins_no_truncate BEFORE TRUNCATE ON corsproxy_origins
    FOR EACH STATEMENT EXECUTE FUNCTION corsproxy_refuse_truncate();
-- Also under session_replication_role = replica (a logical-replication apply worker, a data restore), which skips
-- ordinary triggers: a change made there must reach the replicas like any other.
ALTER TABLE corsproxy_origins ENABLE ALWAYS TRIGGER corsproxy_origins_serialise;
ALTER TABLE corsproxy_origins ENABLE ALWAYS TRIGGER corsproxy_origins_log;
ALTER TABLE corsproxy_origins ENABLE ALWAYS TRIGGER corsproxy_origins_no_truncate;
"""

#: Upgrades: MIGRATIONS[n] takes a schema at version n to n + 1 (version 0: no schema yet).
MIGRATIONS: dict[int, str] = {0: _SCHEMA_V1}


class SourceUnavailable(StoreError):
    """PostgreSQL cannot be reached: nothing was written anywhere (never a write to the local store only)."""

    reason = "source_of_truth_unavailable"


class SchemaError(StoreError):
    """The database has no corsproxy schema, or one of a version this corsproxy does not know."""

    reason = "schema"

    def problem(self) -> Problem:
        """How a config check reports it: at ``store.postgresql``, naming the command that fixes it."""
        return Problem("store.postgresql", "postgresql", "postgresql_schema", str(self))


def _psycopg() -> Any:
    try:
        import psycopg
    except ImportError:  # pragma: no cover - the package depends on it
        raise StoreError("store.postgresql needs the psycopg package: pip install 'psycopg[binary]'") from None
    return psycopg


def connect(source: PostgresSource, *, application_name: str = "corsproxy", timeout: float = 5.0) -> Any:
    """A psycopg connection (autocommit off), or :class:`SourceUnavailable` naming the redacted URL."""
    psycopg = _psycopg()
    try:
        return psycopg.connect(source.url, connect_timeout=max(1, int(timeout)), application_name=application_name)
    except psycopg.Error as exc:
        raise unavailable(source, exc) from None


def unavailable(source: PostgresSource, exc: BaseException) -> SourceUnavailable:
    # libpq's messages name host and port, and the URL is shown redacted; but libpq quotes a token it cannot parse,
    # which can be the password itself (a bad percent escape in it), so the message is scrubbed of it too.
    detail = source.scrub(" ".join(str(exc).split())) or type(exc).__name__
    return SourceUnavailable(f"source of truth unavailable: PostgreSQL at {source.display}: {detail}")


def schema_version(conn: Any) -> int:
    """The schema's version; 0 when the database has none."""
    with conn.transaction():
        found = conn.execute("SELECT to_regclass('corsproxy_schema') IS NOT NULL").fetchone()
        if not found[0]:
            return 0
        row = conn.execute("SELECT version FROM corsproxy_schema").fetchone()
    return 0 if row is None else int(row[0])


def checked_source(source: PostgresSource, config_path: str, application_name: str) -> SourceUnavailable | None:
    """Refuse (:class:`SchemaError`) a database whose schema this corsproxy does not know; PostgreSQL being
    unreachable is returned, not raised: a replica serves and reports what it last synced."""
    try:
        with connect(source, application_name=application_name) as conn:
            check_schema(conn, source, config_path)
    except SourceUnavailable as exc:
        return exc
    return None


def check_schema(conn: Any, source: PostgresSource, config_path: str) -> None:
    """Refuse a database without this corsproxy's schema, saying which command fixes it."""
    version = schema_version(conn)
    if version == SCHEMA_VERSION:
        return
    command = f"corsproxy db migrate --config {config_path}"
    if version == 0:
        raise SchemaError(f"PostgreSQL at {source.display} has no corsproxy schema: run `{command}` first")
    if version < SCHEMA_VERSION:
        raise SchemaError(
            f"PostgreSQL at {source.display} has corsproxy schema version {version}, this corsproxy needs "
            f"{SCHEMA_VERSION}: run `{command}`"
        )
    raise SchemaError(
        f"PostgreSQL at {source.display} has corsproxy schema version {version}, newer than this corsproxy knows "
        f"({SCHEMA_VERSION}): upgrade corsproxy on this host"
    )


def migrate(source: PostgresSource) -> tuple[int, int]:
    """Create or upgrade the schema, one transaction per step; idempotent. Returns (version before, after)."""
    psycopg = _psycopg()
    with connect(source, application_name="corsproxy-migrate") as conn:
        try:
            with conn.transaction():
                # Two migrations started at once: the second waits, then finds the work done.
                conn.execute("SELECT pg_advisory_xact_lock(%s)", (ADVISORY_LOCK + 1,))
                before = current = _version_in(conn)
                if current > SCHEMA_VERSION:
                    raise SchemaError(
                        f"PostgreSQL at {source.display} has corsproxy schema version {current}, newer than this "
                        f"corsproxy knows ({SCHEMA_VERSION}): upgrade corsproxy"
                    )
                while current < SCHEMA_VERSION:
                    conn.execute(MIGRATIONS[current])
                    current += 1
                    conn.execute("UPDATE corsproxy_schema SET version = %s", (current,))
        except psycopg.OperationalError as exc:
            raise unavailable(source, exc) from None
    return before, current


def _version_in(conn: Any) -> int:
    if not conn.execute("SELECT to_regclass('corsproxy_schema') IS NOT NULL").fetchone()[0]:
        return 0
    row = conn.execute("SELECT version FROM corsproxy_schema").fetchone()
    return 0 if row is None else int(row[0])


def _timestamp(value: float | None) -> dt.datetime | None:
    return None if value is None else dt.datetime.fromtimestamp(value, dt.UTC)


class PostgresOrigins:
    """The fleet's origin set, in the store's place for :mod:`corsproxy.origins.writes` (``apply``, ``remove``,
    ``prune_expired``, same contracts): each call is one PostgreSQL transaction, recorded with ``actor``.

    ``declared`` is this host's ``cors.allow_origins``: those entries are shown to the write service as owned by
    ``config`` (so an operator write to one is refused, as without a fleet), since this host's config wins over
    the fleet's row for them. ``last_seq`` is the change log position of the last write, for read-your-write.
    """

    def __init__(self, source: PostgresSource, declared: Mapping[str, ConfiguredOrigin] | None = None) -> None:
        self.source = source
        self.declared = {
            key: OriginRecord(e.policy, e.expires, "config", 0.0, e.note) for key, e in (declared or {}).items()
        }
        self.last_seq = 0
        self.written: dict[str, OriginRecord | None] = {}

    def _run(self, actor: str, work: Callable[[Any], Any]) -> Any:
        """``work(conn)`` in one transaction holding the writers' lock, as ``actor``; ``last_seq`` set after."""
        psycopg = _psycopg()
        try:
            with connect(self.source, application_name="corsproxy-write") as conn:
                with conn.transaction():
                    conn.execute("SELECT pg_advisory_xact_lock(%s)", (ADVISORY_LOCK,))
                    conn.execute("SELECT set_config('corsproxy.actor', %s, true)", (actor,))
                    result = work(conn)
                    row = conn.execute("SELECT coalesce(max(seq), 0) FROM corsproxy_changes").fetchone()
                    seq = int(row[0])
                self.last_seq = seq
                return result
        except psycopg.errors.UndefinedTable:
            raise SchemaError(
                f"PostgreSQL at {self.source.display} has no corsproxy schema: run `corsproxy db migrate --config "
                "FILE` first"
            ) from None
        except psycopg.OperationalError as exc:
            raise unavailable(self.source, exc) from None

    @staticmethod
    def _rows(conn: Any, keys: Collection[str]) -> dict[str, OriginRecord]:
        rows = conn.execute(
            "SELECT origin, policy, extract(epoch FROM expires), note, extract(epoch FROM updated_at) "
            "FROM corsproxy_origins "
            "WHERE origin = ANY(%s) FOR UPDATE",
            (list(keys),),
        ).fetchall()
        # expires read as a number: psycopg cannot load infinity or a year past 9999 (plain SQL can write both)
        # as a datetime, and the row must stay replaceable through the write path.
        return {
            o: OriginRecord(p, None if e is None else float(e), SOURCE, float(u), n or "") for o, p, e, n, u in rows
        }

    def apply(self, keys: Iterable[str], resolve: Resolve, actor: str, finish: Finish | None = None) -> tuple[int, int]:
        wanted = list(keys)

        def work(conn: Any) -> tuple[int, int]:
            stored = self._rows(conn, wanted)
            added = replaced = 0
            writes: list[tuple[str, OriginRecord]] = []
            for key in wanted:
                current = self.declared.get(key) or stored.get(key)
                record = resolve(key, current)
                if record is None:
                    continue
                writes.append((key, record))
                if key in stored:
                    replaced += 1
                else:
                    added += 1
            if finish is not None:
                finish()  # may raise: the transaction rolls back
            with conn.cursor() as cur:
                cur.executemany(
                    "INSERT INTO corsproxy_origins (origin, policy, expires, note) VALUES (%s, %s, %s, %s) "
                    "ON CONFLICT (origin) DO UPDATE SET policy = excluded.policy, expires = excluded.expires, "
                    "note = excluded.note, updated_at = now()",
                    [(key, r.policy, _timestamp(r.expires), r.note) for key, r in writes],
                )
            self.written = dict(writes)
            return added, replaced

        result: tuple[int, int] = self._run(actor, work)
        return result

    def remove(self, key: str, actor: str, action: str = "remove", guard: Guard | None = None) -> OriginRecord | None:
        def work(conn: Any) -> OriginRecord | None:
            current = self.declared.get(key) or self._rows(conn, [key]).get(key)
            if current is not None and guard is not None:
                guard(current)
            if current is None or current.source != SOURCE:
                return None
            conn.execute("DELETE FROM corsproxy_origins WHERE origin = %s", (key,))
            self.written = {key: None}
            return current

        result: OriginRecord | None = self._run(actor, work)
        return result

    def prune_expired(self, now: float, actor: str, keep_sources: Collection[str] = ()) -> list[str]:
        def work(conn: Any) -> list[str]:
            rows = conn.execute(
                "DELETE FROM corsproxy_origins WHERE expires <= %s AND NOT (origin = ANY(%s)) RETURNING origin",
                (_timestamp(now), list(self.declared) if "config" in keep_sources else []),
            ).fetchall()
            self.written = {row[0]: None for row in rows}
            return sorted(row[0] for row in rows)

        result: list[str] = self._run(actor, work)
        return result
