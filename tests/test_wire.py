"""CORS on the wire: the real proxy in front of a real upstream on loopback, with a real LMDB store."""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp.test_utils import TestServer

from corsproxy.store import OriginRecord
from tests.support.inprocess import ProxyFactory, client_state
from tests.support.upstream import RECEIVED

ALLOWED = "https://app.example.com"
REFUSED = "https://evil-example.com"


def _cors(headers: object) -> dict[str, str]:
    """Every Access-Control-* header of a response."""
    return {k: v for k, v in headers.items() if k.lower().startswith("access-control-")}  # type: ignore[attr-defined]


def _preflight(origin: str, method: str = "PUT", headers: str | None = None) -> dict[str, str]:
    out = {"Origin": origin, "Access-Control-Request-Method": method}
    if headers is not None:
        out["Access-Control-Request-Headers"] = headers
    return out


async def test_preflight_is_answered_and_never_forwarded(make_proxy: ProxyFactory, upstream: TestServer) -> None:
    client = await make_proxy()
    allowed = await client.options("/redirect", headers=_preflight(ALLOWED, "PUT", "content-type,x-api-key"))
    refused = await client.options("/redirect", headers=_preflight(REFUSED))
    assert allowed.status == 204
    assert _cors(allowed.headers) == {
        "Access-Control-Allow-Origin": ALLOWED,
        "Access-Control-Allow-Credentials": "true",
        "Access-Control-Allow-Methods": "DELETE, GET, POST, PUT",
        "Access-Control-Allow-Headers": "content-type, x-api-key",
        "Access-Control-Max-Age": "600",
    }
    assert allowed.headers["Vary"] == "Origin, Access-Control-Request-Method, Access-Control-Request-Headers"
    assert refused.status == 403
    assert _cors(refused.headers) == {}
    assert refused.headers["Vary"] == "Origin, Access-Control-Request-Method, Access-Control-Request-Headers"
    assert upstream.app[RECEIVED] == []


async def test_plain_options_is_forwarded(make_proxy: ProxyFactory, upstream: TestServer) -> None:
    client = await make_proxy()
    response = await client.options("/thing", headers={"Origin": ALLOWED})
    assert response.status == 200
    assert (await response.json())["method"] == "OPTIONS"
    assert response.headers["Access-Control-Allow-Origin"] == ALLOWED
    assert len(upstream.app[RECEIVED]) == 1


@pytest.mark.parametrize(
    ("origin", "expected"),
    [
        (
            ALLOWED,
            {
                "Access-Control-Allow-Origin": ALLOWED,
                "Access-Control-Allow-Credentials": "true",
                "Access-Control-Expose-Headers": "x-request-id",
            },
        ),
        (REFUSED, {}),
        ("https://app.example.com/", {}),
        (None, {}),
    ],
    ids=["allowed", "refused", "malformed", "no origin"],
)
async def test_upstream_cors_headers_never_pass_through(
    make_proxy: ProxyFactory, origin: str | None, expected: dict[str, str]
) -> None:
    client = await make_proxy()
    response = await client.get("/upstream-cors", headers={"Origin": origin} if origin else {})
    assert response.status == 200
    assert _cors(response.headers) == expected
    assert response.headers.getall("Vary") == ["Accept-Encoding, Origin"]


@pytest.mark.parametrize("status", [301, 302, 400, 404, 418, 500, 503])
async def test_every_status_carries_cors_for_an_allowed_origin(make_proxy: ProxyFactory, status: int) -> None:
    client = await make_proxy()
    response = await client.get(f"/status/{status}", headers={"Origin": ALLOWED}, allow_redirects=False)
    assert response.status == status
    assert response.headers["Access-Control-Allow-Origin"] == ALLOWED
    assert "Origin" in response.headers["Vary"]


async def test_redirects_are_passed_back_not_followed(make_proxy: ProxyFactory, upstream: TestServer) -> None:
    client = await make_proxy()
    response = await client.get("/redirect", allow_redirects=False)
    assert response.status == 302
    assert response.headers["Location"] == "/elsewhere"
    assert len(upstream.app[RECEIVED]) == 1


async def test_upstream_down_is_502_with_cors(make_proxy: ProxyFactory) -> None:
    client = await make_proxy(upstream={"url": "http://127.0.0.1:9"})  # discard port: nothing listens
    response = await client.get("/x", headers={"Origin": ALLOWED})
    assert response.status == 502
    assert response.headers["Access-Control-Allow-Origin"] == ALLOWED
    assert response.headers["Vary"] == "Origin"
    assert "upstream" in await response.text()
    refused = await client.get("/x", headers={"Origin": REFUSED})
    assert refused.status == 502
    assert _cors(refused.headers) == {}


