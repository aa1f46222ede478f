"""End-to-end CORS through corsproxy in a real headless Chromium (issue 7).

Each case loads a page from some origin, runs ``fetch()`` in it and asserts what the page's script observed: a
readable response (status, body, the headers it may read) or the ``TypeError`` Fetch gives scripts on a CORS
failure. Where the issue asks, it also asserts what the upstream received (it records every request) and what the
proxy decided (an observer on ``ProxyState.observers``) — e.g. that a refused preflight kept the real request away
from the upstream, or that Chromium sent one preflight for two requests within ``max_age``.

The origins and the policy they meet are described in ``conftest.py``.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import Any

import pytest

from corsproxy.core.decision import Kind, Reason
from tests.browser.browsing import BrowserPage, Seen, World, fetch_in
from tests.browser.chromium import check_module
from tests.browser.servers import SESSION_COOKIE

check_module()  # no Chromium or no playwright: one skip line locally, a failure under CORSPROXY_REQUIRE_BROWSER=1

pytestmark = [pytest.mark.browser, pytest.mark.asyncio(loop_scope="module")]


def echoed(seen: Seen) -> dict[str, Any]:
    """The upstream's echo of the request it received (tests/support/upstream.py ``echo``), as the script read it."""
    assert seen.readable, f"the page could not read the response: {seen.error}"
    assert seen.body is not None
    body: dict[str, Any] = json.loads(seen.body)
    return body


def echoed_header(seen: Seen, name: str) -> str | None:
    values = [value for key, value in echoed(seen)["headers"] if key.lower() == name.lower()]
    assert len(values) <= 1, values
    return values[0] if values else None


# -- an allowed origin -------------------------------------------------------------------------------------------


async def test_simple_get_is_readable(tab: BrowserPage, world: World) -> None:
    seen = await tab.fetch(world.allowed, "/simple-get")
    assert seen.status == 200
    assert seen.type == "cors"
    assert echoed(seen)["method"] == "GET"
    assert echoed_header(seen, "Origin") == world.allowed
    assert world.log.preflights("/simple-get") == 0  # a simple request: Chromium sends it without asking


async def test_json_post_is_preflighted_and_readable(tab: BrowserPage, world: World) -> None:
    body = json.dumps({"hello": "proxy"})
    seen = await tab.fetch(
        world.allowed, "/json-post", method="POST", headers={"Content-Type": "application/json"}, body=body
    )
    assert seen.status == 200
    assert echoed(seen)["method"] == "POST"
    assert echoed(seen)["body_length"] == len(body)
    assert world.log.preflights("/json-post") == 1
    # The proxy answered the preflight itself: the upstream saw only the real request.
    assert [r.method for r in world.upstream_saw("/json-post")] == ["POST"]


async def test_allowed_custom_header_reaches_upstream(tab: BrowserPage, world: World) -> None:
    seen = await tab.fetch(world.allowed, "/custom-header", headers={"X-Api-Key": "key-123"})
    assert seen.status == 200
    assert echoed_header(seen, "X-Api-Key") == "key-123"
    assert world.log.preflights("/custom-header") == 1


async def test_allowed_method_put(tab: BrowserPage, world: World) -> None:
    seen = await tab.fetch(world.allowed, "/put", method="PUT", body="new value")
    assert seen.status == 200
    assert echoed(seen)["method"] == "PUT"
    assert [d.reason for d in world.log.decisions("/put", Kind.PREFLIGHT)] == [Reason.ALLOWED]


async def test_credentials_include_sends_cookie_and_reads_response(tab: BrowserPage, world: World) -> None:
    # A top-level visit to the API: the upstream sets an HttpOnly session cookie through the proxy. The page origin
    # http://127.0.0.1:PAGE and the proxy http://127.0.0.1:PROXY are cross-origin but same-site (ports do not make
    # sites), so Chromium sends this SameSite=Lax cookie with credentialed fetches; see the README for cross-site.
    await tab.page.goto(world.proxy + "/set-cookie")

    seen = await tab.fetch(world.allowed, "/whoami", credentials="include")
    assert seen.status == 200
    assert echoed_header(seen, "Cookie") == SESSION_COOKIE

    preflighted = await tab.fetch(
        world.allowed, "/whoami-put", method="PUT", credentials="include", headers={"X-Api-Key": "k"}
    )
    assert preflighted.status == 200
    assert echoed_header(preflighted, "Cookie") == SESSION_COOKIE
    assert world.log.preflights("/whoami-put") == 1

    # The control: the same request without credentials carries no cookie.
    anonymous = await tab.fetch(world.allowed, "/whoami-anonymous", credentials="omit")
    assert echoed_header(anonymous, "Cookie") is None


