"""Shared fixtures: a real upstream on loopback, the real proxy app in front of it, a real LMDB in ``tmp_path``."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from corsproxy.config import parse_config
from corsproxy.core.settings import Config
from corsproxy.http.app import create_app
from tests.upstream import make_upstream_app

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


@pytest.fixture
def config_data(tmp_path: Path) -> Callable[..., dict[str, Any]]:
    """Build a config document: BASE_CONFIG with the store in ``tmp_path``, merged with overrides."""

    def build(**override: Any) -> dict[str, Any]:
        data = merge(BASE_CONFIG, {"store": {"path": str(tmp_path / "origins.lmdb")}})
        return merge(data, override)

    return build


@pytest.fixture
def write_config(tmp_path: Path, config_data: Callable[..., dict[str, Any]]) -> Callable[..., Path]:
    """Write a config file to ``tmp_path`` and return its path."""

    def write(name: str = "config.yaml", **override: Any) -> Path:
        path = tmp_path / name
        path.write_text(yaml.safe_dump(config_data(**override)))
        return path

    return write


@pytest.fixture
async def upstream(aiohttp_server: Callable[..., Awaitable[TestServer]]) -> TestServer:
    return await aiohttp_server(make_upstream_app())


ProxyFactory = Callable[..., Awaitable[TestClient[web.Request, web.Application]]]


@pytest.fixture
def make_proxy(
    upstream: TestServer,
    config_data: Callable[..., dict[str, Any]],
    aiohttp_client: Callable[..., Awaitable[TestClient[web.Request, web.Application]]],
) -> ProxyFactory:
    """Start the real proxy in front of the test upstream; keyword arguments override config keys."""

    async def start(**override: Any) -> TestClient[web.Request, web.Application]:
        override = merge({"upstream": {"url": f"http://127.0.0.1:{upstream.port}"}}, override)
        config: Config = parse_config(config_data(**override), env={})
        return await aiohttp_client(create_app(config))

    return start


def run_cli(*args: str, input: str | None = None, env: dict[str, str] | None = None, timeout: float = 60) -> Any:
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
