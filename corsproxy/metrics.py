"""Prometheus metrics, aggregated across worker processes.

Owns the metric names and labels. Uses prometheus-client's multiprocess mode: each worker writes its samples to
memory-mapped files in ``PROMETHEUS_MULTIPROC_DIR`` and whichever worker answers ``GET /metrics`` sums them all, so a
scrape sees the whole server whichever worker it reaches. That environment variable must be set *before*
``prometheus_client`` is first imported (it picks its value store at import time): :mod:`corsproxy.server` sets it
up, then imports this module.

Must not import aiohttp or lmdb; requests are seen as :class:`corsproxy.proxy.Outcome` values.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest, multiprocess

# The classic text format (what generate_latest writes): every Prometheus version reads it.
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4 as CONTENT_TYPE

if TYPE_CHECKING:
    from corsproxy.proxy import Outcome

__all__ = ["CONTENT_TYPE", "MULTIPROC_ENV", "Metrics", "mark_process_dead"]

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"

# Seconds. A preflight answered from LMDB takes well under a millisecond; an upstream call anything up to read_timeout.
_LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class Metrics:
    """The metric objects of one process; :meth:`observe` is an observer for :attr:`ProxyState.observers`."""

    def __init__(self) -> None:
        # In multiprocess mode the samples live in files and the collector reads them: registering the objects
        # anywhere would count them twice. Outside it (a single process), a private registry keeps them apart
        # from prometheus-client's global one.
        self.registry = None if os.environ.get(MULTIPROC_ENV) else CollectorRegistry()
        registry = self.registry
        self.requests = Counter(
            "corsproxy_requests",
            "Requests on the proxied port, by CORS kind (preflight, actual, non_cors) and decision reason.",
            ["kind", "reason"],
            registry=registry,
        )
        self.upstream_responses = Counter(
            "corsproxy_upstream_responses",
            "Responses received from the upstream, by status class (2xx, 3xx, 4xx, 5xx).",
            ["status_class"],
            registry=registry,
        )
        self.upstream_errors = Counter(
            "corsproxy_upstream_errors",
            "Upstream calls that failed, by type (connect, timeout, protocol, disconnect).",
            ["type"],
            registry=registry,
        )
        self.request_duration = Histogram(
            "corsproxy_request_duration_seconds",
            "Whole request time as corsproxy saw it, by CORS kind.",
            ["kind"],
            buckets=_LATENCY_BUCKETS,
            registry=registry,
        )
        self.upstream_latency = Histogram(
            "corsproxy_upstream_latency_seconds",
            "Time from sending a request upstream to receiving the upstream's response head.",
            buckets=_LATENCY_BUCKETS,
            registry=registry,
        )
        self.origins = Gauge(
            "corsproxy_origins",
            "Entries in the origin store (read when metrics are scraped).",
            multiprocess_mode="livemostrecent",
            registry=registry,
        )
        self.store_read_errors = Counter(
            "corsproxy_store_read_errors",
            "Failed reads of the origin store (the request was answered with an error).",
            registry=registry,
        )
        self.reloads = Counter(
            "corsproxy_reloads",
            "Configuration reloads requested (SIGHUP or POST /reload), by result (applied, refused).",
            ["result"],
            registry=registry,
        )
        self.origins_file_syncs = Counter(
            "corsproxy_origins_file_syncs",
            "Times the watched origins file was read after a change, by result (applied, refused).",
            ["result"],
            registry=registry,
        )

    def observe(self, outcome: Outcome) -> None:
        kind = outcome.decision.kind.value
        self.requests.labels(kind, outcome.decision.reason.value).inc()
        self.request_duration.labels(kind).observe(outcome.duration)
        if outcome.upstream_error is not None:
            self.upstream_errors.labels(outcome.upstream_error).inc()
        if outcome.upstream_latency is not None:
            self.upstream_latency.observe(outcome.upstream_latency)
            if outcome.upstream_error is None or outcome.upstream_error == "disconnect":
                self.upstream_responses.labels(f"{outcome.status // 100}xx").inc()

    def render(self) -> bytes:
        """The Prometheus text format, summed over every live and dead worker of this server."""
        if os.environ.get(MULTIPROC_ENV):
            registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
            return generate_latest(registry)
        assert self.registry is not None
        return generate_latest(self.registry)


def mark_process_dead(pid: int) -> None:
    """Called by the arbiter when a worker exits: its live gauges stop counting; its counters are kept."""
    if os.environ.get(MULTIPROC_ENV):
        multiprocess.mark_process_dead(pid)  # type: ignore[no-untyped-call]
