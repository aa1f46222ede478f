"""Prometheus metrics, aggregated across worker processes.

Owns the metric names and labels. Uses prometheus-client's multiprocess mode: each worker writes its samples to
memory-mapped files in ``PROMETHEUS_MULTIPROC_DIR`` and whichever worker answers ``GET /metrics`` sums them all, so a
scrape sees the whole server whichever worker it reaches. That environment variable must be set *before*
``prometheus_client`` is first imported (it picks its value store at import time): :mod:`corsproxy.ops.server` sets it
up, then imports this module.

Must not import aiohttp or lmdb; requests are seen as :class:`corsproxy.core.outcome.Outcome` values.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from bisect import bisect_left
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest, multiprocess

# The classic text format (what generate_latest writes): every Prometheus version reads it.
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4 as CONTENT_TYPE
from prometheus_client.mmap_dict import MmapedDict

from corsproxy.core.log_limit import PROXY_LINES

if TYPE_CHECKING:
    from corsproxy.core.outcome import Outcome
    from corsproxy.store import StoreUsage

__all__ = ["CONTENT_TYPE", "MULTIPROC_ENV", "Metrics", "fold_dead_process", "mark_process_dead"]

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"

#: What the proxy refuses before a request reaches its handler (so ``corsproxy_requests`` never sees it): the
#: :data:`~corsproxy.core.log_limit.PROXY_LINES` keys whose counts become ``corsproxy_malformed_requests{type}``.
MALFORMED_TYPES = ("malformed_request", "head_too_large", "head_timeout")

# Seconds. A preflight answered from LMDB takes well under a millisecond; an upstream call anything up to read_timeout.
_LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class Metrics:
    """The metric objects of one process; :meth:`observe` is an observer for :attr:`ProxyState.observers`.

    The per-request metrics (requests, upstream responses and errors, the two latency histograms) are counted by
    :meth:`observe` in plain ints and folded into the prometheus-client objects by :meth:`flush`, which the worker calls
    about once a second, before it answers a scrape, and when it stops (for speed: ``Counter.inc`` and
    ``Histogram.observe`` in multiprocess mode write memory-mapped files under a lock, on every call; a few dict
    increments cost a small fraction of that, see bench/RESULTS.md). The price is that a scrape may miss up to a second
    of another worker's requests, which it picks up on the next scrape. The rare events (reloads, origins-file syncs,
    store errors, the origin count) are written straight through.

    :meth:`observe` and :meth:`flush` must run on the same thread (the worker's event loop): the buffers have no lock.
    """

    def __init__(self) -> None:
        # In multiprocess mode the samples live in files and the collector reads them: registering the objects
        # anywhere would count them twice. Outside it (a single process), a private registry keeps them apart
        # from prometheus-client's global one.
        self.registry = None if os.environ.get(MULTIPROC_ENV) else CollectorRegistry()
        registry = self.registry

        def counter(name: str, doc: str, *labels: str) -> Counter:
            return Counter(name, doc, labels, registry=registry)

        def gauge(name: str, doc: str, *labels: str) -> Gauge:
            # Read from the store when metrics are scraped: the latest live worker's reading is the value.
            return Gauge(name, doc, labels, multiprocess_mode="livemostrecent", registry=registry)

        def histogram(name: str, doc: str, *labels: str) -> Histogram:
            return Histogram(name, doc, labels, buckets=_LATENCY_BUCKETS, registry=registry)

        self.requests = counter(
            "corsproxy_requests",
            "Requests on the proxied port, by CORS kind (preflight, actual, non_cors) and decision reason.",
            "kind",
            "reason",
        )
        self.upstream_responses = counter(
            "corsproxy_upstream_responses",
            "Responses received from the upstream, by status class (2xx, 3xx, 4xx, 5xx).",
            "status_class",
        )
        self.upstream_errors = counter(
            "corsproxy_upstream_errors",
            "Upstream calls that failed, by type (connect, timeout, protocol, disconnect).",
            "type",
        )
        self.request_duration = histogram(
            "corsproxy_request_duration_seconds",
            "Whole request time as corsproxy saw it, by CORS kind.",
            "kind",
        )
        self.upstream_latency = histogram(
            "corsproxy_upstream_latency_seconds",
            "Time from sending a request upstream to receiving the upstream's response head.",
        )
        self.malformed_requests = counter(
            "corsproxy_malformed_requests",
            "Requests refused before the handler, by type: malformed_request (400), head_too_large (431), "
            "head_timeout (no complete head within limits.header_read_timeout). Exact, whatever the logs left out.",
            "type",
        )
        self.origins = gauge(
            "corsproxy_origins",
            "Entries in the origin store (read when metrics are scraped).",
        )
        self.store_read_errors = counter(
            "corsproxy_store_read_errors",
            "Failed reads of the origin store (the request was answered with an error).",
        )
        # The store's room, read when metrics are scraped: alert on used/limit and on disk free before writes fail.
        self.store_bytes = gauge(
            "corsproxy_store_bytes",
            "The origin store's size, by kind: used (live data), file (the data file's high-water mark), map_size "
            "(store.map_size_mb), limit (where additions stop: the map less the removal reserve), disk_free.",
            "kind",
        )
        self.store_audit_events = gauge(
            "corsproxy_store_audit_events",
            "Events in the store's audit trail (bounded by store.audit_retention).",
        )
        self.store_writable = gauge(
            "corsproxy_store_writable",
            "1 when an ordinary addition fits in the store and on its disk, else 0 (removals still work longer).",
        )
        self.store_write_errors = counter(
            "corsproxy_store_write_errors",
            "Admin API writes the store refused, by reason (store_full, disk_full, io); nothing was written.",
            "reason",
        )
        self.reloads = counter(
            "corsproxy_reloads",
            "Configuration reloads requested (SIGHUP or POST /reload), by result (applied, refused).",
            "result",
        )
        self.origins_file_syncs = counter(
            "corsproxy_origins_file_syncs",
            "Times the watched origins file was read after a change, by result (applied, refused).",
            "result",
        )
        # Fleet mode (store.postgresql): counted by the worker that runs this host's syncer, read from the store.
        self.sync_errors = counter(
            "corsproxy_sync_errors",
            "Failed exchanges with PostgreSQL in fleet mode, by kind (connect, sync, listen, schema, store).",
            "kind",
        )
        self.sync_rows_refused = counter(
            "corsproxy_sync_rows_refused",
            "Rows of corsproxy_origins this host refused to apply: invalid or unsafe (`corsproxy check` lists them).",
        )
        self.sync_position = gauge(
            "corsproxy_sync_position", "The change log sequence number this host's replica has applied."
        )
        self.sync_lag = gauge(
            "corsproxy_sync_lag_seconds",
            "Seconds since this host's replica last confirmed it had every change (grows while PostgreSQL is down).",
        )
        # Not yet flushed: requests by (kind, reason) enum pair; upstream responses by status // 100; upstream errors
        # by type; per histogram (kind, or None for the upstream latency) its bucket counts (the last one is +Inf)
        # followed by its sum. Keys are whatever the request path already holds, so observe() builds no strings.
        self._requests: dict[tuple[Any, Any], int] = {}
        self._status_classes: dict[int, int] = {}
        self._upstream_errors: dict[str, int] = {}
        self._durations: dict[Any, list[float]] = {}
        self._upstream_latencies: list[float] = _empty_histogram()
        #: Sees each batch just before it is folded in (the console's charts): requests, status classes, request
        #: durations by kind, upstream latencies. It must copy what it keeps; it runs on the flushing thread.
        self.on_flush: Callable[[dict[Any, int], dict[int, int], dict[Any, list[float]], list[float]], None] | None
        self.on_flush = None

    def observe(self, outcome: Outcome) -> None:
        decision = outcome.decision
        kind = decision.kind
        key = (kind, decision.reason)
        requests = self._requests
        requests[key] = requests.get(key, 0) + 1
        duration = outcome.duration
        histogram = self._durations.get(kind)
        if histogram is None:
            histogram = self._durations[kind] = _empty_histogram()
        histogram[bisect_left(_LATENCY_BUCKETS, duration)] += 1  # le buckets: a value equal to a bound is in it
        histogram[-1] += duration
        error = outcome.upstream_error
        if error is not None:
            errors = self._upstream_errors
            errors[error] = errors.get(error, 0) + 1
        latency = outcome.upstream_latency
        if latency is not None:
            latencies = self._upstream_latencies
            latencies[bisect_left(_LATENCY_BUCKETS, latency)] += 1
            latencies[-1] += latency
            if error is None or error == "disconnect":
                status_class = outcome.status // 100
                classes = self._status_classes
                classes[status_class] = classes.get(status_class, 0) + 1

    def flush(self) -> None:
        """Fold what :meth:`observe` counted since the last call into the prometheus-client objects (a scrape reads
        those). Cheap when nothing happened; call it on the thread that calls :meth:`observe`."""
        if self.on_flush is not None:
            self.on_flush(self._requests, self._status_classes, self._durations, self._upstream_latencies)
        if self._requests:
            requests, self._requests = self._requests, {}
            for (kind, reason), count in requests.items():
                self.requests.labels(kind.value, reason.value).inc(count)
        if self._status_classes:
            classes, self._status_classes = self._status_classes, {}
            for status_class, count in classes.items():
                self.upstream_responses.labels(f"{status_class}xx").inc(count)
        if self._upstream_errors:
            errors, self._upstream_errors = self._upstream_errors, {}
            for error, count in errors.items():
                self.upstream_errors.labels(error).inc(count)
        if self._durations:
            durations, self._durations = self._durations, {}
            for kind, histogram in durations.items():
                _add_to_histogram(self.request_duration.labels(kind.value), histogram)
        # The proxy's line limiter counts every such event, logged or not; this is its one reader.
        for key, count in PROXY_LINES.take_counts().items():
            if key in MALFORMED_TYPES:
                self.malformed_requests.labels(key).inc(count)
        latencies = self._upstream_latencies
        if any(latencies):
            self._upstream_latencies = _empty_histogram()
            _add_to_histogram(self.upstream_latency, latencies)

    def count_store_error(self) -> None:
        """One failed read of the origin store (for code that catches ``lmdb.Error`` itself and answers)."""
        self.store_read_errors.inc()

    def set_store_usage(self, usage: StoreUsage) -> None:
        for kind, value in (
            ("used", usage.used_bytes),
            ("file", usage.file_bytes),
            ("map_size", usage.map_size_bytes),
            ("limit", usage.limit_bytes),
            ("disk_free", usage.disk_free_bytes),
        ):
            self.store_bytes.labels(kind).set(value)
        self.store_audit_events.set(usage.audit_events)
        self.store_writable.set(1 if usage.writable else 0)

    def render(self) -> bytes:
        """The Prometheus text format, summed over every live and dead worker of this server.

        Reads what was flushed; the caller flushes this process's own counts first (on the event loop's thread)."""
        directory = os.environ.get(MULTIPROC_ENV)
        if directory:
            registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
            with _folding_lock(directory, fcntl.LOCK_SH):  # no file is folded away while it is being read
                return generate_latest(registry)
        assert self.registry is not None
        return generate_latest(self.registry)


def _empty_histogram() -> list[float]:
    return [0.0] * (len(_LATENCY_BUCKETS) + 2)  # one count per bucket, +Inf, then the sum


def _add_to_histogram(histogram: Histogram, counts: list[float]) -> None:
    """Add a batch of observations to a (labelled) histogram.

    prometheus-client has no public call for "n observations at once"; ``Histogram.observe`` adds the value to
    ``_sum`` and 1 to the first ``_buckets[i]`` whose bound holds it (non-cumulative; the exposition sums them), so
    this does the same per batch. tests/test_metrics.py pins the result through a real scrape.
    """
    buckets = histogram._buckets
    for index, count in enumerate(counts[:-1]):
        if count:
            buckets[index].inc(count)
    histogram._sum.inc(counts[-1])


def mark_process_dead(pid: int) -> None:
    """Called by the arbiter when a worker exits: its live gauges stop counting; its counters are kept."""
    if os.environ.get(MULTIPROC_ENV):
        multiprocess.mark_process_dead(pid)  # type: ignore[no-untyped-call]


#: The file kinds whose samples outlive their process (counters only grow); live gauges are dropped on exit instead.
_KEPT_KINDS = ("counter", "histogram", "summary")
_FOLD_LOCK = ".fold.lock"


@contextlib.contextmanager
def _folding_lock(directory: str, mode: int) -> Iterator[None]:
    with open(os.path.join(directory, _FOLD_LOCK), "a+b") as lock:
        fcntl.flock(lock, mode)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def fold_dead_process(pid: int) -> None:
    """Add a dead worker's counter and histogram samples into one ``<kind>_archive.db`` per kind and delete its
    files, so the multiprocess directory holds the live workers' files plus a fixed few, however many workers have
    come and gone (every reload replaces them all). Sums, and so every scrape, are unchanged: the collector adds the
    archive like any other file. A scrape holds the shared lock, so it sees the files before or after, never half.

    prometheus-client has no public call for this; it writes the archive with its own ``MmapedDict`` (the format its
    collector reads), and tests/test_reload_fleet_reload.py pins the totals through real scrapes across reloads."""
    directory = os.environ.get(MULTIPROC_ENV)
    if not directory:
        return
    with _folding_lock(directory, fcntl.LOCK_EX):
        for kind in _KEPT_KINDS:
            path = os.path.join(directory, f"{kind}_{pid}.db")
            if not os.path.exists(path):
                continue
            archive = MmapedDict(os.path.join(directory, f"{kind}_archive.db"))  # type: ignore[no-untyped-call]
            try:
                for key, value, timestamp, _pos in MmapedDict.read_all_values_from_file(path):  # type: ignore[no-untyped-call]
                    total, _ = archive.read_value(key)  # type: ignore[no-untyped-call]
                    archive.write_value(key, total + value, timestamp)  # type: ignore[no-untyped-call]
            finally:
                archive.close()  # type: ignore[no-untyped-call]
            os.unlink(path)
