"""Live reload of the YAML: SIGHUP and POST /reload validate first, keep the running config on any error, and apply a
good one to new requests without dropping the ones in flight."""

from __future__ import annotations

import signal
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from tests.support.net import Response, wait_until
from tests.support.serve import Server
from tests.support.upstream import ThreadedUpstream

APP = "https://app.example.com"


def _preflight(server: Server, method: str) -> Response:
    return server.proxy("OPTIONS", "/api", headers={"Origin": APP, "Access-Control-Request-Method": method})


def _workers_now(server: Server) -> int:
    return len({line["pid"] for line in server.logs() if "corsproxy listening" in line.get("message", "")})


@pytest.fixture
def server(tmp_path: Path, upstream_thread: ThreadedUpstream) -> Any:
    s = Server(tmp_path, upstream_thread.port, workers=2).start()
    yield s
    assert s.stop() == 0


def _with_patch(server: Server) -> dict[str, Any]:
    data = dict(server.data)
    data["cors"] = {**data["cors"], "allow_methods": [*data["cors"]["allow_methods"], "PATCH"]}
    return data


def test_sighup_applies_a_good_config_without_dropping_in_flight_requests(server: Server) -> None:
    assert _preflight(server, "PATCH").status == 403
    results: list[Response] = []
    in_flight = threading.Thread(
        target=lambda: results.append(server.proxy("GET", "/slow?seconds=2", headers={"Origin": APP}, timeout=20))
    )
    in_flight.start()
    time.sleep(0.3)
    booted = _workers_now(server)
    server.write_config(_with_patch(server))
    server.send(signal.SIGHUP)
    wait_until(lambda: "reloaded " in server.log_text(), timeout=30, what="the reload")
    assert _workers_now(server) == booted + 2  # two new workers on the new config
    in_flight.join(20)
    assert results and results[0].status == 200 and results[0].body == b"late"
    # Every answer from now on is the new config's, whichever worker gives it.
    for _ in range(20):
        assert _preflight(server, "PATCH").status == 204
    metrics = server.admin("GET", "/metrics").body.decode()
    assert 'corsproxy_reloads_total{result="applied"} 1.0' in metrics
    # The slow GET finished on an old worker while it drained, just before it exited: a worker flushes its counts
    # into the shared metric files when it stops (they are batched, issue 6), so the new workers' scrape has it.
    wait_until(
        lambda: (
            'corsproxy_requests_total{kind="actual",reason="allowed"} 1.0'
            in server.admin("GET", "/metrics").body.decode()
        ),
        timeout=10,
        interval=0.2,
        what="the drained worker's request in /metrics",
    )


def test_sighup_keeps_the_running_config_when_the_new_one_is_bad(server: Server) -> None:
    bad = _with_patch(server)
    bad["cors"] = {**bad["cors"], "allow_origins": ["https://*.co.uk"], "allow_credentials": True, "max_age": "long"}
    server.write_config(bad)
    booted = _workers_now(server)
    server.send(signal.SIGHUP)
    wait_until(lambda: "reload refused" in server.log_text(), what="the refusal to be logged")
    errors = [line for line in server.logs() if "reload refused" in line.get("message", "")]
    assert errors[0]["level"] == "error"
    assert "cors.max_age" in errors[0]["message"] and "co.uk" in errors[0]["message"]  # every problem, with its path
    time.sleep(0.5)
    assert _workers_now(server) == booted  # no worker was restarted
    assert _preflight(server, "PATCH").status == 403
    assert _preflight(server, "POST").status == 204


def test_reload_endpoint(server: Server) -> None:
    server.config_path.write_text("cors: {allow_origins: [nope]\n")
    refused = server.admin("POST", "/reload")
    assert refused.status == 400
    body = refused.json()
    assert body["error"] == "configuration refused" and body["field"] == "config"
    assert (
        body["problems"]
        and body["problems"][0]["code"] == "invalid_yaml"
        and "invalid YAML" in body["problems"][0]["message"]
    )
    assert _preflight(server, "PATCH").status == 403

    server.write_config(_with_patch(server))
    accepted = server.admin("POST", "/reload")
    # The answer waits for the arbiter's verdict: new workers on the new config serve before it says "applied".
    assert accepted.status == 200 and accepted.json()["status"] == "applied"
    assert "reloaded " in server.log_text()
    assert _preflight(server, "PATCH").status == 204
    metrics = server.admin("GET", "/metrics").body.decode()
    assert 'corsproxy_reloads_total{result="refused"} 1.0' in metrics
    assert 'corsproxy_reloads_total{result="applied"} 1.0' in metrics
