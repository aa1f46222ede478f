"""The console's endpoints on a real ``corsproxy serve`` (2 workers), without a browser: sign-in, sessions shared by
the workers, CSRF, refusal of other sites, the security headers, refusals and charts from real traffic, and writes
through the admin API's own checks and audit."""

from __future__ import annotations

import http.cookies
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest

from tests.support.net import Response, request, wait_until
from tests.support.serve import OTHER_TOKEN, TOKEN, Server
from tests.support.upstream import ThreadedUpstream


@pytest.fixture(scope="module")
def console_server(tmp_path_factory: pytest.TempPathFactory, upstream_thread: ThreadedUpstream) -> Iterator[Server]:
    tmp = tmp_path_factory.mktemp("console-api")
    (tmp / "tokens").write_text(f"alice:{TOKEN}\nbob:{OTHER_TOKEN}\n")
    server = Server(
        tmp, upstream_thread.port, env={"CORSPROXY_ADMIN_TOKEN": ""}, admin={"token_file": str(tmp / "tokens")}
    )
    server.start()
    yield server
    server.stop()


class Console:
    """A same-origin client of the console, as the console's own page would be (cookie, Origin, CSRF header)."""

    def __init__(self, server: Server, host: str | None = None) -> None:
        self.server = server
        self.host = host or f"127.0.0.1:{server.admin_port}"
        self.origin = f"http://{self.host}"
        self.cookie: str | None = None
        self.csrf: str | None = None

    def call(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        headers: dict[str, str] | None = None,
        csrf: bool = True,
        origin: str | None = "",
    ) -> Response:
        sent = {"Host": self.host}
        if method not in ("GET", "HEAD"):
            sent["Origin"] = self.origin if origin == "" else (origin or "")
            if origin is None:
                del sent["Origin"]
            if csrf and self.csrf:
                sent["X-CSRF-Token"] = self.csrf
        elif origin:
            sent["Origin"] = origin
        if self.cookie:
            sent["Cookie"] = f"corsproxy_console={self.cookie}"
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            sent["Content-Type"] = "application/json"
        sent.update(headers or {})
        return request(self.server.admin_port, method, "/console/" + path, headers=sent, body=data)

    def sign_in(self, token: str = TOKEN) -> Response:
        response = self.call("POST", "api/session", {"token": token})
        if response.status == 201:
            morsel = http.cookies.SimpleCookie(response.headers["Set-Cookie"])["corsproxy_console"]
            self.cookie = morsel.value
            self.csrf = response.json()["csrf"]
        return response


def test_sign_in_sets_a_strict_http_only_cookie_and_sign_out_ends_it(console_server: Server) -> None:
    console = Console(console_server)
    response = console.sign_in()
    assert response.status == 201, response.body
    assert response.json()["actor"] == "admin:alice"
    cookie = response.headers["Set-Cookie"]
    attributes = {part.strip().split("=")[0].lower(): part for part in cookie.split(";")}
    assert "httponly" in attributes
    assert attributes["samesite"].split("=")[1].strip() == "Strict"
    assert attributes["path"].split("=")[1].strip() == "/console/"
    assert int(attributes["max-age"].split("=")[1]) > 0
    assert "secure" not in attributes  # a plain-HTTP listener: the browser would drop a Secure cookie
    # Any worker answers with the same session (it lives in the shared console environment, not a worker).
    for _ in range(12):  # a fresh connection each: the kernel spreads them over both workers
        answer = console.call("GET", "api/session")
        assert answer.status == 200, answer.body
        assert answer.json()["csrf"] == console.csrf
    assert console.call("DELETE", "api/session").status == 200
    assert console.call("GET", "api/session").json() == {
        "signed_in": False,
        "reason": "the session has ended (expired or signed out): sign in again",
    }
    assert console.call("GET", "api/overview").status == 401


def test_a_wrong_token_is_refused(console_server: Server) -> None:
    console = Console(console_server)
    response = console.sign_in("not-the-token-0123456789abcdef")
    assert response.status == 401
    assert "Set-Cookie" not in response.headers
    assert "not a valid admin token" in response.json()["reason"]
    assert console.call("GET", "api/refusals").status == 401


def test_every_write_needs_the_csrf_token_and_the_console_origin(console_server: Server) -> None:
    console = Console(console_server)
    assert console.sign_in().status == 201
    body = {"policy": "default"}
    target = "api/origins/" + quote("https://csrf.example.com", safe="")
    assert console.call("PUT", target, body, csrf=False).status == 403
    assert console.call("PUT", target, body, headers={"X-CSRF-Token": "guess"}).status == 403
    evil = console.call("PUT", target, body, origin="http://evil.localhost:8000")
    assert evil.status == 403 and "not the console's own origin" in evil.json()["reason"]
    assert console.call("PUT", target, body, origin=None).status == 403  # no Origin: not the console's page
    cross = console.call("PUT", target, body, headers={"Sec-Fetch-Site": "cross-site"})
    assert cross.status == 403
    assert console_server.admin("GET", "/origins/" + quote("https://csrf.example.com", safe="")).status == 404
    assert console.call("PUT", target, body).status == 201  # all three present: written
    assert console.call("DELETE", target).status == 200


