"""Running the proxy: ``corsproxy serve`` (a gunicorn arbiter over aiohttp workers), the admin listener, fleet mode
and the demo with its built-in echo upstream.

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
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import lmdb
from aiohttp import web
from aiohttp.worker import GunicornWebWorker
from gunicorn.app.base import BaseApplication  # type: ignore[import-untyped]
from gunicorn.arbiter import Arbiter  # type: ignore[import-untyped]

from corsproxy.config import ConfigError, load_config
from corsproxy.core.origin import is_loopback_host
from corsproxy.core.settings import Config
from corsproxy.http.app import STATE, ProxyState, create_app
from corsproxy.http.protocol import ProxyRunner

if TYPE_CHECKING:
    from corsproxy.ops.metrics import Metrics

__all__ = [
    "check_can_listen",
    "check_store_writable",
    "default_workers",
    "echo_app",
    "run_demo",
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
        raise ConfigError([f"admin token: {exc}"], config.source) from None
    if not tokens and (admin.token_file or not is_loopback_host(admin.host)):
        raise ConfigError(
            [f"admin: no token found in {admin.token_file or 'CORSPROXY_ADMIN_TOKEN'} for {admin.host}"], config.source
        )


class CorsproxyWorker(GunicornWebWorker):
    """aiohttp's gunicorn worker, with a TLS context built the modern way (gunicorn's ``ssl_version`` is gone)."""

    @staticmethod
    def _create_ssl_context(cfg: Any) -> ssl.SSLContext:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(cfg.certfile, cfg.keyfile)
        return context


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


class _Arbiter(Arbiter):  # type: ignore[misc]
    """gunicorn's arbiter, except that a reload never starts workers on a configuration that does not validate."""

    app: CorsproxyApplication

    def reload(self) -> None:
        app = self.app
        path = app.config.source
        try:
            config = load_config(path)
            check_admin_tokens(config)
        except ConfigError as exc:
            self.log.error("reload refused, the running configuration stays: %s", exc)
            app.count_reload("refused")
            return
        except Exception as exc:  # never let a reload take the arbiter down
            self.log.error("reload refused, the running configuration stays: %r", exc)
            app.count_reload("refused")
            return
        for warning in config.warnings:
            self.log.warning("%s: %s", path, warning)
        try:
            app.set_config(config)
        except OSError as exc:
            self.log.error(
                "reload refused: admin listener %s: %s", _bind_address(config.admin.host, config.admin.port or 0), exc
            )
            app.count_reload("refused")
            return
        super().reload()
        app.count_reload("applied")
        self.log.info("reloaded %s: new workers serve it, old ones finished their requests", path)


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
        self._bind_admin(config)
        super().__init__(prog="corsproxy")

    # -- arbiter side ---------------------------------------------------------------------------------------------

    def _bind_admin(self, config: Config) -> None:
        admin = config.admin
        wanted = None if admin.port is None else (admin.host, admin.port)
        current = None if self.admin_socket is None else getattr(self, "_admin_address", None)
        if wanted == current:
            return
        new = None if wanted is None else _listen_socket(*wanted)
        if self.admin_socket is not None:
            self.admin_socket.close()  # this process's copy; draining workers keep theirs until they exit
        self.admin_socket = new
        self._admin_address = wanted

    def set_config(self, config: Config) -> None:
        self._bind_admin(config)
        self.config = config

    def count_reload(self, result: str) -> None:
        from corsproxy.ops.metrics import Metrics

        if self._metrics is None:
            self._metrics = Metrics()
        self._metrics.reloads.labels(result).inc()

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
        app = create_app(config)  # no middleware: aiohttp then skips its middleware chain on every request

        async def runtime(app: web.Application) -> AsyncIterator[None]:
            async with _worker_runtime(self, app, metrics):
                yield

        app.cleanup_ctx.append(runtime)  # after the proxy's own: the store is open when it runs
        return ProxyRunner(app, access_log=None, shutdown_timeout=config.limits.drain_timeout)


def _child_exit(server: Any, worker: Any) -> None:
    from corsproxy.ops.metrics import mark_process_dead

    mark_process_dead(worker.pid)


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
        except lmdb.Error:
            metrics.count_store_error()
        return metrics.render(), CONTENT_TYPE

    def reload_all(_config: Config) -> None:
        os.kill(application.arbiter_pid, signal.SIGHUP)  # the arbiter validates again and restarts workers on it

    admin_runner: web.AppRunner | None = None
    if application.admin_socket is not None:
        ctx = AdminContext(
            proxy=app,
            tokens=load_tokens(config.admin),
            config_path=config.source,
            request_reload=reload_all,
            render_metrics=render,
            on_reload_refused=lambda: metrics.reloads.labels("refused").inc(),
            on_store_write_error=lambda reason: metrics.store_write_errors.labels(reason).inc(),
        )

        async def draining(_app: web.Application) -> None:
            ctx.draining = True  # /readyz says 503 while this worker finishes its requests

        app.on_shutdown.append(draining)
        admin_runner = web.AppRunner(create_admin_app(ctx), access_log=None, shutdown_timeout=5.0)
        await admin_runner.setup()
        await web.SockSite(admin_runner, application.admin_socket).start()

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
        if await asyncio.to_thread(watcher.try_lead):
            await asyncio.to_thread(watcher.poll)  # the file's origins are in the store before this worker serves
        watcher_task = asyncio.create_task(watcher.run())
    try:
        yield
    finally:
        flusher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await flusher
        metrics.flush()  # the proxy has drained (cleanup runs after aiohttp's shutdown): nothing counted is lost
        aiohttp_server_log.removeFilter(store_errors)
        if watcher_task is not None:
            watcher_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher_task
        if admin_runner is not None:
            await admin_runner.cleanup()


