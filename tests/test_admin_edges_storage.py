"""Admin API edges of a real ``corsproxy serve``: browser and Host checks on every path, anonymous writes only by
opt-in, bounded bodies and fields, and writes the store has no room for (a full map, a really full disk)."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from corsproxy.config import ConfigError, parse_config
from tests.support.config import BASE_CONFIG, merge
from tests.support.net import Response, request
from tests.support.serve import TOKEN, Server, origin_path
from tests.support.upstream import ThreadedUpstream

AUTH = {"Authorization": f"Bearer {TOKEN}"}


def _error(response: Response, status: int, field: str | None = None) -> dict[str, Any]:
    assert response.status == status, response.body[:2000]
    assert response.headers["Content-Type"].startswith("application/json")
    assert b"Traceback" not in response.body
    body: dict[str, Any] = response.json()
    assert body["error"] and body.get("reason"), body
    if field is not None:
        assert body["field"] == field, body
    return body


def _import_lines(start: int, count: int, note: str = "n" * 60) -> str:
    return "".join(f"https://h{i}.example.com note={note}\n" for i in range(start, start + count))


def _fill_through_admin(server: Server) -> Response:
    """Import batches of 500, then 50, then 5 lines, each until one is refused: the first refusal. The store is then
    within a few entries of full."""
    first: Response | None = None
    start = 0
    for size in (500, 50, 5):
        for _ in range(1000):
            response = server.admin("POST", "/origins/import", raw=_import_lines(start, size).encode())
            start += size
            if response.status != 200:
                first = first or response
                break
        else:
            pytest.fail("the store never filled up")
    assert first is not None
    return first


def _chunked(data: bytes, size: int = 8192) -> bytes:
    """``data`` in HTTP/1.1 chunked framing: a body with no Content-Length to check up front."""
    chunks = [data[i : i + size] for i in range(0, len(data), size)]
    return b"".join(b"%x\r\n%s\r\n" % (len(chunk), chunk) for chunk in chunks) + b"0\r\n\r\n"


def _metric(server: Server, name: str) -> float:
    text = server.admin("GET", "/metrics").body.decode()
    match = re.search(rf"^{re.escape(name)} (\S+)$", text, re.MULTILINE)
    assert match, f"{name} not in /metrics"
    return float(match.group(1))


# -- with a token -------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory, upstream_thread: ThreadedUpstream) -> Iterator[Server]:
    """One worker, a token, a 1 MiB store, one extra admin host name."""
    tmp = tmp_path_factory.mktemp("small")
    server = Server(
        tmp,
        upstream_thread.port,
        workers=1,
        store={"map_size_mb": 1},
        admin={"allowed_hosts": ["corsproxy-admin.internal"]},
    )
    server.start()
    yield server
    server.stop()


@pytest.mark.parametrize("site", ["same-origin", "same-site", "cross-site"])
def test_same_origin_fetches_are_refused_like_any_page(small: Server, site: str) -> None:
    """After DNS rebinding the attacker's page is same-origin with the admin API: only `none` (typed URL, curl) is
    served."""
    headers = {**AUTH, "Sec-Fetch-Site": site}
    _error(request(small.admin_port, "GET", "/origins", headers=headers), 403)
    put = request(small.admin_port, "PUT", origin_path("https://csrf.example.com"), headers=headers, body="{}")
    _error(put, 403)
    _error(request(small.admin_port, "GET", "/healthz", headers={"Sec-Fetch-Site": site}), 403)
    assert small.admin("GET", origin_path("https://csrf.example.com")).status == 404
    assert request(small.admin_port, "GET", "/origins", headers={**AUTH, "Sec-Fetch-Site": "none"}).status == 200


@pytest.mark.parametrize("path", ["/healthz", "/readyz"])
@pytest.mark.parametrize(
    "host", ["evil.example.net:{port}", "evil.example.net", "127.0.0.1.evil.example.net:{port}"], ids=str
)
def test_token_free_endpoints_refuse_hosts_a_rebinding_page_sends(small: Server, path: str, host: str) -> None:
    port = small.admin_port
    body = _error(request(port, "GET", path, headers={"Host": host.format(port=port)}), 403)
    assert "admin.allowed_hosts" in body["reason"]


@pytest.mark.parametrize("path", ["/healthz", "/readyz"])
@pytest.mark.parametrize(
    "host",
    ["127.0.0.1:{port}", "localhost:{port}", "[::1]:{port}", "10.1.2.3:{port}", "corsproxy-admin.internal"],
    ids=str,
)
def test_token_free_endpoints_answer_hosts_a_rebinding_page_cannot_send(small: Server, path: str, host: str) -> None:
    response = request(small.admin_port, "GET", path, headers={"Host": host.format(port=small.admin_port)})
    assert response.status in (200, 503), (host, response.body)  # 503 only if the upstream is down
    assert "error" not in response.json()


def test_start_up_log_names_the_admin_listener_and_its_auth_mode(small: Server) -> None:
    assert f"admin API on 127.0.0.1:{small.admin_port}: bearer tokens (admin)" in small.log_text()


def test_deeply_nested_json_is_a_400(small: Server) -> None:
    nested = b"[" * 200_000 + b"]" * 200_000
    response = small.admin("PUT", origin_path("https://deep.example.com"), raw=b'{"note": ' + nested + b"}")
    # Over the body bound already; the same depth in a body under it is refused for its nesting.
    _error(response, 413, "body")
    nested = b"[" * 30_000 + b"]" * 30_000
    body = _error(small.admin("PUT", origin_path("https://deep.example.com"), raw=b'{"note": ' + nested + b"}"), 400)
    assert body["field"] == "body" and "nested too deeply" in body["reason"]


def test_bodies_and_notes_are_bounded(small: Server) -> None:
    key = origin_path("https://big.example.com")
    _error(small.admin("PUT", key, raw=json.dumps({"note": "x" * 70_000}).encode()), 413, "body")
    _error(small.admin("PUT", key, body={"note": "x" * 1001}), 400, "note")
    chunked = request(
        small.admin_port,
        "PUT",
        key,
        headers={**AUTH, "Transfer-Encoding": "chunked"},
        body=_chunked(json.dumps({"note": "y" * 70_000}).encode()),
    )
    _error(chunked, 413, "body")
    assert small.admin("GET", key).status == 404
    refused = _error(small.admin("POST", "/origins/import", raw=_import_lines(0, 1, "z" * 2000).encode()), 400)
    assert "at most 1000" in refused["refused"][0]["reason"]
    stored = small.admin("PUT", key, body={"note": "x" * 1000})
    assert stored.status == 201 and stored.json()["note"] == "x" * 1000
    assert small.admin("DELETE", key).status == 200


def test_a_full_store_is_a_507_naming_the_setting_and_removals_still_work(small: Server) -> None:
    pid = small.admin("GET", "/healthz").json()["pid"]
    refused = _fill_through_admin(small)
    body = _error(refused, 507, "store")
    assert body["error"] == "store full" and "store.map_size_mb" in body["reason"]
    put = small.admin("PUT", origin_path("https://one-more-with-a-long-note.example.com"), body={"note": "x" * 1000})
    assert put.status in (201, 507)  # a small write may still fit under the limit; never a 500
    assert small.admin("DELETE", origin_path("https://h1.example.com")).status == 200
    assert small.admin("GET", "/healthz").json()["pid"] == pid  # the worker that refused is the one still serving
    ready = small.admin("GET", "/readyz", token=None)
    assert ready.status == 200, ready.body
    store = ready.json()["store"]
    assert store["writable"] is False and store["map_size_bytes"] == 1 << 20
    assert any("store.map_size_mb" in problem for problem in store["problems"])
    assert small.admin("GET", "/healthz").json()["warnings"]
    assert _metric(small, 'corsproxy_store_bytes{kind="map_size"}') == 1 << 20
    assert (
        0
        < _metric(small, 'corsproxy_store_bytes{kind="used"}')
        <= _metric(small, 'corsproxy_store_bytes{kind="limit"}')
    )
    assert _metric(small, "corsproxy_store_writable") == 0
    assert _metric(small, 'corsproxy_store_write_errors_total{reason="store_full"}') >= 1
    assert _metric(small, "corsproxy_store_audit_events") > 0
    assert small.proxy("GET", "/x", headers={"Origin": "https://app.example.com"}).status == 200


# -- without a token ----------------------------------------------------------------------------------------------


def test_without_a_token_writes_need_the_opt_in(tmp_path: Path, upstream_thread: ThreadedUpstream) -> None:
    key = origin_path("https://anon.example.com")
    server = Server(tmp_path, upstream_thread.port, workers=1, env={"CORSPROXY_ADMIN_TOKEN": ""}).start()
    try:
        body = _error(server.admin("PUT", key, token=None, body={}), 403)
        assert "admin.allow_anonymous_writes: true" in body["reason"]
        _error(server.admin("POST", "/origins/import", token=None, raw=b"https://anon.example.com\n"), 403)
        _error(server.admin("POST", "/reload", token=None), 403)
        assert server.admin("GET", key, token=None).status == 404  # reads stay anonymous on loopback
        assert server.admin("GET", "/origins", token=None).status == 200
        assert "no token, loopback Hosts only; reads anonymous, writes refused" in server.log_text()
    finally:
        assert server.stop() == 0

    opted = Server(
        tmp_path,
        upstream_thread.port,
        workers=1,
        env={"CORSPROXY_ADMIN_TOKEN": ""},
        admin={"allow_anonymous_writes": True},
    ).start()
    try:
        assert opted.admin("PUT", key, token=None, body={}).status == 201
        warning = [line for line in opted.logs() if "admin API on" in line.get("message", "")][-1]  # this run's
        assert warning["level"].lower() == "warning" and "reads and writes anonymous" in warning["message"]
    finally:
        assert opted.stop() == 0


def test_the_anonymous_write_opt_in_is_refused_with_a_token() -> None:
    data = merge(BASE_CONFIG, {"admin": {"listen": {"port": 9090}, "allow_anonymous_writes": True}})
    with pytest.raises(ConfigError, match=r"admin\.allow_anonymous_writes"):
        parse_config(data, env={"CORSPROXY_ADMIN_TOKEN": TOKEN})
    with pytest.raises(ConfigError, match=r"admin\.allowed_hosts"):
        parse_config(merge(BASE_CONFIG, {"admin": {"allowed_hosts": "corsproxy.internal"}}), env={})


# -- a really full disk -------------------------------------------------------------------------------------------


def test_a_full_disk_refuses_writes_without_killing_the_worker(
    tiny_fs: Path, tmp_path: Path, upstream_thread: ThreadedUpstream
) -> None:
    """The default 1 GiB map on a 2 MiB filesystem: admin writes end in 507 and the worker that took them keeps
    serving (before, each PUT killed it with SIGBUS)."""
    server = Server(tmp_path, upstream_thread.port, workers=1, store={"path": str(tiny_fs / "origins.lmdb")})
    server.start()
    try:
        pid = server.admin("GET", "/healthz").json()["pid"]
        refused = _fill_through_admin(server)
        body = _error(refused, 507, "store")
        assert body["error"] == "disk full" and "store.path" in body["reason"]
        # Single PUTs fit for a while after a big import is refused; they too end in 507, never in a dead worker.
        for i in range(2000):
            put = server.admin("PUT", origin_path(f"https://late{i}.example.com"), body={"note": "x" * 1000})
            if put.status != 201:
                break
        _error(put, 507, "store")
        for i in range(5):
            later = server.admin("PUT", origin_path(f"https://later{i}.example.com"), body={"note": "x" * 1000})
            _error(later, 507, "store")
        assert server.admin("DELETE", origin_path("https://h1.example.com")).status == 200
        assert server.admin("GET", "/healthz").json()["pid"] == pid
        assert server.booted_pids() == {pid}  # no worker was replaced
        assert server.proxy("GET", "/x", headers={"Origin": "https://app.example.com"}).status == 200
        ready = server.admin("GET", "/readyz", token=None).json()
        assert ready["store"]["writable"] is False
        assert any("filesystem" in problem for problem in ready["store"]["problems"])
        assert _metric(server, 'corsproxy_store_write_errors_total{reason="disk_full"}') >= 6
        assert _metric(server, 'corsproxy_store_bytes{kind="disk_free"}') < 1 << 20
    finally:
        assert server.stop() == 0
