"""After an answer from the ordinary handler, the next request on the connection must still take the fast paths.

aiohttp's request loop waits for the next request only once the ordinary handler's task has ended and the loop has run
on; a client that sends its next request as soon as it has read a response lands in between. Such a request used to
be queued for the ordinary handler, whose answer opened the same window again: one ordinary answer (the first request
of a connection on Python 3.11, or any request only the ordinary path takes) made every later request on that
connection ordinary — three times the CPU per forwarded request, and half the time in the benchmark.

The client here is a thread with a blocking socket, so it sends its next request the moment the response is read,
truly concurrently with the proxy's event loop. Each test runs on both event loops ``corsproxy serve`` may use: with
uvloop (its default when installed) I/O callbacks run before callbacks already scheduled, which is where the window
shows; asyncio's loop runs them after.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator, Callable, Coroutine
from pathlib import Path
from typing import Any

import pytest

from corsproxy.http.forward import Exchange
from tests.support.fwd import config_on, count_exchanges, count_fast_answers
from tests.support.inprocess import serve_proxy
from tests.support.raw_upstream import RawConnection, RawUpstream

try:
    import uvloop

    _HAVE_UVLOOP = True
except ImportError:  # the oldest-aiohttp CI run has no uvloop
    _HAVE_UVLOOP = False

ORIGIN = "https://app.example.com"
LOOPS = ["asyncio", pytest.param("uvloop", marks=pytest.mark.skipif(not _HAVE_UVLOOP, reason="uvloop not installed"))]
ROUNDS = 60
CLIENTS = 4
OK_BODY = b"ok"


async def answer_all(connection: RawConnection) -> None:
    while await connection.read_request() is not None:
        await connection.send(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")


@contextlib.asynccontextmanager
async def proxy_counting(tmp_path: Path) -> AsyncIterator[tuple[int, list[Exchange], list[bytes]]]:
    """The proxy, with its two fast paths wrapped to record what each of them answered."""
    forwarded: list[Exchange] = []
    preflights: list[bytes] = []
    async with RawUpstream(answer_all) as upstream, serve_proxy(config_on(tmp_path, upstream.port, "gap")) as proxy:
        count_exchanges(proxy.runner, forwarded)
        count_fast_answers(proxy.runner, preflights)
        yield proxy.port, forwarded, preflights


def _read_response(sock: socket.socket) -> bytes:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, f"connection closed after {data!r}"
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = next(
        (int(line.split(b":")[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length:")), 0
    )
    while len(body) < length:
        chunk = sock.recv(65536)
        assert chunk, "connection closed mid-body"
        body += chunk
    return head


def _alternate(port: int, ordinary: bytes, fast: bytes) -> list[bytes]:
    """On one connection: an ordinary-path request, then one the fast path takes, sent the moment the first answer is
    read; ``ROUNDS`` times. Returns the fast requests' response heads."""
    heads = []
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        for _ in range(ROUNDS):
            sock.sendall(ordinary)
            _read_response(sock)
            sock.sendall(fast)
            heads.append(_read_response(sock))
    return heads


async def _alternating_clients(port: int, ordinary: bytes, fast: bytes) -> list[bytes]:
    """:func:`_alternate` on ``CLIENTS`` connections at once: a busy loop is where the window is widest."""
    runs = await asyncio.gather(*(asyncio.to_thread(_alternate, port, ordinary, fast) for _ in range(CLIENTS)))
    return [head for heads in runs for head in heads]


def _get(target: str) -> bytes:
    return f"GET {target} HTTP/1.1\r\nHost: proxy.test\r\nOrigin: {ORIGIN}\r\n\r\n".encode()


#: An absolute-form target: the fast paths leave it to the ordinary handler, which forwards it as /items.
ORDINARY = _get("http://proxy.test/items")
PREFLIGHT = (
    f"OPTIONS /items HTTP/1.1\r\nHost: proxy.test\r\nOrigin: {ORIGIN}\r\nAccess-Control-Request-Method: PUT\r\n\r\n"
).encode()


def _run(loop: str, scenario: Callable[[], Coroutine[Any, Any, None]]) -> None:
    """Run ``scenario`` on a fresh event loop of the kind asked for (the proxy and its upstream live on it)."""
    runner = uvloop.run if loop == "uvloop" else asyncio.run
    runner(asyncio.wait_for(scenario(), 60))


@pytest.mark.parametrize("loop", LOOPS)
def test_a_request_sent_right_after_an_ordinary_answer_is_forwarded_by_the_fast_path(tmp_path: Path, loop: str) -> None:
    async def scenario() -> None:
        async with proxy_counting(tmp_path) as (port, forwarded, _):
            heads = await _alternating_clients(port, ORDINARY, _get("/items"))
        assert all(head.startswith(b"HTTP/1.1 200 ") for head in heads)
        assert len(forwarded) == ROUNDS * CLIENTS

    _run(loop, scenario)


@pytest.mark.parametrize("loop", LOOPS)
def test_a_preflight_sent_right_after_an_ordinary_answer_is_answered_fast(tmp_path: Path, loop: str) -> None:
    async def scenario() -> None:
        async with proxy_counting(tmp_path) as (port, _, preflights):
            heads = await _alternating_clients(port, ORDINARY, PREFLIGHT)
        assert all(head.startswith(b"HTTP/1.1 204 ") for head in heads)
        assert len(preflights) == ROUNDS * CLIENTS

    _run(loop, scenario)


def _fresh_connections(port: int, request: bytes) -> None:
    for _ in range(ROUNDS):
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            sock.sendall(request)
            _read_response(sock)


@pytest.mark.parametrize("loop", LOOPS)
@pytest.mark.parametrize("kind", ["forwarded", "preflight"])
def test_the_first_request_of_a_connection_takes_the_fast_path(tmp_path: Path, kind: str, loop: str) -> None:
    request = _get("/items") if kind == "forwarded" else PREFLIGHT

    async def scenario() -> None:
        async with proxy_counting(tmp_path) as (port, forwarded, preflights):
            await asyncio.to_thread(_fresh_connections, port, request)
        assert len(forwarded if kind == "forwarded" else preflights) == ROUNDS

    _run(loop, scenario)
