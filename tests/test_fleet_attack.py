"""Attacks on fleet mode, against a real PostgreSQL server and real ``corsproxy serve`` replicas: plain-SQL rows
that must never be allowed (and rows that must not wedge the syncer), updates that make a row unsafe or change its
key, every way of revoking, a long open writer transaction, quotes in what the write path sends to SQL, the
password in a malformed URL, an outage at start, and a host's declaration against the fleet's row.

Without PostgreSQL installed these tests skip with one reason line (they fail under CORSPROXY_REQUIRE_POSTGRESQL=1).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.config import run_cli
from tests.support.net import free_port, wait_until
from tests.support.postgres import PostgresCluster, start_cluster
from tests.support.serve import origin_path, scrape, value
from tests.support.upstream import ThreadedUpstream
from tests.test_fleet_postgresql import allowed, eventually, preflight, replica, sql, wait_ready

pytestmark = pytest.mark.filterwarnings("error")


@pytest.fixture(scope="session")
def pg_cluster() -> Iterator[PostgresCluster]:
    cluster = start_cluster()
    yield cluster
    cluster.destroy()


@pytest.fixture
def pg_url(pg_cluster: PostgresCluster, tmp_path: Path) -> str:
    url = pg_cluster.database()
    config = tmp_path / "migrate.yaml"
    config.write_text(f"upstream: {{url: 'http://127.0.0.1:9'}}\nstore: {{postgresql: '{url}'}}\n")
    done = run_cli("db", "migrate", "--config", str(config))
    assert done.returncode == 0, done.stderr
    return url


def insert(url: str, origin: str, policy: str = "default", note: str = "", expires: str | None = None) -> None:
    sql(
        url,
        "INSERT INTO corsproxy_origins (origin, policy, note, expires) VALUES (%s, %s, %s, %s::timestamptz)",
        (origin, policy, note, expires),
    )


# -- rows that must never be allowed ------------------------------------------------------------------------------

#: A plain-SQL row -> the origins a browser could send that it must not let through.
BAD_ROWS: dict[str, tuple[str, ...]] = {
    "https://.*\\.customer\\.test": ("https://x.customer.test",),
    "https://a.customer.test|https://evil.test": ("https://a.customer.test", "https://evil.test"),
    "/^https:\\/\\/.*$/": ("https://evil.test",),
    "null": ("null",),
    "*": ("https://evil.test",),  # the default policy allows credentials
    "https://*.com": ("https://evil.com",),
    "https://*.co.uk": ("https://evil.co.uk",),
    "https://*.github.io": ("https://evil.github.io",),
    "HTTPS://UP.customer.test": ("https://up.customer.test",),
    "https://trail.customer.test.": ("https://trail.customer.test.", "https://trail.customer.test"),
    "https://port.customer.test:443": ("https://port.customer.test", "https://port.customer.test:443"),
    " https://lead.customer.test": ("https://lead.customer.test",),
    "https://tail.customer.test ": ("https://tail.customer.test",),
    "https://tab.customer.test\t": ("https://tab.customer.test",),
    "https://bücher.customer.test": ("https://xn--bcher-kva.customer.test",),
    "https://*": ("https://evil.test",),
    "http://plain.customer.test": ("http://plain.customer.test",),  # http: under a credentialed policy
}


def test_every_dangerous_or_misspelt_plain_sql_row_is_refused_counted_and_listed(
    tmp_path: Path, pg_url: str, upstream_thread: ThreadedUpstream
) -> None:
    a = replica(tmp_path, "a", upstream_thread, pg_url, workers=1)
    with a:
        wait_ready(a)
        for origin in BAD_ROWS:
            insert(pg_url, origin)
        insert(pg_url, "https://policy.customer.test", policy="no-such-policy")
        insert(pg_url, "https://note.customer.test", note="n" * 1001)
        insert(pg_url, "https://expired.customer.test", expires="2001-01-01T00:00:00Z")
        insert(pg_url, "https://last.customer.test")  # the change log's last row: everything before it is applied
        wait_until(lambda: allowed(a, "https://last.customer.test"), 30, what="the rows to apply")
        for row, origins in BAD_ROWS.items():
            for origin in origins:
                assert preflight(a, origin) is None, (row, origin)
        for origin in ("https://policy.customer.test", "https://note.customer.test", "https://expired.customer.test"):
            assert preflight(a, origin) is None, origin
        refused = len(BAD_ROWS) + 2  # the expired row is applied as what it is: an entry that no longer allows
        wait_until(lambda: value(scrape(a), "corsproxy_sync_rows_refused_total") == refused, 30, what="counted")
        checked = run_cli("check", "--config", str(a.config_path))
        assert checked.returncode == 0, checked.stderr
        for origin in [*BAD_ROWS, "https://policy.customer.test", "https://note.customer.test"]:
            assert f"PostgreSQL row {origin!r} refused" in checked.stderr, (origin, checked.stderr)
        assert "refused" in a.log_text()


def test_rows_psycopg_or_lmdb_cannot_take_do_not_stop_the_syncer(
    tmp_path: Path, pg_url: str, upstream_thread: ThreadedUpstream
) -> None:
    """A row whose ``expires`` Python cannot represent (``infinity``, year 20000) or whose origin is longer than an
    LMDB key must be refused like any other bad row: not wedge the replica, so that later changes (a revocation
    above all) still apply."""
    insert(pg_url, "https://revoked.customer.test")
    a = replica(tmp_path, "a", upstream_thread, pg_url, workers=1)
    with a:
        wait_ready(a)
        assert allowed(a, "https://revoked.customer.test")
        insert(pg_url, "https://forever.customer.test", expires="infinity")
        insert(pg_url, "https://never.customer.test", expires="-infinity")
        insert(pg_url, "https://far.customer.test", expires="20000-01-01T00:00:00Z")
        insert(pg_url, "https://" + "a" * 600 + ".customer.test")
        insert(pg_url, "https://" + "ü" * 300 + ".customer.test")
        sql(pg_url, "DELETE FROM corsproxy_origins WHERE origin = 'https://revoked.customer.test'")
        insert(pg_url, "https://after.customer.test")
        eventually(a, "https://after.customer.test")
        assert not allowed(a, "https://revoked.customer.test")
        assert not allowed(a, "https://never.customer.test")
        checked = run_cli("check", "--config", str(a.config_path))
        assert "PostgreSQL row 'https://forever.customer.test' refused" in checked.stderr, checked.stderr
        assert "longer than 320 characters" in checked.stderr, checked.stderr
        # Deleting the long rows clears their refusals.
        sql(pg_url, "DELETE FROM corsproxy_origins WHERE length(origin) > 320")
        insert(pg_url, "https://after2.customer.test")
        eventually(a, "https://after2.customer.test")
        checked = run_cli("check", "--config", str(a.config_path))
        assert "longer than 320 characters" not in checked.stderr, checked.stderr
    # A new replica copies the same rows as a snapshot: the same refusals, and it becomes ready.
    b = replica(tmp_path, "b", upstream_thread, pg_url, workers=1)
    with b:
        wait_ready(b)
        assert allowed(b, "https://after.customer.test")
        assert not allowed(b, "https://forever.customer.test")


def test_an_update_that_makes_a_row_unsafe_revokes_it_and_a_key_update_removes_the_old_origin(
    tmp_path: Path, pg_url: str, upstream_thread: ThreadedUpstream
) -> None:
    a = replica(tmp_path, "a", upstream_thread, pg_url, workers=1)
    b = replica(tmp_path, "b", upstream_thread, pg_url, workers=1)
    good = "https://good.customer.test"
    with a, b:
        wait_ready(a)
        wait_ready(b)
        insert(pg_url, good)
        for server in (a, b):
            eventually(server, good)
        # Good -> unknown policy: the old entry must not stay allowed.
        sql(pg_url, "UPDATE corsproxy_origins SET policy = 'gone' WHERE origin = %s", (good,))
        for server in (a, b):
            eventually(server, good, yes=False)
        sql(pg_url, "UPDATE corsproxy_origins SET policy = 'default' WHERE origin = %s", (good,))
        for server in (a, b):
            eventually(server, good)
        # Good -> a too-long note (refused): revoked too.
        sql(pg_url, "UPDATE corsproxy_origins SET note = repeat('x', 5000) WHERE origin = %s", (good,))
        for server in (a, b):
            eventually(server, good, yes=False)
        sql(pg_url, "UPDATE corsproxy_origins SET note = '' WHERE origin = %s", (good,))
        for server in (a, b):
            eventually(server, good)
        # The primary key itself: to a bad spelling (old gone, new refused), then to a good one.
        sql(pg_url, "UPDATE corsproxy_origins SET origin = 'https://GOOD.customer.test' WHERE origin = %s", (good,))
        for server in (a, b):
            eventually(server, good, yes=False)
        sql(pg_url, "UPDATE corsproxy_origins SET origin = 'https://moved.customer.test'")
        for server in (a, b):
            eventually(server, "https://moved.customer.test")
            assert not allowed(server, good)
        # A key update to a wildcard over a public suffix: the old entry goes, nothing new is allowed.
        sql(pg_url, "UPDATE corsproxy_origins SET origin = 'https://*.com'")
        for server in (a, b):
            eventually(server, "https://moved.customer.test", yes=False)
            assert preflight(server, "https://evil.com") is None


# -- revocation ---------------------------------------------------------------------------------------------------


def test_every_way_of_revoking_stops_the_next_preflight_on_the_other_replica(
    tmp_path: Path, pg_url: str, upstream_thread: ThreadedUpstream
) -> None:
    a = replica(tmp_path, "a", upstream_thread, pg_url, workers=1)
    b = replica(tmp_path, "b", upstream_thread, pg_url, workers=1)
    names = ("sql", "admin", "cli", "expiry")
    origins = {name: f"https://{name}.customer.test" for name in names}
    with a, b:
        wait_ready(a)
        wait_ready(b)
        for name in ("sql", "admin", "cli"):
            insert(pg_url, origins[name])
        sql(
            pg_url,
            "INSERT INTO corsproxy_origins (origin, expires) VALUES (%s, now() + interval '4 seconds')",
            (origins["expiry"],),
        )
        for origin in origins.values():
            eventually(b, origin)
        sql(pg_url, "DELETE FROM corsproxy_origins WHERE origin = %s", (origins["sql"],))
        eventually(b, origins["sql"], yes=False)
        assert a.admin("DELETE", origin_path(origins["admin"])).status == 200
        eventually(b, origins["admin"], yes=False)
        removed = run_cli("origins", "remove", origins["cli"], "--config", str(a.config_path))
        assert removed.returncode == 0, removed.stderr
        eventually(b, origins["cli"], yes=False)
        eventually(b, origins["expiry"], yes=False)  # nobody writes anything: the stored expiry alone revokes
        eventually(a, origins["expiry"], yes=False)


# -- ordering -----------------------------------------------------------------------------------------------------


def test_a_long_open_writer_transaction_holds_back_later_writers_and_nothing_is_skipped(
    tmp_path: Path, pg_url: str, upstream_thread: ThreadedUpstream
) -> None:
    import psycopg

    a = replica(tmp_path, "a", upstream_thread, pg_url, workers=1)
    b = replica(tmp_path, "b", upstream_thread, pg_url, workers=1)
    with a, b:
        wait_ready(a)
        wait_ready(b)
        slow = psycopg.connect(pg_url)
        try:
            # Draws its sequence number first, commits last.
            slow.execute("INSERT INTO corsproxy_origins (origin) VALUES ('https://slow.customer.test')")
            results: dict[str, object] = {}

            def later_sql() -> None:
                sql(pg_url, "INSERT INTO corsproxy_origins (origin) VALUES ('https://quick.customer.test')")
                results["sql"] = True

            def later_admin() -> None:
                results["admin"] = a.admin("PUT", origin_path("https://api.customer.test"), body={}).status

            threads = [threading.Thread(target=later_sql), threading.Thread(target=later_admin)]
            for thread in threads:
                thread.start()
            insert_seen = wait_until_count(pg_url, 1)
            assert insert_seen
            assert not allowed(b, "https://quick.customer.test")
            assert not allowed(b, "https://slow.customer.test")
            slow.commit()
        finally:
            slow.close()
        for thread in threads:
            thread.join(60)
        assert results == {"sql": True, "admin": 201}
        for origin in ("https://slow.customer.test", "https://quick.customer.test", "https://api.customer.test"):
            eventually(b, origin)
            eventually(a, origin)
        seqs = [row[0] for row in sql(pg_url, "SELECT seq FROM corsproxy_changes ORDER BY at")]
        assert seqs == sorted(seqs)


def wait_until_count(url: str, waiting: int) -> bool:
    """Wait (bounded) until ``waiting`` further sessions are blocked on the writers' advisory lock."""

    def blocked() -> bool:
        rows = sql(url, "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted")
        return int(rows[0][0]) >= waiting

    wait_until(blocked, 30, what="writers waiting on the lock")
    return True


