"""No request path that a common server would serve under a restrictive route's prefix is judged by a more
permissive route (routes matched per server reading, ambiguous paths refused).

Pure tables against the decision core: each hostile path is read the way nginx, uvicorn/Starlette, Express, Go's
net/http, Tomcat/Spring and IIS read it — modelled here independently of corsproxy's own readings — and the decision
must either be ``path_ambiguous`` (answered 400) or be judged under the very route every one of those servers serves
the path under. The wire tests (real proxy, raw upstream) are in ``test_route_escape_wire.py``.
"""

from __future__ import annotations

import posixpath
from collections.abc import Callable
from urllib.parse import unquote

import pytest

from corsproxy.config import ConfigError, parse_config
from corsproxy.core.decision import CorsRequest, Kind, Reason, Route, StaticOriginSet, actual_headers, path_readings
from corsproxy.core.settings import Config
from tests.support.config import BASE_CONFIG, merge
from tests.support.routes import ROUTED


@pytest.fixture(scope="module")
def config() -> Config:
    return parse_config(ROUTED, env={})


def _clean(path: str) -> str:
    """Merge slashes and resolve dot segments the way nginx, Go's path.Clean and Tomcat do (a climb is clamped)."""
    cleaned = posixpath.normpath("/" + path.lstrip("/"))
    if cleaned.startswith("//"):
        cleaned = cleaned[1:]
    return cleaned + "/" if path.endswith(("/", "/.", "/..")) and cleaned != "/" else cleaned


def _cut_params(path: str) -> str:
    return "/".join(segment.split(";", 1)[0] for segment in path.split("/"))


#: How each server turns a request path into the path it routes: (name, reading, matches case-insensitively).
SERVERS: list[tuple[str, Callable[[str], str], bool]] = [
    ("express", lambda p: p, False),  # routes the raw pathname
    ("go chi (RawPath)", lambda p: p, False),
    ("starlette", unquote, False),  # scope["path"] is the decoded path, nothing resolved
    ("go net/http", lambda p: _clean(unquote(p)), False),  # ServeMux cleans the decoded path
    ("nginx", lambda p: _clean(unquote(p)), False),  # decodes, merges slashes, resolves dots
    ("tomcat/spring", lambda p: _clean(unquote(_cut_params(p))), False),  # ";" cut before decoding
    ("jetty", lambda p: _clean(_cut_params(unquote(p))), False),  # ";" cut after decoding
    ("iis", lambda p: _clean(unquote(p).replace("\\", "/")), True),
    (
        "iis (windows names)",
        lambda p: "/".join(s.rstrip(". ") or s for s in _clean(unquote(p).replace("\\", "/")).split("/")),
        True,
    ),
    ("double decoding", lambda p: _clean(unquote(unquote(p)).replace("\\", "/")), False),
]


def _served_under(config: Config, reading: str, folded: bool) -> Route | None:
    for route in config.engine.routes:
        if route.matches_folded(reading.lower()) if folded else route.matches(reading):
            return route
    return None


TRICKS = [
    "..;/",
    "..%3b/",
    "..;x/",
    "../",
    "..%2f",
    "..%2F",
    "%2e%2e/",
    "%2E%2E/",
    ".%2e/",
    "%2e./",
    "..\\",
    "..%5c",
    "..%5C",
    "%2e%2e%5c",
    "..%255c",
    "..%252f",
    "%252e%252e/",
    "./../",
    ".;/../",
    "x/..//../",
    "x/../../",
]
HOSTILE = sorted(
    {
        f"/{here}/{trick}{there}/users"
        for trick in TRICKS
        for here in ("admin", "public", "legacy", "api")
        for there in ("admin", "public", "legacy")
    }
    | {f"/{trick}admin/users" for trick in TRICKS}
    | {
        f"/{here}/{trick}{there}/users"
        for trick in TRICKS
        for here, there in (("admin", "public"), ("public", "admin"))
    }
    | {f"/legacy/{trick}admin/users" for trick in TRICKS}
    | {
        "/ADMIN/users",
        "/Admin/users",
        "/admin./users",
        "/admin%2e/users",
        "/admin%20/users",
        "/admin /users",
        "/admin;x/users",
        "/admin%3bx/users",
        "/%61dmin/users",
        "/%2561dmin/users",
        "/admin%2fusers",
        "//admin/users",
        "///admin/users",
        "/./admin/users",
        "/.%2fadmin/users",
        "\\admin/users",
        "/%5cadmin/users",
        "/public/..",
        "/public/%2e%2e",
        "/public/..;",
        "/public;/../admin/",
        "/api/v2;x/y",
        "/api/v2%2fy",
        "/api/v2.",
        "/API/V2/x",
        "/api%2fv2/x",
    }
)


