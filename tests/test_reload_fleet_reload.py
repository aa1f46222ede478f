"""Reloads that cannot take serving down and lose no request: real ``corsproxy serve --workers 2`` subprocesses, a real
upstream, a keep-alive load that never retries (like wrk), and SIGHUP / ``POST /reload`` during it.

A reload is applied only once new workers on the new configuration accept connections and the store has been
reconciled with it; otherwise the running workers keep serving and the refusal is logged, answered and counted.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import threading
import time
from pathlib import Path
from typing import Any

import lmdb
import pytest

from corsproxy.store import OriginRecord, OriginStore, StoreFullError
from tests.conftest import merge
from tests.test_workers_harness import Response, Server, ThreadedUpstream, free_port, upstream_thread, wait_until

__all__ = ["upstream_thread"]

APP = "https://app.example.com"
GET = b"GET /api/load HTTP/1.1\r\nHost: 127.0.0.1\r\nOrigin: https://app.example.com\r\n\r\n"
PREFLIGHT = (
    b"OPTIONS /api/load HTTP/1.1\r\nHost: 127.0.0.1\r\nOrigin: https://app.example.com\r\n"
    b"Access-Control-Request-Method: POST\r\n\r\n"
)


class KeepAliveLoad:
    """``connections`` keep-alive connections, each sending a request as soon as the previous answer is read (GETs
    forwarded upstream and preflights from the fast path, alternately), on a thread with its own event loop.

    Never retries: a request that gets no complete answer is a failure, as wrk counts it. A connection the server
    ends with ``Connection: close`` after a complete answer is reopened; that is not a failure."""

    def __init__(self, port: int, connections: int = 24, per_connection: int = 20_000) -> None:
        self.port = port
        self.connections = connections
        self.per_connection = per_connection  # a bound, whatever happens
        self.ok = 0
        self.closed_by_server = 0
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._run()), daemon=True)

    def __enter__(self) -> KeepAliveLoad:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(30)
        assert not self._thread.is_alive(), "the load did not stop"

    async def _run(self) -> None:
        await asyncio.gather(*(self._connection(i) for i in range(self.connections)))

    async def _connection(self, index: int) -> None:
        reader: asyncio.StreamReader | None = None
        writer: asyncio.StreamWriter | None = None
        for n in range(self.per_connection):
            if self._stop.is_set():
                break
            preflight = (n + index) % 2 == 0
            try:
                if writer is None:
                    reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", self.port), 10)
                assert reader is not None
                writer.write(PREFLIGHT if preflight else GET)
                status, close = await asyncio.wait_for(_read_response(reader), 30)
            except (OSError, asyncio.IncompleteReadError, TimeoutError, ValueError) as exc:
                self.failures.append(f"{'OPTIONS' if preflight else 'GET'}: {exc!r}")
                if writer is not None:
                    writer.close()
                writer = None
                await asyncio.sleep(0.01)
                continue
            if status != (204 if preflight else 200):
                self.failures.append(f"status {status}")
            else:
                self.ok += 1
            if close:
                self.closed_by_server += 1
                assert writer is not None
                writer.close()
                writer = None
        if writer is not None:
            writer.close()


async def _read_response(reader: asyncio.StreamReader) -> tuple[int, bool]:
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ", 2)[1])
    headers = {}
    for line in lines[1:]:
        if ":" in line:
            name, value = line.split(":", 1)
            headers[name.strip().lower()] = value.strip()
    if headers.get("transfer-encoding", "").lower() == "chunked":
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
            await reader.readexactly(size + 2)
            if size == 0:
                break
    else:
        await reader.readexactly(int(headers.get("content-length", "0")))
    return status, headers.get("connection", "").lower() == "close"


def _reloads(server: Server, word: str = "reloaded ") -> int:
    return sum(1 for line in server.logs() if line.get("message", "").startswith(word))


def _preflight(server: Server) -> Response:
    return server.proxy("OPTIONS", "/api", headers={"Origin": APP, "Access-Control-Request-Method": "POST"})


@pytest.fixture
def server(tmp_path: Path, upstream_thread: ThreadedUpstream) -> Any:
    s = Server(tmp_path, upstream_thread.port, workers=2)
    s.env["PROMETHEUS_MULTIPROC_DIR"] = str(tmp_path / "metrics")  # where the test can count the files
    (tmp_path / "metrics").mkdir()
    s.start()
    yield s
    assert s.stop() == 0


def test_reloads_under_keepalive_load_fail_no_request(server: Server) -> None:
    with KeepAliveLoad(server.port) as load:
        wait_until(lambda: load.ok >= 300 or load.failures, timeout=30, what="the load to run")
        for _ in range(3):
            done = _reloads(server)
            server.send(signal.SIGHUP)
            wait_until(lambda: _reloads(server) > done, timeout=60, what="the reload")  # noqa: B023
            served = load.ok
            # The load goes on through the new workers, and the old ones have had their drain.
            wait_until(lambda: load.ok >= served + 300, timeout=30, what="the load on the new workers")  # noqa: B023
    assert load.failures == [], f"{len(load.failures)} failed requests, e.g. {load.failures[:5]}"
    assert load.closed_by_server > 0  # draining workers ended keep-alive connections with Connection: close
    log = server.log_text()
    assert "Error while closing socket" not in log
    assert "Bad file descriptor" not in log


def test_a_reload_whose_store_cannot_be_created_is_refused_and_serving_goes_on(server: Server) -> None:
    """The issue's reproduction: ``store.path: /dev/null/store`` validates, and the running workers must stay."""
    server.write_config(merge(server.data, {"store": {"path": "/dev/null/store"}}))
    refused = server.admin("POST", "/reload")
    assert refused.status == 409, refused.body
    body = refused.json()
    assert body["error"] == "reload refused" and "/dev/null/store" in body["reason"], body
    server.send(signal.SIGHUP)
    wait_until(lambda: _reloads(server, "reload refused") >= 2, what="the SIGHUP's refusal")
    assert server.proc is not None and server.proc.poll() is None  # the arbiter is alive
    assert _preflight(server).status == 204
    metrics = server.admin("GET", "/metrics").body.decode()
    assert 'corsproxy_reloads_total{result="refused"} 2.0' in metrics


