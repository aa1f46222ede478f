"""Attacks on the forwarding fast path (corsproxy.http.forward, corsproxy.http.upstream), over real loopback sockets:
request smuggling and path tricks compared with the ordinary path, response-side desync on pooled upstream
connections (can one client get bytes meant for another?), and flow control (does a client that stops reading keep
the proxy's memory bounded, and does it leave anything behind in the pool?).

The ordinary path is the reference: the same bytes are sent to a proxy with the fast path and one without it, and
what the raw-socket upstream receives and what the client gets back must be the same.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import socket
import threading
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from corsproxy.http.forward import Exchange
from corsproxy.http.protocol import GuardedRequestHandler
from tests.support.fwd import ORIGIN, config_on, count_exchanges, normal, raw, request
from tests.support.inprocess import RunningProxy, serve_proxy
from tests.support.raw_upstream import OK, RawConnection, RawUpstream


def _status(response: bytes) -> bytes:
    return response.split(b"\r\n", 1)[0]


# -- response-side desync on pooled upstream connections -----------------------------------------------------------


async def _two_clients(
    tmp_path: Path, first_answer: bytes, *, second_answer: bytes = OK, read_timeout: float = 5
) -> tuple[bytes, bytes, RawUpstream]:
    """Client A's request is answered with ``first_answer`` (one write); then client B, on a new client connection,
    asks the same proxy; every later request on any upstream connection is answered with ``second_answer``."""
    served = 0

    async def handler(connection: RawConnection) -> None:
        nonlocal served
        while await connection.read_request() is not None:
            served += 1
            await connection.send(first_answer if served == 1 else second_answer)

    async with (
        RawUpstream(handler) as upstream,
        serve_proxy(config_on(tmp_path, upstream.port, "a", upstream={"read_timeout": read_timeout})) as proxy,
    ):
        a = await raw(proxy.port, request("GET", "/a"))
        b = await raw(proxy.port, request("GET", "/b"))
    return a, b, upstream


MINE = b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nmine"


async def test_bytes_after_a_response_are_never_given_to_the_next_client(tmp_path: Path) -> None:
    """The upstream sends more than the response it framed, in the same segment: the start of another response
    (a framework writing twice, a wrong Content-Length). The pooled connection must not be reused — the next client's
    request must get its own answer, not a continuation of the leftover."""
    leftover = b"HTTP/1.1 200 OK\r\nContent-Length: 40\r\n\r\nsecret of client A"
    a, b, upstream = await _two_clients(tmp_path, OK + leftover, second_answer=MINE)
    assert a.startswith(b"HTTP/1.1 200 OK\r\n") and a.endswith(b"\r\n\r\nok")
    assert b"secret" not in b
    assert b.startswith(b"HTTP/1.1 200 OK\r\n"), b
    assert b.endswith(b"\r\n\r\nmine"), b
    assert len(upstream.connections) == 2  # the dirty connection was dropped, B's request went on a new one


async def test_a_whole_second_response_after_a_response_is_not_relayed(tmp_path: Path) -> None:
    """Two complete responses to one request, in one segment: the second reaches nobody."""
    extra = b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nsecret"
    a, b, _ = await _two_clients(tmp_path, OK + extra, second_answer=MINE)
    assert a.endswith(b"\r\n\r\nok") and b"secret" not in a
    assert b.endswith(b"\r\n\r\nmine") and b"secret" not in b


@pytest.mark.parametrize(
    "answer",
    [
        b"HTTP/1.1 204 No Content\r\nContent-Length: 6\r\n\r\nsecret",
        b"HTTP/1.1 304 Not Modified\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nsecret",
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok, and more than framed: secret",
    ],
    ids=["204-with-body", "304-then-response", "body-longer-than-length"],
)
async def test_body_where_none_may_be_is_not_given_to_the_next_client(tmp_path: Path, answer: bytes) -> None:
    a, b, _ = await _two_clients(tmp_path, answer, second_answer=MINE)
    assert b"secret" not in a + b
    assert b.endswith(b"\r\n\r\nmine"), b


async def test_head_response_with_a_body_is_not_given_to_the_next_client(tmp_path: Path) -> None:
    served = 0

    async def handler(connection: RawConnection) -> None:
        nonlocal served
        while (received := await connection.read_request()) is not None:
            served += 1
            if received.request_line.startswith("HEAD"):
                await connection.send(b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nsecret")
            else:
                await connection.send(MINE)

    async with RawUpstream(handler) as upstream, serve_proxy(config_on(tmp_path, upstream.port, "h")) as proxy:
        head = await raw(proxy.port, request("HEAD", "/a"))
        b = await raw(proxy.port, request("GET", "/b"))
    assert head.startswith(b"HTTP/1.1 200 OK\r\n") and b"Content-Length: 6\r\n" in head
    assert b"secret" not in head + b
    assert b.endswith(b"\r\n\r\nmine")


@pytest.mark.parametrize(
    "interim",
    [b"HTTP/1.1 100 Continue\r\n\r\n", b"HTTP/1.1 103 Early Hints\r\nLink: </s.css>; rel=preload\r\n\r\n"],
    ids=["100-unasked", "103"],
)
async def test_interim_responses_are_dropped_and_the_final_one_relayed(tmp_path: Path, interim: bytes) -> None:
    a, b, _ = await _two_clients(tmp_path, interim + MINE, second_answer=OK)
    assert a.startswith(b"HTTP/1.1 200 OK\r\n") and a.endswith(b"mine")
    assert b"Link" not in a and b"Continue" not in a
    assert b.endswith(b"\r\n\r\nok")


@pytest.mark.parametrize(
    "answer",
    [
        b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n4\r\nmine\r\n0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\nContent-Length: 5\r\n\r\nmine!",
    ],
    ids=["cl-and-chunked", "two-lengths"],
)
async def test_ambiguous_responses_are_502_on_both_paths(tmp_path: Path, answer: bytes) -> None:
    async def handler(connection: RawConnection) -> None:
        while await connection.read_request() is not None:
            await connection.send(answer)

    answers = []
    async with RawUpstream(handler) as upstream:
        for fast in (True, False):
            config = config_on(tmp_path, upstream.port, f"amb-{fast}")
            async with serve_proxy(config, fast_forwarding=fast) as proxy:
                answers.append(normal(await raw(proxy.port, request("GET", "/x"))))
    assert _status(answers[0]) == b"HTTP/1.1 502 Bad Gateway", answers
    assert answers[0] == answers[1]


UNASKED_101 = b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: h2c\r\nConnection: upgrade\r\n\r\nsecret"


async def test_unasked_101_is_a_502_on_the_fast_path(tmp_path: Path) -> None:
    a, b, _ = await _two_clients(tmp_path, UNASKED_101, second_answer=MINE)
    assert _status(a) == b"HTTP/1.1 502 Bad Gateway" and b"secret" not in a
    assert b.endswith(b"\r\n\r\nmine")


@pytest.mark.xfail(
    strict=True,
    reason="the ordinary path relays an unasked 101 Switching Protocols to the client (aiohttp's client takes 101 as "
    "the final response), with Upgrade and Connection stripped; the fast path answers 502",
)
async def test_unasked_101_is_a_502_on_the_ordinary_path(tmp_path: Path) -> None:
    async def handler(connection: RawConnection) -> None:
        while await connection.read_request() is not None:
            await connection.send(UNASKED_101)

    async with (
        RawUpstream(handler) as upstream,
        serve_proxy(config_on(tmp_path, upstream.port, "101"), fast_forwarding=False) as proxy,
    ):
        answer = await raw(proxy.port, request("GET", "/x"))
    assert _status(answer) == b"HTTP/1.1 502 Bad Gateway", answer


async def test_upstream_connection_close_is_not_reused(tmp_path: Path) -> None:
    close = b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\nok"
    a, b, upstream = await _two_clients(tmp_path, close, second_answer=MINE)
    assert a.endswith(b"\r\n\r\nok") and b.endswith(b"\r\n\r\nmine")
    assert len(upstream.connections) == 2


async def test_early_response_before_the_body_closes_both_sides(tmp_path: Path) -> None:
    """The upstream answers (413-like) before it read the body: neither the client connection nor the upstream one may
    carry on, or the rest of the body would be read as the next request (client side) or the next response would be
    matched to the wrong request (upstream side)."""

    async def handler(connection: RawConnection) -> None:
        await connection.reader.readuntil(b"\r\n\r\n")
        await connection.send(b"HTTP/1.1 413 Too Large\r\nContent-Length: 3\r\n\r\nbig")
        await connection.reader.read()

    async with RawUpstream(handler) as upstream, serve_proxy(config_on(tmp_path, upstream.port, "e")) as proxy:
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
        writer.write(request("POST", "/up", b"Content-Length: 100000\r\n", b"x" * 10))
        await writer.drain()
        answer = await asyncio.wait_for(reader.read(), 5)  # until the proxy closes the client connection
        writer.close()
        await asyncio.wait_for(upstream.connections[0].closed.wait(), 5)
    assert answer.startswith(b"HTTP/1.1 413 Too Large\r\n") and answer.endswith(b"big")


# -- flow control: a client that stops reading -------------------------------------------------------------------


def _handler_for(proxy: RunningProxy, local_port: int) -> GuardedRequestHandler:
    server: Any = proxy.runner.server
    for handler in server.connections:
        transport = handler.transport
        if transport is not None and transport.get_extra_info("peername")[1] == local_port:
            assert isinstance(handler, GuardedRequestHandler)
            return handler
    raise AssertionError("no proxy connection for that client")


async def _until(check: Callable[[], bool], what: str, tries: int = 500) -> None:
    for _ in range(tries):
        if check():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"timed out waiting for {what}")


def _more_than(received: list[Any], before: int) -> bool:
    return len(received) > before


def _relayed(handler: GuardedRequestHandler) -> bool:
    return handler._exchange is None


async def _stalled_client(
    proxy: RunningProxy, upstream: RawUpstream
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, GuardedRequestHandler]:
    """A client that sends requests one by one and reads nothing, until the proxy paused writing to it at the end of
    a response (the response that crossed the high-water mark ended in the same read)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", proxy.port))
    reader, writer = await asyncio.open_connection(sock=sock)
    local_port = sock.getsockname()[1]
    handler: GuardedRequestHandler | None = None
    for n in range(400):
        before = len(upstream.received)
        writer.write(request("GET", f"/small?n={n}"))
        await writer.drain()
        await _until(functools.partial(_more_than, upstream.received, before), "the upstream to get the request")
        if handler is None:
            handler = _handler_for(proxy, local_port)
            sock_ = handler.transport.get_extra_info("socket") if handler.transport is not None else None
            assert sock_ is not None
            sock_.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)  # a client on a slow network
        await _until(functools.partial(_relayed, handler), "the response to be relayed")
        if handler.writing_paused:
            return reader, writer, handler
    raise AssertionError("the proxy never paused writing to a client that does not read")


