"""Running the proxy: ``corsproxy serve`` (a gunicorn arbiter over aiohttp workers), the admin listener and fleet
mode. (``corsproxy demo`` is :mod:`corsproxy.ops.demo`.)

Owns the process model. The arbiter is gunicorn's, the process manager aiohttp documents: it forks N
workers that share the proxied listening socket, replaces a worker that dies, and on ``SIGTERM`` lets every worker
stop accepting and finish its in-flight requests for up to ``limits.drain_timeout`` seconds, then exits 0.
Each worker builds its own app after the fork (:func:`corsproxy.http.app.create_app`), so each opens the LMDB
environment itself; a change written by any process (admin API, CLI, origins file) is seen by every worker on its next
request, since every lookup is a fresh LMDB read transaction.

The admin listener's socket is bound once in the arbiter and inherited by every worker, like the proxied one: any
worker may answer an admin request (they share the store, and metrics are summed across workers), and a bad admin
address fails the start instead of one worker. ``SIGHUP`` (or ``POST /reload``, which signals the arbiter) validates
the YAML first; a refused file is logged and changes nothing, a valid one starts new workers on it while the old
ones drain (gunicorn's graceful reload), so no in-flight request is dropped.

Imports prometheus-client only after ``PROMETHEUS_MULTIPROC_DIR`` is set (see :mod:`corsproxy.ops.metrics`).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import importlib.metadata
import importlib.util
import json
import logging
import math
import os
import shutil
import signal
import socket
import ssl
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import lmdb
from aiohttp import web
from aiohttp.worker import GunicornWebWorker
from gunicorn import sock  # type: ignore[import-untyped]
from gunicorn.app.base import BaseApplication  # type: ignore[import-untyped]
from gunicorn.arbiter import Arbiter  # type: ignore[import-untyped]
from gunicorn.errors import HaltServer  # type: ignore[import-untyped]

from corsproxy.config import ConfigError, load_config, store_path_problem
from corsproxy.core.origin import is_loopback_host
from corsproxy.core.problems import Problem, field_of
from corsproxy.core.settings import Config
from corsproxy.http.app import STATE, ProxyState, create_app
from corsproxy.http.protocol import ProxyRunner
from corsproxy.store import StoreError

if TYPE_CHECKING:
    from corsproxy.ops.metrics import Metrics
    from corsproxy.origins.postgres import SourceUnavailable

__all__ = [
    "check_can_listen",
    "check_store_writable",
    "default_workers",
    "serve",
    "setup_logging",
]

log = logging.getLogger("corsproxy")

#: Read by prometheus-client when it is first imported, so it is set here before :mod:`corsproxy.ops.metrics` is.
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"


def setup_logging(level: int = logging.INFO) -> None:
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)


def default_workers() -> int:
    """One worker per core this process may run on (the affinity mask, which respects a cpuset; not a CPU quota)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


# -- the gunicorn side: arbiter, worker, application --------------------------------------------------------------


def _bind_address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _listen_socket(host: str, port: int) -> socket.socket:
    family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[
        0
    ]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(128)
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock


def check_admin_tokens(config: Config) -> None:
    """Refuse to serve an admin listener whose token source yields no token (an empty file is no protection)."""
    from corsproxy.ops.admin import load_tokens

    admin = config.admin
    if admin.port is None:
        return
    try:
        tokens = load_tokens(admin)
    except (OSError, ValueError) as exc:
        where = "admin.token_file" if admin.token_file else "env CORSPROXY_ADMIN_TOKEN"
        raise ConfigError([Problem(where, field_of(where), "invalid_admin_token", str(exc))], config.source) from None
    if not tokens and (admin.token_file or not is_loopback_host(admin.host)):
        message = f"no token found in {admin.token_file or 'CORSPROXY_ADMIN_TOKEN'} for {admin.host}"
        raise ConfigError([Problem("admin", "admin", "admin_token_missing", message)], config.source)


def _boot_status_path(runtime_dir: str | os.PathLike[str], pid: int) -> Path:
    return Path(runtime_dir) / f"boot-{pid}"


def _write_boot_status(runtime_dir: str | os.PathLike[str], pid: int, status: str) -> None:
    """Tell the arbiter this worker serves (``ready``) or why it could not start (``failed: <reason>``)."""
    path = _boot_status_path(runtime_dir, pid)
    partial = path.with_suffix(".partial")
    with contextlib.suppress(OSError):
        partial.write_text(status[:4000])
        partial.replace(path)  # the arbiter never reads half a status


def _read_boot_status(runtime_dir: str | os.PathLike[str], pid: int) -> str | None:
    try:
        return _boot_status_path(runtime_dir, pid).read_text()
    except OSError:
        return None


def _describe(exc: BaseException) -> str:
    if isinstance(exc, lmdb.MapFullError):
        return (
            f"the origin store is full ({exc}): raise store.map_size_mb, or remove entries "
            "(corsproxy origins remove / prune)"
        )
    text = str(exc).strip().splitlines()
    detail = text[0] if text else ""
    return detail if isinstance(exc, StoreError | ConfigError) else f"{type(exc).__name__}: {detail}"


