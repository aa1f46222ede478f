"""On a TLS admin listener the console's session cookie is also ``Secure`` (in-process: ``corsproxy serve`` has no
TLS admin listener, but the admin app can be served behind one)."""

from __future__ import annotations

import http.cookies
import ssl
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

from corsproxy.config import parse_config
from corsproxy.http.app import create_app
from corsproxy.ops.admin import AdminContext, create_admin_app
from tests.test_fwd_ws_tls import certificates

__all__ = ["certificates"]  # a fixture, imported for pytest

TOKEN = "tls-console-token-0123456789abcdef"


async def test_the_session_cookie_is_secure_on_tls(
    certificates: Path, config_data: Callable[..., dict[str, Any]]
) -> None:
    proxy = create_app(parse_config(config_data(), env={}))
    proxy_runner = web.AppRunner(proxy)
    await proxy_runner.setup()  # opens the store: the admin app reads it
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_context.load_cert_chain(certificates / "server.pem", certificates / "server.key")
    admin_runner = web.AppRunner(create_admin_app(AdminContext(proxy=proxy, tokens={TOKEN: "alice"})))
    await admin_runner.setup()
    site = web.TCPSite(admin_runner, "127.0.0.1", 0, ssl_context=server_context)
    await site.start()
    port = admin_runner.addresses[0][1]
    client_context = ssl.create_default_context(cafile=str(certificates / "ca.pem"))
    try:
        async with aiohttp.ClientSession() as session:
            url = f"https://127.0.0.1:{port}/console/api/session"
            headers = {"Origin": f"https://127.0.0.1:{port}"}
            async with session.post(url, json={"token": TOKEN}, headers=headers, ssl=client_context) as response:
                assert response.status == 201, await response.text()
                cookie = http.cookies.SimpleCookie(response.headers["Set-Cookie"])["corsproxy_console"]
                assert cookie["secure"] is True
                assert cookie["httponly"] is True
                assert cookie["samesite"] == "Strict"
            # The plain-http origin of the same host and port is another origin: refused.
            plain = {"Origin": f"http://127.0.0.1:{port}"}
            async with session.post(url, json={"token": TOKEN}, headers=plain, ssl=client_context) as response:
                assert response.status == 403
    finally:
        await admin_runner.cleanup()
        await proxy_runner.cleanup()