# -- what the write path sends to SQL -----------------------------------------------------------------------------


def test_quotes_in_notes_and_actors_stay_data(tmp_path: Path, pg_url: str, upstream_thread: ThreadedUpstream) -> None:
    a = replica(tmp_path, "a", upstream_thread, pg_url, workers=1)
    note = "'); DROP TABLE corsproxy_origins; -- \" $$ \\ %s %(x)s"
    actor = "o'hara\"; DROP TABLE corsproxy_changes; --"
    with a:
        wait_ready(a)
        put = a.admin("PUT", origin_path("https://quote.customer.test"), body={"note": note})
        assert put.status == 201, put.body
        added = run_cli(
            "origins", "add", "https://cli.customer.test", "--note", note, "--config", str(a.config_path),
            env={"USER": actor, "LOGNAME": actor, "SUDO_USER": actor},
        )  # fmt: skip
        assert added.returncode == 0, added.stderr
        rows = sql(pg_url, "SELECT origin, note FROM corsproxy_origins ORDER BY origin")
        assert rows == [("https://cli.customer.test", note), ("https://quote.customer.test", note)]
        actors = {row[0] for row in sql(pg_url, "SELECT actor FROM corsproxy_changes")}
        assert len(actors) == 2 and "admin:admin" in actors
        eventually(a, "https://cli.customer.test")
        # Origins with quotes never reach SQL: the parser refuses them first.
        bad = a.admin("PUT", origin_path("https://x.test'); DROP TABLE corsproxy_origins; --"), body={})
        assert bad.status in (400, 422), bad.body
        assert sql(pg_url, "SELECT count(*) FROM corsproxy_origins") == [(2,)]