async def test_credentials_include_from_a_pattern_origin_is_readable(tab: BrowserPage, world: World) -> None:
    # Cross-site this time (a.app.localhost -> 127.0.0.1): whether Chromium attaches the cookie is its third-party
    # cookie policy's business (in these headless profiles it does not, see the README); what CORS owes the page is
    # a readable answer to a credentialed request from an origin the pattern allows.
    seen = await tab.fetch(world.named("a.app.localhost"), "/credentialed-cross-site", credentials="include")
    assert seen.status == 200
    assert echoed_header(seen, "Origin") == world.named("a.app.localhost")


async def test_exposed_header_readable_unexposed_not(tab: BrowserPage, world: World) -> None:
    seen = await tab.fetch(world.allowed, "/expose")
    assert seen.status == 200
    assert seen.headers.get("x-request-id") == "req-1"  # in expose_headers
    assert "x-secret-internal" not in seen.headers  # sent by the upstream, never exposed
    assert seen.headers.get("content-type", "").startswith("application/json")  # CORS-safelisted


# -- refused -----------------------------------------------------------------------------------------------------

REFUSED_ORIGINS: list[tuple[str, Callable[[World], str]]] = [
    ("another-host", lambda w: f"http://127.0.0.2:{w.host2_port}"),
    ("another-port", lambda w: f"http://127.0.0.1:{w.other_port}"),
    ("localhost-name-of-the-same-address", lambda w: w.named("localhost", w.page_port)),
    ("pattern-lookalike-without-label-boundary", lambda w: w.named("evilapp.localhost")),
    ("pattern-apex", lambda w: w.named("app.localhost")),
    ("pattern-as-prefix-of-another-host", lambda w: w.named("a.app.localhost.evil.localhost")),
    ("pattern-host-on-another-port", lambda w: w.named("a.app.localhost", w.other_port)),
]


@pytest.mark.parametrize(("case", "origin_of"), REFUSED_ORIGINS, ids=[case for case, _ in REFUSED_ORIGINS])
async def test_refused_origin_cannot_read(
    tab: BrowserPage, world: World, case: str, origin_of: Callable[[World], str]
) -> None:
    origin = origin_of(world)
    path = f"/refused/{case}"
    seen = await tab.fetch(origin, path)
    assert seen.blocked_by_cors, seen
    decisions = world.log.decisions(path)
    assert [(d.origin, d.reason) for d in decisions] == [(origin, Reason.ORIGIN_NOT_ALLOWED)]
    # The control: the server is reachable from this page, only the CORS check fails (an opaque no-cors answer).
    opaque = await tab.fetch(origin, path + "/no-cors", mode="no-cors")
    assert opaque.readable
    assert opaque.type == "opaque"


async def test_null_origin_from_sandboxed_iframe_is_refused(tab: BrowserPage, world: World) -> None:
    await tab.open(world.allowed, "/sandboxed")  # an allowed page embedding a sandboxed frame
    (frame,) = tab.page.main_frame.child_frames
    assert await frame.evaluate("self.origin") == "null"
    seen = await fetch_in(frame, world.proxy + "/null-origin", {})
    assert seen.blocked_by_cors, seen
    assert [(d.origin, d.reason) for d in world.log.decisions("/null-origin")] == [("null", Reason.ORIGIN_NULL)]


async def test_disallowed_method_never_reaches_upstream(tab: BrowserPage, world: World) -> None:
    seen = await tab.fetch(world.allowed, "/delete-me", method="DELETE")
    assert seen.blocked_by_cors, seen
    assert [d.reason for d in world.log.decisions("/delete-me")] == [Reason.METHOD_NOT_ALLOWED]
    assert world.upstream_saw("/delete-me") == []


async def test_disallowed_header_never_reaches_upstream(tab: BrowserPage, world: World) -> None:
    seen = await tab.fetch(world.allowed, "/forbidden-header", headers={"X-Forbidden": "1"})
    assert seen.blocked_by_cors, seen
    assert [d.reason for d in world.log.decisions("/forbidden-header")] == [Reason.HEADER_NOT_ALLOWED]
    assert world.upstream_saw("/forbidden-header") == []


