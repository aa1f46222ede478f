"""The real proxy in the test's own event loop, served as ``corsproxy serve`` serves it: by its
:class:`~corsproxy.proxy.ProxyRunner` (header-read timeout, 431 past the parser's ceiling, the preflight fast path
unless turned off) on a loopback socket; and the admin app in front of it, as a worker serves it.
"""

from __future__ import annotations

import contextlib
import socket
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from corsproxy.admin import AdminContext, create_admin_app
from corsproxy.config import Config, parse_config
from corsproxy.proxy import STATE, ProxyRunner, ProxyState, create_app

__all__ = [
    "ProxyFactory",
    "RunningAdmin",
    "RunningProxy",
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
