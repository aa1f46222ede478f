"""A throwaway PostgreSQL cluster for the fleet tests: ``initdb`` in a temporary directory, the server on a free
loopback port, trust authentication on 127.0.0.1 only, stopped and deleted at the end of the session.

PostgreSQL refuses to run as root, so as root the cluster belongs to an unprivileged user (Debian's ``postgres``,
else ``nobody``) and every server command runs through ``runuser``. A machine without PostgreSQL skips the tests
that need it with one reason line; CI sets ``CORSPROXY_REQUIRE_POSTGRESQL=1`` so that they fail there instead.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import subprocess
import tempfile
import uuid
from pathlib import Path

import pytest

from tests.support.net import free_port

__all__ = ["PostgresCluster", "postgres_required", "start_cluster"]


def postgres_required() -> bool:
    return os.environ.get("CORSPROXY_REQUIRE_POSTGRESQL", "") not in ("", "0")


def _bindir() -> Path | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(p.split("/")[4]))
    if found:
        return Path(found[-1]).parent
    initdb = shutil.which("initdb")
    return Path(initdb).parent if initdb else None


def _run_as() -> str | None:
    """The user the server runs as when this process is root (``None``: run as ourselves)."""
    if os.getuid() != 0:
        return None
    for name in ("postgres", "nobody"):
        try:
            pwd.getpwnam(name)
        except KeyError:
            continue
        return name
    return None


class PostgresCluster:
    """One running cluster; :meth:`database` makes a fresh, empty database for one test."""

    def __init__(self, bindir: Path, base: Path, user: str | None) -> None:
        self.bindir = bindir
        self.base = base
        self.data = base / "data"
        self.user = user
        self.port = free_port()
        self.log = base / "server.log"

    def _cmd(self, *args: str) -> list[str]:
        return ["runuser", "-u", self.user, "--", *args] if self.user else list(args)

    def _run(self, *args: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
        return subprocess.run(self._cmd(*args), capture_output=True, text=True, timeout=timeout, check=False)

    def init(self) -> None:
        done = self._run(
            str(self.bindir / "initdb"), "-D", str(self.data), "-U", "postgres", "--auth=trust", "-E", "UTF8",
            "--locale=C.UTF-8", "--no-instructions",
        )  # fmt: skip
        if done.returncode != 0:
            raise RuntimeError(f"initdb failed: {done.stderr.strip()[-500:]}")
        # Loopback TCP only; no Unix socket outside the temporary directory.
        (self.data / "pg_hba.conf").write_text("host all all 127.0.0.1/32 trust\n")
        if self.user:
            shutil.chown(self.data / "pg_hba.conf", self.user)

    def start(self) -> None:
        options = (
            f"-c listen_addresses=127.0.0.1 -p {self.port} -k {self.base} -c fsync=off -c synchronous_commit=off "
            "-c full_page_writes=off -c max_connections=200"
        )
        done = self._run(
            str(self.bindir / "pg_ctl"), "-D", str(self.data), "-l", str(self.log), "-o", options, "-w", "-t", "60",
            "start",
        )  # fmt: skip
        if done.returncode != 0:
            log = self.log.read_text(errors="replace")[-1000:] if self.log.exists() else ""
            raise RuntimeError(f"pg_ctl start failed: {done.stderr.strip()[-500:]} {log}")

    def stop(self) -> None:
        self._run(str(self.bindir / "pg_ctl"), "-D", str(self.data), "-m", "fast", "-w", "-t", "60", "stop")

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def database(self) -> str:
        """A new empty database; its URL."""
        import psycopg

        name = "t_" + uuid.uuid4().hex[:12]
        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def destroy(self) -> None:
        self.stop()
        shutil.rmtree(self.base, ignore_errors=True)


def start_cluster() -> PostgresCluster:
    """A started cluster, or a skip (a failure under ``CORSPROXY_REQUIRE_POSTGRESQL=1``) saying why not."""

    def unavailable(reason: str) -> PostgresCluster:
        if postgres_required():
            pytest.fail(f"CORSPROXY_REQUIRE_POSTGRESQL is set but {reason}", pytrace=False)
        pytest.skip(reason)

    try:
        import psycopg  # noqa: F401
    except ImportError:
        return unavailable("psycopg is not installed (pip install -e '.[test]')")
    bindir = _bindir()
    if bindir is None:
        return unavailable("PostgreSQL is not installed (apt-get install postgresql)")
    user = _run_as()
    if os.getuid() == 0 and user is None:
        return unavailable("running as root and no unprivileged user (postgres, nobody) to run PostgreSQL as")
    base = Path(tempfile.mkdtemp(prefix="corsproxy-pg-"))
    if user:
        shutil.chown(base, user)
    cluster = PostgresCluster(bindir, base, user)
    try:
        cluster.init()
        cluster.start()
    except (RuntimeError, OSError, subprocess.TimeoutExpired) as exc:
        shutil.rmtree(base, ignore_errors=True)
        return unavailable(f"a throwaway PostgreSQL cluster could not be started: {exc}")
    return cluster