@pytest.mark.parametrize("path", HOSTILE)
@pytest.mark.parametrize("method", ["GET", "OPTIONS"])
@pytest.mark.parametrize("origin", ["https://evil.example.net", "https://app.example.com", "https://admin.example.com"])
def test_no_server_reading_escapes_the_judged_route(config: Config, path: str, method: str, origin: str) -> None:
    store = StaticOriginSet({k: e.policy for k, e in config.origins.items()})
    methods = ["GET"] if method == "OPTIONS" else []
    decision = config.engine.judge(CorsRequest(method, (origin,), tuple(methods), path=path), store, 0.0)
    served = {name: _served_under(config, read(path), folded) for name, read, folded in SERVERS}
    if decision.reason is Reason.PATH_AMBIGUOUS:  # refused with 400: never judged by any route
        # Readable only when the origin is allowed under every route any server serves it under.
        if actual_headers(decision):
            for route in {id(route): route for route in served.values()}.values():
                under = config.engine._decide(CorsRequest("GET", (origin,)), (route,), store, 0.0)
                assert under.allowed, (route, under)
        return
    wrong = {name: route for name, route in served.items() if route != decision.route}
    assert not wrong, f"judged under {decision.route}, but served under {wrong}"


def test_the_reported_escapes_are_refused(config: Config) -> None:
    """The four paths of the report, as browsers send them."""
    store = StaticOriginSet({k: e.policy for k, e in config.origins.items()})
    for path, origin in [
        ("/admin/..;/public/", "https://evil.com"),
        ("/admin/..;/x", "https://app.example.com"),
        ("/admin/..%5cpublic/", "https://evil.com"),
        ("/legacy/..;/admin/x", "https://app.example.com"),
    ]:
        for method, request_methods in (("GET", []), ("OPTIONS", ["GET"])):
            decision = config.engine.judge(
                CorsRequest(method, (origin,), tuple(request_methods), path=path), store, 0.0
            )
            assert decision.reason is Reason.PATH_AMBIGUOUS, (path, method)
            assert decision.kind is (Kind.PREFLIGHT if request_methods else Kind.ACTUAL)
            assert actual_headers(decision) == []  # /admin/ refuses both origins: nothing readable


def test_ambiguous_but_allowed_everywhere_gets_the_least_privileged_headers(config: Config) -> None:
    store = StaticOriginSet({k: e.policy for k, e in config.origins.items()})
    # /public/ (* without credentials) or the default (credentialed app origin): both allow the app origin.
    decision = config.engine.judge(CorsRequest("GET", ("https://app.example.com",), path="/public/..;/x"), store, 0.0)
    assert decision.reason is Reason.PATH_AMBIGUOUS
    assert dict(actual_headers(decision)) == {
        "Access-Control-Allow-Origin": "*",
        "Access-Control-Expose-Headers": "x-request-id",
    }
    no_origin = config.engine.judge(CorsRequest("GET", (), path="/public/..;/x"), store, 0.0)
    assert (no_origin.kind, no_origin.reason) == (Kind.NON_CORS, Reason.PATH_AMBIGUOUS)


BENIGN = {
    # path -> the route every server serves it under
    "/api/x": None,
    "/public/a%20b": "/public/",
    "/public/a%2Fb": "/public/",  # an encoded slash inside one route (GitLab-style ids) is not ambiguous
    "/admin/x;v=1": "/admin/",
    "/admin//x": "/admin/",
    "/admin/./x": "/admin/",
    "/admin/a/../b": "/admin/",
    "/.well-known/x": None,
    "/public/file.tar.gz": "/public/",
    "/api/v2/x?next=/../admin/": "/api/v2",  # the query is not part of the path
    "/x/..;/y": None,
}