class CorsproxyWorker(GunicornWebWorker):
    """aiohttp's gunicorn worker, with a TLS context built the modern way (gunicorn's ``ssl_version`` is gone), and
    a boot report for the arbiter: ``ready`` once it accepts connections, or the reason it could not start."""

    _ready_reported = False
    sockets: list[Any]

    @staticmethod
    def _create_ssl_context(cfg: Any) -> ssl.SSLContext:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(cfg.certfile, cfg.keyfile)
        return context

    def run(self) -> None:
        # The event loop gets the plain sockets, not gunicorn's wrappers: uvloop closes the descriptor itself and then
        # calls the wrapper's close(), which logged "Error while closing socket [Errno 9]" on every reload and stop.
        self.sockets = [getattr(sock, "sock", sock) for sock in self.sockets]
        try:
            super().run()
        except Exception as exc:
            if not self.booted:
                _write_boot_status(self.cfg.worker_tmp_dir, os.getpid(), f"failed: {_describe(exc)}")
            raise

    def handle_exit(self, sig: int, frame: Any) -> None:
        super().handle_exit(sig, frame)
        # aiohttp's worker notices ``alive`` only at its next heartbeat (up to a second later) and keeps accepting
        # until then: wake it now, so a reload's old workers stop taking connections as soon as they are told.
        wake = getattr(self, "_notify_waiter_done", None)
        if callable(wake):
            wake()

    def notify(self) -> None:
        super().notify()
        # aiohttp's worker calls notify() first right after its sites accept connections (and sets booted then).
        if self.booted and not self._ready_reported:
            self._ready_reported = True
            _write_boot_status(self.cfg.worker_tmp_dir, os.getpid(), "ready")


class CorsproxyUVLoopWorker(CorsproxyWorker):
    """The same worker on uvloop's event loop (the ``corsproxy[speed]`` extra): what aiohttp's
    ``GunicornUVLoopWebWorker`` does, on top of :class:`CorsproxyWorker`'s TLS context."""

    def init_process(self) -> None:
        try:
            import uvloop
        except ImportError as exc:  # installed but broken: serve on asyncio rather than not at all
            self.log.warning("uvloop does not import (%s): this worker runs on asyncio's event loop", exc)
        else:
            # The arbiter's loop (if any) was created under the default policy: close it before switching.
            with contextlib.suppress(RuntimeError):
                asyncio.get_event_loop().close()
            asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
        super().init_process()


#: ``CORSPROXY_UVLOOP=0`` keeps asyncio's own event loop even when uvloop is installed.
UVLOOP_ENV = "CORSPROXY_UVLOOP"


def event_loop_choice() -> tuple[str, str]:
    """The worker class to run and a line saying which event loop it uses and why (logged once at start).

    uvloop when it is installed (``pip install 'corsproxy[speed]'``) unless ``CORSPROXY_UVLOOP`` is ``0``, ``false``,
    ``no`` or ``off``: it takes event-loop and socket work off every request (bench/RESULTS.md has the figure).
    """
    setting = os.environ.get(UVLOOP_ENV, "").strip().lower()
    if setting in ("0", "false", "no", "off"):
        return "corsproxy.ops.server.CorsproxyWorker", f"event loop: asyncio ({UVLOOP_ENV}={setting})"
    # Looked up, not imported: the arbiter never runs an event loop, and uvloop is loaded only where it serves.
    if importlib.util.find_spec("uvloop") is None:
        if setting:
            log.warning("%s=%s but uvloop is not installed (pip install 'corsproxy[speed]')", UVLOOP_ENV, setting)
        return "corsproxy.ops.server.CorsproxyWorker", "event loop: asyncio (uvloop not installed)"
    try:
        version = importlib.metadata.version("uvloop")
    except importlib.metadata.PackageNotFoundError:
        version = "(version unknown)"
    return "corsproxy.ops.server.CorsproxyUVLoopWorker", f"event loop: uvloop {version}"


#: Seconds between attempts to start a worker after one failed to boot (doubling, up to the last value).
_RESPAWN_BACKOFF = (1.0, 2.0, 4.0, 8.0, 16.0, 30.0)


