"""The operator console in a real headless Chromium, against a real ``corsproxy serve`` (2 workers) with real traffic.

One Chromium and one server for the module. The server's store holds 100,000 imported entries besides the
configured ones. Pages on other loopback origins play the application whose requests get refused (and then allowed
from the console) and the hostile site that tries to use the operator's console session. Every console page is
checked for console errors, every request the browser makes for staying on loopback, and each screen is saved as a
screenshot under the test's temporary directory (the path is printed) for a person to look at.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import quote, urlsplit

import pytest
import pytest_asyncio

from corsproxy.store import OriginRecord, OriginStore
from tests.browser.browsing import FETCH_TIMEOUT, fetch_in
from tests.browser.chromium import check_module
from tests.browser.servers import Servers, bound_socket, make_page_app, port_of
from tests.conftest import run_cli
from tests.test_workers_harness import TOKEN, Server, ThreadedUpstream, wait_until

check_module()  # no Chromium or no playwright: one skip line locally, a failure under CORSPROXY_REQUIRE_BROWSER=1

if TYPE_CHECKING:
    from playwright.async_api import Browser, BrowserContext, ConsoleMessage, Page, Request

pytestmark = [pytest.mark.browser, pytest.mark.asyncio(loop_scope="module")]

BULK = 100_000
#: How Chromium logs a 401 answer (a refused sign-in, a request after sign-out): the only messages a test expects.
UNAUTHORIZED = "error: Failed to load resource: the server responded with a status of 401 (Unauthorized)"


@dataclass
class ConsoleWorld:
    server: Server
    app_origin: str  # a page origin the proxy refuses until the console allows it
    evil_port: int  # pages hostile to the operator: http://127.0.0.1:PORT (same site) and http://evil.localhost:PORT
    tmp: Path
    config_path: Path

    @property
    def console(self) -> str:
        return f"http://127.0.0.1:{self.server.admin_port}/console/"

    @property
    def proxy(self) -> str:
        return f"http://127.0.0.1:{self.server.port}"


def _seed(store_path: Path) -> None:
    records = ((f"https://o{n:06d}.bulk.example.com", OriginRecord(source="cli", note="bulk")) for n in range(BULK))
    with OriginStore(store_path) as store:
        assert store.put_many(records, "cli:seed") == (BULK, 0)


@pytest.fixture(scope="module")
def upstream_thread() -> Iterator[ThreadedUpstream]:
    with ThreadedUpstream() as up:
        yield up


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def world(
    tmp_path_factory: pytest.TempPathFactory, upstream_thread: ThreadedUpstream
) -> AsyncIterator[ConsoleWorld]:
    tmp = tmp_path_factory.mktemp("console")
    (tmp / "tokens").write_text(f"alice:{TOKEN}\n")
    server = Server(
        tmp, upstream_thread.port, env={"CORSPROXY_ADMIN_TOKEN": ""}, admin={"token_file": str(tmp / "tokens")}
    )
    servers = Servers()
    page, evil = bound_socket(), bound_socket()
    await servers.serve(make_page_app(), page, evil)
    try:
        # The bulk entries are written straight into the store's LMDB before the start (what an import writes).
        await asyncio.to_thread(_seed, Path(server.data["store"]["path"]))
        await asyncio.to_thread(server.start)
        yield ConsoleWorld(
            server=server,
            app_origin=f"http://127.0.0.1:{port_of(page)}",
            evil_port=port_of(evil),
            tmp=tmp,
            config_path=server.config_path,
        )
    finally:
        await asyncio.to_thread(server.stop)
        await servers.close()


@dataclass
class Watch:
    """What the pages of one test logged and where the browser connected."""

    errors: list[str] = field(default_factory=list)
    hosts: set[str] = field(default_factory=set)

    def console(self, message: ConsoleMessage) -> None:
        if message.type in ("error", "warning"):
            self.errors.append(f"{message.type}: {message.text} ({message.location.get('url')})")

    def request(self, request: Request) -> None:
        self.hosts.add(urlsplit(request.url).hostname or request.url)


def _loopback(host: str) -> bool:
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@pytest_asyncio.fixture(loop_scope="module")
async def context(browser: Browser) -> AsyncIterator[tuple[BrowserContext, Watch]]:
    context = await browser.new_context(viewport={"width": 1280, "height": 900})
    context.set_default_timeout(FETCH_TIMEOUT * 1000)
    watch = Watch()
    context.on("request", watch.request)
    try:
        yield context, watch
    finally:
        await context.close()
    leaving = sorted(host for host in watch.hosts if not _loopback(host))
    assert not leaving, f"the browser connected beyond loopback: {leaving}"


async def console_page(context: BrowserContext, watch: Watch, world: ConsoleWorld) -> Page:
    page = await context.new_page()
    page.on("console", watch.console)
    page.on("pageerror", lambda error: watch.errors.append(f"{page.url}: uncaught: {error}"))
    await page.goto(world.console)
    return page


async def sign_in(page: Page, token: str = TOKEN) -> None:
    await page.get_by_label("Admin token").fill(token)
    await page.get_by_role("button", name="Sign in").click()


async def signed_in_page(context: BrowserContext, watch: Watch, world: ConsoleWorld) -> Page:
    page = await console_page(context, watch, world)
    await sign_in(page)
    await page.get_by_role("navigation").wait_for()
    return page


async def shoot(page: Page, tmp_path: Path, name: str, width: int = 1280) -> None:
    await page.set_viewport_size({"width": width, "height": 900})
    await page.wait_for_timeout(100)  # a layout pass after the resize
    path = tmp_path / f"{name}-{width}.png"
    await page.evaluate("window.scrollTo(0, 0)")
    await page.screenshot(path=str(path), full_page=width > 600)  # a phone: the first screenful
    print(f"screenshot: {path}")


async def page_fetch(page: Page, url: str, init: dict[str, Any]) -> Any:
    return await fetch_in(page.main_frame, url, init)


# -- sign-in ------------------------------------------------------------------------------------------------------


async def test_sign_in_wrong_token_and_sign_out(
    context: tuple[BrowserContext, Watch], world: ConsoleWorld, tmp_path: Path
) -> None:
    ctx, watch = context
    page = await console_page(ctx, watch, world)
    token = page.get_by_label("Admin token")
    assert await token.get_attribute("type") == "password"
    assert await page.locator("form#sign-in-form input").count() == 1  # one field: the token
    await shoot(page, tmp_path, "sign-in")
    await shoot(page, tmp_path, "sign-in", 390)

    await sign_in(page, "wrong-token-0123456789abcdef")
    await page.get_by_text("that is not a valid admin token").wait_for()
    assert await page.get_by_role("navigation").is_hidden()
    assert not await ctx.cookies()
    await shoot(page, tmp_path, "sign-in-refused")

    await token.fill(TOKEN)
    await token.press("Enter")  # the keyboard alone signs in
    nav = page.get_by_role("navigation", name="Console sections")
    await nav.wait_for()
    entries = await nav.get_by_role("link").all_inner_texts()
    assert entries == ["Overview", "Refusals", "Origins", "Explain", "Audit", "Configuration"]
    cookies = await ctx.cookies()
    assert [(c["name"], c["httpOnly"], c["sameSite"], c["path"]) for c in cookies] == [
        ("corsproxy_console", True, "Strict", "/console/")
    ]
    assert await page.evaluate("document.cookie") == ""  # HttpOnly: the page's script never sees the session
    assert await page.locator("#who").inner_text() == "admin:alice"

    # Keyboard: the navigation is reachable with Tab and follows Enter.
    await page.locator("#main").focus()
    await page.keyboard.press("Shift+Tab")
    await page.keyboard.press("Shift+Tab")  # past the sign-out button, back into the navigation
    focused = await page.evaluate("document.activeElement.textContent")
    assert focused == "Configuration", focused
    await page.keyboard.press("Enter")
    await page.get_by_role("heading", name="Configuration", level=1).wait_for()

    await page.get_by_role("button", name="Sign out").click()
    await page.get_by_label("Admin token").wait_for()
    assert not await ctx.cookies()
    after = await page.evaluate("fetch('api/overview').then(r => r.status)")
    assert after == 401  # the session is gone on the server, not only in this browser
    await page.reload()
    await page.get_by_label("Admin token").wait_for()
    assert await page.get_by_role("navigation").is_hidden()
    assert watch.errors == [
        f"{UNAUTHORIZED} ({world.console}api/session)",  # the wrong token
        f"{UNAUTHORIZED} ({world.console}api/overview)",  # the test's own request after sign-out
    ], watch.errors


# -- Overview -----------------------------------------------------------------------------------------------------


async def test_overview_charts_render_from_real_traffic(
    context: tuple[BrowserContext, Watch], world: ConsoleWorld, tmp_path: Path
) -> None:
    ctx, watch = context
    server = world.server

    def traffic() -> None:
        for n in range(20):
            server.proxy("GET", f"/hello/{n}", {"Origin": "https://app.example.com"})
            server.proxy("OPTIONS", "/x", {"Origin": "https://app.example.com", "Access-Control-Request-Method": "PUT"})
            server.proxy(
                "OPTIONS", "/x", {"Origin": "https://chart.example.net", "Access-Control-Request-Method": "PUT"}
            )
            server.proxy("GET", "/status/404")

    await asyncio.to_thread(traffic)
    page = await signed_in_page(ctx, watch, world)
    await page.get_by_role("heading", name="Overview", level=1).wait_for()
    for series in ("preflight allowed", "preflight refused", "actual allowed", "non-CORS"):
        await page.locator(f'#chart-requests path[data-series="{series}"]').wait_for(timeout=15_000)
    await page.locator('#chart-refusals path[data-series="origin_not_allowed"]').wait_for()
    await page.locator('#chart-status path[data-series="2xx"]').wait_for()
    await page.locator('#chart-status path[data-series="4xx"]').wait_for()
    await page.locator('#chart-latency path[data-series="p99"]').wait_for(state="attached")
    entries = await page.locator("#card-store .big").inner_text()
    assert int(entries.replace(",", "")) >= BULK
    label = await page.locator("#chart-requests svg").get_attribute("aria-label")
    assert label is not None and "preflight refused peak" in label
    await shoot(page, tmp_path, "overview")
    await shoot(page, tmp_path, "overview", 390)
    await page.get_by_label("Last hour").check()
    await page.locator('#chart-requests path[data-series="preflight refused"]').wait_for()
    assert watch.errors == []


# -- Refusals, Allow… ---------------------------------------------------------------------------------------------


async def test_a_refused_origin_appears_and_allow_lets_its_next_preflight_through(
    context: tuple[BrowserContext, Watch], world: ConsoleWorld, tmp_path: Path
) -> None:
    ctx, watch = context
    page = await signed_in_page(ctx, watch, world)
    await page.get_by_role("link", name="Refusals").click()
    await page.get_by_role("heading", name="Refusals", level=1).wait_for()

    # The application: a page on another origin calling the proxy, as a browser does (a preflighted PUT).
    app = await ctx.new_page()
    await app.goto(world.app_origin + "/")
    init = {"method": "PUT", "headers": {"Content-Type": "application/json"}, "body": "{}", "credentials": "include"}
    seen = await page_fetch(app, world.proxy + "/api/things", init)
    assert seen.blocked_by_cors, seen
    refused_at = time.monotonic()
    group = page.locator(f'section.refusal-group[data-origin="{world.app_origin}"]')
    await group.wait_for(timeout=2_000)  # the bound: within 2 s across all workers
    print(f"refusal listed {time.monotonic() - refused_at:.3f} s after the preflight was refused")
    row = group.locator("tbody tr").first
    cells = await row.locator("td").all_inner_texts()
    assert cells[1:5] == ["preflight", "OPTIONS", "/api/things", "origin_not_allowed"], cells
    await shoot(page, tmp_path, "refusals")
    await shoot(page, tmp_path, "refusals", 390)

    await group.get_by_role("button", name="Allow…").click()
    await page.get_by_role("heading", name="Origins", level=1).wait_for()
    result = page.locator("#add-result")
    await result.get_by_text("passes every check").wait_for()  # the form opened pre-filled and checked
    assert await page.get_by_label("Origin or pattern").input_value() == world.app_origin
    await page.get_by_label("Note").fill("allowed from the console")
    await page.get_by_role("button", name="Check").click()  # an edit asks for a new check before Commit
    await result.get_by_text("passes every check").wait_for()
    await shoot(page, tmp_path, "allow-review")
    await page.get_by_role("button", name="Commit").click()
    await result.get_by_text(f"Added {world.app_origin}").wait_for()
    assert "null" not in await result.inner_text()

    seen = await page_fetch(app, world.proxy + "/api/things", init)
    assert seen.readable and seen.status == 200, seen
    assert json.loads(seen.body)["method"] == "PUT"
    stored = await asyncio.to_thread(world.server.admin, "GET", "/origins/" + quote(world.app_origin, safe=""))
    assert stored.json()["source"] == "admin:alice" and stored.json()["note"] == "allowed from the console"
    assert watch.errors == []


async def test_an_unsafe_allow_is_refused_with_its_explanation(
    context: tuple[BrowserContext, Watch], world: ConsoleWorld, tmp_path: Path
) -> None:
    ctx, watch = context
    page = await signed_in_page(ctx, watch, world)
    await page.get_by_role("link", name="Origins").click()
    field = page.get_by_label("Origin or pattern")
    result = page.locator("#add-result")
    commit = page.get_by_role("button", name="Commit")
    for unsafe, because in (
        ("*", "credentials"),
        ("https://*.github.io", "public suffix"),
        ("https://*.co.uk", "public suffix"),
    ):
        await field.fill(unsafe)
        await page.get_by_role("button", name="Check").click()
        refusal = result.locator(".error")
        await refusal.wait_for()
        text = await refusal.inner_text()
        assert text.startswith("Refused:") and because in text, text
        assert await commit.is_disabled()
        if unsafe == "*":
            await shoot(page, tmp_path, "unsafe-allow")
    listed = await asyncio.to_thread(world.server.admin, "GET", "/origins/" + quote("*", safe=""))
    assert listed.status == 404
    assert watch.errors == []


# -- Origins ------------------------------------------------------------------------------------------------------


async def test_origins_pages_and_searches_a_large_store_server_side(
    context: tuple[BrowserContext, Watch], world: ConsoleWorld, tmp_path: Path
) -> None:
    ctx, watch = context
    page = await signed_in_page(ctx, watch, world)
    await page.get_by_role("link", name="Origins").click()
    table = page.locator("#origins-table tbody tr")
    await table.first.wait_for()
    timings: list[tuple[float, float]] = []  # (server ms, browser round trip ms) per page

    async def measured(action: Any) -> list[str]:
        await page.evaluate("document.getElementById('page-timing').dataset.elapsedMs = ''")
        started = time.monotonic()
        await action()
        await page.locator('#page-timing:not([data-elapsed-ms=""])').wait_for()
        rtt = (time.monotonic() - started) * 1000
        timings.append((float(await page.locator("#page-timing").get_attribute("data-elapsed-ms") or "nan"), rtt))
        return await page.locator("#origins-table tbody td.origin").all_inner_texts()

    first = await page.locator("#origins-table tbody td.origin").all_inner_texts()
    assert len(first) == 50
    seen = list(first)
    for _ in range(4):
        seen += await measured(lambda: page.get_by_role("button", name="Next").click())
    assert seen == sorted(seen) and len(set(seen)) == 250
    back = await measured(lambda: page.get_by_role("button", name="Previous").click())
    assert back == seen[150:200]
    assert await page.locator("#page-number").inner_text() == "page 4"

    search = page.get_by_label("Search (the start of an origin; the scheme may be left out)")
    await search.fill("o099990.bulk")
    found = await measured(lambda: search.press("Enter"))
    assert found == ["https://o099990.bulk.example.com"]
    await search.fill("o0999")
    found = await measured(lambda: page.get_by_role("button", name="Search").click())
    assert len(found) == 50 and all(origin.startswith("https://o0999") for origin in found)
    await page.get_by_role("button", name="Next").click()
    await page.locator("#page-number").get_by_text("page 2").wait_for()
    await shoot(page, tmp_path, "origins")
    await shoot(page, tmp_path, "origins", 390)

    # Entries declared in the config are read-only and say where to change them.
    await search.fill("https://app.example.com")
    await search.press("Enter")
    row = page.locator('#origins-table tr[data-origin="https://app.example.com"]')
    await row.wait_for()
    assert "read-only: change it in cors.allow_origins in" in await row.inner_text()
    assert await row.get_by_role("button").count() == 0

    print(f"origins pages over {BULK:,} entries (server ms, browser round trip ms): {timings}")
    for server_ms, rtt in timings:
        assert server_ms < 300, timings  # the scan itself; the bound
        assert rtt < 3000, timings  # loose: the whole round trip on a loaded machine
    assert watch.errors == []


async def test_edit_and_remove_an_entry(context: tuple[BrowserContext, Watch], world: ConsoleWorld) -> None:
    ctx, watch = context
    origin = "https://edit-me.example.net"
    added = await asyncio.to_thread(world.server.admin, "PUT", "/origins/" + quote(origin, safe=""), body={})
    assert added.status == 201
    page = await signed_in_page(ctx, watch, world)
    await page.get_by_role("link", name="Origins").click()
    search = page.get_by_label("Search (the start of an origin; the scheme may be left out)")
    await search.fill("edit-me")
    await search.press("Enter")
    row = page.locator(f'#origins-table tr[data-origin="{origin}"]')
    await row.get_by_role("button", name=f"Edit {origin}").click()
    assert await page.get_by_label("Origin or pattern").input_value() == origin
    await page.get_by_label("Expires after (ttl)").fill("2d")
    await page.get_by_role("button", name="Check").click()
    await page.locator("#add-result").get_by_text("replaces the current entry").wait_for()
    await page.get_by_role("button", name="Commit").click()
    await page.locator("#add-result").get_by_text(f"Changed {origin}").wait_for()
    stored = await asyncio.to_thread(world.server.admin, "GET", "/origins/" + quote(origin, safe=""))
    assert stored.json()["expires"] is not None
    remove = row.get_by_role("button", name=f"Remove {origin}")
    await remove.click()
    await row.get_by_role("button", name=f"Confirm removal of {origin}").click()
    await page.locator("#add-result").get_by_text(f"Removed {origin}").wait_for()
    gone = await asyncio.to_thread(world.server.admin, "GET", "/origins/" + quote(origin, safe=""))
    assert gone.status == 404
    assert watch.errors == []


# -- Explain, Audit -----------------------------------------------------------------------------------------------


def _cli(world: ConsoleWorld, *args: str) -> Any:
    done = run_cli(*args, "--config", str(world.config_path), env={"CORSPROXY_ADMIN_TOKEN": ""})
    return done


@pytest.mark.parametrize(
    ("origin", "method", "headers", "path"),
    [
        ("https://app.example.com", "PUT", "content-type", "/api"),
        ("https://nope.example.net", "", "", "/"),
        ("https://app.example.com", "PATCH", "", "/"),
        ("https://app.example.com", "POST", "x-not-allowed", "/"),
    ],
    ids=["allowed-preflight", "refused-origin", "refused-method", "refused-header"],
)
async def test_explain_shows_what_the_cli_shows(
    context: tuple[BrowserContext, Watch],
    world: ConsoleWorld,
    tmp_path: Path,
    origin: str,
    method: str,
    headers: str,
    path: str,
) -> None:
    ctx, watch = context
    args = ["explain", "--origin", origin, "--path", path, "--json"]
    if method:
        args += ["--method", method]
    if headers:
        args += ["--headers", headers]
    done = await asyncio.to_thread(_cli, world, *args)
    assert done.returncode in (0, 1), done.stderr
    cli = json.loads(done.stdout)
    page = await signed_in_page(ctx, watch, world)
    await page.get_by_role("link", name="Explain").click()
    await page.get_by_label("Origin").fill(origin)
    await page.get_by_label("Preflight for method").fill(method)
    await page.get_by_label("Request headers").fill(headers)
    await page.get_by_label("Path").fill(path)
    await page.get_by_role("button", name="Explain").click()
    decision = page.locator("#explain-decision")
    await decision.wait_for()
    assert await decision.inner_text() == f"{'allowed' if cli['allowed'] else 'refused'} ({cli['reason']})"
    assert await page.locator("#explain-request").inner_text() == cli["request"]
    assert await page.locator("#explain-matched").inner_text() == (cli["matched"] or "(no entry)")
    assert await page.locator("#explain-why").inner_text() == cli["why"]
    assert await page.locator("#explain-fix").inner_text() == (cli["fix"] or "–")
    shown = await page.locator("#explain-headers-out").inner_text()
    assert shown == ("\n".join(f"{n}: {v}" for n, v in cli["headers"]) or "none")
    if method == "PUT":
        await shoot(page, tmp_path, "explain")
        await shoot(page, tmp_path, "explain", 390)
    assert watch.errors == []


async def test_explain_from_a_refusal(context: tuple[BrowserContext, Watch], world: ConsoleWorld) -> None:
    ctx, watch = context
    origin = "https://explain-me.example.net"
    await asyncio.to_thread(world.server.proxy, "GET", "/from-refusal", {"Origin": origin})
    page = await signed_in_page(ctx, watch, world)
    await page.get_by_role("link", name="Refusals").click()
    group = page.locator(f'section.refusal-group[data-origin="{origin}"]')
    await group.get_by_role("button", name=f"Explain GET /from-refusal from {origin}").click()
    await page.get_by_role("heading", name="Explain", level=1).wait_for()
    assert await page.locator("#explain-decision").inner_text() == "refused (origin_not_allowed)"
    assert await page.locator("#explain-request").inner_text() == f"GET /from-refusal from {origin}"
    assert watch.errors == []


async def test_audit_shows_what_the_cli_shows_filtered_by_origin_and_actor(
    context: tuple[BrowserContext, Watch], world: ConsoleWorld, tmp_path: Path
) -> None:
    ctx, watch = context
    origin = "https://audited.example.net"
    for ttl in ("1d", "2d"):
        await asyncio.to_thread(
            world.server.admin, "PUT", "/origins/" + quote(origin, safe=""), body={"ttl": ttl, "note": ttl}
        )
    done = await asyncio.to_thread(_cli, world, "origins", "history", "--origin", origin)
    assert done.returncode == 0, done.stderr
    cli = [json.loads(line) for line in done.stdout.splitlines()]
    assert [e["action"] for e in cli] == ["add", "replace"]
    page = await signed_in_page(ctx, watch, world)
    await page.get_by_role("link", name="Audit").click()
    await page.locator("#audit-table").wait_for()
    await page.get_by_label("Origin").fill(origin)
    await page.get_by_role("button", name="Filter").click()
    rows = page.locator("#audit-table tbody tr")
    await page.locator("#audit-table tbody tr:nth-child(2):last-child").wait_for()  # exactly two rows
    shown = [await rows.nth(i).locator("td").all_inner_texts() for i in range(2)]
    expected = [[e["time"], e["action"], e["origin"], e["actor"]] for e in reversed(cli)]  # newest first
    assert [cells[:4] for cells in shown] == expected
    assert "note: 1d → 2d" in shown[0][4]
    assert "null" not in await page.locator("#audit-result").inner_text()
    await shoot(page, tmp_path, "audit")
    await shoot(page, tmp_path, "audit", 390)

    await page.get_by_label("Origin").fill("")
    await page.get_by_label("Actor (contains)").fill("alice")
    await page.get_by_role("button", name="Filter").click()
    await page.get_by_text("The actor filter searched").wait_for()
    actors = await page.locator("#audit-table tbody td:nth-child(4)").all_inner_texts()
    assert actors and set(actors) == {"admin:alice"}
    assert watch.errors == []


# -- another site -------------------------------------------------------------------------------------------------


# Another port of 127.0.0.1 is the same *site* as the console (ports do not make sites): SameSite=Strict does not
# keep the session cookie from its requests, so only the Origin, Sec-Fetch-Site and CSRF checks stand in its way.
@pytest.mark.parametrize("host", ["127.0.0.1", "evil.localhost"], ids=["same-site", "cross-site"])
async def test_a_page_on_another_origin_can_neither_write_nor_read(
    context: tuple[BrowserContext, Watch], world: ConsoleWorld, host: str
) -> None:
    ctx, watch = context
    console = await signed_in_page(ctx, watch, world)  # the operator is signed in, in the same browser
    await console.get_by_role("heading", name="Overview", level=1).wait_for()
    before = await asyncio.to_thread(world.server.admin, "GET", "/audit?limit=1000")
    evil = await ctx.new_page()
    await evil.goto(f"http://{host}:{world.evil_port}/")
    target = world.console + "api/origins/" + quote("https://attacker.example.net", safe="")
    attempts = {
        "cors-put": (target, {"method": "PUT", "credentials": "include", "body": "{}"}),
        "simple-post-reload": (
            world.console + "api/reload",
            {"method": "POST", "mode": "no-cors", "credentials": "include"},
        ),
        "simple-post-check": (
            world.console + "api/config/check",
            {"method": "POST", "mode": "no-cors", "credentials": "include", "body": "{}"},
        ),
        "read-session": (world.console + "api/session", {"credentials": "include"}),
        "read-refusals": (world.console + "api/refusals", {"credentials": "include"}),
    }
    for name, (url, init) in attempts.items():
        seen = await page_fetch(evil, url, init)
        # Nothing readable: a CORS error, or for no-cors requests an error too (Cross-Origin-Resource-Policy:
        # same-origin blocks even the opaque answer); that the server refused them is checked below.
        assert seen.blocked_by_cors, (name, seen)
    # A form post, the classic CSRF: a top-level navigation (with the cookie, from the same site) and its Origin.
    await evil.set_content(
        f'<form method="post" action="{world.console}api/reload"><button>go</button></form>', wait_until="load"
    )
    async with evil.expect_request(lambda r: r.url.endswith("/api/reload")) as posted, evil.expect_navigation():
        await evil.get_by_role("button", name="go").click()
    assert "forbidden" in (await evil.content())
    sent_cookie = "corsproxy_console=" in (await (await posted.value).all_headers()).get("cookie", "")
    assert sent_cookie == (host == "127.0.0.1")  # same site: the browser did send the session
    after = await asyncio.to_thread(world.server.admin, "GET", "/audit?limit=1000")
    assert after.json() == before.json()
    assert not any("reload of" in line.get("message", "") for line in world.server.logs())
    assert watch.errors == []  # (the hostile page's own CORS errors are not the console's)


async def test_another_name_for_the_same_address_has_no_session(
    context: tuple[BrowserContext, Watch], world: ConsoleWorld
) -> None:
    ctx, watch = context
    await signed_in_page(ctx, watch, world)
    # What a DNS-rebinding page would be: same address and port, another name, so another origin and no cookie.
    other = await ctx.new_page()
    await other.goto(f"http://rebound.localhost:{world.server.admin_port}/console/")
    status = await other.evaluate("fetch('api/refusals').then(r => r.status)")
    assert status == 401


# -- Configuration (last: its reload replaces the workers) --------------------------------------------------------


async def test_configuration_is_redacted_checked_and_reloaded_and_the_session_survives(
    context: tuple[BrowserContext, Watch], world: ConsoleWorld, tmp_path: Path
) -> None:
    ctx, watch = context
    page = await signed_in_page(ctx, watch, world)
    await page.get_by_role("link", name="Configuration").click()
    shown = page.locator("#config-json")
    await shown.get_by_text('"policies"').wait_for()
    text = await shown.inner_text()
    assert TOKEN not in text and '"token_file"' in text
    reload_button = page.get_by_role("button", name="Reload")
    assert await reload_button.is_disabled()

    original = world.config_path.read_text()
    world.config_path.write_text(original + "\nlimits:\n  max_body_size: -1\n  drain_timeout: 10\n")
    await page.get_by_role("button", name="Check the file").click()
    problems = page.locator("#config-result li")
    await problems.first.wait_for()
    listed = await problems.all_inner_texts()
    assert any(problem.startswith("limits.max_body_size") for problem in listed), listed
    assert await reload_button.is_disabled()
    await shoot(page, tmp_path, "configuration-refused")

    world.config_path.write_text(original)
    await page.get_by_role("button", name="Check the file").click()
    await page.locator("#config-result .ok").get_by_text("is valid").wait_for()
    await shoot(page, tmp_path, "configuration")
    await shoot(page, tmp_path, "configuration", 390)
    before_reload = "https://before-reload.example.net"
    await asyncio.to_thread(world.server.proxy, "GET", "/", {"Origin": before_reload})
    await page.get_by_role("link", name="Refusals").click()
    await page.locator(f'section.refusal-group[data-origin="{before_reload}"]').wait_for()
    await page.get_by_role("link", name="Configuration").click()
    await page.get_by_role("button", name="Check the file").click()
    await page.locator("#config-result .ok").get_by_text("is valid").wait_for()
    booted = len(world.server.booted_pids())
    await reload_button.click()
    await page.locator("#config-result .ok").get_by_text("Reloading").wait_for()
    await asyncio.to_thread(
        wait_until, lambda: len(world.server.booted_pids()) >= booted + 2, 30, 0.1, "the new workers"
    )
    # The session lives in the shared console environment: the new workers know it.
    await page.reload()
    await page.get_by_role("navigation", name="Console sections").wait_for()
    await page.get_by_role("link", name="Refusals").click()
    await page.locator(f'section.refusal-group[data-origin="{before_reload}"]').wait_for()  # kept too
    await page.get_by_role("link", name="Overview").click()
    await page.locator("#card-config").get_by_text("reloads: 1 applied, 0 refused").wait_for()
    assert watch.errors == []
