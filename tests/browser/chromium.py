"""Finding and launching Debian's Chromium through playwright, and what to do when it is not there.

A local run without Chromium skips the browser suite with one reason line; CI sets ``CORSPROXY_REQUIRE_BROWSER=1``
so that the same condition fails instead (issue 7: "CI must never skip them"). Nothing here downloads a browser:
``playwright install`` is never run, playwright only drives the system's ``/usr/bin/chromium``.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Any, NoReturn

import pytest

try:
    from playwright.async_api import async_playwright
except ImportError:  # pragma: no cover - the test extra is not installed
    async_playwright = None  # type: ignore[assignment]

__all__ = ["CHROMIUM", "LAUNCH_ARGS", "async_playwright", "check_module", "unavailable"]

#: Debian's package; ``CORSPROXY_CHROMIUM`` points elsewhere (another distribution's path, a Chrome build).
CHROMIUM = os.environ.get("CORSPROXY_CHROMIUM", "/usr/bin/chromium")

#: Headless, no sandbox (containers and CI runners lack the user namespaces it needs), and nothing that phones home
#: or updates itself: every connection the browser makes in these tests is one a test page asked for.
LAUNCH_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
    "--disable-quic",
    "--disable-sync",
]


def _required() -> bool:
    return os.environ.get("CORSPROXY_REQUIRE_BROWSER", "") not in ("", "0")


def unavailable(reason: str, *, whole_module: bool = False) -> NoReturn:
    """Skip (locally) or fail (CI) with one line that says what is missing and how to get it."""
    if _required():
        pytest.fail(f"CORSPROXY_REQUIRE_BROWSER is set but {reason}", pytrace=False)
    pytest.skip(reason, allow_module_level=whole_module)


def check_module() -> None:
    """Called at import of the browser test module: skip it whole, with one reason, when nothing can run."""
    reason = missing()
    if reason is not None:
        unavailable(reason, whole_module=True)


def missing() -> str | None:
    if async_playwright is None:
        return "browser tests need the playwright package: pip install -e '.[test]'"
    if not Path(CHROMIUM).is_file() or not os.access(CHROMIUM, os.X_OK):
        return f"browser tests need Chromium at {CHROMIUM}: apt-get install chromium (or set CORSPROXY_CHROMIUM)"
    # A cheap probe at collection time, so that a broken install (missing libraries) is one skip line too; a launch
    # that still fails later skips or fails each test from the ``browser`` fixture.
    try:
        probe = subprocess.run([CHROMIUM, "--version"], capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"{CHROMIUM} --version did not run: {exc}"
    if probe.returncode != 0 or "chrom" not in probe.stdout.lower():
        return f"{CHROMIUM} --version failed (exit {probe.returncode}): is Chromium installed correctly?"
    return None


def launch_options() -> dict[str, Any]:
    return {"executable_path": CHROMIUM, "headless": True, "args": LAUNCH_ARGS, "timeout": 30_000}