class _Arbiter(Arbiter):  # type: ignore[misc]
    """gunicorn's arbiter, with reloads that cannot take serving down.

    gunicorn's own reload starts the new workers and stops the old ones at once, before the new ones have proved
    they can start; one that cannot (its store path is not a directory, the store is full...) then makes the arbiter
    halt, and nothing serves. Here a reload is a transaction: the new configuration is validated, new workers start
    on it beside the old ones, and only once every one of them accepts connections — and the store has been
    reconciled with the new ``cors.allow_origins``, in one process of its own — are the old workers told to drain.
    If anything fails, the new workers are stopped, the old ones never noticed, and the refusal is logged with its
    reason, counted, and reported to ``POST /reload``. A worker that fails to boot only halts the arbiter when no
    worker has ever served (``corsproxy serve`` then exits with the reason); later, the arbiter retries with a
    backoff while the others serve.
    """

    app: CorsproxyApplication
    LISTENERS: list[Any]

    def __init__(self, app: CorsproxyApplication) -> None:
        super().__init__(app)
        self._spawned: dict[int, Any] = {}  # every worker not yet forgotten, to close what a halted reap skipped
        self._exit_reasons: dict[int, str] = {}  # why a worker that exited before it was ready failed
        self._serving = False  # some worker has reported ready
        self._failed_boots = 0
        self._respawn_not_before = 0.0
        self._retiring: set[int] = set()  # told to drain by a reload: neither counted nor signalled again
        self.stale_sockets: list[Any] = []
        self._reloading = False

    # -- workers ----------------------------------------------------------------------------------------------------

    def spawn_worker(self) -> int:
        pid = int(super().spawn_worker())  # (in the worker, super() never returns)
        self._spawned[pid] = self.WORKERS[pid]
        return pid

    def _ready(self, pid: int) -> bool:
        ready = _read_boot_status(self.app.runtime_dir, pid) == "ready"
        if ready and not self._serving:
            self._serving = True
        return ready

    def _forget_exited(self) -> list[str]:
        """Clean up after workers that exited; the reasons of those that died before they were ready (a boot
        failure, or a crash such as SIGBUS while starting), leaving out workers that were told to stop."""
        failed: list[str] = []
        for pid in [pid for pid in self._spawned if pid not in self.WORKERS]:
            worker = self._spawned.pop(pid)
            with contextlib.suppress(OSError, ValueError):
                worker.tmp.close()  # gunicorn skips this when a boot failure halts its reap
            status = _read_boot_status(self.app.runtime_dir, pid)
            if status not in ("ready", "draining"):
                reason = (status or "").removeprefix("failed: ") or "it exited before it was ready"
                self._exit_reasons[pid] = reason
                if pid not in self._retiring:
                    failed.append(reason)
            self._retiring.discard(pid)
            with contextlib.suppress(OSError):
                _boot_status_path(self.app.runtime_dir, pid).unlink()
            _child_exit(self, worker)  # idempotent: gunicorn may have called it already
        while len(self._exit_reasons) > 64:  # bounded: only the latest matter
            self._exit_reasons.pop(next(iter(self._exit_reasons)))
        return failed

    def reap_workers(self) -> None:
        failed: list[str] = []
        halted: HaltServer | None = None
        while True:
            try:
                super().reap_workers()
                break
            except HaltServer as exc:  # gunicorn's answer to a boot failure: decided below instead
                halted = exc
            finally:
                failed += self._forget_exited()
        reasons = "; ".join(dict.fromkeys(failed))
        if halted is not None and not (self._serving or any(self._ready(pid) for pid in self.WORKERS)):
            raise HaltServer(f"{halted.reason} {reasons}".strip(), halted.exit_status)
        if failed and not self._reloading:  # (a reload reports its own new workers' failures)
            delay = _RESPAWN_BACKOFF[min(self._failed_boots, len(_RESPAWN_BACKOFF) - 1)]
            self._failed_boots += 1
            self._respawn_not_before = time.monotonic() + delay
            self.log.error(
                "a worker failed to start (%s); the running workers keep serving; next attempt in %gs", reasons, delay
            )

    def manage_workers(self) -> None:
        if self._failed_boots and any(self._ready(pid) for pid in self.WORKERS):
            self._failed_boots = 0
        if len(self.WORKERS) - len(self._retiring & self.WORKERS.keys()) < self.num_workers and (
            time.monotonic() < self._respawn_not_before
        ):
            return  # a worker just failed to boot: do not fork a crash loop
        # Workers a reload told to drain stay out of gunicorn's count: it would otherwise send them a second SIGTERM
        # (asyncio then writes to its closed wakeup fd: "Exception ignored ... [Errno 9]") and not replace a new
        # worker that died while they drain.
        retiring = {pid: self.WORKERS.pop(pid) for pid in list(self._retiring) if pid in self.WORKERS}
        self._retiring = set(retiring)
        try:
            super().manage_workers()
        finally:
            self.WORKERS.update(retiring)
        if not self._serving:
            any(self._ready(pid) for pid in self.WORKERS)

    # -- reload -----------------------------------------------------------------------------------------------------

    def reload(self) -> None:
        self._reloading = True
        try:
            self._reload()
        finally:
            self._reloading = False

    def _reload(self) -> None:
        app = self.app
        path = app.config.source
        try:
            config = load_config(path)
            check_admin_tokens(config)
            check_store_path(config)
        except ConfigError as exc:
            self._refuse(path, str(exc))
            return
        except Exception as exc:  # never let a reload take the arbiter down
            self._refuse(path, repr(exc))
            return
        for warning in config.warnings:
            self.log.warning("%s: %s", path, warning)
        try:
            app.set_config(config)
        except OSError as exc:
            self._refuse(path, f"admin listener {_bind_address(config.admin.host, config.admin.port or 0)}: {exc}")
            return
        old_pids = [pid for pid in self.WORKERS if pid not in self._retiring]
        old_listeners = list(self.LISTENERS)
        old_address = self.cfg.address
        listeners_changed = False
        problem: str | None = None
        new_pids: list[int] = []
        try:
            app.reload()  # gunicorn's settings from the new config
            self.setup(app)
            if self.cfg.address != old_address:
                # New listening sockets beside the old ones, which the old workers keep serving until the switch.
                self.LISTENERS = sock.create_sockets(self.cfg, self.log)
                listeners_changed = True
            # What the new workers must not inherit (see _post_fork): the sockets this reload replaces.
            self.stale_sockets = [*(old_listeners if listeners_changed else ()), *app.replaced_admin_socket()]
            new_pids = [self.spawn_worker() for _ in range(self.cfg.workers)]
            deadline = time.monotonic() + self.timeout
            problem = self._await_ready(new_pids, deadline)
            if problem is None:
                problem = self._reconcile(config, deadline)
        except Exception as exc:  # pragma: no cover - a bug, but never the arbiter's end
            self.log.exception("reload failed")
            problem = _describe(exc)
        finally:
            self.stale_sockets = []
        if problem is not None:
            for pid in new_pids:
                self.kill_worker(pid, signal.SIGTERM)  # they drain like any worker: nothing they took is lost
            self._retiring.update(new_pids)
            if listeners_changed:
                for listener in self.LISTENERS:
                    listener.close()
                self.LISTENERS = old_listeners
            app.rollback_config()
            app.reload()
            self.setup(app)
            self._refuse(path, problem)
            return
        if listeners_changed:
            for listener in old_listeners:
                listener.close()
        app.commit_config()
        for pid in old_pids:
            self.kill_worker(pid, signal.SIGTERM)  # they stop accepting and finish their requests
        self._retiring.update(old_pids)
        self._await_stopped_accepting(old_pids, time.monotonic() + 10.0)
        self.log.info(
            "reloaded %s: %d new worker(s) serve it; the old ones finish their requests and exit", path, len(new_pids)
        )
        app.count_reload("applied")
        app.report_reload("applied", "")

    def _refuse(self, path: str, reason: str) -> None:
        self.log.error("reload refused, the running configuration stays (%s): %s", path, reason)
        self.app.count_reload("refused")
        self.app.report_reload("refused", reason)

    def _await_ready(self, pids: list[int], deadline: float) -> str | None:
        """``None`` once every worker in ``pids`` accepts connections; else why not (exited, or too slow)."""
        pending = set(pids)
        while True:
            for pid in list(pending):
                if self._ready(pid):
                    pending.discard(pid)
                elif pid not in self.WORKERS:
                    return f"a new worker could not start: {self._exit_reasons.get(pid, 'it exited')}"
            if not pending:
                return None
            if time.monotonic() >= deadline:
                return (
                    f"the new workers did not start within {self.timeout}s (is the store's writer lock held by a "
                    "long import?)"
                )
            self.reap_workers()
            time.sleep(0.02)

    def _await_stopped_accepting(self, pids: list[int], deadline: float) -> None:
        """Wait (bounded) until the old workers no longer accept connections, so that every connection accepted
        after the reload is reported is served on the new configuration."""
        while time.monotonic() < deadline:
            if all(
                pid not in self.WORKERS or _read_boot_status(self.app.runtime_dir, pid) == "draining" for pid in pids
            ):
                return
            self.reap_workers()
            time.sleep(0.02)

    def _reconcile(self, config: Config, deadline: float) -> str | None:
        """Reconcile the store with the new config in a child process (LMDB's writer lock may be held by an import:
        the arbiter keeps reaping meanwhile, and both generations of workers keep serving)."""
        read_end, write_end = os.pipe()
        pid = os.fork()
        if pid == 0:  # pragma: no cover - runs in the child (its coverage is not collected)
            os.close(read_end)
            code = 0
            try:
                reconcile_store(config)
                message = "ok"
            except BaseException as exc:
                message, code = f"the store could not be reconciled with the new config: {_describe(exc)}", 1
            try:
                os.write(write_end, message.encode("utf-8", "replace")[:4000])
            finally:
                os._exit(code)
        os.close(write_end)
        chunks: list[bytes] = []
        try:
            os.set_blocking(read_end, False)
            while True:
                try:
                    chunk = os.read(read_end, 4096)
                except BlockingIOError:
                    if time.monotonic() >= deadline:
                        with contextlib.suppress(OSError):
                            os.kill(pid, signal.SIGKILL)  # its transaction aborts: the store is unchanged
                        return f"the store could not be reconciled within {self.timeout}s (writer lock held?)"
                    self.reap_workers()  # also reaps the child (gunicorn waits for any child)
                    time.sleep(0.02)
                    continue
                if not chunk:
                    break
                chunks.append(chunk)
        finally:
            os.close(read_end)
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, os.WNOHANG)
        message = b"".join(chunks).decode("utf-8", "replace")
        if message == "ok":
            return None
        return message or "the process reconciling the store died"


