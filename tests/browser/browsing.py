"""What a test does in the browser: load a page of some origin, run ``fetch()`` in it, and keep what the script saw.

:class:`World` names the servers and origins of the module (built by the ``world`` fixture in ``conftest.py``).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from aiohttp import web

from tests.browser.servers import ProxyLog

if TYPE_CHECKING:  # playwright may be missing locally: then the suite skips instead of failing to import
    from playwright.async_api import Frame, Page

__all__ = ["FETCH_TIMEOUT", "BrowserPage", "Seen", "World", "fetch_in"]

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