# -- secrets ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("via", ["config", "environment"])
def test_a_password_that_libpq_cannot_parse_is_never_quoted(
    tmp_path: Path, upstream_thread: ThreadedUpstream, via: str
) -> None:
    """libpq quotes the offending token of a malformed URL ("invalid percent-encoded token: ..."), which can be the
    password itself: it must not reach the log, ``corsproxy check`` or an admin answer."""
    secret = "s3cr%zzet-never-shown"
    url = f"postgresql://corsproxy:{secret}@127.0.0.1:{free_port()}/corsproxy"
    directory = tmp_path / "a"
    directory.mkdir()
    from tests.support.serve import Server

    if via == "config":
        a = Server(directory, upstream_thread.port, workers=1, store={"postgresql": {"url": url, "poll_interval": 0.2}})
        env = None
    else:
        env = {"CORSPROXY_DATABASE_URL": url}
        a = Server(
            directory,
            upstream_thread.port,
            workers=1,
            env=env,
            store={"postgresql": {"url": "postgresql://placeholder@127.0.0.1:9/x", "poll_interval": 0.2}},
        )
    with a:
        wait_until(lambda: "source of truth unavailable" in a.log_text(), 30, what="the syncer's error line")
        put = a.admin("PUT", origin_path("https://x.customer.test"), body={})
        assert put.status == 503, put.body
        assert secret not in put.body.decode()
        assert "s3cr" not in put.body.decode()
        checked = run_cli("check", "--config", str(a.config_path), env=env)
        assert "s3cr" not in checked.stdout + checked.stderr
        added = run_cli("origins", "add", "https://x.customer.test", "--config", str(a.config_path), env=env)
        assert added.returncode != 0
        assert "s3cr" not in added.stdout + added.stderr
        migrated = run_cli("db", "migrate", "--config", str(a.config_path), env=env)
        assert migrated.returncode != 0
        assert "s3cr" not in migrated.stdout + migrated.stderr
        metrics = a.admin("GET", "/metrics")
        assert metrics.status == 200 and "s3cr" not in metrics.body.decode()
        ready = a.admin("GET", "/readyz", token=None)
        assert ready.status == 503 and "s3cr" not in ready.body.decode()
        assert "s3cr" not in a.admin("GET", "/origins").body.decode()
    assert "s3cr" not in a.log_text()


