"""Real filesystems for the store's failure cases: a tmpfs mounted for one test (root only; skipped elsewhere)."""

from __future__ import annotations

import contextlib
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

__all__ = ["tmpfs"]


@contextlib.contextmanager
def tmpfs(mount: Path, options: str) -> Iterator[Path]:
    """A real tmpfs mounted at ``mount`` (created) with ``options``, lazily unmounted afterwards. Skips the test
    where it cannot be mounted: only root may mount, and some sandboxes refuse even root."""
    if os.geteuid() != 0:
        pytest.skip(f"mounting a tmpfs ({options}) needs root")
    mount.mkdir()
    result = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(mount)], check=False, capture_output=True
    )
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {result.stderr.decode().strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)
