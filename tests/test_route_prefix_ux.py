"""A route prefix written with a trailing slash (``/admin/``) covers the bare path (``/admin``) too, so the README's
example route is not bypassed by dropping the slash; the same rule everywhere a route is matched."""

from __future__ import annotations

from typing import Any

import pytest

from corsproxy.config import ConfigError, parse_config
from corsproxy.core.decision import CorsRequest, Reason, StaticOriginSet
from tests.support.config import BASE_CONFIG, merge
from tests.support.inprocess import ProxyFactory

ROUTES: list[dict[str, Any]] = [
    {"path": "/admin/", "allow_origins": ["https://admin.example.com"]},
    {"path": "/public/", "allow_origins": ["*"], "policy": "public"},
    {"path": "/exact", "allow_origins": ["https://exact.example.com"]},
]
ROUTED = merge(BASE_CONFIG, {"policies": {"public": {"allow_credentials": False}}, "routes": ROUTES})

# path -> the route prefix that judges it (None: no route, the default policy)
MATCHES = {
    "bare path of a slash prefix": ("/admin", "/admin/"),
    "bare path with a query": ("/admin?next=/", "/admin/"),
    "the prefix itself": ("/admin/", "/admin/"),
    "below the prefix": ("/admin/users", "/admin/"),
    "bare path, other route": ("/public", "/public/"),
    "a longer segment is not covered": ("/administrator", None),
    "a longer segment, slash prefix": ("/admins/x", None),
    "dot segments to the bare path": ("/public/../admin", "/admin/"),
    "prefix without slash, bare": ("/exact", "/exact"),
    "prefix without slash, below": ("/exact/x", "/exact"),
    "prefix without slash, longer segment": ("/exactly", None),
    "root": ("/", None),
}


@pytest.mark.parametrize(("path", "prefix"), MATCHES.values(), ids=MATCHES.keys())
def test_which_route_judges_a_path(path: str, prefix: str | None) -> None:
    route = parse_config(ROUTED, env={}).engine.route_for(path)
    assert (route.prefix if route else None) == prefix


def test_the_bare_admin_path_is_judged_by_the_admin_route() -> None:
    config = parse_config(ROUTED, env={})
    store = StaticOriginSet({key: entry.policy for key, entry in config.origins.items()})
    decision = config.engine.judge(
        CorsRequest("OPTIONS", ("https://app.example.com",), ("GET",), path="/admin"), store, 0.0
    )
    assert decision.reason is Reason.ORIGIN_NOT_ALLOWED  # in the store, but the route's own list replaces it
    assert decision.route is not None and decision.route.prefix == "/admin/"


def test_a_later_route_for_the_bare_path_can_never_match() -> None:
    data = merge(BASE_CONFIG, {"routes": [{"path": "/admin/", "mode": "report-only"}, {"path": "/admin"}]})
    with pytest.raises(ConfigError) as info:
        parse_config(data, env={})
    assert [(p.path, p.code) for p in info.value.problems] == [("routes[1].path", "route_shadowed")]
    assert "can never match" in info.value.problems[0].message


async def test_proxy_refuses_the_bare_admin_path_to_the_default_policys_origin(make_proxy: ProxyFactory) -> None:
    client = await make_proxy(policies={"public": {"allow_credentials": False}}, routes=ROUTES)
    for path in ("/admin", "/admin/", "/admin/users"):
        preflight = await client.options(
            path, headers={"Origin": "https://app.example.com", "Access-Control-Request-Method": "GET"}
        )
        assert preflight.status == 403, path
        assert not [h for h in preflight.headers if h.lower().startswith("access-control-")], path
        actual = await client.get(path, headers={"Origin": "https://app.example.com"})
        assert "Access-Control-Allow-Origin" not in actual.headers, path
        assert "Access-Control-Allow-Credentials" not in actual.headers, path
    admin = await client.get("/admin", headers={"Origin": "https://admin.example.com"})
    assert admin.headers["Access-Control-Allow-Origin"] == "https://admin.example.com"
