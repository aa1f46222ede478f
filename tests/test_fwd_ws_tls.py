"""Issue 4: WebSocket pass-through with the handshake's Origin checked (CSWSH), and HTTPS upstreams verified against
``upstream.ca_bundle`` (a CA and server certificate generated per test with the ``openssl`` CLI)."""

from __future__ import annotations

import ssl
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from tests.support.inprocess import running_proxy

ALLOWED = "https://app.example.com"
HANDSHAKES = web.AppKey("handshakes", list)


async def ws_echo(request: web.Request) -> web.StreamResponse:
    request.app[HANDSHAKES].append(dict(request.headers))
    ws = web.WebSocketResponse(protocols=("chat.v2", "chat.v1"))
    await ws.prepare(request)
    async for message in ws:
        if message.type is aiohttp.WSMsgType.TEXT:
            if message.data == "close-4001":
                await ws.close(code=4001, message=b"upstream says bye")
                break
            await ws.send_str("echo:" + message.data)
        elif message.type is aiohttp.WSMsgType.BINARY:
            await ws.send_bytes(message.data[::-1])
    return ws


def ws_app() -> web.Application:
    app = web.Application()
    app[HANDSHAKES] = []
    app.router.add_get("/ws", ws_echo)
    return app


ServerFactory = Callable[..., Awaitable[TestServer]]


async def test_websocket_relayed_both_ways(
    aiohttp_server: ServerFactory, config_data: Callable[..., dict[str, Any]]
) -> None:
    upstream = await aiohttp_server(ws_app())
    async with (
        running_proxy(config_data(upstream={"url": f"http://127.0.0.1:{upstream.port}"})) as port,
        aiohttp.ClientSession() as session,
        session.ws_connect(
            f"http://127.0.0.1:{port}/ws",
            origin=ALLOWED,
            protocols=("chat.v1",),
            headers={"Cookie": "session=abc"},
        ) as ws,
    ):
        assert ws.protocol == "chat.v1"  # negotiated with the upstream, passed on
        await ws.send_str("hello")
        assert (await ws.receive()).data == "echo:hello"
        await ws.send_bytes(b"\x00\x01\x02")
        assert (await ws.receive()).data == b"\x02\x01\x00"
        await ws.send_str("close-4001")
        closing = await ws.receive()
        assert closing.type is aiohttp.WSMsgType.CLOSE
        assert ws.close_code == 4001  # the upstream's close code reaches the client
    (handshake,) = upstream.app[HANDSHAKES]
    assert handshake["Origin"] == ALLOWED
    assert handshake["Cookie"] == "session=abc"
    assert handshake["X-Forwarded-For"] == "127.0.0.1"


@pytest.mark.parametrize(
    ("origin", "check", "expected"),
    [
        ("https://evil.example", True, 403),
        ("https://app.example.com.evil.net", True, 403),
        ("https://evil.example", False, 101),
        (None, True, 101),  # not a browser: Origin is what browsers send, and CSWSH needs a browser
    ],
    ids=["refused", "look-alike", "check-off", "no-origin"],
)
async def test_websocket_origin_check(
    aiohttp_server: ServerFactory,
    config_data: Callable[..., dict[str, Any]],
    origin: str | None,
    check: bool,
    expected: int,
) -> None:
    upstream = await aiohttp_server(ws_app())
    data = config_data(
        upstream={"url": f"http://127.0.0.1:{upstream.port}"}, forwarding={"websocket_origin_check": check}
    )
    async with running_proxy(data) as port, aiohttp.ClientSession() as session:
        if expected == 403:
            with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
                await session.ws_connect(f"http://127.0.0.1:{port}/ws", origin=origin)
            assert refused.value.status == 403
            assert upstream.app[HANDSHAKES] == []  # the upstream never saw the handshake
        else:
            async with session.ws_connect(f"http://127.0.0.1:{port}/ws", origin=origin) as ws:
                await ws.send_str("x")
                assert (await ws.receive()).data == "echo:x"
            assert len(upstream.app[HANDSHAKES]) == 1


async def test_websocket_upstream_refusal_passed_on(
    aiohttp_server: ServerFactory, config_data: Callable[..., dict[str, Any]]
) -> None:
    upstream = await aiohttp_server(ws_app())
    async with (
        running_proxy(config_data(upstream={"url": f"http://127.0.0.1:{upstream.port}"})) as port,
        aiohttp.ClientSession() as session,
    ):
        with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
            await session.ws_connect(f"http://127.0.0.1:{port}/no-such-socket", origin=ALLOWED)
        assert refused.value.status == 404


async def hello(request: web.Request) -> web.Response:
    return web.Response(text=f"tls {request.scheme} {request.headers['Host']}")


async def test_https_upstream_verified_with_ca_bundle(
    certificates: Path, config_data: Callable[..., dict[str, Any]]
) -> None:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(certificates / "server.pem", certificates / "server.key")
    app = web.Application()
    app.router.add_get("/{tail:.*}", hello)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=context)
    await site.start()
    upstream_port = runner.addresses[0][1]
    try:
        trusted = config_data(
            upstream={"url": f"https://127.0.0.1:{upstream_port}", "ca_bundle": str(certificates / "ca.pem")}
        )
        untrusted = config_data(upstream={"url": f"https://127.0.0.1:{upstream_port}"})
        async with aiohttp.ClientSession() as session:
            async with running_proxy(trusted) as port, session.get(f"http://127.0.0.1:{port}/x") as response:
                assert response.status == 200
                assert await response.text() == f"tls https 127.0.0.1:{upstream_port}"
            # Without the CA the certificate does not verify: 502, never a silent downgrade to no verification.
            async with (
                running_proxy(untrusted) as port,
                session.get(f"http://127.0.0.1:{port}/x", headers={"Origin": ALLOWED}) as response,
            ):
                assert response.status == 502
                assert response.headers["Access-Control-Allow-Origin"] == ALLOWED
    finally:
        await runner.cleanup()
