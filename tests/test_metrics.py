"""GET /metrics on a real 2-worker server: Prometheus text, parsed, counting every worker's requests."""

from __future__ import annotations

from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from tests.test_workers_harness import Server, ThreadedUpstream, free_port, served, upstream_thread

__all__ = ["served", "upstream_thread"]

APP = "https://app.example.com"


def scrape(server: Server) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    response = server.admin("GET", "/metrics")
    assert response.status == 200
    assert response.headers["Content-Type"].startswith("text/plain; version=0.0.4")
    samples = {}
    for family in text_string_to_metric_families(response.body.decode()):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def value(samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


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
    after = scrape(served)

    def delta(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

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
        samples = scrape(server)
        assert value(samples, "corsproxy_upstream_errors_total", type="connect") == 2
        assert value(samples, "corsproxy_upstream_latency_seconds_count") == 0
        assert value(samples, "corsproxy_requests_total", kind="actual", reason="allowed") == 2
    finally:
        assert server.stop() == 0
