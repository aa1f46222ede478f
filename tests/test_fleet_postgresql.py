"""Fleet mode against a real PostgreSQL server: ``corsproxy db migrate``, replicas (real ``corsproxy serve``
processes, each with its own LMDB directory) following the change log, plain-SQL writes, refused rows, crashes,
dropped notifications, an outage of PostgreSQL, a replica beyond the log's retention, concurrent writers.

Without PostgreSQL installed these tests skip with one reason line (they fail under CORSPROXY_REQUIRE_POSTGRESQL=1).
"""

from __future__ import annotations

import json
import os
import signal
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from corsproxy.store import OriginStore
from tests.support.config import run_cli
from tests.support.net import free_port, wait_until
from tests.support.postgres import PostgresCluster, start_cluster
from tests.support.serve import Server, origin_path, scrape, value
from tests.support.upstream import ThreadedUpstream

pytestmark = pytest.mark.filterwarnings("error")


@pytest.fixture(scope="session")
def pg_cluster() -> Iterator[PostgresCluster]:
    cluster = start_cluster()
    yield cluster
    cluster.destroy()


@pytest.fixture
def pg_url(pg_cluster: PostgresCluster, tmp_path: Path) -> str:
    """A fresh, migrated database (through the real CLI)."""
    url = pg_cluster.database()
    config = tmp_path / "migrate.yaml"
    config.write_text(f"upstream: {{url: 'http://127.0.0.1:9'}}\nstore: {{postgresql: '{url}'}}\n")
    done = run_cli("db", "migrate", "--config", str(config))
    assert done.returncode == 0, done.stderr
    return url


def sql(url: str, statement: str, params: Any = None) -> list[tuple[Any, ...]]:
    import psycopg

    with psycopg.connect(url, autocommit=True) as conn:
        cur = conn.execute(statement, params)
        return cur.fetchall() if cur.description else []


def replica(tmp: Path, name: str, upstream: ThreadedUpstream, url: str, workers: int = 2, **pg: Any) -> Server:
    directory = tmp / name
    directory.mkdir()
    return Server(
        directory,
        upstream.port,
        workers=workers,
        store={"postgresql": {"url": url, "poll_interval": 0.2, **pg}},
    )


def preflight(server: Server, origin: str) -> str | None:
    response = server.proxy("OPTIONS", "/anything", headers={"Origin": origin, "Access-Control-Request-Method": "GET"})
    return response.headers.get("Access-Control-Allow-Origin")


def allowed(server: Server, origin: str) -> bool:
    return preflight(server, origin) == origin


def eventually(server: Server, origin: str, yes: bool = True, timeout: float = 30.0) -> None:
    """Wait (bounded) until ``server`` allows ``origin`` (or, ``yes=False``, refuses it)."""
    wait_until(lambda: allowed(server, origin) == yes, timeout, what=f"{origin} {'allowed' if yes else 'refused'}")


def wait_ready(server: Server, timeout: float = 30.0) -> None:
    wait_until(lambda: server.admin("GET", "/readyz", token=None).status == 200, timeout, what="replica ready")


def position(server: Server) -> int:
    with OriginStore(server.tmp / "origins.lmdb", readonly=True) as store:
        raw = store.sync_get(b"position")
    return 0 if raw is None else int(raw)


# -- schema -------------------------------------------------------------------------------------------------------


def test_serve_refuses_a_database_without_the_schema_and_migrate_is_idempotent(
    tmp_path: Path, pg_cluster: PostgresCluster, upstream_thread: ThreadedUpstream
) -> None:
    url = pg_cluster.database()
    server = replica(tmp_path, "a", upstream_thread, url)
    server.start(wait=False)
    assert server.proc is not None
    server.proc.wait(30)
    assert server.stop() != 0
    log = server.log_text()
    assert "no corsproxy schema" in log and f"corsproxy db migrate --config {server.config_path}" in log
    first = run_cli("db", "migrate", "--config", str(server.config_path))
    assert first.returncode == 0, first.stderr
    assert "from version 0 to 1" in first.stdout
    again = run_cli("db", "migrate", "--config", str(server.config_path))
    assert again.returncode == 0 and "nothing to do" in again.stdout
    server.proc = None
    with server:
        wait_ready(server)


# -- propagation --------------------------------------------------------------------------------------------------