def test_a_reload_whose_workers_cannot_open_the_store_is_refused(server: Server, tmp_path: Path) -> None:
    """The check passes (a writable directory) but no worker can open it: the arbiter must not halt."""
    broken = tmp_path / "broken-store"
    broken.mkdir()
    (broken / "data.mdb").write_bytes(b"this is not an LMDB file\n" * 1000)
    server.write_config(merge(server.data, {"store": {"path": str(broken)}}))
    before = set(server.booted_pids())
    refused = server.admin("POST", "/reload")
    assert refused.status == 409, refused.body
    reason = refused.json()["reason"]
    assert "a new worker could not start" in reason and str(broken) in reason, reason
    assert server.proc is not None and server.proc.poll() is None
    for _ in range(10):  # every answer still comes from the old workers, on the old store
        assert _preflight(server).status == 204
    assert set(server.booted_pids()) == before  # no new worker ever served
    # A good config afterwards is applied as usual.
    server.write_config()
    assert server.admin("POST", "/reload").json()["status"] == "applied"
    assert _preflight(server).status == 204


def test_a_reload_onto_a_full_store_is_refused(tmp_path: Path, upstream_thread: ThreadedUpstream) -> None:
    """The reload's reconcile hits MDB_MAP_FULL: refused with the reason; the running workers keep serving."""
    server = Server(tmp_path, upstream_thread.port, workers=2, store={"map_size_mb": 1}).start()
    try:
        with OriginStore(tmp_path / "origins.lmdb", map_size=1 << 20) as store:
            n = 0
            with pytest.raises(StoreFullError):  # fill it until it is full
                while n < 100_000:
                    store.put_many(
                        ((f"https://filler-{n + i}.example.net", OriginRecord(note="x" * 100)) for i in range(50)),
                        "test",
                    )
                    n += 50
        more = [f"https://new-{i}.example.com" for i in range(300)]
        data = merge(server.data, {"cors": {"allow_origins": [*server.data["cors"]["allow_origins"], *more]}})
        server.write_config(data)
        refused = server.admin("POST", "/reload")
        assert refused.status == 409, refused.body
        assert "full" in refused.json()["reason"] and "store.map_size_mb" in refused.json()["reason"]
        assert server.proc is not None and server.proc.poll() is None
        assert _preflight(server).status == 204
        assert (
            server.proxy("OPTIONS", "/api", headers={"Origin": more[0], "Access-Control-Request-Method": "POST"}).status
            == 403
        )
    finally:
        assert server.stop() == 0


def test_a_reload_during_a_long_write_keeps_serving_and_logs_after_the_fact(server: Server, tmp_path: Path) -> None:
    """An import holds LMDB's writer lock: the old workers keep serving until the new ones are ready, and the
    "reloaded" line comes only after the new workers serve."""
    held = threading.Event()
    release = threading.Event()

    def hold_writer_lock() -> None:
        env = lmdb.open(str(tmp_path / "origins.lmdb"), map_size=1 << 30, max_dbs=4, writemap=True)
        try:
            txn = env.begin(write=True)
            held.set()
            release.wait(30)
            txn.abort()
        finally:
            env.close()

    holder = threading.Thread(target=hold_writer_lock, daemon=True)
    holder.start()
    assert held.wait(10)
    first = server.booted_pids()
    try:
        server.send(signal.SIGHUP)
        # While the lock is held — long enough for old workers told to stop to have exited — the proxy answers on
        # fresh connections, and no reload is reported: the new workers are not serving yet.
        for _ in range(40):
            assert _preflight(server).status == 204
            assert server.proxy("GET", "/api", headers={"Origin": APP}, timeout=5).status == 200
            time.sleep(0.1)
        assert _reloads(server) == 0
    finally:
        release.set()
        holder.join(10)
    wait_until(lambda: _reloads(server) == 1, timeout=60, what="the reload")
    logs = server.logs()
    reloaded = next(line for line in logs if line.get("message", "").startswith("reloaded "))
    new_workers = [
        line for line in logs if "corsproxy listening" in line.get("message", "") and line["pid"] not in first
    ]
    assert len(new_workers) == 2
    assert all(line["time"] <= reloaded["time"] for line in new_workers)


