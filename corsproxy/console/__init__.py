"""The operator console: see what is refused and why, and fix it, in a browser (served by the admin listener).

- :mod:`corsproxy.console.app` — the pages and JSON endpoints under ``/console/``, and their session sign-in.
- :mod:`corsproxy.console.recorder` — what each worker collects off the request path (refusals, chart counts).
- :mod:`corsproxy.console.db` — the state every worker shares (sessions, refusals, chart buckets), in LMDB.
- ``static/`` — the page: plain HTML, CSS and JavaScript modules, no build step, nothing fetched from elsewhere.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from corsproxy.console.app import CONSOLE, SESSION_COOKIE, console_gate, effective_config, mount_console
from corsproxy.console.db import ConsoleDB, console_db_path
from corsproxy.console.recorder import ConsoleRecorder

if TYPE_CHECKING:
    from corsproxy.http.app import ProxyState
    from corsproxy.ops.metrics import Metrics

__all__ = [
    "CONSOLE",
    "SESSION_COOKIE",
    "ConsoleRecorder",
    "console_gate",
    "effective_config",
    "mount_console",
    "start_recorder",
]

log = logging.getLogger("corsproxy.console")


def start_recorder(state: ProxyState, metrics: Metrics) -> Callable[[], Awaitable[None]] | None:
    """In a worker: collect refusals (an observer) and chart counts (the metrics' flush) for the console.

    Returns the coroutine function that stops it (after a last flush), or ``None`` when the console's environment
    cannot be opened (logged; the proxy serves on without it).
    """
    path = console_db_path(state.config.store.path)
    try:
        db = ConsoleDB.shared(path)
    except Exception as exc:
        log.error("console: cannot open %s, refusals and charts are not collected: %s", path, exc)
        return None
    recorder = ConsoleRecorder(db)
    state.observers.append(recorder.observe)
    metrics.on_flush = recorder.count
    task = asyncio.create_task(recorder.run())

    async def stop() -> None:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        metrics.on_flush = None
        with contextlib.suppress(ValueError):
            state.observers.remove(recorder.observe)
        db.release()

    return stop