class CorsproxyApplication(BaseApplication):  # type: ignore[misc]
    """The gunicorn application: settings come from the corsproxy config; ``load`` gives each worker its app."""

    def __init__(self, config: Config, workers: int, runtime_dir: Path) -> None:
        self.config = config
        self.worker_class, self.event_loop = event_loop_choice()
        self.workers = workers
        self.runtime_dir = runtime_dir
        self.admin_socket: socket.socket | None = None
        self.arbiter_pid = os.getpid()
        self._metrics: Metrics | None = None
        self._previous: tuple[Config, socket.socket | None, tuple[str, int] | None] | None = None
        self._admin_address: tuple[str, int] | None = None
        self._reloads_done = 0
        self._bind_admin(config)
        super().__init__(prog="corsproxy")

    # -- arbiter side ---------------------------------------------------------------------------------------------

    def _bind_admin(self, config: Config) -> None:
        admin = config.admin
        wanted = None if admin.port is None else (admin.host, admin.port)
        current = None if self.admin_socket is None else self._admin_address
        if wanted == current:
            return
        self.admin_socket = None if wanted is None else _listen_socket(*wanted)
        self._admin_address = wanted

    def set_config(self, config: Config) -> None:
        """Take ``config`` for the workers started from now on; :meth:`commit_config` or :meth:`rollback_config`
        follows. A changed admin address is bound now; the old socket stays open until the commit (for a rollback)."""
        self._previous = (self.config, self.admin_socket, self._admin_address)
        self._bind_admin(config)
        self.config = config

    def commit_config(self) -> None:
        previous, self._previous = self._previous, None
        if previous is not None and previous[1] is not None and previous[1] is not self.admin_socket:
            previous[1].close()  # this process's copy; draining workers keep theirs until they exit

    def replaced_admin_socket(self) -> list[socket.socket]:
        """The admin socket :meth:`set_config` replaced (open until the commit), if it replaced one."""
        previous = self._previous
        if previous is None or previous[1] is None or previous[1] is self.admin_socket:
            return []
        return [previous[1]]

    def rollback_config(self) -> None:
        previous, self._previous = self._previous, None
        if previous is None:
            return
        if self.admin_socket is not None and self.admin_socket is not previous[1]:
            self.admin_socket.close()
        self.config, self.admin_socket, self._admin_address = previous

    def count_reload(self, result: str) -> None:
        from corsproxy.ops.metrics import Metrics

        if self._metrics is None:
            self._metrics = Metrics()
        self._metrics.reloads.labels(result).inc()

    @property
    def reload_result_path(self) -> Path:
        return self.runtime_dir / "reload-result.json"

    def report_reload(self, result: str, reason: str) -> None:
        """Publish the outcome of the latest reload for ``POST /reload`` (which waits for it in a worker)."""
        self._reloads_done += 1
        path = self.reload_result_path
        partial = path.with_suffix(".partial")
        with contextlib.suppress(OSError):
            partial.write_text(json.dumps({"seq": self._reloads_done, "result": result, "reason": reason}))
            partial.replace(path)

    def load_config(self) -> None:
        from corsproxy.ops.request_log import log_dict_config

        config = self.config
        limits = config.limits
        settings: dict[str, Any] = {
            "bind": [_bind_address(config.listen.host, config.listen.port)],
            "workers": self.workers,
            "worker_class": self.worker_class,
            # The worker's own drain (the AppRunner's shutdown_timeout) ends first, so the store is closed cleanly;
            # the arbiter's SIGKILL is only the backstop.
            "graceful_timeout": math.ceil(limits.drain_timeout) + 5,
            # The heartbeat stops while a worker drains: the watchdog must outlast the drain.
            "timeout": max(30, math.ceil(limits.drain_timeout) + 15),
            "keepalive": math.ceil(limits.idle_timeout),
            "proc_name": "corsproxy",
            "worker_tmp_dir": str(self.runtime_dir),
            "control_socket_disable": True,  # no unix socket in $HOME: read-only root filesystems stay happy
            "logconfig_dict": log_dict_config(config.logging),
            "loglevel": config.logging.level,
            "accesslog": None,
            "child_exit": _child_exit,
            "post_fork": _post_fork,
            "forwarded_allow_ips": "",
        }
        if config.listen.tls_cert and config.listen.tls_key:
            settings["certfile"] = config.listen.tls_cert
            settings["keyfile"] = config.listen.tls_key
        for key, value in settings.items():
            self.cfg.set(key, value)

    def load(self) -> Callable[[], Awaitable[web.AppRunner]]:
        return self._build_runner

    def run(self) -> None:
        arbiter = _Arbiter(self)
        arbiter.log.info("%s", self.event_loop)  # after gunicorn configured logging, in the operator's format
        admin = self.config.admin
        if admin.port is not None:
            from corsproxy.ops.admin import auth_mode, load_tokens

            tokens = load_tokens(admin)
            (arbiter.log.info if tokens or not admin.allow_anonymous_writes else arbiter.log.warning)(
                "%s", auth_mode(admin, tokens)
            )
        arbiter.run()

    # -- worker side (after the fork) -----------------------------------------------------------------------------

    async def _build_runner(self) -> web.AppRunner:
        from corsproxy.ops.metrics import Metrics

        config = self.config
        metrics = Metrics()
        # No middleware: aiohttp then skips its middleware chain on every request. No reconcile: the
        # arbiter does it in one place, so no worker's start waits for LMDB's writer lock.
        app = create_app(config, reconcile=False)

        async def runtime(app: web.Application) -> AsyncIterator[None]:
            async with _worker_runtime(self, app, metrics):
                yield

        app.cleanup_ctx.append(runtime)  # after the proxy's own: the store is open when it runs
        return ProxyRunner(app, access_log=None, shutdown_timeout=config.limits.drain_timeout)


