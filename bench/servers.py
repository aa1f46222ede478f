"""The processes the benchmark measures corsproxy against, each runnable on its own::

    python bench/servers.py upstream   --port 9001          # the fast upstream: small JSON, 1 MiB, upload sink
    python bench/servers.py bare204    --port 9002          # aiohttp Application + router, constant 204
    python bench/servers.py lowlevel204 --port 9003         # aiohttp's low-level web.Server: no router, no app
    python bench/servers.py rawproto204 --port 9004         # asyncio.Protocol writing precomputed bytes (the ceiling)
    python bench/servers.py fastpreflight --port 9006 --origins https://a.example,https://b.example
                                                            # aiohttp's C parser + cached response bytes (a prototype)
    python bench/servers.py forwarder  --port 9005 --upstream http://127.0.0.1:9001   # minimal aiohttp forwarder

``--uvloop`` runs any of them on uvloop. These are the floors an aiohttp design starts from; they implement no CORS.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import email.utils
import json
from collections.abc import AsyncIterator

import aiohttp
from aiohttp import web
from aiohttp.base_protocol import BaseProtocol
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.http_parser import HttpRequestParser, RawRequestMessage

SMALL_JSON = json.dumps({"id": 42, "name": "corsproxy benchmark", "tags": ["a", "b", "c"], "ok": True}).encode()
ONE_MIB = b"x" * (1 << 20)
CHUNK = 1 << 16

#: RFC 9110 §7.6.1 hop-by-hop fields: the only headers the minimal forwarder drops.
HOP_BY_HOP = frozenset(
    {"connection", "keep-alive", "proxy-connection", "te", "trailer", "transfer-encoding", "upgrade", "host"}
)


# -- the upstream ---------------------------------------------------------------------------------------------------


async def small_json(request: web.Request) -> web.Response:
    return web.Response(body=SMALL_JSON, content_type="application/json", headers={"X-Request-Id": "bench"})


async def one_mib(request: web.Request) -> web.Response:
    return web.Response(body=ONE_MIB, content_type="application/octet-stream")


async def upload_sink(request: web.Request) -> web.Response:
    """Read the whole body in chunks (never holding it), then say how many bytes arrived."""
    received = 0
    while chunk := await request.content.readany():  # whatever arrived, without re-chunking copies
        received += len(chunk)
    return web.json_response({"received": received})


def upstream_app() -> web.Application:
    app = web.Application(client_max_size=0)
    app.router.add_get("/small.json", small_json)
    app.router.add_get("/1m.bin", one_mib)
    app.router.add_post("/upload", upload_sink)
    return app


# -- preflight floors -----------------------------------------------------------------------------------------------


async def constant_204(request: web.BaseRequest) -> web.Response:
    return web.Response(status=204)


def bare204_app() -> web.Application:
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", constant_204)
    return app


_RAW_204 = b"HTTP/1.1 204 No Content\r\nServer: raw\r\nConnection: keep-alive\r\n\r\n"


class Raw204(asyncio.Protocol):
    """Answers every request head with the same precomputed bytes: what Python + asyncio cost with no HTTP framework.
    Only understands bodiless keep-alive requests — a measuring stick, not a server."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buffer = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        buffer = self.buffer + data
        count = buffer.count(b"\r\n\r\n")
        if count:
            assert self.transport is not None
            self.transport.write(_RAW_204 * count)
            buffer = buffer[buffer.rindex(b"\r\n\r\n") + 4 :]
        self.buffer = buffer


