"""Fleet mode benchmark: replicas of one PostgreSQL origin set, each a real ``corsproxy serve`` with its own LMDB.

    python bench/fleet.py            # the full run (about 5 minutes): figures for bench/RESULTS.md
    python bench/fleet.py --smoke    # a quick pass (20 writes, 20,000-row cold start): proves the tool works

What it measures (all on loopback; PostgreSQL is a throwaway cluster started like the tests' one,
tests/support/postgres.py, with fsync off, so writes cost less than on a real server):

- propagation: a write through replica A's admin API (and, separately, a plain-SQL INSERT) until a preflight on
  replicas B and C is allowed, each polled on its own keep-alive connection; p50/p99 over ``--writes`` writes;
- a burst of 10,000 changes in one INSERT: time for B to apply it, and the LMDB transactions it took (batches);
  W1 (one wrk connection) preflight throughput of B's worker while bursts are applied, against without;
- cold start: an empty replica against 1,000,000 rows, time to ``/readyz`` 200 and the worker's RSS (and its anonymous
  part: LMDB pages are file-backed and shared, the kernel may drop them), against a replica of 10 rows.

Targets (printed, not judged): propagation p99 < 1 s (aim 200 ms); cold start < 60 s, RSS < 1.5x that with 10
origins; burst throughput >= 0.9x. Raw results go to bench/out/fleet-*.json.
"""

from __future__ import annotations

import argparse
import http.client
import http.server
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any
from urllib.parse import quote

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

import procstat  # noqa: E402
import psycopg  # noqa: E402
import yaml  # noqa: E402
from loadgen import Request, ensure_wrk, run_wrk  # noqa: E402

from corsproxy.core.settings import PostgresSource  # noqa: E402
from corsproxy.origins.postgres import migrate  # noqa: E402
from tests.support.net import free_port  # noqa: E402
from tests.support.postgres import start_cluster  # noqa: E402

TOKEN = "bench-admin-token-0123456789abcdef"


class Upstream:
    """A trivial upstream, for /readyz (preflights are answered by the proxy itself)."""

    def __init__(self) -> None:
        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                self.send_response(200)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"ok")

            def log_message(self, *args: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


class Replica:
    def __init__(self, root: Path, name: str, upstream: int, url: str, **pg: Any) -> None:
        self.dir = root / name
        self.dir.mkdir()
        self.port = free_port()
        self.admin_port = free_port()
        config = {
            "listen": {"host": "127.0.0.1", "port": self.port},
            "upstream": {"url": f"http://127.0.0.1:{upstream}"},
            "store": {"path": str(self.dir / "origins.lmdb"), "postgresql": {"url": url, **pg}},
            "admin": {"listen": {"host": "127.0.0.1", "port": self.admin_port}},
            "cors": {"allow_methods": ["GET", "POST"], "allow_credentials": False},
            "logging": {"format": "json", "sample_allowed": 0},
        }
        self.config = self.dir / "config.yaml"
        self.config.write_text(yaml.safe_dump(config))
        self.log = (self.dir / "serve.log").open("ab")
        env = {**os.environ, "CORSPROXY_ADMIN_TOKEN": TOKEN, "PYTHONPATH": str(REPO)}
        env.pop("PROMETHEUS_MULTIPROC_DIR", None)
        self.started = time.monotonic()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "corsproxy", "serve", "--config", str(self.config), "--workers", "1"],
            stdout=self.log,
            stderr=self.log,
            env=env,
        )

    def ready(self, timeout: float = 300.0) -> float:
        """Seconds from start to /readyz 200."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise SystemExit(f"replica {self.dir} exited: {(self.dir / 'serve.log').read_text()[-2000:]}")
            try:
                conn = http.client.HTTPConnection("127.0.0.1", self.admin_port, timeout=5)
                conn.request("GET", "/readyz")
                if conn.getresponse().status == 200:
                    return time.monotonic() - self.started
            except OSError:
                pass
            time.sleep(0.05)
        raise SystemExit(f"replica {self.dir} not ready after {timeout}s")

    def worker(self) -> int:
        kids = procstat.children(self.proc.pid)
        return kids[0]

    def admin(self, method: str, path: str, body: Any = None) -> int:
        conn = http.client.HTTPConnection("127.0.0.1", self.admin_port, timeout=30)
        headers = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"}
        conn.request(method, path, body=json.dumps(body) if body is not None else None, headers=headers)
        response = conn.getresponse()
        response.read()
        conn.close()
        return response.status

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


class Prober:
    """One keep-alive connection to a replica's proxied port; :meth:`allowed` sends one preflight."""

    def __init__(self, port: int) -> None:
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)

    def allowed(self, origin: str) -> bool:
        self.conn.request("OPTIONS", "/x", headers={"Origin": origin, "Access-Control-Request-Method": "GET"})
        response = self.conn.getresponse()
        response.read()
        return response.headers.get("Access-Control-Allow-Origin") == origin