def _post_fork(server: Any, worker: Any) -> None:
    """In a worker forked during a reload that changes a listening address: close its copies of the sockets being
    replaced. Left open, the old port would stay bound after the switch, its connections queued with no one to
    accept them (clients hang instead of being refused)."""
    for stale in getattr(server, "stale_sockets", ()):
        with contextlib.suppress(OSError):
            stale.close()


def _child_exit(server: Any, worker: Any) -> None:
    from corsproxy.ops.metrics import fold_dead_process, mark_process_dead

    mark_process_dead(worker.pid)
    try:
        fold_dead_process(worker.pid)  # else two files per worker generation would pile up forever
    except (OSError, ValueError) as exc:  # a metrics file problem must never take the arbiter down
        server.log.warning("could not fold the metrics of worker %s: %s", worker.pid, exc)


class _StoreErrorCounter(logging.Filter):
    """Counts the LMDB errors that reach aiohttp: a handler that raised ``lmdb.Error`` is answered 500 and logged by
    aiohttp's ``handle_error`` with the exception attached, so the count costs nothing on requests that succeed (a
    middleware costs every request, see bench/RESULTS.md). Code that catches ``lmdb.Error`` itself and answers calls
    :meth:`Metrics.count_store_error` instead, so no error is counted twice."""

    def __init__(self, metrics: Metrics) -> None:
        super().__init__()
        self.metrics = metrics

    def filter(self, record: logging.LogRecord) -> bool:
        exc_info = record.exc_info
        if exc_info and isinstance(exc_info[1], lmdb.Error):
            self.metrics.count_store_error()
        return True