def test_other_sites_cannot_read_anything(console_server: Server) -> None:
    console = Console(console_server)
    assert console.sign_in().status == 201
    for site in ("cross-site", "same-site"):
        for path in ("api/session", "api/refusals", "api/origins", "api/config", "static/console.js"):
            response = console.call("GET", path, headers={"Sec-Fetch-Site": site, "Sec-Fetch-Mode": "no-cors"})
            assert response.status == 403, (site, path)
            assert b"csrf" not in response.body
    # A cross-site link may open the page (it gets the sign-in shell; the Strict cookie is not sent by a browser).
    page = console.call("GET", "", headers={"Sec-Fetch-Site": "cross-site", "Sec-Fetch-Mode": "navigate"})
    assert page.status == 200 and b"Sign in" in page.body
    # A read with another site's Origin (a CORS fetch) is refused too, and never gets CORS headers.
    read = console.call("GET", "api/session", origin="http://evil.localhost:8000")
    assert read.status == 403
    assert not [name for name in read.headers if name.lower().startswith("access-control-")]


def test_a_session_is_bound_to_the_host_it_was_issued_for(console_server: Server) -> None:
    console = Console(console_server)
    assert console.sign_in().status == 201
    rebound = Console(console_server, host=f"localhost:{console_server.admin_port}")
    rebound.cookie, rebound.csrf = console.cookie, console.csrf
    assert rebound.call("GET", "api/refusals").status == 401
    assert rebound.call("GET", "api/session").json()["signed_in"] is False


def test_the_session_cookie_opens_nothing_on_the_admin_api(console_server: Server) -> None:
    console = Console(console_server)
    assert console.sign_in().status == 201
    response = request(
        console_server.admin_port,
        "GET",
        "/origins",
        headers={"Cookie": f"corsproxy_console={console.cookie}", "Sec-Fetch-Site": "same-origin"},
    )
    assert response.status == 403  # a request a page made: refused before any credential is looked at
    without_page = request(
        console_server.admin_port, "GET", "/origins", headers={"Cookie": f"corsproxy_console={console.cookie}"}
    )
    assert without_page.status == 401  # and the cookie is no credential for the API


@pytest.mark.parametrize(
    "path",
    ["", "static/console.js", "static/console.css", "api/session", "api/nothing-here"],
    ids=lambda p: p or "page",
)
def test_security_headers_on_every_console_response(console_server: Server, path: str) -> None:
    response = Console(console_server).call("GET", path)
    csp = response.headers["Content-Security-Policy"]
    assert "default-src 'none'" in csp and "frame-ancestors 'none'" in csp and "script-src 'self'" in csp
    assert "unsafe-inline" not in csp
    assert response.headers["X-Content-Type-Options"] == "nosniff"
    assert response.headers["Referrer-Policy"] == "no-referrer"


def test_the_console_page_has_nothing_inline_and_scripts_their_type(console_server: Server) -> None:
    console = Console(console_server)
    assert console.call("GET", "static/console.js").headers["Content-Type"].startswith("text/javascript")
    page = console.call("GET", "").body.decode()
    assert "<script>" not in page and "style=" not in page  # nothing inline for the CSP to have to allow
    assert request(console_server.admin_port, "GET", "/console").status == 308


def test_refusals_and_charts_from_real_traffic(console_server: Server) -> None:
    console = Console(console_server)
    assert console.sign_in().status == 201
    refused = "https://refused-api.example.net"
    for _ in range(3):
        answer = console_server.proxy(
            "OPTIONS", "/things?secret=1", {"Origin": refused, "Access-Control-Request-Method": "PUT"}
        )
        assert answer.status == 403
    console_server.proxy("GET", "/hello", {"Origin": "https://app.example.com"})

    def listed() -> dict[str, Any] | None:
        groups = console.call("GET", "api/refusals").json()["groups"]
        return next((g for g in groups if g["origin"] == refused and g["count"] >= 3), None)

    group = wait_until(listed, 10, what="the refusal in the console")
    row = group["requests"][0]
    # (the method a preflight asks for is known only when the origin passed; here it is the preflight's own)
    assert (row["kind"], row["method"], row["path"], row["reason"]) == (
        "preflight",
        "OPTIONS",
        "/things",
        "origin_not_allowed",
    )
    assert group["allowable"] is True
    assert "secret" not in json.dumps(group)  # the query string is not kept

    def charted() -> dict[str, Any] | None:
        data = console.call("GET", "api/series?window=900").json()
        refused_rate = sum(data["requests"].get("preflight refused", []))
        return data if refused_rate * data["step"] >= 3 and data["requests"].get("actual allowed") else None

    data = wait_until(charted, 10, what="the requests in the chart series")
    assert sum(data["refusals"]["origin_not_allowed"]) * data["step"] >= 3
    assert any(v is not None for v in data["duration_ms"]["p50"])
    assert len(data["requests"]["preflight refused"]) == 900 // data["step"]