async def test_upstream_timeout_is_504_with_cors(make_proxy: ProxyFactory) -> None:
    client = await make_proxy(upstream={"read_timeout": 0.3})
    response = await client.get("/slow?seconds=3", headers={"Origin": ALLOWED})
    assert response.status == 504
    assert response.headers["Access-Control-Allow-Origin"] == ALLOWED


async def test_large_upload_streams_intact(make_proxy: ProxyFactory) -> None:
    client = await make_proxy()
    block = bytes(range(256)) * 4096  # 1 MiB
    digest = hashlib.sha256()

    async def body() -> AsyncIterator[bytes]:
        for _ in range(48):
            digest.update(block)
            yield block

    response = await client.post("/upload", data=body(), headers={"Origin": ALLOWED})
    assert response.status == 200
    result = await response.json()
    assert result == {"sha256": digest.hexdigest(), "length": 48 << 20}


async def test_large_chunked_download_streams_intact(make_proxy: ProxyFactory) -> None:
    client = await make_proxy()
    size = 48 << 20
    response = await client.get(f"/download?size={size}", headers={"Origin": ALLOWED})
    assert response.status == 200
    assert response.headers["Access-Control-Allow-Origin"] == ALLOWED
    expected = hashlib.sha256()
    pattern = bytes(range(256)) * 256
    for offset in range(0, size, len(pattern)):
        expected.update(pattern[: min(len(pattern), size - offset)])
    got = hashlib.sha256()
    total = 0
    async for chunk in response.content.iter_chunked(1 << 16):
        got.update(chunk)
        total += len(chunk)
    assert total == size
    assert got.hexdigest() == expected.hexdigest()


async def test_origin_added_to_the_store_is_honoured_on_the_next_request(make_proxy: ProxyFactory) -> None:
    client = await make_proxy()
    before = await client.options("/x", headers=_preflight("https://new.example.net"))
    assert before.status == 403
    client_state(client).store.put("https://new.example.net", OriginRecord(), "test")
    after = await client.options("/x", headers=_preflight("https://new.example.net"))
    assert after.status == 204


async def test_expired_origin_is_refused(make_proxy: ProxyFactory) -> None:
    client = await make_proxy()
    client_state(client).store.put("https://gone.example.net", OriginRecord(expires=1.0), "test")
    response = await client.options("/x", headers=_preflight("https://gone.example.net"))
    assert response.status == 403


BLOCKING = [
    ("off", "POST", REFUSED, 200),
    ("unsafe_methods", "POST", REFUSED, 403),
    ("unsafe_methods", "GET", REFUSED, 200),
    ("all", "GET", REFUSED, 403),
    ("all", "GET", "https://api.example.com", 200),  # same-origin (public_origins) is exempt
    ("all", "POST", ALLOWED, 200),
    ("all", "GET", None, 200),  # no Origin: not a CORS request
]


@pytest.mark.parametrize(
    ("mode", "method", "origin", "status"), BLOCKING, ids=[f"{m}-{x}-{o}" for m, x, o, _ in BLOCKING]
)
async def test_block_disallowed(
    make_proxy: ProxyFactory, upstream: TestServer, mode: str, method: str, origin: str | None, status: int
) -> None:
    client = await make_proxy(block_disallowed=mode, public_origins=["https://api.example.com"])
    response = await client.request(method, "/x", headers={"Origin": origin} if origin else {})
    assert response.status == status
    assert len(upstream.app[RECEIVED]) == (1 if status == 200 else 0)
    if status == 403:
        assert _cors(response.headers) == {}
        assert response.headers["Vary"] == "Origin"


async def test_private_network_access(make_proxy: ProxyFactory) -> None:
    client = await make_proxy(cors={"allow_private_network": True})
    headers = {**_preflight(ALLOWED, "GET"), "Access-Control-Request-Private-Network": "true"}
    response = await client.options("/x", headers=headers)
    assert response.status == 204
    assert response.headers["Access-Control-Allow-Private-Network"] == "true"
    assert "Access-Control-Request-Private-Network" in response.headers["Vary"]
    refused = await client.options("/x", headers={**headers, "Origin": REFUSED})
    assert "Access-Control-Allow-Private-Network" not in refused.headers


async def test_debug_reason_header(make_proxy: ProxyFactory) -> None:
    client = await make_proxy(debug_reason_header=True)
    response = await client.options("/x", headers=_preflight(ALLOWED, "PATCH"))
    assert response.status == 403
    assert response.headers["X-Corsproxy-Reason"] == "method_not_allowed"