async def test_credentials_refused_on_a_policy_without_them(tab: BrowserPage, world: World) -> None:
    # /no-credentials/ is a route that allows this very origin under a policy with allow_credentials: false.
    anonymous = await tab.fetch(world.allowed, "/no-credentials/anonymous")
    assert anonymous.status == 200  # the origin is allowed on the route...

    seen = await tab.fetch(world.allowed, "/no-credentials/with-cookies", credentials="include")
    assert seen.blocked_by_cors, seen  # ...but without Access-Control-Allow-Credentials the browser withholds it
    (decision,) = world.log.decisions("/no-credentials/with-cookies")
    assert decision.allowed
    assert decision.policy is not None
    assert decision.policy.name == "no-credentials"


async def test_upstream_wildcard_does_not_leak_to_refused_origin(tab: BrowserPage, world: World) -> None:
    # The upstream answers with its own "Access-Control-Allow-Origin: *" and exposes x-secret-internal.
    refused = await tab.fetch(f"http://127.0.0.2:{world.host2_port}", "/upstream-cors")
    assert refused.blocked_by_cors, refused

    allowed = await tab.fetch(world.allowed, "/upstream-cors")
    assert allowed.status == 200
    assert allowed.body == "ok"
    assert "x-secret-internal" not in allowed.headers  # the upstream's own expose list did not survive either


# -- caches ------------------------------------------------------------------------------------------------------


#: Chromium caches a preflight for 5 s when Access-Control-Max-Age is absent (Fetch #cors-preflight-cache); waiting
#: longer than that before the second request is what shows the proxy's max_age (600 s) is the one in force.
DEFAULT_PREFLIGHT_CACHE_SECONDS = 5


async def test_second_request_within_max_age_sends_no_preflight(tab: BrowserPage, world: World) -> None:
    path = "/preflight-cache"
    first = await tab.fetch(world.allowed, path, method="PUT", headers={"X-Api-Key": "k"}, body="x")
    assert first.status == 200
    await asyncio.sleep(DEFAULT_PREFLIGHT_CACHE_SECONDS + 1)
    second = await tab.fetch(world.allowed, path, method="PUT", headers={"X-Api-Key": "k"}, body="x")
    assert second.status == 200
    assert world.log.preflights(path) == 1  # max_age: 600, the second PUT went straight out
    assert len(world.upstream_saw(path, "PUT")) == 2


async def test_max_age_zero_preflights_every_request(tab: BrowserPage, world: World) -> None:
    # The control: on a route whose policy says max_age: 0, Chromium asks again every time.
    path = "/no-preflight-cache/put"
    for _ in range(2):
        seen = await tab.fetch(world.allowed, path, method="PUT", headers={"X-Api-Key": "k"}, body="x")
        assert seen.status == 200
    assert world.log.preflights(path) == 2


async def test_two_origins_reading_one_cached_url_each_get_their_own_answer(tab: BrowserPage, world: World) -> None:
    # a.app.localhost and b.app.localhost are one site, so they share Chromium's (partitioned) HTTP cache.
    first, second = world.named("a.app.localhost"), world.named("b.app.localhost")
    path = "/cached/vary"

    seen = await tab.fetch(first, path, cache="force-cache")
    assert json.loads(seen.body or "")["origin"] == first
    again = await tab.fetch(first, path, cache="force-cache")
    assert again.body == seen.body
    assert len(world.upstream_saw(path)) == 1  # the response really is cached

    # Without "Vary: Origin" the cache would hand the second origin the first one's answer, whose
    # Access-Control-Allow-Origin names the first origin: a CORS failure for a request the policy allows.
    other = await tab.fetch(second, path, cache="force-cache")
    assert other.readable, other
    assert json.loads(other.body or "")["origin"] == second
    assert len(world.upstream_saw(path)) == 2


# -- errors ------------------------------------------------------------------------------------------------------


async def test_upstream_500_is_readable(tab: BrowserPage, world: World) -> None:
    seen = await tab.fetch(world.allowed, "/status/500")
    assert seen.readable, seen
    assert seen.status == 500
    assert seen.body == "upstream says 500\n"


async def test_proxy_502_is_readable_by_allowed_origin_only(tab: BrowserPage, world: World) -> None:
    await tab.open(world.allowed)
    seen = await fetch_in(tab.page.main_frame, world.dead_proxy + "/down", {})
    assert seen.readable, seen
    assert seen.status == 502
    assert seen.body == "upstream unreachable\n"

    # The preflight is the proxy's own business: answered while the upstream is down, then the real request's 502.
    put = await fetch_in(tab.page.main_frame, world.dead_proxy + "/down-put", {"method": "PUT", "body": "x"})
    assert put.status == 502

    await tab.open(f"http://127.0.0.2:{world.host2_port}")
    refused = await fetch_in(tab.page.main_frame, world.dead_proxy + "/down", {})
    assert refused.blocked_by_cors, refused