class FastPreflight(BaseProtocol):
    """A prototype of answering preflights below aiohttp's request machinery: aiohttp's C parser, then one dict lookup
    of the complete response bytes per (origin, request-method, request-headers), written straight to the transport.

    It measures what corsproxy could cost per preflight with that design (RESULTS.md, recommendation 1); it is not a
    CORS implementation — exact origins only, no validation of the method token or header names, no routes.
    """

    allowed: frozenset[str] = frozenset()
    methods = "DELETE, GET, POST, PUT"
    _answers: dict[tuple[str | None, ...], bytes] = {}  # noqa: RUF012 - one cache per process, cleared every second
    _date = b""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__(loop)
        self.parser = HttpRequestParser(self, loop, 1 << 16, max_line_size=8190, max_field_size=8190)

    @classmethod
    def tick(cls, loop: asyncio.AbstractEventLoop) -> None:
        """Responses carry a Date (RFC 9110 §6.6.1): cached answers live for one second, like aiohttp's date cache."""
        cls._date = email.utils.formatdate(usegmt=True).encode()
        cls._answers = {}
        loop.call_later(1.0, cls.tick, loop)

    def data_received(self, data: bytes) -> None:
        try:
            messages, _upgraded, _tail = self.parser.feed_data(data)
        except HttpProcessingError:
            assert self.transport is not None
            self.transport.close()
            return
        if messages:
            assert self.transport is not None
            self.transport.write(b"".join(self.answer(message) for message, _payload in messages))

    def answer(self, message: RawRequestMessage) -> bytes:
        headers = message.headers
        key = (
            message.method,
            headers.get("Origin"),
            headers.get("Access-Control-Request-Method"),
            headers.get("Access-Control-Request-Headers"),
        )
        found = self._answers.get(key)
        if found is None:
            found = self._answers[key] = self.build(*key)
        return found

    def build(self, method: str | None, origin: str | None, request_method: str | None, names: str | None) -> bytes:
        lines = [b"Vary: Origin, Access-Control-Request-Method, Access-Control-Request-Headers"]
        if method == "OPTIONS" and origin in self.allowed and request_method:
            head = b"HTTP/1.1 204 No Content"
            lines += [f"Access-Control-Allow-Origin: {origin}".encode(), b"Access-Control-Allow-Credentials: true",
                      f"Access-Control-Allow-Methods: {self.methods}".encode()]  # fmt: skip
            if names:
                lines.append(f"Access-Control-Allow-Headers: {names.lower()}".encode())
            lines.append(b"Access-Control-Max-Age: 600")  # and no Content-Length: a 204 has none (RFC 9110 §8.6)
            body = b""
        else:
            head, body = b"HTTP/1.1 403 Forbidden", b"CORS preflight refused\n"
            lines += [b"Content-Type: text/plain; charset=utf-8", f"Content-Length: {len(body)}".encode()]
        return b"\r\n".join([head, b"Date: " + self._date, b"Server: fastpreflight", *lines, b"", body])


# -- the minimal forwarder ------------------------------------------------------------------------------------------

_SESSION = web.AppKey("session", aiohttp.ClientSession)
_BASE = web.AppKey("base", str)


async def forward(request: web.Request) -> web.StreamResponse:
    """Stream the request to the upstream and the answer back; drop hop-by-hop headers; nothing else."""
    headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP_BY_HOP}
    async with request.app[_SESSION].request(
        request.method,
        request.app[_BASE] + request.raw_path,
        headers=headers,
        data=request.content if request.body_exists else None,
        allow_redirects=False,
    ) as upstream:
        response = web.StreamResponse(status=upstream.status)
        for name, value in upstream.headers.items():
            if name.lower() not in HOP_BY_HOP and name.lower() != "content-length":
                response.headers.add(name, value)
        if upstream.content_length is not None:
            response.content_length = upstream.content_length
        await response.prepare(request)
        async for chunk in upstream.content.iter_chunked(CHUNK):
            await response.write(chunk)
        await response.write_eof()
        return response


def forwarder_app(upstream: str) -> web.Application:
    async def session(app: web.Application) -> AsyncIterator[None]:
        app[_SESSION] = aiohttp.ClientSession(auto_decompress=False, skip_auto_headers=("User-Agent",))
        yield
        await app[_SESSION].close()

    app = web.Application(client_max_size=0)
    app[_BASE] = upstream.rstrip("/")
    app.cleanup_ctx.append(session)
    app.router.add_route("*", "/{tail:.*}", forward)
    return app


# -- running ----------------------------------------------------------------------------------------------------------


async def _serve_forever(kind: str, host: str, port: int, upstream: str, origins: list[str]) -> None:
    loop = asyncio.get_running_loop()
    if kind in ("rawproto204", "fastpreflight"):
        if kind == "fastpreflight":
            FastPreflight.allowed = frozenset(origins)
            FastPreflight.tick(loop)
        factory = Raw204 if kind == "rawproto204" else lambda: FastPreflight(loop)
        server = await loop.create_server(factory, host, port)
        async with server:
            await server.serve_forever()
        return
    runner: web.BaseRunner
    if kind == "lowlevel204":
        runner = web.ServerRunner(web.Server(constant_204), access_log=None)
    else:
        app = (
            forwarder_app(upstream) if kind == "forwarder" else upstream_app() if kind == "upstream" else bare204_app()
        )
        runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, host, port, backlog=1024).start()
    try:
        await asyncio.Event().wait()
    finally:
        await runner.cleanup()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    kinds = ["upstream", "bare204", "lowlevel204", "rawproto204", "fastpreflight", "forwarder"]
    parser.add_argument("kind", choices=kinds)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--upstream", default="http://127.0.0.1:9001", help="forwarder only")
    parser.add_argument("--origins", default="", help="fastpreflight only: allowed origins, comma-separated")
    parser.add_argument("--uvloop", action="store_true", help="run on uvloop (pip install corsproxy[speed])")
    args = parser.parse_args()
    loop_factory = None
    if args.uvloop:
        import uvloop

        loop_factory = uvloop.new_event_loop
    with contextlib.suppress(KeyboardInterrupt), asyncio.Runner(loop_factory=loop_factory) as runner:
        runner.run(_serve_forever(args.kind, args.host, args.port, args.upstream, args.origins.split(",")))


if __name__ == "__main__":
    main()