SMALL = b"HTTP/1.1 200 OK\r\nContent-Length: 8192\r\n\r\n" + b"s" * 8192


async def test_a_connection_paused_for_a_slow_client_is_not_pooled_paused(tmp_path: Path) -> None:
    """The response that fills a stalled client's buffer ends in the same read from the upstream: its upstream
    connection goes back to the pool. It must go back reading — else the next client's request on it hangs until
    read_timeout (504), and a close by the upstream goes unnoticed."""
    n = 0

    async def handler(connection: RawConnection) -> None:
        nonlocal n
        while (received := await connection.read_request()) is not None:
            n += 1
            await connection.send(MINE if received.target == "/other" else SMALL)

    config = config_on(tmp_path, 0, "p", upstream={"read_timeout": 1})
    async with RawUpstream(handler) as upstream:
        config["upstream"]["url"] = f"http://127.0.0.1:{upstream.port}"
        async with serve_proxy(config) as proxy:
            _, writer, _ = await _stalled_client(proxy, upstream)
            other = await raw(proxy.port, request("GET", "/other"), quiet=3)
            writer.transport.abort()
    assert other.startswith(b"HTTP/1.1 200 OK\r\n"), other
    assert other.endswith(b"mine")


async def test_an_exchange_started_for_a_paused_client_reads_the_upstream_paused(tmp_path: Path) -> None:
    """A client whose connection the proxy has paused (its buffer between the low- and high-water marks) asks for a
    large response: the upstream must be read only as fast as the client takes it — the proxy's buffer for that
    client stays bounded (here: a 32 MiB response, the buffer must stay under 2 MiB)."""
    big = 32 << 20
    sent = asyncio.Event()

    async def handler(connection: RawConnection) -> None:
        while (received := await connection.read_request()) is not None:
            if received.target != "/big":
                await connection.send(SMALL)
                continue
            connection.writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % big)
            piece = b"b" * (1 << 20)
            for _ in range(big // len(piece)):
                connection.writer.write(piece)
                await connection.writer.drain()
            sent.set()

    async with RawUpstream(handler) as upstream, serve_proxy(config_on(tmp_path, upstream.port, "m")) as proxy:
        reader, writer, client = await _stalled_client(proxy, upstream)
        transport = client.transport
        assert transport is not None
        # Take a little, so that the buffer drops under the high-water mark but not to the low one: still paused.
        while transport.get_write_buffer_size() > 48 << 10:
            await reader.read(4096)
            await asyncio.sleep(0)
        await _until(lambda: transport.get_write_buffer_size() <= 48 << 10, "the buffer to drain a little")
        assert client.writing_paused
        writer.write(request("GET", "/big"))
        await writer.drain()
        peak = 0
        for _ in range(300):
            peak = max(peak, transport.get_write_buffer_size())
            if sent.is_set() or peak > 2 << 20:
                break
            await asyncio.sleep(0.01)
        writer.transport.abort()
    assert peak < 2 << 20, f"the proxy buffered {peak} bytes for a client that reads nothing"


# -- request side: the fast path against the ordinary one, on the same bytes -------------------------------------

ROUTES = {
    "routes": [
        {"path": "/public/", "allow_origins": ["*"], "policy": "public"},
        {"path": "/admin/", "allow_origins": ["https://admin.example.com"]},
        {"path": "/legacy/", "mode": "report-only"},
    ],
    "policies": {"public": {"allow_credentials": False}},
}


async def _echo(connection: RawConnection) -> None:
    """Answers every request with 200 and a body naming its target."""
    while (received := await connection.read_request()) is not None:
        body = received.target.encode("latin-1")
        head = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body)
        await connection.send(head if received.request_line.startswith("HEAD ") else head + body)


