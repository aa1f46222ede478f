"""``corsproxy demo``: the proxy in one process in front of a built-in echo upstream, on a temporary store.

Owns the echo upstream and the banner that shows what to try. The listener is bound by the caller (the CLI), so a
taken port fails before anything starts; the proxy app and its limits are :mod:`corsproxy.http`'s, as under
``corsproxy serve``, only without the arbiter and its workers.
"""

from __future__ import annotations

import asyncio
import json
import socket
from dataclasses import replace

from aiohttp import web

from corsproxy.core.settings import Config
from corsproxy.http.app import create_app
from corsproxy.http.protocol import ProxyRunner
from corsproxy.ops.server import _bind_address, _listen_socket, setup_logging

__all__ = ["echo_app", "run_demo"]


async def _echo(request: web.Request) -> web.Response:
    body = await request.read()
    return web.json_response(
        {
            "method": request.method,
            "path": request.raw_path,
            "headers": dict(request.headers),
            "body": body.decode("utf-8", "replace"),
        },
        headers={"X-Request-Id": "demo-1", "X-Internal": "not exposed"},
    )


def echo_app() -> web.Application:
    """A tiny upstream that answers every request with what it received, as JSON."""
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", _echo)
    return app


async def run_demo(config: Config, listener: socket.socket | None = None) -> None:
    """Serve the demo on ``listener`` (bound by the caller, so that a taken port fails before anything starts), or
    on the config's address."""
    setup_logging()
    if listener is None:
        listener = _listen_socket(config.listen.host, config.listen.port)
    proxy_runner: web.AppRunner | None = None
    upstream_runner = web.AppRunner(echo_app(), access_log=None)
    try:
        await upstream_runner.setup()
        upstream_site = web.TCPSite(upstream_runner, "127.0.0.1", 0)
        await upstream_site.start()
        port = upstream_runner.addresses[0][1]
        upstream = replace(config.upstream, url=f"http://127.0.0.1:{port}", host="127.0.0.1", port=port, base_path="")
        config = replace(config, upstream=upstream)
        proxy_runner = ProxyRunner(create_app(config), access_log=None)  # same limits as `serve`
        await proxy_runner.setup()
        await web.SockSite(proxy_runner, listener).start()
        _demo_banner(config, listener, port)
        await asyncio.Event().wait()
    finally:
        if proxy_runner is not None:
            await proxy_runner.cleanup()
        await upstream_runner.cleanup()
        listener.close()


def _demo_banner(config: Config, listener: socket.socket, port: int) -> None:
    host, listen_port = listener.getsockname()[:2]
    host = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(host, host)  # what curl on this machine reaches
    base = f"http://{_bind_address(host, listen_port)}"
    allowed = next((k for k in config.origins if "*" not in k and k != "null"), "https://app.example.com")
    print(
        f"\ncorsproxy demo: {base} -> echo upstream on 127.0.0.1:{port}\n"
        f"origins allowed: {json.dumps(sorted(config.origins))}\n\n"
        "An allowed preflight (204 with Access-Control-Allow-*):\n"
        f"  curl -si -X OPTIONS {base}/api/hello -H 'Origin: {allowed}' "
        "-H 'Access-Control-Request-Method: POST' -H 'Access-Control-Request-Headers: content-type'\n\n"
        "A refused preflight from a look-alike origin (403, no Access-Control-Allow-*):\n"
        f"  curl -si -X OPTIONS {base}/api/hello -H 'Origin: https://evil-example.com' "
        "-H 'Access-Control-Request-Method: POST'\n\n"
        "An actual request, forwarded to the upstream:\n"
        f"  curl -si {base}/api/hello -H 'Origin: {allowed}'\n\n"
        "Ctrl-C stops the demo.\n",
        flush=True,
    )
