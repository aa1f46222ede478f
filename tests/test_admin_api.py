"""The admin API: auth, every endpoint's success and error paths.

Each endpoint test gets an admin API of its own (``admin_api``: the proxy and its admin app in this process, a fresh
store in ``tmp_path``, the origins file applied), so no test sees another's writes and the order never matters.
What needs the real process — the metrics of two workers behind auth, readiness, the admin port apart from the
proxied one, refusals at start — runs on a real ``corsproxy serve`` (``served`` only for tests that write nothing).
"""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Any

import pytest

from tests.support.config import run_cli
from tests.support.net import free_port
from tests.support.serve import OTHER_TOKEN, TOKEN, Clients, Server, origin_path
from tests.support.upstream import ThreadedUpstream

APP = "https://app.example.com"  # listed in the config's cors.allow_origins


def _error(response: Any, status: int, field: str | None = None) -> dict[str, Any]:
    assert response.status == status, response.body
    assert response.headers["Content-Type"].startswith("application/json")
    body: dict[str, Any] = response.json()
    assert isinstance(body["error"], str) and body["error"]
    assert "Traceback" not in response.body.decode()
    if field is not None:
        assert body["field"] == field, body
        assert body["reason"], body
    return body


# -- authentication -----------------------------------------------------------------------------------------------


PROTECTED = ["/origins", origin_path(APP), "/audit", f"/explain?origin={APP}", "/metrics"]


@pytest.mark.parametrize("path", PROTECTED, ids=["list", "entry", "audit", "explain", "metrics"])
@pytest.mark.parametrize(
    ("token", "status"),
    [pytest.param(None, 401, id="no-token"), pytest.param("wrong-token", 401, id="wrong-token"), (TOKEN, 200)],
)
def test_auth_on_every_protected_endpoint(served: Server, path: str, token: str | None, status: int) -> None:
    response = served.admin("GET", path, token=token)
    assert response.status == status, (path, response.body)
    if status == 401:
        assert response.headers["WWW-Authenticate"] == 'Bearer realm="corsproxy-admin"'
        _error(response, 401)


def test_auth_rejects_other_schemes_and_guards_writes(served: Server) -> None:
    basic = served.admin("GET", "/origins", token=None)
    assert basic.status == 401
    from tests.support.net import request

    response = request(served.admin_port, "GET", "/origins", headers={"Authorization": f"Basic {TOKEN}"})
    _error(response, 401)
    _error(served.admin("PUT", origin_path("https://sneaky.example.com"), token=OTHER_TOKEN, body={}), 401)
    _error(served.admin("POST", "/reload", token=None), 401)
    assert served.admin("GET", origin_path("https://sneaky.example.com")).status == 404


def test_health_endpoints_need_no_token(served: Server) -> None:
    health = served.admin("GET", "/healthz", token=None)
    assert health.status == 200 and health.json()["status"] == "ok"
    ready = served.admin("GET", "/readyz", token=None)
    assert ready.status == 200, ready.body
    assert ready.json()["ready"] is True


# -- origins ------------------------------------------------------------------------------------------------------


def test_list_pages_with_a_cursor_and_filters(admin_api: Clients) -> None:
    listing = admin_api.admin("GET", "/origins").json()
    keys = [item["origin"] for item in listing["origins"]]
    assert APP in keys and "https://fleet.example.com" in keys
    assert keys == sorted(keys)
    first = admin_api.admin("GET", "/origins?limit=1").json()
    assert len(first["origins"]) == 1 and first["next"] == keys[0]
    second = admin_api.admin("GET", f"/origins?limit=1&after={first['next']}").json()
    assert second["origins"][0]["origin"] == keys[1]
    filtered = admin_api.admin("GET", "/origins?filter=fleet").json()
    assert [item["origin"] for item in filtered["origins"]] == ["https://fleet.example.com"]
    assert filtered["origins"][0]["source"] == "file"
    assert filtered["next"] is None


@pytest.mark.parametrize("limit", ["0", "abc", "100000"])
def test_list_limit_out_of_range(admin_api: Clients, limit: str) -> None:
    _error(admin_api.admin("GET", f"/origins?limit={limit}"), 400, "limit")


def test_get_one_origin(admin_api: Clients) -> None:
    got = admin_api.admin("GET", origin_path(APP))
    assert got.status == 200
    assert got.json() | {"added": None} == {
        "origin": APP,
        "policy": "default",
        "expires": None,
        "source": "config",
        "added": None,
        "note": "",
        "expired": False,
    }
    # Non-canonical spellings find the canonical entry (the same canonicalisation as the config).
    assert admin_api.admin("GET", origin_path("HTTPS://APP.example.com:443")).json()["origin"] == APP
    _error(admin_api.admin("GET", origin_path("https://nowhere.example.com")), 404, "origin")
    _error(admin_api.admin("GET", origin_path("https://app.example.com/path")), 400, "origin")


