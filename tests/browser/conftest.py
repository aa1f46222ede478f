"""Fixtures of the browser suite: one Chromium, one set of real servers, a fresh browser context per test.

The browser and the servers live for the whole module, in the module's event loop (``loop_scope="module"``), so the
suite launches Chromium once. Each test gets its own browser context — an incognito-like profile with its own
cookies, HTTP cache and CORS preflight cache — so no test sees another's state.

Origins (every one on loopback; Chromium resolves ``localhost`` and every ``*.localhost`` name to loopback itself):

- ``http://127.0.0.1:PROXY`` — the proxy; every page below is cross-origin to it.
- ``http://127.0.0.1:DEAD`` — a second proxy whose upstream is a closed port (corsproxy's own 502).
- ``http://127.0.0.1:PAGE`` — allowed exactly, under the credentialed default policy; also listed on the
  ``/no-credentials/`` route (a policy without credentials) and the ``/no-preflight-cache/`` route (``max_age: 0``).
- ``http://a.app.localhost:NAMES``, ``http://b.app.localhost:NAMES`` — allowed by ``http://*.app.localhost:NAMES``.
- ``http://127.0.0.2:HOST2`` — refused: another host. ``http://127.0.0.1:OTHER`` — refused: another port.
- ``http://localhost:PAGE``, ``http://evilapp.localhost:NAMES``, ``http://app.localhost:NAMES``,
  ``http://a.app.localhost.evil.localhost:NAMES``, ``http://a.app.localhost:OTHER`` — refused: other names for the
  same address, and look-alikes of the pattern.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import pytest_asyncio

from tests.browser.browsing import FETCH_TIMEOUT, BrowserPage, World
from tests.browser.chromium import async_playwright, launch_options, unavailable
from tests.browser.servers import (
    Servers,
    bound_socket,
    make_browser_upstream_app,
    make_page_app,
    port_of,
    start_proxy,
)
from tests.support.net import free_port
from tests.support.upstream import RECEIVED

if TYPE_CHECKING:  # playwright may be missing locally: then the suite skips instead of failing to import
    from playwright.async_api import Browser, BrowserContext


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
            {**common, "upstream": {"url": f"http://127.0.0.1:{free_port()}", "connect_timeout": 2}},
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