@pytest.mark.parametrize(("path", "prefix"), BENIGN.items(), ids=BENIGN.keys())
def test_unambiguous_paths_are_judged_as_before(config: Config, path: str, prefix: str | None) -> None:
    store = StaticOriginSet({k: e.policy for k, e in config.origins.items()})
    decision = config.engine.judge(CorsRequest("GET", ("https://evil.example.net",), path=path), store, 0.0)
    assert decision.reason is not Reason.PATH_AMBIGUOUS
    assert (decision.route.prefix if decision.route else None) == prefix


def test_without_routes_nothing_is_ambiguous() -> None:
    config = parse_config(BASE_CONFIG, env={})
    store = StaticOriginSet({k: e.policy for k, e in config.origins.items()})
    for path in HOSTILE:
        assert config.engine.judge(CorsRequest("GET", ("https://app.example.com",), path=path), store, 0.0).allowed


def test_readings_are_bounded() -> None:
    """A path built to multiply readings, or with more segments or escapes than any client sends, is not read at
    all (it may mean anything: judged as reaching every route, so refused)."""
    assert path_readings("/a" * 65 + "/%20") is None
    assert path_readings("/a%20" * 2049) is None
    assert path_readings("/.;%2e%2e\\x. //" * 8) is None
    assert path_readings("/a" * 65) == ("/a" * 65,)  # nothing to read: no bound needed
    config = parse_config(ROUTED, env={})
    store = StaticOriginSet({k: e.policy for k, e in config.origins.items()})
    decision = config.engine.judge(CorsRequest("GET", ("https://app.example.com",), path="/a%20" * 2049), store, 0.0)
    assert decision.reason is Reason.PATH_AMBIGUOUS and actual_headers(decision) == []


@pytest.mark.parametrize(
    ("prefix", "words"),
    [
        ("/admin;x/", "normalised"),
        ("/a%2fb/", "normalised"),
        ("/a/../b/", "normalised"),
        ("/a//b/", "normalised"),
        ("/a\\b/", "normalised"),
        ("/admin./", "normalised"),
    ],
)
def test_route_paths_must_be_written_normalised(prefix: str, words: str) -> None:
    with pytest.raises(ConfigError) as error:
        parse_config(merge(BASE_CONFIG, {"routes": [{"path": prefix, "mode": "report-only"}]}), env={})
    assert "routes[0].path" in str(error.value) and words in str(error.value)


def test_routes_differing_only_in_case_are_refused() -> None:
    routes = [{"path": "/Admin/", "mode": "report-only"}, {"path": "/admin/", "mode": "enforce"}]
    with pytest.raises(ConfigError) as error:
        parse_config(merge(BASE_CONFIG, {"routes": routes}), env={})
    assert "routes[1].path" in str(error.value) and "case" in str(error.value)


def test_explain_names_an_ambiguous_path(config: Config) -> None:
    from corsproxy.core.explain import explain

    store = StaticOriginSet({k: e.policy for k, e in config.origins.items()})
    for method in (None, "GET"):
        result = explain(config, store, "https://app.example.com", method, path="/admin/..;/x", now=1.0)
        assert result.decision.reason is Reason.PATH_AMBIGUOUS
        assert "/admin/" in result.why and "400" in result.why and "normalised" in result.fix


def test_no_generated_path_escapes_either(config: Config) -> None:
    """Thousands of paths built from the pieces servers read differently (seeded, so every run checks the same
    ones): each is refused as ambiguous or judged under the route every modelled server serves it under."""
    import random

    pieces = [
        "/", "admin", "public", "legacy", "api", "v2", "ADMIN", "Public", "x", "..", ".", ";", ";x", "%2e", "%2E",
        "%2f", "%2F", "%5c", "\\", "%3b", "%25", "2e", "2f", "5c", "//", ". ", "%20", "#", "%61", "a",
    ]  # fmt: skip
    rng = random.Random(20261201)
    store = StaticOriginSet({k: e.policy for k, e in config.origins.items()})
    checked = 0
    for _ in range(4000):
        path = "/" + "".join(rng.choice(pieces) for _ in range(rng.randint(1, 9)))
        decision = config.engine.judge(CorsRequest("GET", ("https://app.example.com",), path=path), store, 0.0)
        if decision.reason is Reason.PATH_AMBIGUOUS:
            continue
        checked += 1
        for name, read, folded in SERVERS:
            route = _served_under(config, read(path.split("#", 1)[0]), folded)
            assert route == decision.route, f"{path!r}: judged under {decision.route}, {name} serves it under {route}"
    assert checked > 400  # the table is not all refusals: plenty of paths are judged
