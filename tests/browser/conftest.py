"""Fixtures of the browser suite: one Chromium, one set of real servers, a fresh browser context per test.

The browser and the servers live for the whole module, in the module's event loop (``loop_scope="module"``), so the
suite launches Chromium once. Each test gets its own browser context — an incognito-like profile with its own
cookies, HTTP cache and CORS preflight cache — so no test sees another's state.

Origins (every one on loopback; Chromium resolves ``localhost`` and every ``*.localhost`` name to loopback itself):

==========================================  =======================================================================
``http://127.0.0.1:PROXY``                   the proxy; every page below is cross-origin to it
``http://127.0.0.1:DEAD``                    a second proxy whose upstream is a closed port (corsproxy's own 502)
``http://127.0.0.1:PAGE``                    allowed exactly (credentialed default policy; also on a route whose policy
                                             has no credentials)
``http://{a,b}.app.localhost:NAMES``         allowed through the pattern ``http://*.app.localhost:NAMES``
``http://127.0.0.2:HOST2``                   refused: another host
``http://127.0.0.1:OTHER``                   refused: another port of the allowed host
``http://localhost:NAMES`` etc.              refused: other names and look-alikes of the pattern
==========================================  =======================================================================
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import pytest_asyncio
from aiohttp import web

from tests.browser.chromium import async_playwright, launch_options, unavailable
from tests.browser.servers import (
    ProxyLog,
    Servers,
    bound_socket,
    closed_port,
    make_browser_upstream_app,
    make_page_app,
    port_of,
    start_proxy,
)
from tests.upstream import RECEIVED

if TYPE_CHECKING:  # playwright may be missing locally: then the suite skips instead of failing to import
    from playwright.async_api import Browser, BrowserContext, Frame, Page

#: Bound on one fetch as the page sees it; everything is on loopback, so this only ever trips on a hang.
FETCH_TIMEOUT = 15.0

_FETCH_JS = """
async ([url, init]) => {
  try {
    const response = await fetch(url, init);
    const body = await response.text();
    return {readable: true, type: response.type, status: response.status, body,
            headers: Object.fromEntries(response.headers), error: null};
  } catch (error) {
    return {readable: false, type: null, status: null, body: null, headers: {}, error: String(error)};
  }
}
"""


@dataclass(frozen=True)
class Seen:
    """What the page's script could observe of one ``fetch()``: a readable response, or the error it got."""

    readable: bool
    type: str | None  # "cors", "opaque" (mode: "no-cors"), ...
    status: int | None
    body: str | None
    headers: dict[str, str]  # only the names the script can read: safelisted or exposed
    error: str | None

    @property
    def blocked_by_cors(self) -> bool:
        # Fetch reports a CORS failure to the script as a "network error": a TypeError, nothing more.
        return not self.readable and self.error is not None and self.error.startswith("TypeError")


@dataclass(frozen=True)
class World:
    """The servers of the module and the origins the tests load pages from."""

    proxy: str
    dead_proxy: str
    page_port: int
    other_port: int
    names_port: int
    host2_port: int
    received: list[web.Request]
    log: ProxyLog

    @property
    def allowed(self) -> str:
        return f"http://127.0.0.1:{self.page_port}"

    def named(self, host: str, port: int | None = None) -> str:
        return f"http://{host}:{self.names_port if port is None else port}"

    def upstream_saw(self, path: str, method: str | None = None) -> list[web.Request]:
        return [r for r in self.received if r.path == path and (method is None or r.method == method)]


class BrowserPage:
    """One browser tab; :meth:`fetch` loads a page of ``origin`` (when not already there) and runs ``fetch()`` in it."""

    def __init__(self, page: Page, world: World):
        self.page = page
        self.world = world

    async def open(self, origin: str, path: str = "/") -> None:
        if self.page.url != origin + path:
            await self.page.goto(origin + path)

    async def fetch(self, origin: str, path: str, **init: Any) -> Seen:
        """``fetch(PROXY + path, init)`` from a page of ``origin``."""
        await self.open(origin)
        return await fetch_in(self.page.main_frame, self.world.proxy + path, init)


async def fetch_in(frame: Frame, url: str, init: dict[str, Any]) -> Seen:
    result = await asyncio.wait_for(frame.evaluate(_FETCH_JS, [url, init]), FETCH_TIMEOUT)
    return Seen(**result)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def browser() -> AsyncIterator[Browser]:
    assert async_playwright is not None  # test_browser.py skipped the module otherwise
    playwright = await async_playwright().start()
    try:
        # launch() gives a fresh temporary profile directory, removed on close; never `playwright install`.
        chromium = await playwright.chromium.launch(**launch_options())
    except Exception as exc:
        await playwright.stop()
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        unavailable(f"playwright could not launch {launch_options()['executable_path']}: {first_line}")
    try:
        yield chromium
    finally:
        await chromium.close()
        await playwright.stop()


def _policy(page_port: int, names_port: int) -> dict[str, Any]:
    return {
        "cors": {
            "allow_origins": [f"http://127.0.0.1:{page_port}", f"http://*.app.localhost:{names_port}"],
            "allow_methods": ["GET", "POST", "PUT"],
            "allow_headers": ["content-type", "x-api-key"],
            "expose_headers": ["x-request-id"],
            "allow_credentials": True,
            "max_age": 600,
        },
        "policies": {"no-credentials": {"allow_credentials": False}, "no-preflight-cache": {"max_age": 0}},
        "routes": [
            {
                "path": "/no-credentials/",
                "allow_origins": [f"http://127.0.0.1:{page_port}"],
                "policy": "no-credentials",
            },
            {
                "path": "/no-preflight-cache/",
                "allow_origins": [f"http://127.0.0.1:{page_port}"],
                "policy": "no-preflight-cache",
            },
        ],
    }


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def world(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[World]:
    servers = Servers()
    try:
        upstream_sock = bound_socket()
        upstream = make_browser_upstream_app()
        await servers.serve(upstream, upstream_sock)

        page, other, names, host2 = bound_socket(), bound_socket(), bound_socket(), bound_socket("127.0.0.2")
        await servers.serve(make_page_app(), page, other, names, host2)
        page_port, names_port = port_of(page), port_of(names)

        tmp: Path = tmp_path_factory.mktemp("browser")
        common = {"listen": {"host": "127.0.0.1", "port": 0}, **_policy(page_port, names_port)}
        proxy_port, log = await start_proxy(
            servers,
            {**common, "upstream": {"url": f"http://127.0.0.1:{port_of(upstream_sock)}", "read_timeout": 10}},
            tmp / "origins.lmdb",
        )
        dead_port, _ = await start_proxy(
            servers,
            {**common, "upstream": {"url": f"http://127.0.0.1:{closed_port()}", "connect_timeout": 2}},
            tmp / "dead-origins.lmdb",
        )
        yield World(
            proxy=f"http://127.0.0.1:{proxy_port}",
            dead_proxy=f"http://127.0.0.1:{dead_port}",
            page_port=page_port,
            other_port=port_of(other),
            names_port=names_port,
            host2_port=port_of(host2),
            received=upstream[RECEIVED],
            log=log,
        )
    finally:
        await servers.close()


@pytest_asyncio.fixture(loop_scope="module")
async def context(browser: Browser) -> AsyncIterator[BrowserContext]:
    context = await browser.new_context()
    context.set_default_timeout(FETCH_TIMEOUT * 1000)
    try:
        yield context
    finally:
        await context.close()


@pytest_asyncio.fixture(loop_scope="module")
async def tab(context: BrowserContext, world: World) -> BrowserPage:
    return BrowserPage(await context.new_page(), world)