def test_metric_files_do_not_pile_up_across_reloads_and_totals_hold(server: Server, tmp_path: Path) -> None:
    metrics_dir = tmp_path / "metrics"
    for round_ in range(4):
        for _ in range(5):
            assert server.proxy("GET", "/api", headers={"Origin": APP}).status == 200
        server.send(signal.SIGHUP)
        wait_until(lambda: _reloads(server) > round_, timeout=60, what="the reload")  # noqa: B023
    # Every old worker has exited (their files folded into the archive when the arbiter reaped them).
    wait_until(lambda: len(server.booted_pids()) == 10 and _live_files(metrics_dir) <= 12, timeout=30, what="folds")
    files = sorted(p.name for p in metrics_dir.glob("*.db"))
    assert len(files) <= 12, files  # 2 live workers' files, the arbiter's, the archives: not 2 per dead worker
    body = server.admin("GET", "/metrics").body.decode()
    assert 'corsproxy_requests_total{kind="actual",reason="allowed"} 20.0' in body, body
    assert 'corsproxy_reloads_total{result="applied"} 4.0' in body


def _live_files(directory: Path) -> int:
    return len(list(directory.glob("*.db")))


def test_after_a_reload_every_admin_request_reaches_a_new_worker(server: Server) -> None:
    """The old workers stop taking admin connections when they start to drain, like proxied ones: probes and writes
    after the reload meet the new configuration, not a draining worker's 503."""
    before = server.booted_pids()
    slow: list[Response] = []
    in_flight = threading.Thread(
        target=lambda: slow.append(server.proxy("GET", "/slow?seconds=3", headers={"Origin": APP}, timeout=20))
    )
    in_flight.start()  # keeps one old worker draining for a while after the reload
    time.sleep(0.3)
    assert server.admin("POST", "/reload").json()["status"] == "applied"
    new = server.booted_pids() - before
    assert len(new) == 2
    for _ in range(20):
        health = server.admin("GET", "/healthz", token=None)
        assert health.status == 200 and health.json()["pid"] in new
        assert server.admin("GET", "/readyz", token=None).status == 200
    in_flight.join(20)
    assert slow and slow[0].status == 200  # and the old worker finished its request


def _refused(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=5).close()
    except ConnectionRefusedError:
        return True
    return False


def test_a_reload_that_moves_the_ports_closes_the_old_ones_and_a_refused_one_keeps_them(
    server: Server, tmp_path: Path
) -> None:
    old_port, old_admin = server.port, server.admin_port
    new_port, new_admin = free_port(), free_port()
    moved = {"listen": {"port": new_port}, "admin": {"listen": {"port": new_admin}}}
    broken = tmp_path / "broken-store"
    broken.mkdir()
    (broken / "data.mdb").write_bytes(b"not LMDB\n" * 1000)
    server.write_config(merge(server.data, {**moved, "store": {"path": str(broken)}}))
    assert server.admin("POST", "/reload").status == 409  # the workers could not start: nothing moves
    assert _preflight(server).status == 204
    wait_until(lambda: _refused(new_port) and _refused(new_admin), what="the new ports to be released")

    server.write_config(merge(server.data, moved))
    assert server.admin("POST", "/reload").json()["status"] == "applied"
    server.port, server.admin_port = new_port, new_admin
    assert _preflight(server).status == 204
    assert server.admin("GET", "/healthz", token=None).status == 200
    # No process keeps the old sockets open (the new workers were forked while the arbiter still held them).
    wait_until(lambda: _refused(old_port) and _refused(old_admin), what="the old ports to be closed")


def test_a_replacement_worker_that_cannot_boot_never_halts_the_arbiter(server: Server, tmp_path: Path) -> None:
    """Outside any reload: a worker dies, and its replacement cannot open the store. The other worker keeps serving,
    the arbiter retries with a backoff, and once the store is fixed the fleet is whole again."""
    data = tmp_path / "origins.lmdb" / "data.mdb"
    good = data.with_name("data.mdb.good")
    data.rename(good)  # the running workers keep the file they have open
    data.write_bytes(b"not LMDB\n" * 1000)
    victim = min(server.booted_pids())
    os.kill(victim, signal.SIGKILL)
    wait_until(lambda: "a worker failed to start" in server.log_text(), timeout=30, what="a failed replacement")
    assert server.proc is not None and server.proc.poll() is None  # the arbiter is alive
    for _ in range(10):
        assert _preflight(server).status == 204
    good.replace(data)
    booted = len(server.booted_pids())
    wait_until(lambda: len(server.booted_pids()) > booted, timeout=60, what="a replacement once the store is back")
    assert _preflight(server).status == 204
