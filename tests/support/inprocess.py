"""The real proxy in the test's own event loop, served as ``corsproxy serve`` serves it: by its
:class:`~corsproxy.http.protocol.ProxyRunner` (header-read timeout, 431 past the parser's ceiling, the preflight fast
path unless turned off) on a loopback socket; and the admin app in front of it, as a worker serves it — in the test's
event loop, or on a thread of its own for tests that call it with blocking clients (:class:`ThreadedAdmin`).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from corsproxy.config import parse_config
from corsproxy.core.settings import Config
from corsproxy.http.app import STATE, ProxyState, create_app
from corsproxy.http.protocol import ProxyRunner
from corsproxy.ops.admin import AdminContext, create_admin_app
from corsproxy.origins.file import OriginsFileWatcher
from tests.support.config import BASE_CONFIG, merge
from tests.support.serve import TOKEN, Clients

__all__ = [
    "ProxyFactory",
    "RunningAdmin",
    "RunningProxy",
    "ThreadedAdmin",
    "client_state",
    "proxy_app",
    "running_proxy",
    "serve_admin",
    "serve_proxy",
]

#: The ``make_proxy`` fixture: the proxy app behind pytest-aiohttp's test client, from keyword config overrides.
ProxyFactory = Callable[..., Awaitable[TestClient[web.Request, web.Application]]]


@dataclass(frozen=True)
class RunningProxy:
    app: web.Application
    runner: ProxyRunner
    port: int

    @property
    def state(self) -> ProxyState:
        return self.app[STATE]


def client_state(client: TestClient[web.Request, web.Application]) -> ProxyState:
    """The state (config, store, observers) of the proxy app behind a ``make_proxy`` client."""
    server = client.server
    assert isinstance(server, TestServer)
    return server.app[STATE]


def proxy_app(config: Config | dict[str, Any]) -> web.Application:
    """:func:`create_app` on a config document parsed without the environment (a developer's ``CORSPROXY_*`` must
    not leak into a test) or on an already compiled :class:`Config`."""
    return create_app(config if isinstance(config, Config) else parse_config(config, env={}))


@contextlib.asynccontextmanager
async def serve_proxy(
    config: Config | dict[str, Any] | web.Application,
    *,
    fast_preflights: bool = True,
    sock: socket.socket | None = None,
    **runner_kwargs: Any,
) -> AsyncIterator[RunningProxy]:
    """Serve the proxy on ``sock`` (a bound loopback socket) or on a free loopback port until the block ends."""
    app = config if isinstance(config, web.Application) else proxy_app(config)
    runner = ProxyRunner(app, fast_preflights=fast_preflights, access_log=None, handle_signals=False, **runner_kwargs)
    await runner.setup()
    try:
        if sock is None:
            await web.TCPSite(runner, "127.0.0.1", 0).start()
        else:
            await web.SockSite(runner, sock).start()
        yield RunningProxy(app, runner, int(runner.addresses[0][1]))
    finally:
        await runner.cleanup()


@contextlib.asynccontextmanager
async def running_proxy(config: Config | dict[str, Any], **options: Any) -> AsyncIterator[int]:
    """:func:`serve_proxy` for a test that needs only the port."""
    async with serve_proxy(config, **options) as proxy:
        yield proxy.port


@dataclass(frozen=True)
class RunningAdmin:
    context: AdminContext
    runner: web.AppRunner
    port: int


@contextlib.asynccontextmanager
async def serve_admin(
    proxy: RunningProxy,
    tokens: Mapping[str, str],
    *,
    ssl_context: ssl.SSLContext | None = None,
    **context: Any,
) -> AsyncIterator[RunningAdmin]:
    """:func:`create_admin_app` for ``proxy`` (whose store is open: its app has started) on a free loopback port;
    ``context`` sets further :class:`AdminContext` fields."""
    ctx = AdminContext(proxy=proxy.app, tokens=tokens, **context)
    runner = web.AppRunner(create_admin_app(ctx), access_log=None, handle_signals=False)
    await runner.setup()
    try:
        await web.TCPSite(runner, "127.0.0.1", 0, ssl_context=ssl_context).start()
        yield RunningAdmin(ctx, runner, int(runner.addresses[0][1]))
    finally:
        await runner.cleanup()


class ThreadedAdmin(Clients):
    """The proxy and its admin API in this process, on their own event loop on a thread, with a fresh store in
    ``tmp``: what one ``corsproxy serve`` worker runs, for tests that need a server of their own and call it with
    blocking clients. Its admin token is :data:`TOKEN` (actor ``admin``); ``origins_file`` is applied once before
    it serves, as a worker does. Keyword arguments are merged into the config document."""

    def __init__(self, tmp: Path, upstream_port: int, *, origins_file: str | None = None, **override: Any) -> None:
        self.tmp = tmp
        self.config_path = tmp / "config.yaml"
        self.data = merge(
            BASE_CONFIG,
            {"upstream": {"url": f"http://127.0.0.1:{upstream_port}"}, "store": {"path": str(tmp / "origins.lmdb")}},
        )
        if origins_file is not None:
            (tmp / "origins.txt").write_text(origins_file)
            self.data["origins_file"] = {"path": str(tmp / "origins.txt"), "poll_interval": 0.2}
        self.data = merge(self.data, override)
        self._ready = threading.Event()
        self._failed: BaseException | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=self._serve, daemon=True)

    def _serve(self) -> None:
        try:
            asyncio.run(self._main())
        except BaseException as exc:  # reported by start()
            self._failed = exc
            self._ready.set()

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        config = parse_config(self.data, env={})
        async with (
            serve_proxy(config) as proxy,
            serve_admin(proxy, {TOKEN: "admin"}, config_path=str(self.config_path)) as admin,
        ):
            if config.origins_file.path:
                watcher = OriginsFileWatcher(
                    config.origins_file.path,
                    proxy.state.store,
                    lambda: proxy.state.config.safety,
                    config.origins_file.poll_interval,
                    Path(config.store.path) / "origins-file.lock",
                )
                assert await asyncio.to_thread(watcher.try_lead)
                await asyncio.to_thread(watcher.poll)
            self.port, self.admin_port = proxy.port, admin.port
            self._ready.set()
            await self._stop.wait()

    def __enter__(self) -> ThreadedAdmin:
        self.config_path.write_text(yaml.safe_dump(self.data))
        self._thread.start()
        assert self._ready.wait(20), "the in-process admin API did not start"
        if self._failed is not None:
            raise AssertionError("the in-process admin API did not start") from self._failed
        return self

    def __exit__(self, *exc: object) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(20)
        assert not self._thread.is_alive(), "the in-process admin API did not stop"