async def _flush_now(metrics: Metrics) -> None:
    metrics.flush()


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
        raise ConfigError(
            [f"store.path: {store_dir} is not writable by uid {os.getuid()} ({exc.strerror or exc}) — {fix}"],
            config.source,
        ) from None


def _listen_error(section: str, host: str, port: int, exc: OSError, source: str) -> ConfigError:
    """The problem with listening on ``host:port`` (configured under ``section``), named by the key to change."""
    address = _bind_address(host, port)
    also = " (or $CORSPROXY_PORT)" if section == "listen" else ""
    if exc.errno == errno.EADDRINUSE:
        key = "port"
        why = f"{address} is already in use (another corsproxy, or another program) — stop it or pick another "
        why += f"{section}.port{also}"
    elif exc.errno == errno.EACCES:
        key, why = "port", f"{address}: permission denied (ports below 1024 need privileges) — pick one above 1023"
    elif exc.errno == errno.EADDRNOTAVAIL or isinstance(exc, socket.gaierror):
        key, why = "host", f"{host!r} is not an address of this machine ({exc.strerror or exc}) — e.g. 0.0.0.0"
    else:
        key, why = "port", f"cannot listen on {address}: {exc.strerror or exc}"
    return ConfigError([f"{section}.{key}: {why}"], source)


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
    # (LMDB itself is opened only in the workers, after the fork: an environment must not cross a fork.)
    from corsproxy.store import check_location

    errors, warnings = check_location(config.store.path, config.store.map_size_mb << 20)
    if errors:
        raise ConfigError(errors, config.source)
    for warning in warnings:
        print(f"warning: {warning}", file=sys.stderr)
    check_store_writable(config)
    # gunicorn retries a taken port five times over five seconds and then names no setting: try it once here.
    check_can_listen(config.listen.host, config.listen.port, "listen", config.source)
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


async def _echo(request: web.Request) -> web.Response:
    body = await request.read()
    return web.json_response(
        {
            "method": request.method,
            "path": request.raw_path,
            "headers": dict(request.headers),
            "body": body.decode("utf-8", "replace"),
        },
        headers={"X-Request-Id": "demo-1", "X-Internal": "not exposed"},
    )


def echo_app() -> web.Application:
    """A tiny upstream that answers every request with what it received, as JSON."""
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", _echo)
    return app


async def run_demo(config: Config, listener: socket.socket | None = None) -> None:
    """Serve the demo on ``listener`` (bound by the caller, so that a taken port fails before anything starts), or
    on the config's address."""
    from dataclasses import replace

    setup_logging()
    if listener is None:
        listener = _listen_socket(config.listen.host, config.listen.port)
    proxy_runner: web.AppRunner | None = None
    upstream_runner = web.AppRunner(echo_app(), access_log=None)
    try:
        await upstream_runner.setup()
        upstream_site = web.TCPSite(upstream_runner, "127.0.0.1", 0)
        await upstream_site.start()
        port = upstream_runner.addresses[0][1]
        upstream = replace(config.upstream, url=f"http://127.0.0.1:{port}", host="127.0.0.1", port=port, base_path="")
        config = replace(config, upstream=upstream)
        proxy_runner = ProxyRunner(create_app(config), access_log=None)  # same limits as `serve`
        await proxy_runner.setup()
        await web.SockSite(proxy_runner, listener).start()
        _demo_banner(config, listener, port)
        await asyncio.Event().wait()
    finally:
        if proxy_runner is not None:
            await proxy_runner.cleanup()
        await upstream_runner.cleanup()
        listener.close()


def _demo_banner(config: Config, listener: socket.socket, port: int) -> None:
    host, listen_port = listener.getsockname()[:2]
    host = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(host, host)  # what curl on this machine reaches
    base = f"http://{_bind_address(host, listen_port)}"
    allowed = next((k for k in config.origins if "*" not in k and k != "null"), "https://app.example.com")
    print(
        f"\ncorsproxy demo: {base} -> echo upstream on 127.0.0.1:{port}\n"
        f"origins allowed: {json.dumps(sorted(config.origins))}\n\n"
        "An allowed preflight (204 with Access-Control-Allow-*):\n"
        f"  curl -si -X OPTIONS {base}/api/hello -H 'Origin: {allowed}' "
        "-H 'Access-Control-Request-Method: POST' -H 'Access-Control-Request-Headers: content-type'\n\n"
        "A refused preflight from a look-alike origin (403, no Access-Control-Allow-*):\n"
        f"  curl -si -X OPTIONS {base}/api/hello -H 'Origin: https://evil-example.com' "
        "-H 'Access-Control-Request-Method: POST'\n\n"
        "An actual request, forwarded to the upstream:\n"
        f"  curl -si {base}/api/hello -H 'Origin: {allowed}'\n\n"
        "Ctrl-C stops the demo.\n",
        flush=True,
    )