def _wait_allowed(prober: Prober, origin: str, t0: float, out: list[float], timeout: float = 10.0) -> None:
    while not prober.allowed(origin):
        if time.monotonic() - t0 > timeout:
            print(f"warning: {origin} not honoured on port {prober.conn.port} after {timeout}s", file=sys.stderr)
            out.append(float("inf"))
            return
        time.sleep(0.001)
    out.append(time.monotonic() - t0)


def propagation(writes: int, a: Replica, followers: list[Replica], url: str, how: str) -> dict[str, Any]:
    probers = [Prober(r.port) for r in followers]
    seen: list[float] = []
    with psycopg.connect(url, autocommit=True) as conn:
        for i in range(writes):
            origin = f"https://{how}-{i}.bench.test"
            results: list[float] = []
            t0 = time.monotonic()
            if how == "admin":
                status = a.admin("PUT", "/origins/" + quote(origin, safe=""), {})
                assert status == 201, status
            else:
                conn.execute("INSERT INTO corsproxy_origins (origin) VALUES (%s)", (origin,))
            threads = [threading.Thread(target=_wait_allowed, args=(p, origin, t0, results)) for p in probers]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            seen.extend(results)
    seen.sort()
    return {
        "samples": len(seen),
        "p50_ms": round(1000 * statistics.median(seen), 1),
        "p99_ms": round(1000 * seen[min(len(seen) - 1, int(0.99 * len(seen)))], 1),
        "max_ms": round(1000 * seen[-1], 1),
    }


def _position(replica: Replica) -> int:
    from corsproxy.store import OriginStore

    with OriginStore(replica.dir / "origins.lmdb", readonly=True) as store:
        raw = store.sync_get(b"position")
    return 0 if raw is None else int(raw)


def burst(b: Replica, url: str, rows: int, tag: str) -> dict[str, Any]:
    with psycopg.connect(url, autocommit=True) as conn:
        t0 = time.monotonic()
        conn.execute(
            "INSERT INTO corsproxy_origins (origin) SELECT 'https://' || %s || '-' || i || '.burst.test' "
            "FROM generate_series(1, %s) AS i",
            (tag, rows),
        )
        last = conn.execute("SELECT max(seq) FROM corsproxy_changes").fetchone()[0]
    while _position(b) < last:
        time.sleep(0.005)
    return {"rows": rows, "applied_s": round(time.monotonic() - t0, 3)}


def w1(wrk: str, replica: Replica, seconds: float, scripts: Path) -> float:
    request = Request("OPTIONS", "/x", {"Origin": "https://admin-0.bench.test", "Access-Control-Request-Method": "GET"})
    load = run_wrk(wrk, f"http://127.0.0.1:{replica.port}", request, duration=seconds, connections=1,
                   script_dir=scripts)  # fmt: skip
    return load.requests / load.duration