def test_an_admin_write_on_one_replica_reaches_the_two_others(
    tmp_path: Path, pg_url: str, upstream_thread: ThreadedUpstream
) -> None:
    a, b, c = (replica(tmp_path, name, upstream_thread, pg_url) for name in "abc")
    with a, b, c:
        for server in (a, b, c):
            wait_ready(server)
        origin = "https://tenant-1.customer.test"
        assert not allowed(b, origin)
        put = a.admin("PUT", origin_path(origin), body={"note": "tenant 1"})
        assert put.status == 201, put.body
        assert put.json()["source"] == "postgresql"
        assert allowed(a, origin)  # read-your-write on the replica that took the write, at once
        for server in (b, c):
            eventually(server, origin)
        # A removal through another replica, the same way back.
        assert b.admin("DELETE", origin_path(origin)).status == 200
        assert not allowed(b, origin)
        for server in (a, c):
            eventually(server, origin, yes=False)
        # Every replica's audit trail names the writer, whichever replica it wrote through.
        events = c.admin("GET", f"/audit?origin={origin}").json()["events"]
        assert [(e["action"], e["actor"]) for e in events] == [("add", "admin:admin"), ("remove", "admin:admin")]
        rows = sql(pg_url, "SELECT op, actor FROM corsproxy_changes ORDER BY seq")
        assert rows == [("upsert", "admin:admin"), ("delete", "admin:admin")]


def test_a_cli_write_goes_to_postgresql_and_reaches_the_replica(
    tmp_path: Path, pg_url: str, upstream_thread: ThreadedUpstream
) -> None:
    a = replica(tmp_path, "a", upstream_thread, pg_url)
    with a:
        wait_ready(a)
        origin = "https://cli.customer.test"
        done = run_cli("origins", "add", origin, "--config", str(a.config_path))
        assert done.returncode == 0, done.stderr
        assert sql(pg_url, "SELECT origin, policy FROM corsproxy_origins") == [(origin, "default")]
        wait_until(lambda: allowed(a, origin), 30, what="the CLI write to reach the replica")
        # A YAML-declared origin is this host's: the fleet write is refused, as without a fleet.
        declared = run_cli("origins", "add", "https://app.example.com", "--config", str(a.config_path))
        assert declared.returncode != 0 and "cors.allow_origins" in declared.stderr
        removed = run_cli("origins", "remove", origin, "--config", str(a.config_path))
        assert removed.returncode == 0, removed.stderr
        wait_until(lambda: not allowed(a, origin), 30, what="the CLI removal to reach the replica")


def test_plain_sql_rows_are_honoured_and_unsafe_ones_refused_and_reported(
    tmp_path: Path, pg_url: str, upstream_thread: ThreadedUpstream
) -> None:
    # Rows already there when the replica starts (its cold start copies a snapshot) ...
    sql(pg_url, "INSERT INTO corsproxy_origins (origin) VALUES ('https://before.customer.test')")
    bad = {
        "*": "credentials",  # "*" under a credentialed policy
        "null": "null",
        "https://*.com": "public suffix",
        "^https://.*\\.customer\\.test$": "",
        "https://Upper.customer.test": "canonical",
    }
    for origin in bad:
        sql(pg_url, "INSERT INTO corsproxy_origins (origin) VALUES (%s)", (origin,))
    a = replica(tmp_path, "a", upstream_thread, pg_url, workers=1)
    with a:
        wait_ready(a)
        assert allowed(a, "https://before.customer.test")
        # ... and rows written afterwards, through the change log.
        sql(pg_url, "INSERT INTO corsproxy_origins (origin, note) VALUES ('https://after.customer.test', 'sql')")
        sql(pg_url, "INSERT INTO corsproxy_origins (origin, policy) VALUES ('https://typo.customer.test', 'nope')")
        wait_until(lambda: allowed(a, "https://after.customer.test"), 30, what="a plain-SQL insert to apply")
        assert not allowed(a, "https://typo.customer.test")
        assert not allowed(a, "https://evil.com")
        assert preflight(a, "null") is None
        assert preflight(a, "https://anyone.test") is None
        assert not allowed(a, "https://upper.customer.test")
        # The typo row is a later change than the one waited for: wait for its refusal to be counted too.
        wait_until(
            lambda: value(scrape(a), "corsproxy_sync_rows_refused_total") == len(bad) + 1, 30, what="refusals counted"
        )
        samples = scrape(a)
        assert value(samples, "corsproxy_sync_rows_refused_total") == len(bad) + 1
        assert value(samples, "corsproxy_sync_position") >= 1
        events = a.admin("GET", "/audit?origin=https://after.customer.test").json()["events"]
        assert [e["actor"] for e in events] == ["sql:postgres"]
        checked = run_cli("check", "--config", str(a.config_path))
        assert checked.returncode == 0, checked.stderr
        for origin in [*bad, "https://typo.customer.test"]:
            assert f"PostgreSQL row {origin!r} refused" in checked.stderr, checked.stderr
        assert "unknown policy 'nope'" in checked.stderr
        assert "write it as 'https://upper.customer.test'" in checked.stderr
        # A plain-SQL delete revokes; fixing a refused row applies it (and it is no longer listed).
        sql(pg_url, "DELETE FROM corsproxy_origins WHERE origin = 'https://before.customer.test'")
        sql(pg_url, "UPDATE corsproxy_origins SET policy = 'default' WHERE origin = 'https://typo.customer.test'")
        wait_until(lambda: allowed(a, "https://typo.customer.test"), 30, what="the fixed row to apply")
        wait_until(lambda: not allowed(a, "https://before.customer.test"), 30, what="the delete to apply")
        checked = run_cli("check", "--config", str(a.config_path))
        assert "typo.customer.test" not in checked.stderr
        # TRUNCATE would bypass the change log: refused by the schema.
        import psycopg

        with pytest.raises(psycopg.errors.RaiseException, match="DELETE FROM corsproxy_origins"):
            sql(pg_url, "TRUNCATE corsproxy_origins")


