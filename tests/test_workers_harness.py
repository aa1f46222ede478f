"""Harness for the serving tests (no tests of its own): a real upstream on a thread, ``corsproxy serve`` as a real
subprocess (gunicorn arbiter + workers), and small blocking HTTP helpers for its proxied and admin ports.

Blocking clients on purpose: the server is another process, and the upstream runs its own event loop on a thread, so
nothing here depends on the test's event loop. Every wait is a bounded loop.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
import yaml
from aiohttp import web

from tests.conftest import BASE_CONFIG, merge
from tests.upstream import make_upstream_app

TOKEN = "test-admin-token-0123456789abcdef"
OTHER_TOKEN = "other-admin-token-0123456789abcdef"
REPO = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_until(check: Callable[[], Any], timeout: float = 15.0, interval: float = 0.05, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


class ThreadedUpstream:
    """tests/upstream.py's real app, served by its own event loop on a daemon thread."""

    def __init__(self) -> None:
        self.port = free_port()
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._runner: web.AppRunner | None = None

    def _serve(self) -> None:
        asyncio.set_event_loop(self._loop)

        async def start() -> None:
            self._runner = web.AppRunner(make_upstream_app(), access_log=None)
            await self._runner.setup()
            await web.TCPSite(self._runner, "127.0.0.1", self.port).start()

        self._loop.run_until_complete(start())
        self._ready.set()
        self._loop.run_forever()
        assert self._runner is not None
        self._loop.run_until_complete(self._runner.cleanup())
        self._loop.close()

    def __enter__(self) -> ThreadedUpstream:
        self._thread.start()
        assert self._ready.wait(10), "upstream did not start"
        return self

    def __exit__(self, *exc: object) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)


class Response:
    def __init__(self, status: int, headers: http.client.HTTPMessage, body: bytes) -> None:
        self.status = status
        self.headers = headers
        self.body = body

    def json(self) -> Any:
        return json.loads(self.body)


def request(
    port: int,
    method: str,
    path: str,
    *,
    headers: dict[str, str] | None = None,
    body: bytes | str | None = None,
    timeout: float = 10.0,
) -> Response:
    """One request on a fresh connection (so that, across many calls, the kernel spreads them over the workers)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request(method, path, body=body, headers={"Connection": "close", **(headers or {})})
        response = conn.getresponse()
        return Response(response.status, response.headers, response.read())
    finally:
        conn.close()


def origin_path(origin: str) -> str:
    return "/origins/" + quote(origin, safe="")


class Server:
    """``python -m corsproxy serve`` in a subprocess, with its config in ``tmp``; logs go to ``tmp/serve.log``."""

    def __init__(
        self,
        tmp: Path,
        upstream_port: int,
        *,
        workers: int = 2,
        env: dict[str, str] | None = None,
        **override: Any,
    ) -> None:
        self.tmp = tmp
        self.port = free_port()
        self.admin_port = free_port()
        self.workers = workers
        self.config_path = tmp / "config.yaml"
        self.log_path = tmp / "serve.log"
        self.data = merge(
            BASE_CONFIG,
            {
                "listen": {"host": "127.0.0.1", "port": self.port},
                "upstream": {"url": f"http://127.0.0.1:{upstream_port}"},
                "store": {"path": str(tmp / "origins.lmdb")},
                "admin": {"listen": {"host": "127.0.0.1", "port": self.admin_port}},
                "logging": {"format": "json"},
                "limits": {"drain_timeout": 10},
            },
        )
        self.data = merge(self.data, override)
        self.env = {
            **os.environ,
            "CORSPROXY_ADMIN_TOKEN": TOKEN,
            "PYTHONPATH": str(REPO),
            **(env or {}),
        }
        self.env.pop("PROMETHEUS_MULTIPROC_DIR", None)
        self.env.pop("CORSPROXY_WORKERS", None)
        self.proc: subprocess.Popen[bytes] | None = None

    def write_config(self, data: dict[str, Any] | None = None) -> None:
        self.config_path.write_text(yaml.safe_dump(self.data if data is None else data))

    def start(self, wait: bool = True) -> Server:
        self.write_config()
        self._log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "corsproxy",
                "serve",
                "--config",
                str(self.config_path),
                "--workers",
                str(self.workers),
            ],
            stdout=self._log,
            stderr=self._log,
            env=self.env,
            cwd=self.tmp,
        )
        if wait:
            self.wait_ready()
        return self

    def wait_ready(self, timeout: float = 20.0) -> None:
        """Every worker booted (its ``listening`` line logged) and the admin port answering."""

        def ready() -> bool:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise AssertionError(f"corsproxy exited with {self.proc.returncode}:\n{self.log_text()[-3000:]}")
            if len(self.booted_pids()) < self.workers:
                return False
            try:
                return self.admin("GET", "/healthz", token=None).status == 200
            except OSError:
                return False

        wait_until(ready, timeout, what="corsproxy to start")

    # -- clients ------------------------------------------------------------------------------------------------

    def admin(
        self, method: str, path: str, *, token: str | None = TOKEN, body: Any = None, raw: bytes | None = None
    ) -> Response:
        headers = {} if token is None else {"Authorization": f"Bearer {token}"}
        data: bytes | None = raw
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        return request(self.admin_port, method, path, headers=headers, body=data)

    def proxy(self, method: str, path: str, headers: dict[str, str] | None = None, **kw: Any) -> Response:
        return request(self.port, method, path, headers=headers, **kw)

    # -- logs ---------------------------------------------------------------------------------------------------

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def logs(self) -> list[dict[str, Any]]:
        lines = []
        for line in self.log_text().splitlines():
            if line.startswith("{"):
                try:
                    lines.append(json.loads(line))
                except ValueError:
                    continue  # a line still being written
        return lines

    def booted_pids(self) -> set[int]:
        """Workers that logged their start (JSON or text format)."""
        pids = {line["pid"] for line in self.logs() if "corsproxy listening" in line.get("message", "")}
        pids.update(int(pid) for pid in re.findall(r"\[(\d+)\] corsproxy listening", self.log_text()))
        return pids

    def request_logs(self) -> list[dict[str, Any]]:
        return [line for line in self.logs() if line.get("logger") == "corsproxy.request"]

    # -- signals ------------------------------------------------------------------------------------------------

    def send(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            code = self.proc.wait(5)
        self._log.close()
        return code


@pytest.fixture(scope="module")
def upstream_thread() -> Iterator[ThreadedUpstream]:
    with ThreadedUpstream() as up:
        yield up


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory, upstream_thread: ThreadedUpstream) -> Iterator[Server]:
    """One 2-worker server per test module, with an admin token and a watched origins file."""
    tmp = tmp_path_factory.mktemp("served")
    (tmp / "origins.txt").write_text("https://fleet.example.com note=from-the-file\n")
    server = Server(tmp, upstream_thread.port, origins_file={"path": str(tmp / "origins.txt"), "poll_interval": 0.2})
    server.start()
    yield server
    server.stop()