def test_allow_goes_through_the_admin_checks_and_audit(console_server: Server) -> None:
    console = Console(console_server)
    assert console.sign_in().status == 201
    unsafe = console.call("POST", "api/origins/check", {"origin": "*"})
    assert unsafe.json()["ok"] is False and "credentials" in unsafe.json()["reason"]
    suffix = console.call("POST", "api/origins/check", {"origin": "https://*.co.uk"})
    assert suffix.json()["ok"] is False and "public suffix" in suffix.json()["reason"]
    put = console.call("PUT", "api/origins/" + quote("*", safe=""), {})
    assert put.status == 400 and "credentials" in put.json()["reason"]
    declared = console.call("POST", "api/origins/check", {"origin": "https://app.example.com"})
    assert declared.json()["ok"] is False and "cors.allow_origins" in declared.json()["reason"]

    origin = "https://allowed-by-console.example.net"
    check = console.call("POST", "api/origins/check", {"origin": origin, "ttl": "7d", "note": "from the console"})
    assert check.json() == {"ok": True, "origin": origin, "policy": "default", "warnings": [], "replaces": None}
    put = console.call("PUT", "api/origins/" + quote(origin, safe=""), {"ttl": "7d", "note": "from the console"})
    assert put.status == 201, put.body
    preflight = console_server.proxy("OPTIONS", "/x", {"Origin": origin, "Access-Control-Request-Method": "PUT"})
    assert preflight.status == 204
    assert preflight.headers["Access-Control-Allow-Origin"] == origin
    events = console_server.admin("GET", "/audit?origin=" + quote(origin, safe="")).json()["events"]
    assert [(e["action"], e["actor"]) for e in events] == [("add", "admin:alice")]
    by_actor = console.call("GET", "api/audit?actor=alice").json()["events"]
    assert origin in [e["origin"] for e in by_actor]
    assert console.call("DELETE", "api/origins/" + quote(origin, safe="")).status == 200


def test_origins_pages_by_prefix(console_server: Server) -> None:
    console = Console(console_server)
    assert console.sign_in().status == 201
    lines = "".join(f"https://page{n:03d}.example.net\n" for n in range(120)) + "http://page999.localhost\n"
    assert console_server.admin("POST", "/origins/import", raw=lines.encode()).status == 200
    seen: list[str] = []
    after = ""
    for _ in range(10):
        page = console.call("GET", "api/origins?q=page&limit=50&after=" + quote(after, safe="")).json()
        seen += [entry["origin"] for entry in page["origins"]]
        if not page["next"]:
            break
        after = page["next"]
    assert seen == sorted(seen) and len(seen) == 121 and seen[0] == "http://page999.localhost"
    exact = console.call("GET", "api/origins?q=" + quote("https://page007.example.net", safe="")).json()["origins"]
    assert [entry["origin"] for entry in exact] == ["https://page007.example.net"]
    config_entry = console.call("GET", "api/origins?q=app.example.com").json()["origins"][0]
    assert config_entry["source"] == "config" and "cors.allow_origins" in config_entry["declared_in"]


def test_configuration_is_redacted_and_checked_before_a_reload(console_server: Server, tmp_path: Path) -> None:
    console = Console(console_server)
    assert console.sign_in().status == 201
    config = console.call("GET", "api/config")
    text = config.body.decode()
    assert TOKEN not in text and OTHER_TOKEN not in text
    assert config.json()["admin"]["token_file"].endswith("tokens")
    assert config.json()["policies"]["default"]["allow_credentials"] is True
    good = console.call("POST", "api/config/check", {})
    assert good.json()["ok"] is True
    original = console_server.config_path.read_text()
    try:
        console_server.config_path.write_text(original + "\nlimits:\n  max_body_size: -1\n")
        bad = console.call("POST", "api/config/check", {})
        assert bad.json()["ok"] is False
        # The config's own problems, typed as the admin API answers them.
        assert any(problem["path"].startswith("limits") for problem in bad.json()["problems"]), bad.json()
        reload = console.call("POST", "api/reload", {})
        assert reload.status == 400 and reload.json()["problems"]
    finally:
        console_server.config_path.write_text(original)
