"""Rate limits for the log lines a client can cause: refusals, malformed requests, upstream failures.

Owns one rule: per reason (a refusal reason, a kind of malformed input, an upstream failure type) a process writes at
most ``logging.per_reason_lines`` lines in each ``logging.per_reason_window`` seconds. Past that the lines are only
counted, and when the window ends one summary line per reason says how many were left out ("…and 12,345 more
origin_not_allowed in the last 10 s"). Without it any client could make corsproxy write a line per request it sends
and fill the disk the store lives on.

Callers ask :meth:`LineLimiter.admit` *before* they build a line: a suppressed line costs a clock read and a dict
increment, nothing is formatted, and there is no lock (everything runs on the worker's event loop thread). Logs are
for reading; exact counts are in the metrics (``corsproxy_requests``, ``corsproxy_malformed_requests``,
``corsproxy_upstream_errors``), which do not depend on what was logged.

Each process has two limiters: :data:`REQUEST_LINES` for the request log (logger ``corsproxy.request``) and
:data:`PROXY_LINES` for the proxy's own lines about bad input and failures (logger ``corsproxy``); the app sets both
from its configuration when it starts (:func:`configure_line_limits`) and writes their pending summaries when it stops
(:func:`flush_line_limits`).

Must not import aiohttp or lmdb.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import time
from collections.abc import Callable, Hashable

from corsproxy.core.settings import Logging

__all__ = ["PROXY_LINES", "REQUEST_LINES", "LineLimiter", "configure_line_limits", "flush_line_limits"]

_UNLIMITED = sys.maxsize
_DEFAULTS = Logging()


class LineLimiter:
    """At most ``lines`` admitted per key in each window of ``window`` seconds; a summary line for the rest.

    Windows are fixed: one starts with the first event after the previous one closed and lasts ``window`` seconds.
    It closes on a timer on the running event loop (armed by the first suppressed line, so a flood that stops still
    gets its summary), or failing a loop, on the first event after it ended.
    """

    def __init__(
        self,
        logger: logging.Logger,
        lines: int = _DEFAULTS.per_reason_lines,
        window: float = _DEFAULTS.per_reason_window,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.logger = logger
        self._clock = clock
        self._lines = _UNLIMITED
        self._window = 10.0
        self._counts: dict[Hashable, int] = {}  # events per key in the current window, admitted or not
        self._reported: dict[Hashable, int] = {}  # of those, how many take_counts() already handed out
        self._unreported: dict[Hashable, int] = {}  # counts of closed windows not yet handed out
        self._started = 0.0
        self._window_end = 0.0
        self._timer: asyncio.TimerHandle | None = None
        self.configure(lines, window)

    def configure(self, lines: int, window: float) -> None:
        """New limits; starts afresh (the counts so far are handed to the next :meth:`take_counts`)."""
        self.close_window()
        self._lines = lines if lines > 0 else _UNLIMITED
        self._window = window

    def admit(self, key: Hashable) -> bool:
        """Count one event for ``key``; ``True`` when its line should be written. The hot path: keep it this small."""
        now = self._clock()
        if now >= self._window_end:
            self._roll(now)
        counts = self._counts
        seen = counts.get(key, 0) + 1
        counts[key] = seen
        if seen <= self._lines:
            return True
        if self._timer is None:
            self._arm(now)
        return False

    def close_window(self) -> None:
        """End the current window now and write its summaries (a stopping worker does: flush_line_limits)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._close(self._clock())
        self._window_end = 0.0  # the next event opens a new window

    def take_counts(self) -> dict[Hashable, int]:
        """Events per key since the last call, admitted or not: exact figures for metrics."""
        out, self._unreported = self._unreported, {}
        reported = self._reported
        for key, seen in self._counts.items():
            delta = seen - reported.get(key, 0)
            if delta:
                out[key] = out.get(key, 0) + delta
                reported[key] = seen
        return out

    def _roll(self, now: float) -> None:
        self._close(now)
        self._started = now
        self._window_end = now + self._window

    def _close(self, now: float) -> None:
        counts = self._counts
        if not counts:
            return
        self._counts = {}
        reported, self._reported = self._reported, {}
        unreported = self._unreported
        span = max(0.0, min(now, self._window_end) - self._started)
        for key, seen in counts.items():
            delta = seen - reported.get(key, 0)
            if delta:
                unreported[key] = unreported.get(key, 0) + delta
            suppressed = seen - self._lines
            if suppressed > 0:
                self.logger.warning(
                    "…and %s more %s in the last %s s (%d logged)",
                    f"{suppressed:,}",
                    key,
                    f"{round(span, 1):g}",
                    self._lines,
                    extra={
                        "reason": str(key),
                        "suppressed": suppressed,
                        "logged": self._lines,
                        "window_s": round(span, 3),
                    },
                )

    def _arm(self, now: float) -> None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return  # no loop (a test, a thread): the summary comes with the first event after the window
        self._timer = loop.call_later(max(0.0, self._window_end - now), self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        now = self._clock()
        if now < self._window_end:  # the loop's clock ran a little ahead of ours
            self._arm(now)
            return
        self._close(now)
        self._window_end = 0.0


#: The request log's limiter: keys are refusal reasons (and upstream failure types, ``status_5xx``).
REQUEST_LINES = LineLimiter(logging.getLogger("corsproxy.request"))
#: The proxy's own lines about what clients sent (malformed requests, oversized heads, slow heads, broken bodies,
#: refused WebSocket handshakes) and about upstream failures.
PROXY_LINES = LineLimiter(logging.getLogger("corsproxy"))


def configure_line_limits(settings: Logging) -> None:
    """Apply ``logging.per_reason_*`` to this process's limiters (the app does this when it starts)."""
    for limiter in (REQUEST_LINES, PROXY_LINES):
        limiter.configure(settings.per_reason_lines, settings.per_reason_window)


def flush_line_limits() -> None:
    """Write the summaries of the windows still open (the app does this when it stops)."""
    for limiter in (REQUEST_LINES, PROXY_LINES):
        limiter.close_window()
