"""Route escapes found by attacking the ambiguous-path refusal: readings of a request path that a common server
applies and that corsproxy's readings missed. Each is checked on the decision and on the wire (the real proxy, with
and without the preflight fast path, in front of a raw upstream that records every byte)."""

from __future__ import annotations

from pathlib import Path

import pytest

from corsproxy.config import parse_config
from corsproxy.core.decision import CorsRequest, Reason, StaticOriginSet
from tests.support.raw_upstream import RawUpstream
from tests.support.routes import ROUTED, ask_twice, get_request, preflight_request, routed_proxy

APP = "https://app.example.com"
EVIL = "https://evil.com"

#: IIS (HTTP.sys, ``PercentUAllowed`` on by default) decodes ``%uXXXX`` like ``%XX``, then resolves dot segments:
#: to it these are ``/admin/x``.
PERCENT_U = [
    ("/public/%u002e%u002e/admin/x", EVIL),  # judged under /public/ ("*") before
    ("/x/%u002e%u002e/admin/x", APP),  # judged by the credentialed default policy before
    ("/public/%U002E%U002E/admin/x", EVIL),
    ("/public/..%u002fadmin/x", EVIL),
    ("/public/..%u005cadmin/x", EVIL),
    ("/public/%u002e%2e/admin/x", EVIL),
    ("/%u0061dmin/x", APP),
    ("/public/%25u002e%25u002e/admin/x", EVIL),  # behind a decoding hop, as double %XX decoding is read
]


@pytest.mark.parametrize(("path", "origin"), PERCENT_U)
def test_percent_u_escapes_are_ambiguous(path: str, origin: str) -> None:
    config = parse_config(ROUTED, env={})
    store = StaticOriginSet({k: e.policy for k, e in config.origins.items()})
    admin = next(route for route in config.engine.routes if route.prefix == "/admin/")
    assert admin in config.engine.routes_for(path)
    decision = config.engine.judge(CorsRequest("GET", (origin,), path=path), store, 0.0)
    assert decision.reason is Reason.PATH_AMBIGUOUS


@pytest.mark.parametrize("fast", [True, False], ids=["fast path", "handler only"])
@pytest.mark.parametrize(("path", "origin"), PERCENT_U[:2])
async def test_percent_u_escapes_are_refused_on_the_wire(tmp_path: Path, fast: bool, path: str, origin: str) -> None:
    async with RawUpstream() as upstream, routed_proxy(tmp_path, upstream.port, fast) as port:
        for request in (get_request(path, origin), preflight_request(path, origin)):
            status, headers, body = await ask_twice(port, request)
            assert status == 400, (request, status, body)
            assert not [name for name in headers if name.lower().startswith("access-control-")]
        assert upstream.received == []


def test_a_plain_percent_u_free_path_keeps_one_reading() -> None:
    config = parse_config(ROUTED, env={})
    assert config.engine.routes_for("/public/%75x")[0] is config.engine.routes[0]


@pytest.mark.parametrize("fast", [True, False], ids=["fast path", "handler only"])
@pytest.mark.parametrize(
    "path",
    [
        "/%u002e%u002e/secret",
        "/x/..%u002f..%u002fsecret",
        "/%u002e%2e/secret",
        "/%252e%252e/secret",
        "/%25u002e%25u002e/x",
    ],
)
async def test_percent_u_climb_above_the_base_path_is_refused(tmp_path: Path, fast: bool, path: str) -> None:
    """With ``upstream.url`` ending in a base path, IIS resolves ``/base/%u002e%u002e/secret`` to ``/secret``."""
    async with RawUpstream() as upstream:
        override = {"routes": None, "upstream": {"url": f"http://127.0.0.1:{upstream.port}/base"}}
        async with routed_proxy(tmp_path, upstream.port, fast, **override) as port:
            for request in (get_request(path, APP), preflight_request(path, APP)):
                status, _, body = await ask_twice(port, request)
                assert status == 400, (request, status, body)
                assert b"climbs above" in body
        assert upstream.received == []


#: Case-insensitive servers compare with per-character simple case mappings (Java's ``equalsIgnoreCase``, .NET's
#: invariant casing, NTFS's upcase table): "ı" (U+0131) upper-cases to "I" and "İ" (U+0130) lower-cases to "i", so
#: to them these name ``/admin/x``. Python's ``str.lower`` leaves "ı" alone and turns "İ" into "i" + U+0307.
UNICODE_CASE = [
    ("/adm%C4%B1n/x", APP),  # judged by the credentialed default policy before
    ("/ADM%C4%B0N/x", APP),
    ("/publ%C4%B1c/..%2fadm%C4%B1n/x", EVIL),
]


@pytest.mark.parametrize(("path", "origin"), UNICODE_CASE)
def test_unicode_case_mappings_reach_the_route(path: str, origin: str) -> None:
    config = parse_config(ROUTED, env={})
    store = StaticOriginSet({k: e.policy for k, e in config.origins.items()})
    admin = next(route for route in config.engine.routes if route.prefix == "/admin/")
    assert admin in config.engine.routes_for(path)
    assert config.engine.judge(CorsRequest("GET", (origin,), path=path), store, 0.0).reason is Reason.PATH_AMBIGUOUS


def test_non_ascii_paths_without_a_case_collision_keep_their_route() -> None:
    config = parse_config(ROUTED, env={})
    public = config.engine.routes[0]
    assert config.engine.routes_for("/public/caf%C3%A9") == (public,)
    assert config.engine.routes_for("/caf%C3%A9") == (None,)


@pytest.mark.xfail(
    strict=True,
    reason="not fixed: a format suffix on a route's stem (/admin.json) is served as /admin by Rails' (.:format) routes "
    "and Spring MVC before 5.3 (suffix pattern matching, still configurable), but corsproxy judges it by the default "
    "policy; covering stem + '.' would change what a route prefix means (README), so it is left to a decision",
)
@pytest.mark.parametrize("path", ["/admin.json", "/api/v2.json"])
def test_a_format_suffix_on_a_route_stem_is_judged_by_that_route(path: str) -> None:
    config = parse_config(ROUTED, env={})
    prefix = "/admin/" if path.startswith("/admin") else "/api/v2"
    route = next(route for route in config.engine.routes if route.prefix == prefix)
    assert route in config.engine.routes_for(path)
