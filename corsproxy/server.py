"""Running the proxy: the serve loop, logging set-up and the demo with its built-in echo upstream."""

from __future__ import annotations

import asyncio
import json
import logging
import sys

from aiohttp import web

from corsproxy.config import Config
from corsproxy.proxy import create_app

__all__ = ["echo_app", "run", "run_demo", "setup_logging"]

log = logging.getLogger("corsproxy")


def setup_logging(level: int = logging.INFO) -> None:
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)


def run(config: Config) -> None:
    """Serve until SIGINT/SIGTERM; aiohttp stops accepting, then lets in-flight requests finish."""
    setup_logging()
    web.run_app(
        create_app(config),
        host=config.listen.host,
        port=config.listen.port,
        print=None,
        access_log=None,
        shutdown_timeout=30.0,
    )


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


async def run_demo(config: Config) -> None:
    from dataclasses import replace

    setup_logging()
    upstream_runner = web.AppRunner(echo_app(), access_log=None)
    await upstream_runner.setup()
    upstream_site = web.TCPSite(upstream_runner, "127.0.0.1", 0)
    await upstream_site.start()
    port = upstream_runner.addresses[0][1]
    upstream = replace(config.upstream, url=f"http://127.0.0.1:{port}", host="127.0.0.1", port=port, base_path="")
    config = replace(config, upstream=upstream)
    proxy_runner = web.AppRunner(create_app(config), access_log=None)
    await proxy_runner.setup()
    await web.TCPSite(proxy_runner, config.listen.host, config.listen.port).start()
    base = f"http://{config.listen.host}:{config.listen.port}"
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
    try:
        await asyncio.Event().wait()
    finally:
        await proxy_runner.cleanup()
        await upstream_runner.cleanup()
