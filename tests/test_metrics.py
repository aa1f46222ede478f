"""GET /metrics on a real 2-worker server: Prometheus text, parsed, counting every worker's requests."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from corsproxy.core.decision import Decision, Kind, Reason
from corsproxy.core.outcome import Outcome
from corsproxy.ops.metrics import MULTIPROC_ENV, Metrics
from corsproxy.ops.server import _StoreErrorCounter
from tests.support.inprocess import ProxyFactory, client_state
from tests.support.net import free_port, wait_until
from tests.support.serve import Server, scrape, value
from tests.support.upstream import ThreadedUpstream

APP = "https://app.example.com"


def test_request_counters_add_up_across_workers(served: Server) -> None:
    before = scrape(served)
    for _ in range(6):
        assert served.proxy("GET", "/api", headers={"Origin": APP}).status == 200
    for _ in range(3):
        preflight = {"Origin": "https://evil.example.net", "Access-Control-Request-Method": "POST"}
        assert served.proxy("OPTIONS", "/api", headers=preflight).status == 403
    assert (
        served.proxy("OPTIONS", "/api", headers={"Origin": APP, "Access-Control-Request-Method": "PATCH"}).status == 403
    )
    assert served.proxy("GET", "/status/404").status == 404
    assert served.proxy("GET", "/status/503", headers={"Origin": APP}).status == 503
    after: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}

    def delta(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    def all_counted() -> bool:
        # Each worker folds its counts into the shared files about once a second (issue 6), and a scrape reaches
        # one worker: the other's requests show up within a flush interval.
        nonlocal after
        after = scrape(served)
        return delta("corsproxy_request_duration_seconds_count", kind="actual") >= 7 and (
            delta("corsproxy_upstream_latency_seconds_count") >= 8
        )

    wait_until(all_counted, timeout=10, interval=0.2, what="every worker's requests in /metrics")

    assert delta("corsproxy_requests_total", kind="actual", reason="allowed") == 7
    assert delta("corsproxy_requests_total", kind="preflight", reason="origin_not_allowed") == 3
    assert delta("corsproxy_requests_total", kind="preflight", reason="method_not_allowed") == 1
    assert delta("corsproxy_requests_total", kind="non_cors", reason="no_origin") == 1
    assert delta("corsproxy_upstream_responses_total", status_class="2xx") == 6
    assert delta("corsproxy_upstream_responses_total", status_class="4xx") == 1
    assert delta("corsproxy_upstream_responses_total", status_class="5xx") == 1
    assert delta("corsproxy_request_duration_seconds_count", kind="preflight") == 4
    assert delta("corsproxy_request_duration_seconds_count", kind="actual") == 7
    assert delta("corsproxy_upstream_latency_seconds_count") == 8
    assert value(after, "corsproxy_upstream_latency_seconds_bucket", le="+Inf") == value(
        after, "corsproxy_upstream_latency_seconds_count"
    )
    # The origin set: the config's three entries plus the origins file's one.
    assert value(after, "corsproxy_origins") == len(served.admin("GET", "/origins").json()["origins"]) == 4
    assert ("corsproxy_store_read_errors_total", ()) in after
    assert value(after, "corsproxy_origins_file_syncs_total", result="applied") >= 1


def test_upstream_errors_by_type(tmp_path: Path, upstream_thread: ThreadedUpstream) -> None:
    dead = free_port()
    server = Server(tmp_path, dead, workers=1, upstream={"url": f"http://127.0.0.1:{dead}"}).start()
    try:
        for _ in range(2):
            assert server.proxy("GET", "/api", headers={"Origin": APP}).status == 502
        samples = scrape(server)  # one worker: the one answering the scrape flushes its own counts first
        assert value(samples, "corsproxy_upstream_errors_total", type="connect") == 2
        assert value(samples, "corsproxy_upstream_latency_seconds_count") == 0
        assert value(samples, "corsproxy_requests_total", kind="actual", reason="allowed") == 2
    finally:
        assert server.stop() == 0


def _outcome(kind: Kind, reason: Reason, duration: float, latency: float | None = None, **kw: Any) -> Outcome:
    decision = Decision(kind=kind, reason=reason)
    return Outcome("GET", "/", "127.0.0.1", decision, kw.pop("status", 200), 0, duration, latency, **kw)


def test_counts_reach_prometheus_on_flush_and_buckets_are_exact(monkeypatch: pytest.MonkeyPatch) -> None:
    """observe() only counts; flush() folds the counts into prometheus-client's objects, as observe() per request
    did before (a value equal to a bucket bound is in that bucket; +Inf holds everything)."""
    monkeypatch.delenv(MULTIPROC_ENV, raising=False)  # a private registry, this process only
    metrics = Metrics()
    metrics.observe(_outcome(Kind.PREFLIGHT, Reason.ALLOWED, 0.001))
    metrics.observe(_outcome(Kind.PREFLIGHT, Reason.ALLOWED, 0.0007))
    metrics.observe(_outcome(Kind.PREFLIGHT, Reason.ORIGIN_NOT_ALLOWED, 100.0, status=403))
    metrics.observe(_outcome(Kind.ACTUAL, Reason.ALLOWED, 0.02, 0.005, status=503))
    metrics.observe(_outcome(Kind.ACTUAL, Reason.ALLOWED, 0.3, None, status=502, upstream_error="connect"))
    metrics.observe(_outcome(Kind.ACTUAL, Reason.ALLOWED, 0.3, 0.25, status=200, upstream_error="disconnect"))
    assert _samples(metrics) == {}  # nothing written per request
    metrics.flush()
    samples = _samples(metrics)
    assert value(samples, "corsproxy_requests_total", kind="preflight", reason="allowed") == 2
    assert value(samples, "corsproxy_requests_total", kind="preflight", reason="origin_not_allowed") == 1
    assert value(samples, "corsproxy_requests_total", kind="actual", reason="allowed") == 3
    assert value(samples, "corsproxy_upstream_errors_total", type="connect") == 1
    assert value(samples, "corsproxy_upstream_responses_total", status_class="5xx") == 1
    assert value(samples, "corsproxy_upstream_responses_total", status_class="2xx") == 1
    buckets = {
        le: value(samples, "corsproxy_request_duration_seconds_bucket", kind="preflight", le=le)
        for le in ("0.0005", "0.001", "60.0", "+Inf")
    }
    assert buckets == {"0.0005": 0, "0.001": 2, "60.0": 2, "+Inf": 3}
    assert value(samples, "corsproxy_request_duration_seconds_sum", kind="preflight") == pytest.approx(100.0017)
    assert value(samples, "corsproxy_upstream_latency_seconds_bucket", le="0.005") == 1
    assert value(samples, "corsproxy_upstream_latency_seconds_bucket", le="0.25") == 2
    assert value(samples, "corsproxy_upstream_latency_seconds_count") == 2
    assert value(samples, "corsproxy_upstream_latency_seconds_sum") == pytest.approx(0.255)
    metrics.flush()  # nothing new: nothing added twice
    assert _samples(metrics) == samples


def _samples(metrics: Metrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every non-zero sample of a private registry (absent ones read as 0 through :func:`value`)."""
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(metrics.render().decode())
        for sample in family.samples
        if sample.value and not sample.name.endswith("_created")
    }


async def test_a_store_error_is_counted_without_a_middleware(
    make_proxy: ProxyFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A read of the origin store that fails (here: its LMDB environment closed under the running proxy) is answered
    500 by aiohttp and counted through aiohttp's error log, at no cost to requests that succeed."""
    monkeypatch.delenv(MULTIPROC_ENV, raising=False)
    metrics = Metrics()
    counter = _StoreErrorCounter(metrics)
    aiohttp_log = logging.getLogger("aiohttp.server")
    aiohttp_log.addFilter(counter)
    try:
        client = await make_proxy()
        assert (await client.get("/api", headers={"Origin": "https://app.example.com"})).status == 200
        assert value(_samples(metrics), "corsproxy_store_read_errors_total") == 0
        client_state(client).store.close()
        response = await client.get("/api", headers={"Origin": "https://other.example.com"})  # not in the cache
        assert response.status == 500
        assert value(_samples(metrics), "corsproxy_store_read_errors_total") == 1
    finally:
        aiohttp_log.removeFilter(counter)
