"""Several workers behind one arbiter: changes seen by every worker, dead workers replaced, SIGTERM drains, nothing
in the store lost by any shutdown, and the optional TLS listener."""

from __future__ import annotations

import os
import signal
import ssl
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from tests.support.config import run_cli
from tests.support.net import Response, request, wait_until
from tests.support.serve import Server, origin_path
from tests.support.upstream import ThreadedUpstream


def _worker_pids(server: Server) -> set[int]:
    return {line["pid"] for line in server.logs() if "corsproxy listening" in line.get("message", "")}


def _burst(server: Server, origin: str, count: int) -> list[Response]:
    """``count`` requests from ``origin``, each on its own connection, four at a time, so both workers accept."""
    with ThreadPoolExecutor(4) as pool:
        return list(pool.map(lambda _: server.proxy("GET", "/api/data", headers={"Origin": origin}), range(count)))


def _pids_that_answered(server: Server, origin: str, decision: str) -> set[int]:
    return {
        line["pid"]
        for line in server.request_logs()
        if line.get("origin") == origin and line.get("decision") == decision
    }


@pytest.fixture
def two_workers(tmp_path: Path, upstream_thread: ThreadedUpstream) -> Any:
    server = Server(tmp_path, upstream_thread.port, workers=2).start()
    yield server
    server.stop()


def test_a_change_is_seen_by_every_worker_on_its_next_request(two_workers: Server) -> None:
    server = two_workers
    origin = "https://late-partner.example.com"
    assert len(_worker_pids(server)) == 2
    before = _burst(server, origin, 10)
    assert all("Access-Control-Allow-Origin" not in r.headers for r in before)

    # Written through the admin API (answered by one worker), honoured by all, with no restart.
    assert server.admin("PUT", origin_path(origin), body={"note": "signed today"}).status == 201
    seen: set[int] = set()
    for _ in range(10):  # bounded: 10 bursts of 20 fresh connections
        responses = _burst(server, origin, 20)
        assert all(r.status == 200 and r.headers["Access-Control-Allow-Origin"] == origin for r in responses)
        seen = _pids_that_answered(server, origin, "allowed")
        if len(seen) == 2:
            break
    assert seen == _worker_pids(server), "both workers must have answered the new origin"

    # Removed through the CLI, a separate process writing the same LMDB environment.
    result = run_cli("origins", "remove", origin, "--config", str(server.config_path), env=server.env)
    assert result.returncode == 0, result.stderr
    after = _burst(server, origin, 20)
    assert all("Access-Control-Allow-Origin" not in r.headers for r in after)


def test_a_dead_worker_is_replaced(two_workers: Server) -> None:
    server = two_workers
    pids = _worker_pids(server)
    victim = min(pids)
    os.kill(victim, signal.SIGKILL)
    wait_until(lambda: len(_worker_pids(server) - pids) == 1, what="a replacement worker")
    assert server.proc is not None and server.proc.poll() is None
    responses = _burst(server, "https://app.example.com", 10)
    assert all(r.status == 200 for r in responses)


def test_sigterm_drains_in_flight_requests_and_exits_zero(tmp_path: Path, upstream_thread: ThreadedUpstream) -> None:
    server = Server(tmp_path, upstream_thread.port, workers=2).start()
    key = "https://kept.example.com"
    assert server.admin("PUT", origin_path(key), body={}).status == 201
    results: list[Response] = []

    def slow() -> None:
        results.append(server.proxy("GET", "/slow?seconds=2", headers={"Origin": key}, timeout=20))

    thread = threading.Thread(target=slow)
    thread.start()
    time.sleep(0.5)  # the request is in the upstream's hands now (it sleeps 2 s)
    server.send(signal.SIGTERM)
    wait_until(lambda: "Handling signal: term" in server.log_text(), what="the arbiter to see SIGTERM")
    assert server.stop(timeout=30) == 0
    thread.join(20)
    assert len(results) == 1 and results[0].status == 200 and results[0].body == b"late"
    assert results[0].headers["Access-Control-Allow-Origin"] == key
    with pytest.raises(OSError):
        request(server.port, "GET", "/", timeout=2)
    listing = run_cli("origins", "list", "--config", str(server.config_path), env=server.env)
    assert key in listing.stdout


