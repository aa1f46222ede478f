"""``corsproxy serve`` as a real subprocess (gunicorn arbiter + workers), with its config in a temporary directory,
and blocking clients for its proxied and admin ports; ``corsproxy demo`` the same way. Every wait is a bounded loop.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import IO, Any
from urllib.parse import quote

import yaml
from prometheus_client.parser import text_string_to_metric_families

from tests.support.config import BASE_CONFIG, REPO, merge
from tests.support.net import Response, free_port, request, wait_until

__all__ = ["OTHER_TOKEN", "TOKEN", "Clients", "Demo", "Samples", "Server", "origin_path", "scrape", "value"]

#: Prometheus samples by (name, sorted labels).
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]

TOKEN = "test-admin-token-0123456789abcdef"
OTHER_TOKEN = "other-admin-token-0123456789abcdef"


def origin_path(origin: str) -> str:
    """The admin API's path for one origin entry."""
    return "/origins/" + quote(origin, safe="")


def _accepts(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except OSError:
        return False
    return True


class _Process:
    """A ``python -m corsproxy`` subprocess whose stdout and stderr go to ``log_path``."""

    log_path: Path
    env: dict[str, str]
    proc: subprocess.Popen[bytes] | None = None
    _log: IO[bytes] | None = None

    def _spawn(self, args: list[str], cwd: Path) -> None:
        if self._log is not None:
            self._log.close()  # a restarted process appends to the same log through a new descriptor
        self._log = self.log_path.open("ab")
        command = [sys.executable, "-m", "corsproxy", *args]
        self.proc = subprocess.Popen(command, stdout=self._log, stderr=self._log, env=self.env, cwd=cwd)

    def _still_running(self, what: str) -> None:
        """Fail at once, with the log's end, if the process has exited (instead of waiting out a timeout)."""
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise AssertionError(f"{what} exited with {self.proc.returncode}:\n{self.log_text()[-3000:]}")

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def send(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int:
        """Signal the process (unless it already ended) and wait for it; killed if it does not end in ``timeout``."""
        proc = self.proc
        assert proc is not None
        try:
            if proc.poll() is None:
                proc.send_signal(sig)
            try:
                code = proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                code = proc.wait(5)
        finally:
            if self._log is not None:
                self._log.close()
                self._log = None
        return code

    def __exit__(self, *exc: object) -> None:
        self.stop()


class Clients:
    """Blocking clients for a running proxy's ``port`` and its admin listener's ``admin_port``."""

    port: int
    admin_port: int
    config_path: Path

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


class Server(Clients, _Process):
    """``python -m corsproxy serve`` in a subprocess, with its config in ``tmp``; logs go to ``tmp/serve.log``.

    By default: ``workers`` workers, an admin listener with :data:`TOKEN`, JSON logs. Keyword arguments are merged
    into the config document (a ``None`` value deletes the key, e.g. ``admin=None`` for no admin listener);
    ``workers=None`` leaves ``--workers`` out, ``port`` chooses the proxied port.
    """

    def __init__(
        self,
        tmp: Path,
        upstream_port: int,
        *,
        workers: int | None = 2,
        port: int | None = None,
        env: dict[str, str] | None = None,
        **override: Any,
    ) -> None:
        self.tmp = tmp
        self.port = free_port() if port is None else port
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

    @property
    def has_admin(self) -> bool:
        return "admin" in self.data

    def write_config(self, data: dict[str, Any] | None = None) -> None:
        self.config_path.write_text(yaml.safe_dump(self.data if data is None else data))

    def start(self, wait: bool = True) -> Server:
        self.write_config()
        workers = [] if self.workers is None else ["--workers", str(self.workers)]
        self._spawn(["serve", "--config", str(self.config_path), *workers], self.tmp)
        if wait:
            try:
                self.wait_ready()
            except BaseException:
                self.stop(signal.SIGKILL, 5)  # a start that failed leaves no process nor open log behind
                raise
        return self

    def wait_ready(self, timeout: float = 20.0) -> None:
        """Every worker booted (its ``listening`` line logged) and the admin port answering (without an admin
        listener: the proxied port accepting connections)."""

        def ready() -> bool:
            self._still_running("corsproxy")
            if len(self.booted_pids()) < (self.workers or 1):
                return False
            if not self.has_admin:
                return _accepts(self.port)
            try:
                return self.admin("GET", "/healthz", token=None).status == 200
            except OSError:
                return False

        wait_until(ready, timeout, what="corsproxy to start")

    def __enter__(self) -> Server:
        return self if self.proc is not None else self.start()

    # -- logs ---------------------------------------------------------------------------------------------------

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


def scrape(server: Server) -> Samples:
    """GET /metrics from ``server``'s admin port, parsed (the response's type checked)."""
    response = server.admin("GET", "/metrics")
    assert response.status == 200
    assert response.headers["Content-Type"].startswith("text/plain; version=0.0.4")
    samples = {}
    for family in text_string_to_metric_families(response.body.decode()):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def value(samples: Samples, name: str, **labels: str) -> float:
    """One sample's value; 0 for a sample not (yet) there."""
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


class Demo(_Process):
    """``python -m corsproxy demo --port PORT`` in a subprocess run in ``cwd``; its output goes to a log file beside
    (never inside) ``cwd``, so a test can check that the demo leaves nothing there."""

    def __init__(self, cwd: Path, env: dict[str, str] | None = None) -> None:
        self.cwd = cwd
        self.port = free_port()
        self.log_path = cwd.parent / f"{cwd.name}-demo.log"
        self.env = {**os.environ, **(env or {})}

    def start(self, timeout: float = 30.0) -> Demo:
        self._spawn(["demo", "--port", str(self.port)], self.cwd)

        def listening() -> bool:
            self._still_running("the demo")
            return _accepts(self.port)

        wait_until(listening, timeout, what="the demo to listen")
        return self

    def __enter__(self) -> Demo:
        return self if self.proc is not None else self.start()