def test_put_creates_then_replaces(admin_api: Clients) -> None:
    key = "https://put.example.com"
    created = admin_api.admin("PUT", origin_path(key), body={"note": "partner", "ttl": "7d"})
    assert created.status == 201, created.body
    body = created.json()
    assert body["origin"] == key and body["created"] is True and body["note"] == "partner"
    assert body["expires"] is not None and body["source"] == "admin:admin"
    assert created.headers["Location"] == origin_path(key)
    replaced = admin_api.admin("PUT", origin_path(key), body={"note": "renewed"})
    assert replaced.status == 200
    # Fields left out are kept: the expiry stays, the source stays.
    assert replaced.json()["created"] is False and replaced.json()["expires"] == body["expires"]
    assert replaced.json()["note"] == "renewed" and replaced.json()["source"] == "admin:admin"
    cleared = admin_api.admin("PUT", origin_path(key), body={"expires": "never"})
    assert cleared.status == 200 and cleared.json()["expires"] is None and cleared.json()["note"] == "renewed"
    # A pattern, written with the CLI's own syntax.
    pattern = admin_api.admin("PUT", origin_path("https://*.partners.example.com"), body={})
    assert pattern.status == 201 and pattern.json()["origin"] == "https://*.partners.example.com"


@pytest.mark.parametrize(
    ("origin", "body", "field"),
    [
        pytest.param("https://v.example.com", {"policy": "nope"}, "policy", id="unknown-policy"),
        pytest.param("https://v.example.com", {"ttl": "soon"}, "ttl", id="bad-ttl"),
        pytest.param("https://v.example.com", {"expires": "2001-01-01T00:00:00Z"}, "expires", id="past-expiry"),
        pytest.param("https://v.example.com", {"expires": "tomorrow"}, "expires", id="bad-expiry"),
        pytest.param("https://v.example.com", {"ttl": "1d", "expires": "2099-01-01T00:00:00Z"}, "expires", id="both"),
        pytest.param("https://v.example.com", {"colour": "red"}, "colour", id="unknown-field"),
        pytest.param("https://v.example.com", {"note": 5}, "note", id="note-not-string"),
        pytest.param("https://v.example.com/api", {}, "origin", id="origin-with-path"),
        pytest.param("null", {}, "origin", id="null-origin"),
        pytest.param("https://*.co.uk", {}, "origin", id="public-suffix-wildcard"),
        pytest.param("http://plain.example.com", {}, "origin", id="http-with-credentials"),
        pytest.param("^https://.*$", {}, "origin", id="regex"),
    ],
)
def test_put_validation_errors(admin_api: Clients, origin: str, body: dict[str, Any], field: str) -> None:
    _error(admin_api.admin("PUT", origin_path(origin), body=body), 400, field)
    assert admin_api.admin("GET", "/origins?filter=v.example.com").json()["origins"] == []


def test_put_body_must_be_a_json_object(admin_api: Clients) -> None:
    _error(admin_api.admin("PUT", origin_path("https://b.example.com"), raw=b"{not json"), 400, "body")
    _error(admin_api.admin("PUT", origin_path("https://b.example.com"), raw=b"[1, 2]"), 400, "body")


def test_declared_origins_conflict(admin_api: Clients) -> None:
    body = _error(admin_api.admin("PUT", origin_path(APP), body={"note": "mine now"}), 409, "origin")
    assert body["source"] == "config"
    _error(admin_api.admin("DELETE", origin_path("https://fleet.example.com")), 409, "origin")
    assert admin_api.admin("GET", origin_path(APP)).json()["note"] == ""


def test_delete(admin_api: Clients) -> None:
    key = "https://gone.example.com"
    assert admin_api.admin("PUT", origin_path(key), body={}).status == 201
    removed = admin_api.admin("DELETE", origin_path(key))
    assert removed.status == 200 and removed.json()["removed"] == key
    _error(admin_api.admin("DELETE", origin_path(key)), 404, "origin")
    _error(admin_api.admin("DELETE", origin_path("not an origin")), 400, "origin")