def w1_during_bursts(root: Path, cluster: Any, upstream: int, b: Replica, url: str) -> dict[str, Any]:
    """W1 preflights on B: quiet; while another replica (its own database) applies bursts, which is what the machine
    itself costs; while B applies them. Interleaved, three rounds, so a drift of the shared machine hits all three."""
    wrk = ensure_wrk()
    scripts = root / "wrk"
    scripts.mkdir()
    other_url = cluster.database()
    migrate(PostgresSource(url=other_url))
    other = Replica(root, "other", upstream, other_url)
    other.ready()
    rounds: list[tuple[float, float, float]] = []
    try:
        for n in range(3):

            def loaded(target: Replica, target_url: str, tag: str) -> float:
                stop = threading.Event()

                def bursts() -> None:
                    i = 0
                    while not stop.is_set():
                        burst(target, target_url, 10_000, f"{tag}x{i}")
                        i += 1

                thread = threading.Thread(target=bursts)
                thread.start()
                time.sleep(0.2)
                rate = w1(wrk, b, 5, scripts)
                stop.set()
                thread.join()
                return rate

            quiet = w1(wrk, b, 5, scripts)
            rounds.append((quiet, loaded(other, other_url, f"o{n}"), loaded(b, url, f"b{n}")))
            print("  round", n, [round(x) for x in rounds[-1]], flush=True)
    finally:
        other.stop()
    quiet, elsewhere, own = (statistics.median(r[i] for r in rounds) for i in range(3))
    return {
        "quiet_rps": round(quiet),
        "bursts_on_other_replica_rps": round(elsewhere),
        "bursts_on_b_rps": round(own),
        "ratio_vs_quiet": round(own / quiet, 2),
        "ratio_vs_other_replica": round(own / elsewhere, 2),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="a quick pass: few writes, a small cold start")
    parser.add_argument("--writes", type=int, default=200)
    parser.add_argument("--cold-rows", type=int, default=1_000_000)
    parser.add_argument("--no-cold", action="store_true", help="skip the cold-start measurements")
    args = parser.parse_args()
    writes, cold_rows = (20, 20_000) if args.smoke else (args.writes, args.cold_rows)
    results: dict[str, Any] = {"writes": writes, "cold_rows": cold_rows}
    cluster = start_cluster()
    root = Path(tempfile.mkdtemp(prefix="corsproxy-fleet-bench-"))
    replicas: list[Replica] = []
    try:
        url = cluster.database()
        source = PostgresSource(url=url)
        migrate(source)
        upstream = Upstream()
        a, b, c = (Replica(root, name, upstream.port, url) for name in "abc")
        replicas += [a, b, c]
        for r in (a, b, c):
            r.ready()
        results["propagation_admin"] = propagation(writes, a, [b, c], url, "admin")
        print("admin writes -> B, C:", results["propagation_admin"], flush=True)
        results["propagation_sql"] = propagation(writes, a, [b, c], url, "sql")
        print("plain-SQL writes -> B, C:", results["propagation_sql"], flush=True)

        results["burst"] = burst(b, url, 10_000, "first")
        results["burst"]["batch_size"] = PostgresSource(url="").batch_size
        results["burst"]["lmdb_transactions"] = -(-10_000 // results["burst"]["batch_size"])
        print("burst of 10,000 changes:", results["burst"], flush=True)
        if not args.smoke:
            results["w1_preflights"] = w1_during_bursts(root, cluster, upstream.port, b, url)
            print("W1 preflights on B:", results["w1_preflights"], flush=True)
        for r in (a, b, c):
            r.stop()
        replicas.clear()

        # Cold start: 10 rows, then cold_rows rows, each into an empty replica.
        for rows, name in () if args.no_cold else ((10, "small"), (cold_rows, "large")):
            db = cluster.database()
            migrate(PostgresSource(url=db))
            with psycopg.connect(db, autocommit=True) as conn:
                conn.execute(
                    "INSERT INTO corsproxy_origins (origin) SELECT 'https://c' || i || '.cold.test' "
                    "FROM generate_series(1, %s) AS i",
                    (rows,),
                )
            r = Replica(root, name, upstream.port, db)
            replicas.append(r)
            seconds = r.ready()
            time.sleep(1.0)
            worker = r.worker()
            mem = procstat.memory(worker)
            syncer = procstat.memory(procstat.children(worker)[0])
            results[f"cold_{name}"] = {
                "rows": rows,
                "ready_s": round(seconds, 1),
                "worker_rss_kib": mem.rss,
                "worker_anonymous_kib": mem.anonymous,
                "syncer_rss_kib": syncer.rss,
                "syncer_anonymous_kib": syncer.anonymous,
                "syncer_peak_rss_kib": syncer.peak_rss,
            }
            print(f"cold start, {rows} rows:", results[f"cold_{name}"], flush=True)
            r.stop()
            replicas.remove(r)
        if not args.no_cold:
            small, large = results["cold_small"], results["cold_large"]
            for what in ("worker_rss_kib", "worker_anonymous_kib", "syncer_peak_rss_kib", "syncer_anonymous_kib"):
                results[f"cold_ratio_{what}"] = round(large[what] / small[what], 2)
            print("ratios (1,000,000 rows / 10):", {k: v for k, v in results.items() if k.startswith("cold_ratio")})
        out = REPO / "bench" / "out"
        out.mkdir(exist_ok=True)
        (out / f"fleet-{int(time.time())}.json").write_text(json.dumps(results, indent=2))
    finally:
        for r in replicas:
            r.stop()
        cluster.destroy()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