#: Seconds between folds of a worker's per-request counts into the shared metric files (see :class:`Metrics`).
METRICS_FLUSH_INTERVAL = 1.0


async def _flush_metrics(metrics: Metrics) -> None:
    while True:
        await asyncio.sleep(METRICS_FLUSH_INTERVAL)
        metrics.flush()


@contextlib.asynccontextmanager
async def _worker_runtime(
    application: CorsproxyApplication, app: web.Application, metrics: Metrics
) -> AsyncIterator[None]:
    """What a worker runs beside the proxy: observers, the admin site, the origins-file watcher."""
    from corsproxy.ops.admin import AdminContext, create_admin_app, load_tokens
    from corsproxy.ops.metrics import CONTENT_TYPE
    from corsproxy.ops.request_log import RequestLog
    from corsproxy.origins.file import OriginsFileWatcher, SyncResult

    state = app[STATE]
    config = state.config
    state.observers.append(metrics.observe)
    state.observers.append(RequestLog(config.logging))
    loop = asyncio.get_running_loop()
    flusher = asyncio.create_task(_flush_metrics(metrics))

    store_errors = _StoreErrorCounter(metrics)
    aiohttp_server_log = logging.getLogger("aiohttp.server")
    aiohttp_server_log.addFilter(store_errors)

    def render(state: ProxyState) -> tuple[bytes, str]:
        # Called in a thread (the admin handler's to_thread); observe() runs on the loop, so the flush does too.
        asyncio.run_coroutine_threadsafe(_flush_now(metrics), loop).result(timeout=10)
        try:
            metrics.origins.set(len(state.store))
            metrics.set_store_usage(state.store.usage())
            if config.store.postgresql is not None:
                from corsproxy.origins.sync import read_status, replica_state

                position = replica_state(state.store).position
                metrics.sync_position.set(position or 0)
                caught_up = float(read_status(state.store.path).get("caught_up_at") or 0.0)
                metrics.sync_lag.set(max(0.0, time.time() - caught_up) if caught_up else float("inf"))
        except lmdb.Error:
            metrics.count_store_error()
        return metrics.render(), CONTENT_TYPE

    def reload_all(_config: Config) -> Awaitable[dict[str, Any] | None]:
        before = _read_reload_result(application.reload_result_path)
        os.kill(application.arbiter_pid, signal.SIGHUP)  # the arbiter validates again and restarts workers on it
        return _await_reload_result(application.reload_result_path, before.get("seq", 0) if before else 0)

    admin_runner: web.AppRunner | None = None
    stop_console: Callable[[], Awaitable[None]] | None = None
    if application.admin_socket is not None:
        from corsproxy.console import start_recorder

        stop_console = start_recorder(state, metrics)  # refusals and chart counts for the console at /console/
        ctx = AdminContext(
            proxy=app,
            tokens=load_tokens(config.admin),
            config_path=config.source,
            request_reload=reload_all,
            render_metrics=render,
            on_reload_refused=lambda: metrics.reloads.labels("refused").inc(),
            on_store_write_error=lambda reason: metrics.store_write_errors.labels(reason).inc(),
        )

        admin_runner = web.AppRunner(create_admin_app(ctx), access_log=None, shutdown_timeout=5.0)
        await admin_runner.setup()
        admin_site = web.SockSite(admin_runner, application.admin_socket)
        await admin_site.start()

        async def draining(_app: web.Application) -> None:
            # Stop taking admin connections too (requests in progress finish): after a reload, the new workers
            # answer probes and writes, instead of a draining worker saying 503 or serving the old configuration.
            await admin_site.stop()
            ctx.draining = True  # /readyz says 503 to a probe that reached this worker just before

        app.on_shutdown.append(draining)

    async def stopped_accepting(_app: web.Application) -> None:
        # on_shutdown runs once this worker's proxy sites are closed, and (appended last) after its admin site is:
        # the arbiter waits for this before it reports a reload applied.
        await asyncio.to_thread(_write_boot_status, application.runtime_dir, os.getpid(), "draining")

    app.on_shutdown.append(stopped_accepting)
    watcher_task: asyncio.Task[None] | None = None
    if config.origins_file.path:

        def synced(result: SyncResult) -> None:
            metrics.origins_file_syncs.labels("applied" if result.applied else "refused").inc()

        watcher = OriginsFileWatcher(
            config.origins_file.path,
            state.store,
            lambda: state.config.safety,
            config.origins_file.poll_interval,
            Path(config.store.path) / "origins-file.lock",
            on_sync=synced,
        )
        # The watcher's first poll runs in the background: a start must not wait for LMDB's writer lock (/readyz
        # says "not ready" until the file is applied).
        watcher_task = asyncio.create_task(watcher.run())
    syncer_task: asyncio.Task[None] | None = None
    if config.store.postgresql is not None:
        from corsproxy.origins.sync import SyncSupervisor

        # The syncer runs in a process of its own, led by one worker per host like the watcher; /readyz says "not
        # ready" until its first sync has completed.
        supervisor = SyncSupervisor(config.source, Path(config.store.path))
        syncer_task = asyncio.create_task(supervisor.run(config.store.postgresql.poll_interval))
    try:
        yield
    finally:
        flusher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await flusher
        metrics.flush()  # the proxy has drained (cleanup runs after aiohttp's shutdown): nothing counted is lost
        if stop_console is not None:
            await stop_console()  # after the last metrics flush, which hands the console its last counts
        aiohttp_server_log.removeFilter(store_errors)
        for task in (watcher_task, syncer_task):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        if admin_runner is not None:
            await admin_runner.cleanup()


