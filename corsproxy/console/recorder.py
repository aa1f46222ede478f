"""What each worker collects for the console: its refused requests and its per-interval counts for the charts.

The request path pays one observer call that returns after three identity checks for an allowed request, and a dict
update into a bounded buffer for a refused one. Everything else — merging into the shared console environment — runs
about twice a second on a worker thread (:meth:`ConsoleRecorder.run`), like the metrics' own batched flush. The chart
counts are not counted twice: :class:`corsproxy.ops.metrics.Metrics` hands its once-a-second batch to :meth:`count`.

Must not import aiohttp.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import lmdb

from corsproxy.console.db import SERIES_STEP, ConsoleDB, RefusalKey
from corsproxy.core.decision import Reason

if TYPE_CHECKING:
    from corsproxy.core.outcome import Outcome

__all__ = ["FLUSH_INTERVAL", "ConsoleRecorder"]

log = logging.getLogger("corsproxy.console")

#: Seconds between writes to the shared environment: a refusal reaches the Refusals screen within about twice this.
FLUSH_INTERVAL = 0.5
#: Distinct refused (origin, method, path, reason) rows one worker buffers between flushes; more are only counted.
MAX_PENDING = 1000
_SESSION_PURGE_EVERY = 60.0
#: Characters of a refused request's path the console keeps (the shared list is keyed by it; LMDB keys are short).
_MAX_PATH = 200
_ALLOWED, _NO_ORIGIN, _SAME_ORIGIN = Reason.ALLOWED, Reason.NO_ORIGIN, Reason.SAME_ORIGIN


class ConsoleRecorder:
    """One per worker; :meth:`observe` is an observer for :attr:`ProxyState.observers` (same thread as the loop)."""

    def __init__(self, db: ConsoleDB) -> None:
        self.db = db
        self.dropped = 0  # refusals not buffered because MAX_PENDING distinct rows were already waiting
        self._refusals: dict[RefusalKey, list[float]] = {}
        self._buckets: dict[int, dict[str, Any]] = {}
        self._warned = False
        #: The clock refusals are stamped with, advanced by :meth:`run` each interval (one ``time.time()`` per
        #: interval instead of one per refused request; the Refusals screen shows seconds).
        self.now = time.time()

    def observe(self, outcome: Outcome) -> None:
        decision = outcome.decision
        reason = decision.reason
        if reason is _ALLOWED or reason is _NO_ORIGIN or reason is _SAME_ORIGIN:
            return
        # The query string may carry secrets (API keys in URLs): the console keeps the path only.
        path = outcome.path
        if "?" in path:
            path = path.partition("?")[0]
        if len(path) > _MAX_PATH:
            path = path[:_MAX_PATH]
        headers = decision.request_headers
        key = (
            decision.origin or "",
            decision.kind.value,
            decision.request_method or outcome.method,
            path,
            reason.value,
            ",".join(headers) if headers else "",
        )
        now = self.now
        row = self._refusals.get(key)
        if row is not None:
            row[0] += 1
            row[2] = now
        elif len(self._refusals) < MAX_PENDING:
            self._refusals[key] = [1, now, now]
        else:
            self.dropped += 1

    def count(
        self,
        requests: Mapping[tuple[Any, Any], int],
        status_classes: Mapping[int, int],
        durations: Mapping[Any, list[float]],
        upstream_latencies: list[float],
    ) -> None:
        """Called by ``Metrics.flush`` with the counts it is about to fold in (about once a second); copies them."""
        if not (requests or status_classes or durations or any(upstream_latencies)):
            return
        start = int(time.time()) // SERIES_STEP * SERIES_STEP
        bucket = self._buckets.setdefault(start, {})
        r = bucket.setdefault("r", {})
        for (kind, reason), n in requests.items():
            name = f"{kind.value}|{reason.value}"
            r[name] = r.get(name, 0) + n
        s = bucket.setdefault("s", {})
        for status_class, n in status_classes.items():
            name = f"{status_class}xx"
            s[name] = s.get(name, 0) + n
        for histogram in durations.values():
            _add(bucket, "d", histogram)
        if any(upstream_latencies):
            _add(bucket, "u", upstream_latencies)

    def flush(self) -> None:
        """Write what was collected since the last call (blocking: call it on a worker thread, or at the end)."""
        refusals, self._refusals = self._refusals, {}
        buckets, self._buckets = self._buckets, {}
        self._write(refusals, buckets)

    def _write(self, refusals: dict[RefusalKey, list[float]], buckets: dict[int, dict[str, Any]]) -> None:
        try:
            if refusals:
                self.db.add_refusals(refusals)
            if buckets:
                self.db.add_series(buckets, time.time())
        except lmdb.Error as exc:  # the console's data is best-effort; the proxy must keep serving
            if not self._warned:
                log.warning("console: cannot write %s (refusals and charts are not updated): %s", self.db.path, exc)
                self._warned = True

    async def run(self) -> None:
        """Flush every :data:`FLUSH_INTERVAL` seconds until cancelled, then once more."""
        purged = time.monotonic()
        try:
            while True:
                await asyncio.sleep(FLUSH_INTERVAL)
                self.now = time.time()
                refusals, self._refusals = self._refusals, {}
                buckets, self._buckets = self._buckets, {}
                if refusals or buckets:
                    await asyncio.to_thread(self._write, refusals, buckets)
                if time.monotonic() - purged > _SESSION_PURGE_EVERY:
                    purged = time.monotonic()
                    with contextlib.suppress(lmdb.Error):
                        await asyncio.to_thread(self.db.purge_sessions, time.time())
        finally:
            self.flush()


def _add(bucket: dict[str, Any], part: str, histogram: list[float]) -> None:
    target = bucket.get(part)
    if target is None:
        bucket[part] = list(histogram)
    else:
        for index, value in enumerate(histogram):
            target[index] += value