Pair = tuple[RawUpstream, int, int, list[Exchange]]


@pytest.fixture
async def pair(tmp_path: Path) -> AsyncIterator[Pair]:
    """One raw upstream; the routed config served with the forwarding fast path and without it."""
    taken: list[Exchange] = []
    async with contextlib.AsyncExitStack() as stack:
        upstream = await stack.enter_async_context(RawUpstream(_echo))
        ports = []
        for fast in (True, False):
            config = config_on(tmp_path, upstream.port, f"pair-{fast}", **ROUTES)
            config["limits"] = {"max_body_size": 1000, "max_header_size": 2048}
            proxy = await stack.enter_async_context(serve_proxy(config, fast_forwarding=fast))
            ports.append(proxy.port)
            if fast:
                count_exchanges(proxy.runner, taken)
        yield upstream, ports[0], ports[1], taken


async def _both(pair: Pair, payload: bytes) -> tuple[list[bytes], list[list[bytes]]]:
    """The client's answers and the upstream's received wire bytes, fast path first."""
    upstream, fast, plain, _ = pair
    answers, seen = [], []
    for port in (fast, plain):
        before = len(upstream.received)
        answers.append(normal(await raw(port, payload)))
        await asyncio.sleep(0.05)  # an upstream read still under way is recorded before the comparison
        seen.append([r.wire for r in upstream.received[before:]])
    return answers, seen


