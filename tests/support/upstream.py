"""A real upstream API for tests: an aiohttp app with endpoints that exercise the forwarder.

Started on loopback by pytest-aiohttp's ``aiohttp_server`` (the ``upstream`` fixture), or on its own event loop on a
thread (:class:`ThreadedUpstream`) for a proxy that runs in another process; nothing here is a mock, it is a small
real server.
"""

from __future__ import annotations

import asyncio
import hashlib
import threading

from aiohttp import web

from tests.support.net import free_port

RECEIVED = web.AppKey("received", list)


async def echo(request: web.Request) -> web.Response:
    body = await request.read()
    request.app[RECEIVED].append(request)
    return web.json_response(
        {
            "method": request.method,
            "raw_path": request.raw_path,
            "headers": [[k, v] for k, v in request.headers.items()],
            "body_sha256": hashlib.sha256(body).hexdigest(),
            "body_length": len(body),
        },
        headers={"X-Request-Id": "req-1", "X-Secret-Internal": "hidden"},
    )


async def status(request: web.Request) -> web.Response:
    code = int(request.match_info["code"])
    request.app[RECEIVED].append(request)
    if code in (204, 304):
        return web.Response(status=code)
    return web.Response(status=code, text=f"upstream says {code}\n")


async def redirect(request: web.Request) -> web.Response:
    request.app[RECEIVED].append(request)
    return web.Response(status=302, headers={"Location": "/elsewhere"})


async def upstream_cors(request: web.Request) -> web.Response:
    """An upstream that sets its own, over-permissive CORS headers: the proxy must not let them through."""
    request.app[RECEIVED].append(request)
    return web.Response(
        text="ok",
        headers={
            "Access-Control-Allow-Origin": "*",
            "Access-Control-Allow-Credentials": "true",
            "Access-Control-Expose-Headers": "x-secret-internal",
            "Vary": "Accept-Encoding",
        },
    )


async def cookies(request: web.Request) -> web.Response:
    response = web.Response(text="cookies")
    response.headers.add("Set-Cookie", "a=1; Path=/")
    response.headers.add("Set-Cookie", "b=2; Path=/; HttpOnly")
    return response


async def download(request: web.Request) -> web.StreamResponse:
    """``size`` bytes, chunked, in 64 KiB pieces of a repeating pattern."""
    size = int(request.query.get("size", "1048576"))
    response = web.StreamResponse()
    response.enable_chunked_encoding()
    await response.prepare(request)
    chunk = bytes(range(256)) * 256
    sent = 0
    while sent < size:
        piece = chunk[: min(len(chunk), size - sent)]
        await response.write(piece)
        sent += len(piece)
    await response.write_eof()
    return response


async def upload(request: web.Request) -> web.Response:
    """Hash a streamed body without holding it."""
    digest = hashlib.sha256()
    total = 0
    async for chunk in request.content.iter_chunked(1 << 16):
        digest.update(chunk)
        total += len(chunk)
    return web.json_response({"sha256": digest.hexdigest(), "length": total})


async def slow(request: web.Request) -> web.Response:
    await asyncio.sleep(float(request.query.get("seconds", "5")))
    return web.Response(text="late")


async def drip(request: web.Request) -> web.StreamResponse:
    """Sends a first chunk, then waits for ``seconds`` before finishing."""
    response = web.StreamResponse()
    response.enable_chunked_encoding()
    await response.prepare(request)
    await response.write(b"first\n")
    await asyncio.sleep(float(request.query.get("seconds", "2")))
    await response.write(b"last\n")
    await response.write_eof()
    return response


def make_upstream_app() -> web.Application:
    app = web.Application()
    app[RECEIVED] = []
    app.router.add_route("*", "/status/{code}", status)
    app.router.add_route("*", "/redirect", redirect)
    app.router.add_route("*", "/upstream-cors", upstream_cors)
    app.router.add_get("/cookies", cookies)
    app.router.add_get("/download", download)
    app.router.add_post("/upload", upload)
    app.router.add_get("/slow", slow)
    app.router.add_get("/drip", drip)
    app.router.add_route("*", "/{tail:.*}", echo)
    return app


class ThreadedUpstream:
    """:func:`make_upstream_app`, served by its own event loop on a daemon thread."""

    def __init__(self) -> None:
        self.port = free_port()
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._runner: web.AppRunner | None = None

    def _serve(self) -> None:
        asyncio.set_event_loop(self._loop)

        async def start() -> None:
            self._runner = web.AppRunner(make_upstream_app(), access_log=None)
            await self._runner.setup()
            await web.TCPSite(self._runner, "127.0.0.1", self.port).start()

        self._loop.run_until_complete(start())
        self._ready.set()
        self._loop.run_forever()
        assert self._runner is not None
        self._loop.run_until_complete(self._runner.cleanup())
        self._loop.close()

    def __enter__(self) -> ThreadedUpstream:
        self._thread.start()
        assert self._ready.wait(10), "upstream did not start"
        return self

    def __exit__(self, *exc: object) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