def test_import_all_or_nothing_with_per_line_errors(admin_api: Clients) -> None:
    text = "# partners\nhttps://imp1.example.com note='first one'\n\nhttps://imp2.example.com/path\nnull\n"
    refused = _error(admin_api.admin("POST", "/origins/import", raw=text.encode()), 400, "body")
    assert [item["line"] for item in refused["refused"]] == [4, 5]
    assert all(item["reason"] for item in refused["refused"])
    assert admin_api.admin("GET", "/origins?filter=imp1").json()["origins"] == []

    partial = admin_api.admin("POST", "/origins/import?partial=true", raw=text.encode())
    assert partial.status == 200
    assert partial.json()["added"] == 1 and len(partial.json()["refused"]) == 2
    assert admin_api.admin("GET", origin_path("https://imp1.example.com")).json()["note"] == "first one"

    good = admin_api.admin(
        "POST", "/origins/import", raw=b"https://imp1.example.com\nhttps://imp3.example.com ttl=1d\n"
    )
    assert good.status == 200
    # imp1's line gives no note: its note is kept, so nothing changes.
    assert good.json() == {"added": 1, "replaced": 0, "unchanged": 1, "declared": [], "refused": [], "warnings": []}
    assert admin_api.admin("GET", origin_path("https://imp1.example.com")).json()["note"] == "first one"
    # An origin the config declares: a line equal to it changes nothing (an export reads back) ...
    same = admin_api.admin("POST", "/origins/import", raw=f"{APP}\n".encode())
    assert same.status == 200 and same.json()["declared"] == [APP]
    # ... one that would change it is refused by name, never taken over.
    clash = _error(admin_api.admin("POST", "/origins/import", raw=f"{APP} note=mine\n".encode()), 400, "body")
    assert clash["refused"][0]["origin"] == APP and "cors.allow_origins in" in clash["refused"][0]["reason"]
    assert admin_api.admin("GET", origin_path(APP)).json()["source"] == "config"


# -- explain, audit -----------------------------------------------------------------------------------------------


def test_explain(admin_api: Clients) -> None:
    allowed = admin_api.admin("GET", f"/explain?origin={APP}&method=PUT&headers=content-type&path=/api").json()
    assert allowed["allowed"] is True and allowed["kind"] == "preflight" and allowed["matched"] == APP
    refused = admin_api.admin("GET", f"/explain?origin={APP}&method=PATCH").json()
    assert refused["allowed"] is False and refused["reason"] == "method_not_allowed" and "PATCH" in refused["fix"]
    stranger = admin_api.admin("GET", "/explain?origin=https://evil.example.net").json()
    assert stranger["reason"] == "origin_not_allowed" and stranger["kind"] == "actual"
    _error(admin_api.admin("GET", "/explain"), 400, "origin")
    _error(admin_api.admin("GET", f"/explain?origin={APP}&path=api"), 400, "path")


def test_audit_records_admin_writes_with_the_actor(admin_api: Clients) -> None:
    key = "https://audited.example.com"
    admin_api.admin("PUT", origin_path(key), body={"note": "v1"})
    admin_api.admin("PUT", origin_path(key), body={"note": "v2"})
    admin_api.admin("DELETE", origin_path(key))
    events = admin_api.admin("GET", f"/audit?origin={key}").json()["events"]
    assert [(e["action"], e["actor"]) for e in events] == [
        ("add", "admin:admin"),
        ("replace", "admin:admin"),
        ("remove", "admin:admin"),
    ]
    assert events[1]["old"]["note"] == "v1" and events[1]["new"]["note"] == "v2" and events[2]["new"] is None
    everything = admin_api.admin("GET", "/audit?limit=1000").json()["events"]
    sources = {e["actor"] for e in everything}
    assert {"config", "file", "admin:admin"} <= sources
    assert len(admin_api.admin("GET", "/audit?limit=2").json()["events"]) == 2
    _error(admin_api.admin("GET", "/audit?limit=0"), 400, "limit")
    _error(admin_api.admin("GET", "/audit?origin=bad%20origin"), 400, "origin")
    # The CLI shows the same trail, from the same store.
    cli = run_cli("origins", "history", "--config", str(admin_api.config_path), "--origin", key)
    assert cli.returncode == 0 and cli.stdout.count("\n") == 3


def test_unknown_paths_and_methods_are_json(admin_api: Clients) -> None:
    not_found = _error(admin_api.admin("GET", "/nothing-here"), 404)
    assert "/nothing-here" in not_found["reason"]
    not_allowed = admin_api.admin("POST", "/healthz")
    _error(not_allowed, 405)
    assert "GET" in not_allowed.headers["Allow"]
    _error(admin_api.admin("PATCH", origin_path(APP), body={}), 405)