# -- crashes, lost notifications, outages -------------------------------------------------------------------------


def test_a_replica_killed_mid_batch_resumes_with_nothing_lost_or_doubled(
    tmp_path: Path, pg_url: str, upstream_thread: ThreadedUpstream
) -> None:
    total = 6000
    a = replica(tmp_path, "a", upstream_thread, pg_url, workers=1, batch_size=20)
    with a:
        wait_ready(a)  # synced (empty): what follows arrives through the change log, in batches
        sql(
            pg_url,
            "INSERT INTO corsproxy_origins (origin) SELECT 'https://t' || i || '.customer.test' "
            "FROM generate_series(1, %s) AS i",
            (total,),
        )
        last = sql(pg_url, "SELECT max(seq) FROM corsproxy_changes")[0][0]
        wait_until(lambda: position(a) > 0, 30, interval=0.005, what="the replica to start applying")
        killed_at = position(a)
        syncer = json.loads((a.tmp / "origins.lmdb" / "postgresql-sync.status").read_text())["pid"]
        os.kill(syncer, signal.SIGKILL)  # the process applying the batches
        assert killed_at < last, "the replica finished before it could be killed mid-way: use more rows"
        # Its worker starts it again; it resumes from the committed position.
        wait_until(lambda: position(a) == last, 60, what="the replica to resume and finish")
        with OriginStore(a.tmp / "origins.lmdb", readonly=True) as store:
            keys = {key for key, record in store.iter_all() if record.source == "postgresql"}
            adds = [e for e in store.history(limit=10 * total) if e.action == "add" and e.actor == "sql:postgres"]
        assert keys == {f"https://t{i}.customer.test" for i in range(1, total + 1)}
        assert len(adds) == total  # each change applied exactly once
        assert len({e.origin for e in adds}) == total
        # The worker leading the syncer killed too: its syncer process goes with it, and a new worker's takes over.
        status = a.tmp / "origins.lmdb" / "postgresql-sync.status"
        syncer = json.loads(status.read_text())["pid"]
        os.kill(max(a.booted_pids()), signal.SIGKILL)
        wait_until(lambda: not Path(f"/proc/{syncer}").exists(), 30, what="the orphaned syncer process to exit")
        sql(pg_url, "INSERT INTO corsproxy_origins (origin) VALUES ('https://later.customer.test')")
        eventually(a, "https://later.customer.test")
        assert json.loads(status.read_text())["pid"] != syncer