async def _flush_now(metrics: Metrics) -> None:
    metrics.flush()


def _read_reload_result(path: Path) -> dict[str, Any] | None:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


#: How long ``POST /reload`` waits for the arbiter's verdict before answering 202 (still reloading).
RELOAD_ANSWER_TIMEOUT = 60.0


async def _await_reload_result(path: Path, seen: int) -> dict[str, Any] | None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + RELOAD_ANSWER_TIMEOUT
    while loop.time() < deadline:
        result = await asyncio.to_thread(_read_reload_result, path)
        if result is not None and int(result.get("seq", 0)) > seen:
            return result
        await asyncio.sleep(0.05)
    return None


def check_store_path(config: Config) -> None:
    """What serving needs of ``store.path``, checked before any worker forks (and before a reload starts new ones):
    the store's own location check (errors named by key, with a fix; its warnings printed), then a real write probe."""
    from corsproxy.store import check_location

    errors, warnings = check_location(config.store.path, config.store.map_size_mb << 20)
    if errors:
        raise ConfigError([store_path_problem(error) for error in errors], config.source)
    for warning in warnings:
        print(f"warning: {warning}", file=sys.stderr)
    check_store_writable(config)


def check_source_of_truth(config: Config, application_name: str = "corsproxy-serve") -> SourceUnavailable | None:
    """Fleet mode: refuse (:class:`ConfigError`) a schema this corsproxy does not know, saying which command fixes it.
    PostgreSQL being unreachable is returned, not raised: a replica serves what it last synced."""
    source = config.store.postgresql
    if source is None:
        return None
    from corsproxy.origins.postgres import SchemaError, checked_source

    try:
        return checked_source(source, config.source, application_name)
    except SchemaError as exc:
        raise ConfigError([exc.problem()], config.source) from None


def reconcile_store(config: Config) -> None:
    """Open the store, make its config-owned entries ``cors.allow_origins``, close it (LMDB must not cross a fork:
    the arbiter calls this before forking any worker, or in a child of its own)."""
    from corsproxy.http.app import reconcile_and_log
    from corsproxy.store import OriginStore

    with OriginStore(
        config.store.path, map_size=config.store.map_size_mb << 20, audit_retention=config.store.audit_retention
    ) as store:
        reconcile_and_log(store, config)