REFUSED: list[tuple[str, bytes]] = [
    ("cl-and-te", request("POST", "/x", b"Content-Length: 4\r\nTransfer-Encoding: chunked\r\n", b"0\r\n\r\n")),
    ("two-lengths", request("POST", "/x", b"Content-Length: 3\r\nContent-Length: 4\r\n", b"abcd")),
    ("length-list", request("POST", "/x", b"Content-Length: 3, 3\r\n", b"abc")),
    ("length-plus", request("POST", "/x", b"Content-Length: +3\r\n", b"abc")),
    ("te-chunked-identity", request("POST", "/x", b"Transfer-Encoding: chunked, identity\r\n", b"0\r\n\r\n")),
    ("te-twice", request("POST", "/x", b"Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n", b"0\r\n\r\n")),
    ("te-space-colon", request("POST", "/x", b"Transfer-Encoding : chunked\r\n", b"0\r\n\r\n")),
    ("obs-fold", request("GET", "/x", b"X-A: one\r\n two\r\n")),
    ("bare-lf-head", b"GET /x HTTP/1.1\nHost: proxy.test\n" + ORIGIN + b"\n"),
    ("bare-lf-line", b"GET /x HTTP/1.1\r\nHost: proxy.test\nX-A: 1\r\n" + ORIGIN + b"\r\n"),
    ("nul-in-value", request("GET", "/x", b"X-A: a\x00b\r\n")),
    ("cr-in-value", request("GET", "/x", b"X-A: a\rb\r\n")),
    ("huge-chunk-size", request("POST", "/x", b"Transfer-Encoding: chunked\r\n", b"ffffffffffffffffff\r\nabc\r\n")),
    ("bare-lf-chunk", request("POST", "/x", b"Transfer-Encoding: chunked\r\n", b"3\nabc\n0\n\n")),
    ("two-hosts", b"GET /x HTTP/1.1\r\nHost: a.test\r\nHost: b.test\r\n" + ORIGIN + b"\r\n"),
    ("space-in-name", request("GET", "/x", b"X A: 1\r\n")),
]


@pytest.mark.parametrize(("name", "payload"), REFUSED, ids=[name for name, _ in REFUSED])
async def test_smuggling_is_refused_alike_and_never_reaches_the_upstream(pair: Pair, name: str, payload: bytes) -> None:
    answers, seen = await _both(pair, payload)
    assert _status(answers[0])[9:13] == b"400 ", answers[0]
    assert answers[0] == answers[1]
    assert seen == [[], []]
    assert not pair[3], "the fast path took a request the parser refused"


FORWARDED: list[tuple[str, bytes]] = [
    ("chunk-extension", request("POST", "/x", b"Transfer-Encoding: chunked\r\n", b"3;ext=1\r\nabc\r\n0\r\n\r\n")),
    (
        "trailers",
        request("POST", "/x", b"Transfer-Encoding: chunked\r\n", b"3\r\nabc\r\n0\r\nX-Trailer: t\r\n\r\n"),
    ),
    ("get-with-body", request("GET", "/x", b"Content-Length: 5\r\n", b"hello")),
    ("delete-with-chunked-body", request("DELETE", "/x", b"Transfer-Encoding: chunked\r\n", b"2\r\nhi\r\n0\r\n\r\n")),
    ("head-with-body", request("HEAD", "/x", b"Content-Length: 2\r\n", b"hi")),
    (
        "pipelined-after-body",
        request("POST", "/x?n=1", b"Content-Length: 5\r\n", b"hello")
        + request("GET", "/x?n=2")
        + request("PUT", "/x?n=3", b"Transfer-Encoding: chunked\r\n", b"1\r\na\r\n0\r\n\r\n")
        + request("GET", "/x?n=4"),
    ),
    (
        "body-prefix-looks-like-request",
        request("POST", "/x", b"Content-Length: 24\r\n", b"GET /admin/ HTTP/1.1\r\n\r\n"),
    ),
    ("empty-host", b"GET /x HTTP/1.1\r\nHost:\r\n" + ORIGIN + b"\r\n"),
    ("no-host", b"GET /x HTTP/1.1\r\n" + ORIGIN + b"\r\n"),
    ("lowercase-host", b"GET /x HTTP/1.1\r\nhost: Proxy.Test:8080\r\n" + ORIGIN + b"\r\n"),
    (
        "untrusted-forwarding-spellings",
        request(
            "GET",
            "/x",
            b"X_Forwarded_For: 1.1.1.1\r\nX-Forwarded_Host: evil\r\nx_real_ip: 2.2.2.2\r\nFORWARDED: for=3.3.3.3\r\n"
            b"x-forwarded-proto: https\r\nTrue-Client-IP: 4.4.4.4\r\nX-Original-URL: /admin/\r\n",
        ),
    ),
    (
        "connection-names-fields",
        request("GET", "/x", b"Connection: X-Forwarded-For, x-a\r\nX-Forwarded-For: 9.9.9.9\r\nX-A: 1\r\n"),
    ),
    # Both paths accept these (aiohttp's parser frames them as chunked) and forward one re-framed request;
    # the README lists both as refused.
    ("te-identity-chunked", request("POST", "/x", b"Transfer-Encoding: identity, chunked\r\n", b"0\r\n\r\n")),
    ("chunked-http10", b"POST /x HTTP/1.0\r\nTransfer-Encoding: chunked\r\n" + ORIGIN + b"\r\n0\r\n\r\n"),
    ("names-differing-in-case", request("GET", "/x", b"Cookie: a=1\r\ncookie: b=2\r\nCOOKIE: c=3\r\n")),
    ("many-headers", request("GET", "/x", b"".join(b"X-H%d: %d\r\n" % (i, i) for i in range(90)))),
    ("encoded-slash-query", request("GET", "/x/%2F/y?q=%2e%2e&q=2")),
    ("empty-value", request("GET", "/x", b"X-Empty:\r\nX-Space:   \r\n")),
]