def test_notifications_lost_with_the_listener_connection_still_converge_by_polling(
    tmp_path: Path, pg_url: str, upstream_thread: ThreadedUpstream
) -> None:
    a = replica(tmp_path, "a", upstream_thread, pg_url, workers=1)
    with a:
        wait_ready(a)
        stop = threading.Event()

        def kill_listeners() -> None:
            while not stop.is_set():
                sql(
                    pg_url,
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                    "WHERE application_name = 'corsproxy-listen' AND datname = current_database()",
                )
                stop.wait(0.02)

        killer = threading.Thread(target=kill_listeners)
        killer.start()
        try:
            for i in range(20):
                sql(pg_url, "INSERT INTO corsproxy_origins (origin) VALUES (%s)", (f"https://p{i}.customer.test",))
            wait_until(lambda: all(allowed(a, f"https://p{i}.customer.test") for i in range(20)), 30, what="poll")
        finally:
            stop.set()
            killer.join()
        samples = scrape(a)
        assert value(samples, "corsproxy_sync_errors_total", kind="listen") >= 1


def test_postgresql_down_keeps_serving_and_ready_refuses_writes_then_catches_up(
    tmp_path: Path, pg_cluster: PostgresCluster, pg_url: str, upstream_thread: ThreadedUpstream
) -> None:
    a = replica(tmp_path, "a", upstream_thread, pg_url)
    b = replica(tmp_path, "b", upstream_thread, pg_url)
    sql(pg_url, "INSERT INTO corsproxy_origins (origin) VALUES ('https://kept.customer.test')")
    with a, b:
        wait_ready(a)
        wait_ready(b)
        wait_until(lambda: allowed(b, "https://kept.customer.test"), 30, what="the first row")
        pg_cluster.stop()
        try:
            failures = 0
            for _ in range(100):
                for server in (a, b):
                    response = server.proxy(
                        "OPTIONS",
                        "/x",
                        headers={"Origin": "https://kept.customer.test", "Access-Control-Request-Method": "GET"},
                    )
                    failures += response.headers.get("Access-Control-Allow-Origin") != "https://kept.customer.test"
                    failures += (
                        server.proxy("GET", "/echo", headers={"Origin": "https://kept.customer.test"}).status != 200
                    )
            assert failures == 0
            for server in (a, b):
                ready = server.admin("GET", "/readyz", token=None)
                assert ready.status == 200, ready.body
            put = a.admin("PUT", origin_path("https://new.customer.test"), body={})
            assert put.status == 503, put.body
            assert put.json()["error"] == "source of truth unavailable"
            assert "postgres@127.0.0.1" in put.json()["reason"]
            assert not allowed(a, "https://new.customer.test")  # never a local-only write
            cli = run_cli("origins", "add", "https://new.customer.test", "--config", str(b.config_path))
            assert cli.returncode != 0 and "source of truth unavailable" in cli.stderr
            wait_until(
                lambda: value(scrape(a), "corsproxy_sync_errors_total", kind="sync") >= 1, 30, what="errors counted"
            )
        finally:
            pg_cluster.start()
        sql(pg_url, "INSERT INTO corsproxy_origins (origin) VALUES ('https://after-outage.customer.test')")
        for server in (a, b):
            eventually(server, "https://after-outage.customer.test", timeout=60)
        assert a.admin("PUT", origin_path("https://new.customer.test"), body={}).status == 201


def test_a_replica_beyond_the_change_log_retention_copies_a_snapshot(
    tmp_path: Path, pg_url: str, upstream_thread: ThreadedUpstream, request: pytest.FixtureRequest
) -> None:
    a = replica(tmp_path, "a", upstream_thread, pg_url, workers=1, change_retention="1s")
    b = replica(tmp_path, "b", upstream_thread, pg_url, workers=1, change_retention="1s")
    sql(pg_url, "INSERT INTO corsproxy_origins (origin) VALUES ('https://old.customer.test')")
    with a:
        b.start()
        request.addfinalizer(b.stop)  # whichever run of B is up then, even when an assertion fails
        wait_ready(b)
        assert allowed(b, "https://old.customer.test")
        b.stop()
        behind = position(b)
        sql(pg_url, "DELETE FROM corsproxy_origins WHERE origin = 'https://old.customer.test'")
        sql(pg_url, "INSERT INTO corsproxy_origins (origin) VALUES ('https://new.customer.test')")

        def pruned_past_b() -> bool:
            sql(pg_url, "INSERT INTO corsproxy_origins (origin) VALUES ('https://tick.customer.test') "
                "ON CONFLICT (origin) DO UPDATE SET note = now()::text")  # fmt: skip
            return int(sql(pg_url, "SELECT pruned_through FROM corsproxy_schema")[0][0]) > behind + 2

        wait_until(pruned_past_b, 30, interval=0.3, what="replica A to prune the change log past B's position")
        b.proc = None
        b.start()
        assert b.log_text().count("snapshot applied") == 1  # its cold start
        wait_until(lambda: b.log_text().count("snapshot applied") == 2, 30, what="B to copy a snapshot again")
        assert "older than the change log kept" in b.log_text()
        wait_ready(b)
        assert allowed(b, "https://new.customer.test")
        assert not allowed(b, "https://old.customer.test")