# -- outage at start ----------------------------------------------------------------------------------------------


def test_a_synced_replica_starts_and_serves_with_postgresql_down(
    tmp_path: Path, pg_cluster: PostgresCluster, pg_url: str, upstream_thread: ThreadedUpstream
) -> None:
    insert(pg_url, "https://kept.customer.test")
    a = replica(tmp_path, "a", upstream_thread, pg_url, workers=1)
    with a:
        wait_ready(a)
        eventually(a, "https://kept.customer.test")
    pg_cluster.stop()
    try:
        a.proc = None
        with a:
            wait_ready(a)
            assert allowed(a, "https://kept.customer.test")
            put = a.admin("PUT", origin_path("https://new.customer.test"), body={})
            assert put.status == 503 and put.json()["error"] == "source of truth unavailable", put.body
            gone = a.admin("DELETE", origin_path("https://kept.customer.test"))
            assert gone.status == 503, gone.body
            assert allowed(a, "https://kept.customer.test")  # never a local-only removal either
            assert not allowed(a, "https://new.customer.test")
    finally:
        pg_cluster.start()


# -- a host's declaration against the fleet's row -----------------------------------------------------------------


def test_a_declared_origin_wins_over_the_fleet_row_and_survives_its_removal(
    tmp_path: Path, pg_url: str, upstream_thread: ThreadedUpstream
) -> None:
    declared = "https://app.example.com"  # in the test config's cors.allow_origins
    a = replica(tmp_path, "a", upstream_thread, pg_url, workers=1)
    with a:
        wait_ready(a)
        assert allowed(a, declared)
        insert(pg_url, declared, policy="no-such-policy")  # refused, and must not remove the declaration
        insert(pg_url, "https://marker1.customer.test")
        eventually(a, "https://marker1.customer.test")
        assert allowed(a, declared)
        sql(pg_url, "UPDATE corsproxy_origins SET policy = 'default', note = 'fleet' WHERE origin = %s", (declared,))
        sql(pg_url, "DELETE FROM corsproxy_origins WHERE origin = %s", (declared,))
        insert(pg_url, "https://marker2.customer.test")
        eventually(a, "https://marker2.customer.test")
        assert allowed(a, declared)
        entry = a.admin("GET", origin_path(declared))
        assert entry.status == 200 and entry.json()["source"] == "config", entry.body
        # The admin API and the CLI refuse to write the declared entry through the fleet, as without a fleet.
        assert a.admin("DELETE", origin_path(declared)).status == 409
        assert sql(pg_url, "SELECT count(*) FROM corsproxy_origins WHERE origin = %s", (declared,)) == [(0,)]