def test_admin_is_not_on_the_proxied_port(served: Server) -> None:
    response = served.proxy("GET", "/origins", headers={"Authorization": f"Bearer {TOKEN}"})
    assert response.status == 200
    assert response.json()["raw_path"] == "/origins"  # the upstream's echo: every path there is the upstream's


# -- token names, readiness failure, refusals at start ------------------------------------------------------------


def test_named_tokens_and_readiness_reason(tmp_path: Path, upstream_thread: ThreadedUpstream) -> None:
    tokens = tmp_path / "tokens"
    tokens.write_text(f"# name:token\nalice:{TOKEN}\nbob:{OTHER_TOKEN}\n")
    dead = free_port()
    server = Server(
        tmp_path,
        dead,
        workers=1,
        env={"CORSPROXY_ADMIN_TOKEN": ""},
        admin={"token_file": str(tokens)},
        upstream={"url": f"http://127.0.0.1:{dead}"},
    )
    server.start()
    try:
        assert server.admin("PUT", origin_path("https://a.example.com"), token=TOKEN, body={}).status == 201
        assert server.admin("DELETE", origin_path("https://a.example.com"), token=OTHER_TOKEN).status == 200
        actors = [e["actor"] for e in server.admin("GET", "/audit?origin=https://a.example.com").json()["events"]]
        assert actors == ["admin:alice", "admin:bob"]
        ready = server.admin("GET", "/readyz", token=None)
        assert ready.status == 503
        assert f"127.0.0.1:{dead}" in ready.json()["reason"] and ready.json()["ready"] is False
    finally:
        assert server.stop(signal.SIGTERM) == 0


@pytest.mark.parametrize(
    ("tokens", "admin", "message"),
    [
        pytest.param(
            "# nobody\n",
            {"listen": {"host": "127.0.0.1", "port": "{admin_port}"}, "token_file": "{tokens}"},
            "no token",
            id="token-file-without-tokens",
        ),
        pytest.param(
            "# nobody\n",
            {"listen": {"host": "0.0.0.0", "port": "{admin_port}"}},
            "not a loopback address",
            id="token-less-on-a-public-address",
        ),
        pytest.param(
            "short\n",
            {"listen": {"host": "127.0.0.1", "port": "{admin_port}"}, "token_file": "{tokens}"},
            "shorter than 16",
            id="short-token",
        ),
        pytest.param(
            "# nobody\n",
            {"listen": {"host": "127.0.0.1", "port": "{port}"}},
            "also the proxied port",
            id="admin-port-is-the-proxied-port",
        ),
    ],
)
def test_refuses_to_start_with_an_unusable_admin_setup(
    tmp_path: Path, tokens: str, admin: dict[str, Any], message: str
) -> None:
    token_file = tmp_path / "tokens"
    token_file.write_text(tokens)
    server = Server(tmp_path, free_port(), workers=1, env={"CORSPROXY_ADMIN_TOKEN": ""})
    values = {"tokens": str(token_file), "admin_port": server.admin_port, "port": server.port}

    def fill(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: fill(v) for k, v in value.items()}
        return values[value[1:-1]] if isinstance(value, str) and value.startswith("{") else value

    server.data["admin"] = fill(admin)  # "{name}" strings stand for the values only known here
    server.write_config()
    result = run_cli("serve", "--config", str(server.config_path), env=server.env, timeout=20)
    assert result.returncode == 2 and message in result.stderr


def test_browsers_cannot_drive_the_admin_api(tmp_path: Path, upstream_thread: ThreadedUpstream) -> None:
    """CSRF and DNS rebinding: a web page can make a browser send a simple POST to 127.0.0.1:9090, or rebind its own
    name to it. Requests marked as coming from a page are refused, and without a token only loopback Hosts are
    served (the README's token-less loopback set-up stays usable from curl)."""
    from tests.support.net import request

    server = Server(tmp_path, upstream_thread.port, workers=1, env={"CORSPROXY_ADMIN_TOKEN": ""}).start()
    try:
        port = server.admin_port
        body = "https://evil.example.net\n"
        csrf = request(port, "POST", "/origins/import", headers={"Origin": "https://evil.example.net"}, body=body)
        _error(csrf, 403)
        fetch = request(port, "POST", "/origins/import", headers={"Sec-Fetch-Site": "cross-site"}, body=body)
        _error(fetch, 403)
        rebound = request(port, "POST", "/origins/import", headers={"Host": f"evil.example.net:{port}"}, body=body)
        _error(rebound, 403)
        assert request(port, "GET", origin_path("https://evil.example.net")).status == 404  # nothing was written
        assert request(port, "GET", "/origins").status == 200  # curl on loopback, no token: served
    finally:
        assert server.stop() == 0
