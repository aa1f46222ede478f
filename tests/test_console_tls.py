"""On a TLS admin listener the console's session cookie is also ``Secure`` (in-process: ``corsproxy serve`` has no
TLS admin listener, but the admin app can be served behind one)."""

from __future__ import annotations

import http.cookies
import ssl
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp

from tests.support.inprocess import serve_admin, serve_proxy

TOKEN = "tls-console-token-0123456789abcdef"


async def test_the_session_cookie_is_secure_on_tls(
    certificates: Path, config_data: Callable[..., dict[str, Any]]
) -> None:
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_context.load_cert_chain(certificates / "server.pem", certificates / "server.key")
    async with (
        serve_proxy(config_data()) as proxy,  # its app has started: the store the admin app reads is open
        serve_admin(proxy, {TOKEN: "alice"}, ssl_context=server_context) as admin,
    ):
        port = admin.port
        client_context = ssl.create_default_context(cafile=str(certificates / "ca.pem"))
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