# -- a reload that changes the policies -----------------------------------------------------------------------------


def test_a_reload_that_changes_the_policies_checks_the_fleet_rows_again(
    tmp_path: Path, pg_url: str, upstream_thread: ThreadedUpstream
) -> None:
    """Rows are checked against the policies when applied: a reload that defines a policy a refused row named must
    apply it, and one that makes a policy credentialed must refuse (and list) the rows that became unsafe."""
    a = replica(tmp_path, "a", upstream_thread, pg_url, workers=1)
    a.data["policies"] = {"public": {"allow_credentials": False}}
    with a:
        wait_ready(a)
        insert(pg_url, "https://later.customer.test", policy="partners")  # no such policy yet: refused
        insert(pg_url, "http://plain.customer.test", policy="public")  # http: is fine without credentials
        eventually(a, "http://plain.customer.test")
        assert not allowed(a, "https://later.customer.test")
        a.data["policies"] = {"public": {"allow_credentials": True}, "partners": {"allow_credentials": False}}
        a.write_config()
        answer = a.admin("POST", "/reload")
        assert answer.status == 200, answer.body
        eventually(a, "https://later.customer.test")
        eventually(a, "http://plain.customer.test", yes=False)

        def listed() -> bool:
            checked = run_cli("check", "--config", str(a.config_path))
            return (
                "PostgreSQL row 'http://plain.customer.test' refused" in checked.stderr
                and "https://later.customer.test" not in checked.stderr
            )

        wait_until(listed, 30, what="corsproxy check to list the row that became unsafe")