def test_concurrent_writers_never_make_a_replica_skip_a_change(
    tmp_path: Path, pg_url: str, upstream_thread: ThreadedUpstream
) -> None:
    import psycopg

    a = replica(tmp_path, "a", upstream_thread, pg_url, workers=1, poll_interval=0.05)
    with a:
        wait_ready(a)
        # The race made deterministic: a writer that drew its sequence number first commits last.
        first = psycopg.connect(pg_url)
        first.execute("INSERT INTO corsproxy_origins (origin) VALUES ('https://slow.customer.test')")
        done = threading.Event()

        def second_writer() -> None:
            sql(pg_url, "INSERT INTO corsproxy_origins (origin) VALUES ('https://fast.customer.test')")
            done.set()

        thread = threading.Thread(target=second_writer)
        thread.start()

        def second_waits_or_applied() -> bool:
            waiting = sql(
                pg_url,
                "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND datname = current_database()",
            )[0][0]
            return bool(waiting) or (done.is_set() and allowed(a, "https://fast.customer.test"))

        wait_until(second_waits_or_applied, 30, what="the second writer to wait, or to be applied")
        first.commit()
        first.close()
        thread.join(30)
        wait_until(lambda: allowed(a, "https://slow.customer.test"), 30, what="the first writer's change")
        assert allowed(a, "https://fast.customer.test")

        # And many writers at once, each in its own transactions.
        def writer(n: int) -> None:
            with psycopg.connect(pg_url, autocommit=True) as conn:
                for i in range(60):
                    conn.execute("INSERT INTO corsproxy_origins (origin) VALUES (%s)", (f"https://w{n}-{i}.test",))

        threads = [threading.Thread(target=writer, args=(n,)) for n in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        last = sql(pg_url, "SELECT max(seq) FROM corsproxy_changes")[0][0]
        wait_until(lambda: position(a) == last, 30, what="the replica to reach the last change")
        with OriginStore(a.tmp / "origins.lmdb", readonly=True) as store:
            keys = {key for key, record in store.iter_all() if record.source == "postgresql"}
        assert keys == {row[0] for row in sql(pg_url, "SELECT origin FROM corsproxy_origins")}


def test_a_new_replica_is_not_ready_until_its_first_sync_and_never_logs_the_password(
    tmp_path: Path, pg_cluster: PostgresCluster, upstream_thread: ThreadedUpstream
) -> None:
    # PostgreSQL unreachable from the start (nothing listens there): the replica starts, but stays out of the load
    # balancer, since it has no origin set yet.
    secret = "pa55-w0rd-never-logged"
    down = f"postgresql://corsproxy:{secret}@127.0.0.1:{free_port()}/corsproxy"
    a = replica(tmp_path, "a", upstream_thread, down, workers=1)
    with a:
        ready = a.admin("GET", "/readyz", token=None)
        assert ready.status == 503 and "first sync from PostgreSQL" in ready.json()["reason"]
        assert a.admin("GET", "/healthz", token=None).status == 200
        wait_until(lambda: "source of truth unavailable" in a.log_text(), 30, what="the syncer's error line")
        put = a.admin("PUT", origin_path("https://x.customer.test"), body={})
        assert put.status == 503 and put.json()["error"] == "source of truth unavailable"
        assert secret not in put.body.decode()
        checked = run_cli("check", "--config", str(a.config_path))
        assert "has not completed its first sync" in checked.stderr
        assert secret not in checked.stdout + checked.stderr
    assert secret not in a.log_text()
    assert "corsproxy:***@127.0.0.1" in a.log_text()