def test_nothing_is_lost_when_everything_is_killed(tmp_path: Path, upstream_thread: ThreadedUpstream) -> None:
    server = Server(tmp_path, upstream_thread.port, workers=2).start()
    keys = [f"https://k{i}.example.com" for i in range(20)]
    for key in keys:
        assert server.admin("PUT", origin_path(key), body={}).status == 201
    for pid in _worker_pids(server):
        os.kill(pid, signal.SIGKILL)
    assert server.stop(signal.SIGKILL) == -signal.SIGKILL
    listing = run_cli("origins", "list", "--config", str(server.config_path), env=server.env)
    assert listing.returncode == 0, listing.stderr
    assert all(key in listing.stdout for key in keys)
    history = run_cli("origins", "history", "--config", str(server.config_path), "--limit", "1000", env=server.env)
    assert history.stdout.count('"actor":"admin:admin"') == len(keys)


def test_tls_listener(tmp_path: Path, upstream_thread: ThreadedUpstream) -> None:
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    made = subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=127.0.0.1",
            "-addext",
            "subjectAltName=IP:127.0.0.1",
            "-keyout",
            str(key),
            "-out",
            str(cert),
        ],
        capture_output=True,
        check=False,
        timeout=30,
    )
    if made.returncode != 0:
        pytest.skip(f"openssl cannot make a test certificate: {made.stderr.decode()[-200:]}")
    server = Server(tmp_path, upstream_thread.port, workers=1, listen={"tls_cert": str(cert), "tls_key": str(key)})
    server.start()
    try:
        import http.client

        context = ssl.create_default_context(cafile=str(cert))
        conn = http.client.HTTPSConnection("127.0.0.1", server.port, context=context, timeout=10)
        conn.request("GET", "/api", headers={"Origin": "https://app.example.com"})
        response = conn.getresponse()
        assert response.status == 200
        assert response.headers["Access-Control-Allow-Origin"] == "https://app.example.com"
        assert b'"raw_path": "/api"' in response.read()
        conn.close()
        with pytest.raises(OSError):  # plain HTTP on the TLS port gets no HTTP answer
            request(server.port, "GET", "/", timeout=3)
    finally:
        assert server.stop() == 0


def _maps_uvloop(pid: int) -> bool:
    return "/uvloop/" in Path(f"/proc/{pid}/maps").read_text()


@pytest.mark.parametrize("setting", ["", "0"], ids=["uvloop-when-installed", "CORSPROXY_UVLOOP=0"])
def test_event_loop_choice_is_logged_and_applied(
    setting: str, tmp_path: Path, upstream_thread: ThreadedUpstream
) -> None:
    """uvloop (the ``speed`` extra) serves when installed, unless ``CORSPROXY_UVLOOP=0``; the arbiter says which at
    start, and only a worker that runs it has loaded it."""
    pytest.importorskip("uvloop")
    server = Server(tmp_path, upstream_thread.port, workers=1, env={"CORSPROXY_UVLOOP": setting}).start()
    try:
        assert server.proxy("GET", "/api", headers={"Origin": "https://app.example.com"}).status == 200
        messages = [str(line.get("message", "")) for line in server.logs()]
        expected = "event loop: asyncio (CORSPROXY_UVLOOP=0)" if setting else "event loop: uvloop "
        assert any(message.startswith(expected) for message in messages), messages
        (worker,) = _worker_pids(server)
        assert _maps_uvloop(worker) is (not setting)
        assert server.proc is not None and not _maps_uvloop(server.proc.pid)  # the arbiter never loads it
    finally:
        assert server.stop() == 0