@pytest.mark.xfail(
    strict=True,
    reason="an admin write that keeps a plain-SQL expires of infinity (or past 9999) fails with a 500: the write path "
    "and the admin answer turn expiries into datetimes/time_t (postgres._timestamp, store._iso)",
)
def test_an_admin_write_over_a_row_with_an_infinite_expiry_is_answered(
    tmp_path: Path, pg_url: str, upstream_thread: ThreadedUpstream
) -> None:
    insert(pg_url, "https://forever.customer.test", expires="infinity")
    a = replica(tmp_path, "a", upstream_thread, pg_url, workers=1)
    with a:
        wait_ready(a)
        put = a.admin("PUT", origin_path("https://forever.customer.test"), body={"note": "fixed"})
        assert put.status in (200, 400, 409, 422), put.body
        fixed = a.admin("PUT", origin_path("https://forever.customer.test"), body={"expires": "never"})
        assert fixed.status == 200, fixed.body
        eventually(a, "https://forever.customer.test")


def test_writes_in_replica_mode_are_logged_too(tmp_path: Path, pg_url: str, upstream_thread: ThreadedUpstream) -> None:
    """``session_replication_role = replica`` (a logical-replication apply worker, a restore) skips ordinary
    triggers: a delete made that way would never reach the replicas, so the change log's triggers fire always."""
    insert(pg_url, "https://replicated.customer.test")
    a = replica(tmp_path, "a", upstream_thread, pg_url, workers=1)
    with a:
        wait_ready(a)
        assert allowed(a, "https://replicated.customer.test")
        import psycopg

        with psycopg.connect(pg_url, autocommit=True) as conn:
            conn.execute("SET session_replication_role = replica")
            conn.execute("DELETE FROM corsproxy_origins WHERE origin = 'https://replicated.customer.test'")
            conn.execute("INSERT INTO corsproxy_origins (origin) VALUES ('https://applied.customer.test')")
        eventually(a, "https://applied.customer.test")
        assert not allowed(a, "https://replicated.customer.test")