async def test_preflight_status_200_when_configured(make_proxy: ProxyFactory) -> None:
    client = await make_proxy(cors={"preflight_status": 200})
    response = await client.options("/x", headers=_preflight(ALLOWED))
    assert response.status == 200


async def test_report_only_forwards_everything_and_logs_differences(
    make_proxy: ProxyFactory, upstream: TestServer, caplog: pytest.LogCaptureFixture
) -> None:
    client = await make_proxy(mode="report-only")
    caplog.set_level(logging.WARNING, logger="corsproxy")
    # The upstream answers every origin with ACAO: * — corsproxy would refuse this one.
    response = await client.get("/upstream-cors", headers={"Origin": REFUSED})
    assert response.headers["Access-Control-Allow-Origin"] == "*"  # untouched
    preflight = await client.options("/upstream-cors", headers=_preflight(REFUSED))
    assert preflight.status == 200  # forwarded: the upstream answered it
    assert len(upstream.app[RECEIVED]) == 2
    reports = [r.getMessage() for r in caplog.records if "report-only" in r.getMessage()]
    assert len(reports) == 2
    assert all("upstream allowed" in m and "would refuse (origin_not_allowed)" in m for m in reports)


async def test_report_only_route(make_proxy: ProxyFactory, upstream: TestServer) -> None:
    client = await make_proxy(routes=[{"path": "/legacy/", "mode": "report-only"}])
    legacy = await client.options("/legacy/x", headers=_preflight(REFUSED))
    enforced = await client.options("/api/x", headers=_preflight(REFUSED))
    assert legacy.status == 200  # forwarded to the upstream's echo
    assert enforced.status == 403
    assert len(upstream.app[RECEIVED]) == 1


async def test_ipv6_upstream(config_data: Any, aiohttp_client: Any) -> None:
    from aiohttp.test_utils import TestServer as Server

    from corsproxy.config import parse_config
    from corsproxy.http.app import create_app
    from tests.support.upstream import make_upstream_app

    server = Server(make_upstream_app(), host="::1")
    try:
        await server.start_server()
    except OSError:
        pytest.skip("no IPv6 loopback on this machine")
    try:
        config = parse_config(config_data(upstream={"url": f"http://[::1]:{server.port}"}), env={})
        client = await aiohttp_client(create_app(config))
        response = await client.get("/v6", headers={"Origin": ALLOWED})
        assert response.status == 200
        body = await response.json()
        assert ["Host", f"[::1]:{server.port}"] in body["headers"]
    finally:
        await server.close()


async def test_observers_see_every_request_with_its_true_size(make_proxy: ProxyFactory) -> None:
    client = await make_proxy()
    seen: list[Any] = []
    client_state(client).observers.append(seen.append)
    refused = await client.options("/x", headers=_preflight(REFUSED))
    body = await refused.read()
    await (await client.get("/cookies", headers={"Origin": ALLOWED})).read()
    assert [(o.decision.kind.value, o.decision.reason.value, o.status) for o in seen] == [
        ("preflight", "origin_not_allowed", 403),
        ("actual", "allowed", 200),
    ]
    assert seen[0].bytes_sent == len(body) > 0
    assert seen[1].bytes_sent == len(b"cookies")
    assert seen[1].upstream_latency is not None and seen[0].upstream_latency is None


@pytest.mark.parametrize(
    ("target", "status"),
    [("/../secret", 400), ("/%2e%2e/secret", 400), ("/a/..;/../secret", 400), ("/a/../b", 200), ("/a/b", 200)],
)
async def test_path_cannot_climb_above_the_upstream_base_path(
    make_proxy: ProxyFactory, upstream: TestServer, target: str, status: int
) -> None:
    client = await make_proxy(upstream={"url": f"http://127.0.0.1:{upstream.port}/api"})
    reader, writer = await asyncio.open_connection("127.0.0.1", client.port)
    try:
        writer.write(f"GET {target} HTTP/1.1\r\nHost: x\r\nOrigin: {ALLOWED}\r\nConnection: close\r\n\r\n".encode())
        answer = await asyncio.wait_for(reader.read(), 5)
    finally:
        writer.close()
        await writer.wait_closed()
    assert answer.startswith(f"HTTP/1.1 {status}".encode())
    if status == 400:
        assert b"Access-Control-Allow-Origin: " + ALLOWED.encode() in answer  # own errors stay readable
        assert upstream.app[RECEIVED] == []
    else:
        assert upstream.app[RECEIVED][0].raw_path == "/api" + target