@pytest.mark.parametrize(("name", "payload"), FORWARDED, ids=[name for name, _ in FORWARDED])
async def test_odd_requests_are_forwarded_alike(pair: Pair, name: str, payload: bytes) -> None:
    answers, seen = await _both(pair, payload)
    assert answers[0].startswith(b"HTTP/1."), answers[0]
    assert answers[0] == answers[1], answers
    assert seen[0] == seen[1]


TARGETS = [
    "/admin/%2e%2e/public/x",
    "/public/..;/admin/x",
    "/public/%2e%2e/admin/",
    "/public/%252e%252e/admin/",
    "/public\\..\\admin/",
    "/public/%u002e%u002e/admin/",
    "/public/%5c..%5cadmin/",
    "//admin/",
    "/PUBLIC/../admin/",
    "/public/x#frag",
    "/admin/x#/public/",
    "*",
    "http://evil.test/admin/",
    "http://proxy.test/public/x",
    "/legacy/x",
    "/admin/x",
    "/public/x",
]


@pytest.mark.parametrize("target", TARGETS)
async def test_path_tricks_are_answered_alike(pair: Pair, target: str) -> None:
    for method in ("GET", "POST"):
        payload = request(method, target, b"Content-Length: 0\r\n" if method == "POST" else b"")
        answers, seen = await _both(pair, payload)
        assert answers[0] == answers[1], (method, target)
        assert seen[0] == seen[1], (method, target)


@pytest.mark.parametrize(
    "payload",
    [
        request("GET", "/x", b"X-Big: " + b"a" * 2100 + b"\r\n"),
        request("GET", "/x" + "a" * 2100),
        request("GET", "/x", b"X-Big: " + b"a" * 5000 + b"\r\n"),
        request("POST", "/x", b"Content-Length: 1001\r\n", b"a" * 1001),
        request("POST", "/x", b"Transfer-Encoding: chunked\r\n", b"3e9\r\n" + b"a" * 1001 + b"\r\n0\r\n\r\n"),
    ],
    ids=["431", "414", "431-past-parser", "413-length", "413-chunked"],
)
async def test_limits_answer_alike(pair: Pair, payload: bytes) -> None:
    answers, seen = await _both(pair, payload)
    assert _status(answers[0])[9:12] in (b"413", b"414", b"431"), answers[0]
    assert answers[0] == answers[1]
    assert all(not any(r.endswith(b"a" * 1001) for r in s) for s in seen)  # no complete over-limit body upstream


OBS_TEXT = [b"X-A: caf\xe9 \xff\r\n", "X-A: café\r\n".encode()]


@pytest.mark.parametrize("line", OBS_TEXT, ids=["latin-1", "utf-8"])
async def test_fast_path_forwards_non_ascii_header_bytes_exactly(pair: Pair, line: bytes) -> None:
    _, seen = await _both(pair, request("GET", "/x", line))
    assert len(pair[3]) == 1
    assert line in seen[0][0]


@pytest.mark.xfail(
    strict=True,
    reason="the ordinary path re-encodes non-ASCII header bytes (latin-1 decoded, then written as UTF-8 by aiohttp's "
    "client): é arrives as C3 A9 for E9, and UTF-8 input is double-encoded; the fast path keeps the bytes",
)
@pytest.mark.parametrize("line", OBS_TEXT, ids=["latin-1", "utf-8"])
async def test_ordinary_path_forwards_non_ascii_header_bytes_like_the_fast_path(pair: Pair, line: bytes) -> None:
    _, seen = await _both(pair, request("GET", "/x", line))
    assert seen[0] == seen[1]


