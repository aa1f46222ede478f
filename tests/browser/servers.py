"""The real servers a browser test talks to: page servers on several loopback origins, an upstream API, the proxy.

Everything is a real aiohttp application on a real loopback socket, started in the test's event loop. The upstream
reuses the handlers of :mod:`tests.support.upstream` (so it records what it received in ``RECEIVED``) and adds the two
endpoints only a browser needs: one that sets a cookie, and one whose answer the browser's HTTP cache keeps.
"""

from __future__ import annotations

import contextlib
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import web

from corsproxy.config import parse_config
from corsproxy.core.decision import Decision, Kind
from corsproxy.core.outcome import Outcome
from corsproxy.http.app import create_app
from tests.support.inprocess import RunningProxy, serve_proxy
from tests.support.upstream import RECEIVED, echo, status, upstream_cors

#: The cookie the upstream sets through the proxy. HttpOnly: the page's script can only learn it was *sent* from the
#: upstream's echo, never by reading ``document.cookie``.
SESSION_COOKIE = "session=browser-test"


async def set_cookie(request: web.Request) -> web.Response:
    request.app[RECEIVED].append(request)
    response = web.Response(text="cookie set\n")
    # SameSite=Lax is the browser default made explicit: sent on same-site subresource requests only, which is what a
    # page on http://127.0.0.1:OTHERPORT calling the proxy on http://127.0.0.1:PORT is (ports do not make sites).
    response.headers.add("Set-Cookie", f"{SESSION_COOKIE}; Path=/; HttpOnly; SameSite=Lax")
    return response


async def cached(request: web.Request) -> web.Response:
    """A response the browser's HTTP cache may keep for ten minutes; its body says which origin it was made for."""
    request.app[RECEIVED].append(request)
    serial = sum(1 for seen in request.app[RECEIVED] if seen.path == request.path)  # this answer's number
    body = {"origin": request.headers.get("Origin"), "serial": serial}
    return web.json_response(body, headers={"Cache-Control": "max-age=600"})


def make_browser_upstream_app() -> web.Application:
    app = web.Application()
    app[RECEIVED] = []
    app.router.add_get("/set-cookie", set_cookie)
    app.router.add_get("/cached/{name}", cached)
    app.router.add_route("*", "/status/{code}", status)
    app.router.add_route("*", "/upstream-cors", upstream_cors)
    app.router.add_route("*", "/{tail:.*}", echo)
    return app


_BLANK = "<!doctype html><meta charset=utf-8><title>corsproxy browser test page</title>\n"
#: ``allow-scripts`` without ``allow-same-origin``: the frame gets an opaque origin and its requests send
#: ``Origin: null`` (Fetch #serializing-a-request-origin).
_SANDBOXED = _BLANK + '<iframe sandbox="allow-scripts" src="/frame"></iframe>\n'


async def blank_page(request: web.Request) -> web.Response:
    return web.Response(text=_BLANK, content_type="text/html")


async def sandboxed_page(request: web.Request) -> web.Response:
    return web.Response(text=_SANDBOXED, content_type="text/html")


def make_page_app() -> web.Application:
    """The same tiny pages under every host name: the origin a page runs in is chosen by the URL it is loaded from."""
    app = web.Application()
    app.router.add_get("/", blank_page)
    app.router.add_get("/frame", blank_page)
    app.router.add_get("/sandboxed", sandboxed_page)
    return app


def bound_socket(host: str = "127.0.0.1") -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, 0))
    return sock


def port_of(sock: socket.socket) -> int:
    port: int = sock.getsockname()[1]
    return port


@dataclass
class Servers:
    """Every runner of one browser-test module, and the ports the test cases build URLs from."""

    runners: list[web.AppRunner] = field(default_factory=list)
    proxies: contextlib.AsyncExitStack = field(default_factory=contextlib.AsyncExitStack)

    async def serve(self, app: web.Application, *socks: socket.socket) -> web.AppRunner:
        runner = web.AppRunner(app, handle_signals=False)
        await runner.setup()
        self.runners.append(runner)
        for sock in socks:
            await web.SockSite(runner, sock).start()
        return runner

    async def serve_proxy(self, app: web.Application, sock: socket.socket) -> RunningProxy:
        # The proxy is served as `corsproxy serve` serves it: ProxyRunner, so preflights take the fast path.
        return await self.proxies.enter_async_context(serve_proxy(app, sock=sock))

    async def close(self) -> None:
        await self.proxies.aclose()
        for runner in reversed(self.runners):
            await runner.cleanup()
        self.runners.clear()


@dataclass
class ProxyLog:
    """What one proxy decided, per request, through the ``ProxyState.observers`` hook."""

    outcomes: list[Outcome] = field(default_factory=list)

    def __call__(self, outcome: Outcome) -> None:
        self.outcomes.append(outcome)

    def decisions(self, path: str, kind: Kind | None = None) -> list[Decision]:
        return [o.decision for o in self.outcomes if o.path == path and (kind is None or o.decision.kind is kind)]

    def preflights(self, path: str) -> int:
        return len(self.decisions(path, Kind.PREFLIGHT))


async def start_proxy(servers: Servers, data: dict[str, Any], store: Path) -> tuple[int, ProxyLog]:
    """The real proxy (``parse_config`` + ``create_app``) on a loopback socket; returns its port and decision log."""
    config = parse_config({**data, "store": {"path": str(store)}}, env={})  # env={}: ignore the developer's CORSPROXY_*
    proxy = await servers.serve_proxy(create_app(config), bound_socket())
    log = ProxyLog()
    proxy.state.observers.append(log)
    return proxy.port, log