# -- serve --------------------------------------------------------------------------------------------------------


def check_store_writable(config: Config) -> None:
    """Fail here, with the key and a fix, rather than in every worker: the store's directory must exist and take
    new files. (LMDB itself is opened only in the workers, after the fork: an environment must not cross a fork.)"""
    store_dir = Path(config.store.path)
    fix = (
        "point store.path at a writable directory (in the container image: the volume /var/lib/corsproxy; with a "
        "read-only root filesystem, a mounted volume or tmpfs)"
    )
    try:
        store_dir.mkdir(parents=True, exist_ok=True)
        # A probe file, not os.access: access() says yes to root even where a write then fails.
        with tempfile.TemporaryFile(dir=store_dir, prefix=".corsproxy-write-check-"):
            pass
    except OSError as exc:
        why = f"{store_dir} is not writable by uid {os.getuid()} ({exc.strerror or exc}) — {fix}"
        raise ConfigError([store_path_problem(why, "store_not_writable")], config.source) from None


def _listen_error(section: str, host: str, port: int, exc: OSError, source: str) -> ConfigError:
    """The problem with listening on ``host:port`` (configured under ``section``), named by the key to change."""
    address = _bind_address(host, port)
    also = " (or $CORSPROXY_PORT)" if section == "listen" else ""
    code = "cannot_listen"
    if exc.errno == errno.EADDRINUSE:
        key, code = "port", "port_in_use"
        why = f"{address} is already in use (another corsproxy, or another program) — stop it or pick another "
        why += f"{section}.port{also}"
    elif exc.errno == errno.EACCES:
        key, why = "port", f"{address}: permission denied (ports below 1024 need privileges) — pick one above 1023"
    elif exc.errno == errno.EADDRNOTAVAIL or isinstance(exc, socket.gaierror):
        key, why = "host", f"{host!r} is not an address of this machine ({exc.strerror or exc}) — e.g. 0.0.0.0"
    else:
        key, why = "port", f"cannot listen on {address}: {exc.strerror or exc}"
    return ConfigError([Problem(f"{section}.{key}", key, code, why)], source)


def check_can_listen(host: str, port: int, section: str, source: str) -> None:
    """Raise a :class:`ConfigError` naming ``section``'s key when ``host:port`` cannot be listened on (the socket is
    closed again; the listener proper binds it a moment later with the same options)."""
    if port == 0:
        return
    try:
        _listen_socket(host, port).close()
    except OSError as exc:
        raise _listen_error(section, host, port, exc, source) from None


def serve(config: Config, workers: int) -> int:
    """Run the arbiter and ``workers`` workers until SIGTERM/SIGINT; the exit status (0 after a clean drain)."""
    check_admin_tokens(config)
    # Fail here, with one clear line, rather than in every worker: the store's directory must exist and be writable.
    check_store_path(config)
    if (unavailable := check_source_of_truth(config)) is not None:
        print(f"warning: {unavailable}; serving the last synced replica until it is back", file=sys.stderr)
    # gunicorn retries a taken port five times over five seconds and then names no setting: try it once here.
    check_can_listen(config.listen.host, config.listen.port, "listen", config.source)
    # Reconciled once, here, before any worker forks (the environment is closed again: it must not cross a fork).
    # A full store fails the start with its reason; an import holding the writer lock delays it.
    try:
        reconcile_store(config)
    except StoreError as exc:
        raise ConfigError([store_path_problem(str(exc))], config.source) from None
    except lmdb.Error as exc:
        raise ConfigError([store_path_problem(f"{config.store.path}: {_describe(exc)}")], config.source) from None
    owner = os.getpid()
    runtime_dir = Path(tempfile.mkdtemp(prefix="corsproxy-"))
    metrics_dir = os.environ.get(MULTIPROC_ENV)
    if metrics_dir:
        # Samples of a previous run would be summed into this one's: start from zero, as prometheus-client asks.
        for stale in Path(metrics_dir).glob("*.db"):
            stale.unlink()
    else:
        metrics_dir = str(runtime_dir / "metrics")
        os.mkdir(metrics_dir)
        os.environ[MULTIPROC_ENV] = metrics_dir
    if "prometheus_client" in sys.modules:  # pragma: no cover - a programming error, not an operator's
        log.warning("prometheus_client was imported before %s was set: metrics will not add up", MULTIPROC_ENV)
    try:
        try:
            application = CorsproxyApplication(config, workers, runtime_dir)  # binds the admin listener
        except OSError as exc:
            admin = config.admin
            raise _listen_error("admin.listen", admin.host, admin.port or 0, exc, config.source) from None
        application.run()
    except SystemExit as exc:
        if os.getpid() != owner:
            raise  # a worker leaving: its exit status is the arbiter's business
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    finally:
        if os.getpid() == owner:
            shutil.rmtree(runtime_dir, ignore_errors=True)
    return 0