async def test_non_latin1_target_is_answered_without_a_traceback(pair: Pair, caplog: pytest.LogCaptureFixture) -> None:
    """A target with UTF-8 bytes (which the parser hands over decoded) must be answered alike — and a client must not
    be able to make the proxy log a traceback per request."""
    payload = b"GET /caf\xc3\xa9/\xe2\x82\xac HTTP/1.1\r\nHost: proxy.test\r\n" + ORIGIN + b"\r\n"
    answers, seen = await _both(pair, payload)
    assert answers[0] == answers[1]
    assert seen[0] == seen[1]
    assert not [r for r in caplog.records if r.exc_info], [r.getMessage() for r in caplog.records]


# -- pool, aborts, timeouts -----------------------------------------------------------------------------------------


async def test_a_full_pool_makes_waiters_504_and_then_recovers(tmp_path: Path) -> None:
    """max_upstream_connections 1: while one response hangs, other requests wait up to connect_timeout and get 504;
    when the hanging one ends, the pool serves again (no slot leaked by the waiters that gave up)."""
    release = asyncio.Event()

    async def handler(connection: RawConnection) -> None:
        while (received := await connection.read_request()) is not None:
            if received.target == "/hang":
                await release.wait()
            await connection.send(MINE)

    config = config_on(tmp_path, 0, "pool", limits={"max_upstream_connections": 1})
    config["upstream"]["connect_timeout"] = 0.5
    async with RawUpstream(handler) as upstream:
        config["upstream"]["url"] = f"http://127.0.0.1:{upstream.port}"
        async with serve_proxy(config) as proxy:
            hanging = asyncio.create_task(raw(proxy.port, request("GET", "/hang"), quiet=5))
            await _until(lambda: len(upstream.received) == 1, "the hanging request to arrive")
            waiters = await asyncio.gather(*(raw(proxy.port, request("GET", f"/w{i}")) for i in range(5)))
            release.set()
            first = await hanging
            after = await raw(proxy.port, request("GET", "/after"))
    assert all(_status(w) == b"HTTP/1.1 504 Gateway Timeout" for w in waiters), waiters
    assert first.endswith(b"mine") and after.endswith(b"mine")
    assert upstream.max_active == 1


async def test_client_abort_mid_upload_closes_the_upstream_connection(tmp_path: Path) -> None:
    """The client sends half its body and leaves: the upstream must see the connection close with the request
    incomplete — never a complete request, and the connection never reused for the next client."""

    async def handler(connection: RawConnection) -> None:
        while await connection.read_request() is not None:
            await connection.send(MINE)

    async with RawUpstream(handler) as upstream, serve_proxy(config_on(tmp_path, upstream.port, "up")) as proxy:
        _, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
        writer.write(request("POST", "/up", b"Content-Length: 1000\r\n", b"x" * 400))
        await writer.drain()
        await _until(lambda: bool(upstream.connections), "the upstream connection")
        await asyncio.sleep(0.1)
        writer.transport.abort()
        await asyncio.wait_for(upstream.connections[0].closed.wait(), 5)
        after = await raw(proxy.port, request("GET", "/after"))
    assert after.endswith(b"mine")
    assert [r.complete for r in upstream.received] == [False, True]
    assert len(upstream.connections) == 2


async def test_client_abort_mid_response_never_hands_the_rest_to_the_next_client(tmp_path: Path) -> None:
    """Client A leaves after the first bytes of a long response: the rest must not reach client B on a reused
    connection."""
    first = asyncio.Event()

    async def handler(connection: RawConnection) -> None:
        while (received := await connection.read_request()) is not None:
            if received.target == "/long":
                await connection.send(b"HTTP/1.1 200 OK\r\nContent-Length: 20000\r\n\r\n" + b"A" * 100)
                first.set()
                await asyncio.sleep(0.3)
                with contextlib.suppress(ConnectionError):
                    await connection.send(b"A" * 19900)
            else:
                await connection.send(MINE)

    async with RawUpstream(handler) as upstream, serve_proxy(config_on(tmp_path, upstream.port, "ab")) as proxy:
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
        writer.write(request("GET", "/long"))
        await asyncio.wait_for(first.wait(), 5)
        await asyncio.wait_for(reader.readuntil(b"AAAA"), 5)
        writer.transport.abort()
        b = await raw(proxy.port, request("GET", "/b"))
    assert b.endswith(b"\r\n\r\nmine") and b"AAAA" not in b


