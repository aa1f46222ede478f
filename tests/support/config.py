"""The base config document the tests start from, how they change it, and the CLI as a real subprocess."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = ["BASE_CONFIG", "REPO", "ConfigData", "WriteConfig", "merge", "run_cli"]

#: The ``config_data`` fixture: a config document from keyword overrides.
ConfigData = Callable[..., dict[str, Any]]
#: The ``write_config`` fixture: a config file in ``tmp_path`` from keyword overrides.
WriteConfig = Callable[..., Path]

#: The checkout: subprocesses get it on ``PYTHONPATH`` so that ``tests.*`` and this ``corsproxy`` are importable.
REPO = Path(__file__).resolve().parent.parent.parent

BASE_CONFIG: dict[str, Any] = {
    "listen": {"host": "127.0.0.1", "port": 0},
    "upstream": {"url": "http://127.0.0.1:9", "connect_timeout": 2, "read_timeout": 5},
    "cors": {
        "allow_origins": ["https://app.example.com", "https://*.example.org", "http://localhost:*"],
        "allow_methods": ["GET", "POST", "PUT", "DELETE"],
        "allow_headers": ["content-type", "authorization", "x-api-key"],
        "expose_headers": ["x-request-id"],
        "allow_credentials": True,
        "max_age": 600,
    },
}


def merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """Deep-merge ``override`` into a copy of ``base``; a ``None`` value deletes the key."""
    out = copy.deepcopy(base)
    for key, value in override.items():
        if value is None:
            out.pop(key, None)
        elif isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def run_cli(
    *args: str, input: str | None = None, env: dict[str, str] | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    """Run ``python -m corsproxy`` as a real subprocess."""
    return subprocess.run(
        [sys.executable, "-m", "corsproxy", *args],
        input=input,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
        check=False,
    )
