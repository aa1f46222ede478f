"""Shared fixtures: a real upstream on loopback, the real proxy app in front of it, a real LMDB in ``tmp_path``,
``corsproxy serve`` as a real subprocess, and real filesystems for the store's failure cases.

The helpers these are built on live in :mod:`tests.support`; test modules import helpers from there, and get
fixtures only from here.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from corsproxy.config import parse_config
from corsproxy.core.settings import Config
from corsproxy.http.app import create_app
from corsproxy.store import OriginStore
from tests.support.config import BASE_CONFIG, REPO, ConfigData, WriteConfig, merge
from tests.support.fs import tmpfs
from tests.support.inprocess import ProxyFactory, ThreadedAdmin
from tests.support.serve import Server
from tests.support.tls import make_certificates
from tests.support.upstream import ThreadedUpstream, make_upstream_app


@pytest.fixture
def config_data(tmp_path: Path) -> ConfigData:
    """Build a config document: BASE_CONFIG with the store in ``tmp_path``, merged with overrides."""

    def build(**override: Any) -> dict[str, Any]:
        data = merge(BASE_CONFIG, {"store": {"path": str(tmp_path / "origins.lmdb")}})
        return merge(data, override)

    return build


@pytest.fixture
def write_config(tmp_path: Path, config_data: ConfigData) -> WriteConfig:
    """Write a config file to ``tmp_path`` and return its path."""

    def write(name: str = "config.yaml", **override: Any) -> Path:
        path = tmp_path / name
        path.write_text(yaml.safe_dump(config_data(**override)))
        return path

    return write


@pytest.fixture
async def upstream(aiohttp_server: Callable[..., Awaitable[TestServer]]) -> TestServer:
    """:func:`tests.support.upstream.make_upstream_app` on loopback, in the test's event loop."""
    return await aiohttp_server(make_upstream_app())


@pytest.fixture
def make_proxy(
    upstream: TestServer,
    config_data: ConfigData,
    aiohttp_client: Callable[..., Awaitable[TestClient[web.Request, web.Application]]],
) -> ProxyFactory:
    """Start the real proxy in front of the test upstream; keyword arguments override config keys."""

    async def start(**override: Any) -> TestClient[web.Request, web.Application]:
        override = merge({"upstream": {"url": f"http://127.0.0.1:{upstream.port}"}}, override)
        config: Config = parse_config(config_data(**override), env={})
        return await aiohttp_client(create_app(config))

    return start


@pytest.fixture
def certificates(tmp_path: Path) -> Path:
    """A throw-away CA and a server certificate for 127.0.0.1 signed by it, in ``tmp_path``."""
    return make_certificates(tmp_path)


# -- a proxy in another process --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def upstream_thread() -> Iterator[ThreadedUpstream]:
    """The test upstream on its own thread and event loop, for a proxy that runs as a subprocess."""
    with ThreadedUpstream() as up:
        yield up


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory, upstream_thread: ThreadedUpstream) -> Iterator[Server]:
    """One 2-worker server per test module, with an admin token and a watched origins file.

    Shared by the tests of one module for speed: only tests that do not depend on what another test wrote use it
    (each writes under origins of its own)."""
    tmp = tmp_path_factory.mktemp("served")
    (tmp / "origins.txt").write_text("https://fleet.example.com note=from-the-file\n")
    server = Server(tmp, upstream_thread.port, origins_file={"path": str(tmp / "origins.txt"), "poll_interval": 0.2})
    server.start()
    yield server
    server.stop()


@pytest.fixture
def admin_api(tmp_path: Path, upstream_thread: ThreadedUpstream) -> Iterator[ThreadedAdmin]:
    """An admin API of this test's own: the proxy and its admin app in this process (on a thread, for blocking
    clients), a fresh store in ``tmp_path``, and an origins file declaring ``https://fleet.example.com``."""
    with ThreadedAdmin(
        tmp_path, upstream_thread.port, origins_file="https://fleet.example.com note=from-the-file\n"
    ) as api:
        yield api


# -- the store's failure cases ---------------------------------------------------------------------------------------


@pytest.fixture
def store_held_open(tmp_path: Path) -> Iterator[Path]:
    """The store open in another process (as a serving worker holds it)."""
    path = tmp_path / "db"
    OriginStore(path).close()
    code = (
        "import sys, time; from corsproxy.store import OriginStore\n"
        f"s = OriginStore({str(path)!r}); len(s); print('open', flush=True); time.sleep(60)\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(REPO)}
    )
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "open"
        yield path
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(10)
        assert proc.stdout is not None
        proc.stdout.close()


@pytest.fixture
def tiny_fs(tmp_path: Path) -> Iterator[Path]:
    """A real 2 MiB tmpfs, unmounted afterwards."""
    with tmpfs(tmp_path / "tiny", "size=2m") as mount:
        yield mount