async def test_upstream_stalling_mid_body_aborts_the_client(tmp_path: Path) -> None:
    async def handler(connection: RawConnection) -> None:
        while await connection.read_request() is not None:
            await connection.send(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nsome")
            await connection.reader.read()

    async with (
        RawUpstream(handler) as upstream,
        serve_proxy(config_on(tmp_path, upstream.port, "st", upstream={"read_timeout": 0.5})) as proxy,
    ):
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
        writer.write(request("GET", "/x"))
        answer = await asyncio.wait_for(reader.read(), 5)  # ends when the proxy aborts the connection
        writer.close()
        await asyncio.wait_for(upstream.connections[0].closed.wait(), 5)
    assert answer.startswith(b"HTTP/1.1 200 OK\r\n") and answer.endswith(b"some")


# -- CORS headers on actual responses ------------------------------------------------------------------------------

CORS_ANSWER = (
    b"HTTP/1.1 200 OK\r\nVary: Accept-Encoding\r\nvary: Origin, Cookie\r\nAccess-Control-Allow-Origin: *\r\n"
    b"Access-Control-Allow-Credentials: true\r\nAccess-Control-Expose-Headers: x-secret\r\n"
    b"Access-Control-Allow-Methods: DELETE\r\nX-Secret: s\r\nX-Request-Id: 1\r\nSet-Cookie: a=1\r\n"
    b"Content-Length: 2\r\n\r\nok"
)


@pytest.mark.parametrize(
    "cors",
    [
        {},
        {"expose_headers": ["*"]},
        {"expose_headers": ["*"], "allow_credentials": False},
        {"allow_origins": ["*"], "allow_credentials": False},
    ],
    ids=["default", "expose-star-credentials", "expose-star", "any-origin"],
)
@pytest.mark.parametrize("origin", [ORIGIN, b"Origin: https://evil.test\r\n", b""], ids=["allowed", "refused", "none"])
async def test_cors_headers_on_actual_responses_alike(tmp_path: Path, cors: dict[str, Any], origin: bytes) -> None:
    async def handler(connection: RawConnection) -> None:
        while await connection.read_request() is not None:
            await connection.send(CORS_ANSWER)

    answers = []
    async with RawUpstream(handler) as upstream:
        for fast in (True, False):
            taken: list[Exchange] = []
            config = config_on(tmp_path, upstream.port, f"cors-{fast}", cors=cors)
            async with serve_proxy(config, fast_forwarding=fast) as proxy:
                if fast:
                    count_exchanges(proxy.runner, taken)
                payload = b"GET /x HTTP/1.1\r\nHost: proxy.test\r\n" + origin + b"Cookie: c=1\r\n\r\n"
                answers.append(normal(await raw(proxy.port, payload)))
            assert taken or not fast
    assert answers[0] == answers[1]
    lines = answers[0].split(b"\r\n\r\n")[0].lower().split(b"\r\n")
    given = [line for line in lines if line.startswith(b"access-control-")]
    assert b"access-control-allow-methods: delete" not in given  # the upstream's own CORS headers never pass
    assert len([line for line in lines if line.startswith(b"access-control-allow-origin")]) <= 1
    assert not (b"access-control-allow-origin: *" in given and b"access-control-allow-credentials: true" in given)
    assert all(b"set-cookie" not in line for line in given)
    assert [line for line in lines if line.startswith(b"vary")] == [b"vary: accept-encoding, origin, cookie"]
    if origin != ORIGIN:
        assert not given or given == [b"access-control-allow-origin: *", b"access-control-expose-headers: x-request-id"]


ODD_RESPONSES: list[tuple[str, bytes]] = [
    ("nul-in-value", b"HTTP/1.1 200 OK\r\nX-A: a\x00b\r\nContent-Length: 2\r\n\r\nok"),
    ("big-header", b"HTTP/1.1 200 OK\r\nX-Big: " + b"a" * 9000 + b"\r\nContent-Length: 2\r\n\r\nok"),
    ("many-headers", b"HTTP/1.1 200 OK\r\n" + b"".join(b"X-%d: %d\r\n" % (i, i) for i in range(200))
     + b"Content-Length: 2\r\n\r\nok"),
    ("long-reason", b"HTTP/1.1 200 " + b"r" * 9000 + b"\r\nContent-Length: 2\r\n\r\nok"),
    ("endless-header-value", b"HTTP/1.1 200 OK\r\nX-A: " + b"a" * (3 << 20)),
    ("status-600", b"HTTP/1.1 600 Odd\r\nContent-Length: 2\r\n\r\nok"),
    ("status-099", b"HTTP/1.1 099 Odd\r\nContent-Length: 2\r\n\r\nok"),
    ("http10-no-length", b"HTTP/1.0 200 OK\r\n\r\nuntil close"),
    ("length-negative", b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\nok"),
    ("length-list", b"HTTP/1.1 200 OK\r\nContent-Length: 2, 2\r\n\r\nok"),
    ("length-twice-same", b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 2\r\n\r\nok"),
    ("te-gzip-only", b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\nuntil close"),
]  # fmt: skip


async def _fast_and_plain(tmp_path: Path, answer: bytes, name: str) -> list[bytes]:
    async def handler(connection: RawConnection) -> None:
        while await connection.read_request() is not None:
            await connection.send(answer)
            if b"until close" in answer:
                return

    answers = []
    async with RawUpstream(handler) as upstream:
        for fast in (True, False):
            config = config_on(tmp_path, upstream.port, f"{name}-{fast}")
            async with serve_proxy(config, fast_forwarding=fast) as proxy:
                answers.append(normal(await raw(proxy.port, request("GET", "/x"))))
    return answers


@pytest.mark.parametrize(("name", "answer"), ODD_RESPONSES, ids=[name for name, _ in ODD_RESPONSES])
async def test_odd_responses_are_relayed_or_refused_alike(tmp_path: Path, name: str, answer: bytes) -> None:
    answers = await _fast_and_plain(tmp_path, answer, name)
    assert answers[0] == answers[1], answers


#: Responses the fast path's parser (llhttp, strict) refuses with 502 where the ordinary path's (lenient) relays.
STRICTER: list[tuple[str, bytes]] = [
    ("obs-fold", b"HTTP/1.1 200 OK\r\nX-A: one\r\n two\r\nContent-Length: 2\r\n\r\nok"),
    ("bare-lf", b"HTTP/1.1 200 OK\nContent-Length: 2\n\nok"),
    ("space-before-colon", b"HTTP/1.1 200 OK\r\nContent-Length : 2\r\n\r\nok"),
]


@pytest.mark.parametrize(("name", "answer"), STRICTER, ids=[name for name, _ in STRICTER])
async def test_lax_responses_are_502_on_the_fast_path(tmp_path: Path, name: str, answer: bytes) -> None:
    fast, _ = await _fast_and_plain(tmp_path, answer, name)
    assert _status(fast) == b"HTTP/1.1 502 Bad Gateway", fast


@pytest.mark.xfail(
    strict=True,
    reason="the ordinary path relays 'Content-Length : 2' (space before the colon) as a header of its own next to "
    "the Transfer-Encoding: chunked it frames the body with: a lenient client or cache behind corsproxy may take it "
    "as the length (response splitting); the fast path answers 502",
)
async def test_space_before_colon_in_a_response_is_not_relayed_by_the_ordinary_path(tmp_path: Path) -> None:
    _, plain = await _fast_and_plain(tmp_path, dict(STRICTER)["space-before-colon"], "sbc")
    assert b"Content-Length :" not in plain


async def test_bad_chunk_after_the_head_is_never_a_complete_response(tmp_path: Path) -> None:
    """The fast path relays the head as soon as it is parsed, so a bad chunk size in the same read ends in an abort
    (the ordinary path, which parses the whole read first, answers 502): either way, never a complete response."""
    answer = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nok\r\n0\r\n\r\n"
    fast, plain = await _fast_and_plain(tmp_path, answer, "badchunk")
    assert _status(plain) == b"HTTP/1.1 502 Bad Gateway"
    assert _status(fast) == b"HTTP/1.1 502 Bad Gateway" or not fast.endswith(b"0\r\n\r\n"), fast


FORWARDING_HEADS = [
    b"Host: proxy.test\r\n",
    b"Host: PROXY.test:8443\r\nX-Forwarded-For: 10.0.0.1\r\nX-Forwarded-Host: front.test\r\n"
    b"X-Forwarded-Proto: https\r\n",
    b"Host:\r\nX-Forwarded-For: 10.0.0.1, 10.0.0.2\r\nx-forwarded-for: 10.0.0.3\r\nForwarded: for=1.2.3.4\r\n",
    b"host: p.test\r\nX_Forwarded_For: 6.6.6.6\r\nX-Real-IP: 6.6.6.6\r\nX-Forwarded-Port: 1\r\n",
]


@pytest.mark.parametrize("trusted", [True, False], ids=["trusted", "untrusted"])
@pytest.mark.parametrize("head", FORWARDING_HEADS, ids=["plain", "chain", "empty-host-repeats", "spellings"])
async def test_preserve_host_and_forwarded_fields_alike(tmp_path: Path, trusted: bool, head: bytes) -> None:
    forwarding = {"preserve_host": True, "trusted_proxies": ["127.0.0.1/32"] if trusted else []}
    seen = []
    async with RawUpstream(_echo) as upstream:
        for fast in (True, False):
            taken: list[Exchange] = []
            config = config_on(tmp_path, upstream.port, f"fw-{fast}", forwarding=forwarding)
            async with serve_proxy(config, fast_forwarding=fast) as proxy:
                if fast:
                    count_exchanges(proxy.runner, taken)
                before = len(upstream.received)
                await raw(proxy.port, b"GET /x HTTP/1.1\r\n" + head + ORIGIN + b"\r\n")
                seen.append([r.wire for r in upstream.received[before:]])
            assert taken or not fast
    assert seen[0] == seen[1]
    assert len(seen[0]) == 1


def test_fast_path_forwards_under_uvloop(tmp_path: Path) -> None:
    """`corsproxy serve` runs uvloop when it is installed; its transports are not asyncio.Transport subclasses, and the
    upstream pool must still connect (it asserted the class, so every fast-path request waited for a 504)."""
    uvloop = pytest.importorskip("uvloop")
    taken: list[Exchange] = []

    async def main() -> bytes:
        async with RawUpstream() as upstream:
            config = config_on(tmp_path, upstream.port, "uv", upstream={"read_timeout": 3, "connect_timeout": 3})
            async with serve_proxy(config) as proxy:
                count_exchanges(proxy.runner, taken)
                return await raw(proxy.port, request("GET", "/x"), quiet=5)

    result: list[bytes] = []
    thread = threading.Thread(target=lambda: result.append(uvloop.run(main())))
    thread.start()
    thread.join(30)
    assert result, "the uvloop run did not finish"
    assert len(taken) == 1
    assert result[0].startswith(b"HTTP/1.1 200 OK\r\n") and result[0].endswith(b"\r\n\r\nok")
