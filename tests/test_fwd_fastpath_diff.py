"""The forwarding fast path (corsproxy.http.forward) must forward exactly like the ordinary handler: for the same
requests, byte-for-byte the same request at the upstream (request line, every header line in order and spelling,
body) and the same response at the client (``Date`` aside, chunk boundaries aside) — and it must really be the path
that answered, which is counted by wrapping the runner's forwarder.

Both proxies talk to one raw-socket upstream (tests/support/raw_upstream.py) that records what each connection
delivers and answers with scripted bytes.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from corsproxy.http.forward import Exchange
from corsproxy.http.upstream import UpstreamConnection, UpstreamPool
from tests.support.config import BASE_CONFIG, merge
from tests.support.fwd import count_exchanges, normal, raw, request
from tests.support.inprocess import serve_proxy
from tests.support.raw_upstream import RawConnection, RawUpstream

#: What the scripted upstream answers, by the request target's first segment.
ANSWERS: dict[str, bytes] = {
    "ok": b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nX-Request-Id: 7\r\n\r\nok",
    "chunked": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nVary: Accept\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
    "nocontent": b"HTTP/1.1 204 No Content\r\nX-A: 1\r\n\r\n",
    "notmodified": b'HTTP/1.1 304 Not Modified\r\nETag: "x"\r\nContent-Length: 12\r\n\r\n',
    "cors": (
        b"HTTP/1.1 201 Created\r\nAccess-Control-Allow-Origin: *\r\nSet-Cookie: a=1\r\nset-cookie: b=2\r\n"
        b"Content-Type: text/plain\r\nConnection: x-hop\r\nX-Hop: gone\r\nServer: up\r\nContent-Length: 3\r\n\r\nabc"
    ),
    "reason": b"HTTP/1.1 299 Odd Thing\r\nContent-Length: 0\r\n\r\n",
    "bad": b"NOT HTTP AT ALL\r\n\r\n",
    "eof": b"HTTP/1.1 200 OK\r\nX-Eof: 1\r\n\r\nuntil the end",
}


def _answer_for(target: str) -> bytes:
    key = target.split("/")[1].split("?", maxsplit=1)[0] if target.count("/") else "ok"
    return ANSWERS.get(key, ANSWERS["ok"])


async def scripted(connection: RawConnection) -> None:
    while (received := await connection.read_request()) is not None:
        answer = _answer_for(received.target)
        if received.request_line.startswith("HEAD "):
            answer = answer[: answer.index(b"\r\n\r\n") + 4]
        await connection.send(answer)
        if answer in (ANSWERS["eof"], ANSWERS["bad"]):
            return  # close-delimited (or garbage): the connection ends here


@pytest.fixture
async def pair(tmp_path: Path) -> AsyncIterator[tuple[RawUpstream, int, int, list[Exchange]]]:
    """One upstream; the same config served with the forwarding fast path (as `serve` does) and without it."""
    taken: list[Exchange] = []
    async with contextlib.AsyncExitStack() as stack:
        upstream = await stack.enter_async_context(RawUpstream(scripted))
        ports = []
        for fast in (True, False):
            data = merge(
                BASE_CONFIG,
                {
                    "upstream": {"url": f"http://127.0.0.1:{upstream.port}"},
                    "store": {"path": str(tmp_path / f"db-{fast}")},
                },
            )
            proxy = await stack.enter_async_context(serve_proxy(data, fast_forwarding=fast))
            ports.append(proxy.port)
            if fast:
                count_exchanges(proxy.runner, taken)
        yield upstream, ports[0], ports[1], taken


CASES: list[tuple[str, bytes]] = [
    ("get", request("GET", "/ok?x=1&y=%20")),
    ("head", request("HEAD", "/ok")),
    ("delete", request("DELETE", "/ok/item")),
    ("options-actual", request("OPTIONS", "/ok")),
    ("post-empty", request("POST", "/ok")),
    ("post-length", request("POST", "/ok", b"Content-Type: application/json\r\nContent-Length: 7\r\n", b'{"a":1}')),
    ("put-length-zero", request("PUT", "/ok", b"Content-Length: 0\r\n")),
    (
        "patch-chunked",
        request("PATCH", "/ok", b"Transfer-Encoding: chunked\r\n", b"3\r\nabc\r\n0\r\n\r\n"),
    ),
    (
        "mixed-case-repeats",
        request("GET", "/ok", b"X-Dup: first\r\nX-Dup: second\r\nx-dup: third\r\nX-Other: o\r\nx-DUP: fourth\r\n"),
    ),
    (
        "hop-by-hop",
        request(
            "GET",
            "/ok",
            b"Connection: keep-alive, X-Secret\r\nX-Secret: s\r\nKeep-Alive: 5\r\nTE: trailers\r\n"
            b"X-Forwarded-For: 6.6.6.6\r\nX-Real-IP: 6.6.6.6\r\nX_Forwarded_For: 1.1.1.1\r\nProxy-Authorization: x\r\n",
        ),
    ),
    ("no-origin", b"GET /ok HTTP/1.1\r\nHost: proxy.test\r\n\r\n"),
    ("refused-origin", b"GET /ok HTTP/1.1\r\nHost: proxy.test\r\nOrigin: https://evil.test\r\n\r\n"),
    ("chunked-response", request("GET", "/chunked")),
    ("head-chunked-response", request("HEAD", "/chunked")),
    ("204", request("GET", "/nocontent")),
    ("304", request("GET", "/notmodified", b'If-None-Match: "x"\r\n')),
    ("upstream-cors-and-cookies", request("POST", "/cors", b"Content-Length: 1\r\n", b"z")),
    ("reason-phrase", request("GET", "/reason")),
    ("bad-response", request("GET", "/bad")),
    ("close-delimited", request("GET", "/eof")),
]


@pytest.mark.parametrize(("name", "payload"), CASES, ids=[name for name, _ in CASES])
async def test_same_upstream_request_and_client_response(
    pair: tuple[RawUpstream, int, int, list[Exchange]], name: str, payload: bytes
) -> None:
    upstream, fast, plain, taken = pair
    answers = []
    seen = []
    for port in (fast, plain):
        before = len(upstream.received)
        answers.append(normal(await raw(port, payload)))
        seen.append(upstream.received[before:])
    assert len(taken) == 1, "the fast proxy did not forward this request itself"
    assert answers[0] == answers[1]
    assert answers[0].startswith(b"HTTP/1.1 ")
    assert [r.head for r in seen[0]] == [r.head for r in seen[1]]
    assert [r.body for r in seen[0]] == [r.body for r in seen[1]]
    assert len(seen[0]) == 1


async def test_mixed_case_repeated_lines_reach_the_upstream_as_received(
    pair: tuple[RawUpstream, int, int, list[Exchange]],
) -> None:
    upstream, fast, _, taken = pair
    await raw(fast, dict(CASES)["mixed-case-repeats"])
    assert len(taken) == 1
    head = upstream.received[-1].head.split(b"\r\n")
    lines = [line for line in head if line.lower().startswith(b"x-") and not line.lower().startswith(b"x-forwarded-")]
    assert lines == [b"X-Dup: first", b"X-Dup: second", b"x-dup: third", b"X-Other: o", b"x-DUP: fourth"]


async def test_pipelined_requests_are_answered_in_order(pair: tuple[RawUpstream, int, int, list[Exchange]]) -> None:
    upstream, fast, plain, taken = pair
    payload = (
        request("GET", "/ok?n=1")
        + request("POST", "/chunked?n=2", b"Content-Length: 3\r\n", b"abc")
        + request("OPTIONS", "/ok", b"Access-Control-Request-Method: PUT\r\n")  # a preflight between them
        + request("GET", "/nocontent?n=3")
        + request("GET", "/ok?n=4", b"Expect: 100-continue\r\n")  # the ordinary path answers this one
        + request("GET", "/ok?n=5")
    )
    answers = []
    targets = []
    for port in (fast, plain):
        before = len(upstream.received)
        answers.append(normal(await raw(port, payload)))
        targets.append([r.target for r in upstream.received[before:]])
    assert answers[0] == answers[1]
    assert answers[0].count(b"HTTP/1.1 ") == 6
    assert targets[0] == targets[1] == ["/ok?n=1", "/chunked?n=2", "/nocontent?n=3", "/ok?n=4", "/ok?n=5"]
    assert len(taken) >= 3


async def test_upstream_unreachable_and_timeout_answer_alike(tmp_path: Path) -> None:
    """502 when nothing listens, 504 when the upstream never answers: the same bytes on both paths."""
    hang = asyncio.Event()

    async def silent(connection: RawConnection) -> None:
        await connection.read_request()
        await hang.wait()

    async with RawUpstream(silent) as upstream:
        for url, status in (("http://127.0.0.1:9", b"502"), (f"http://127.0.0.1:{upstream.port}", b"504")):
            answers = []
            for fast in (True, False):
                data = merge(
                    BASE_CONFIG,
                    {
                        "upstream": {"url": url, "read_timeout": 0.5, "connect_timeout": 1},
                        "store": {"path": str(tmp_path / f"db-{fast}-{status.decode()}")},
                    },
                )
                async with serve_proxy(data, fast_forwarding=fast) as proxy:
                    answers.append(normal(await raw(proxy.port, request("GET", "/ok"))))
            assert answers[0] == answers[1]
            assert answers[0].startswith(b"HTTP/1.1 " + status)
        hang.set()


async def test_upstream_dying_mid_body_aborts_the_client(tmp_path: Path) -> None:
    async def dies(connection: RawConnection) -> None:
        await connection.read_request()
        await connection.send(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\npartial")
        connection.writer.transport.abort()

    async with RawUpstream(dies) as upstream:
        data = merge(
            BASE_CONFIG,
            {"upstream": {"url": f"http://127.0.0.1:{upstream.port}"}, "store": {"path": str(tmp_path / "db")}},
        )
        async with serve_proxy(data) as proxy:
            answer = await raw(proxy.port, request("GET", "/ok"))
    assert answer.startswith(b"HTTP/1.1 200 OK\r\n")
    assert answer.endswith(b"partial")  # and then the connection was cut: 7 of 100 bytes, no more


async def test_client_abort_closes_the_upstream_connection(tmp_path: Path) -> None:
    stalled = asyncio.Event()

    async def slow(connection: RawConnection) -> None:
        await connection.read_request()
        await connection.send(b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\nfirst")
        stalled.set()
        await connection.reader.read()  # until the proxy closes its side

    async with RawUpstream(slow) as upstream:
        data = merge(
            BASE_CONFIG,
            {"upstream": {"url": f"http://127.0.0.1:{upstream.port}"}, "store": {"path": str(tmp_path / "db")}},
        )
        async with serve_proxy(data) as proxy:
            reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
            writer.write(request("GET", "/ok"))
            await asyncio.wait_for(stalled.wait(), 5)
            await asyncio.wait_for(reader.readuntil(b"first"), 5)
            writer.transport.abort()
            await asyncio.wait_for(upstream.connections[0].closed.wait(), 5)


async def test_a_client_that_does_not_read_holds_bounded_memory_and_stalls_nobody(tmp_path: Path) -> None:
    """A 64 MiB download to a client that stops reading: the fast path stops reading the upstream (its client-side
    write buffer stays small, the upstream is left unable to send the rest), while another client is served."""
    total = 64 << 20
    sent = [0]
    piece = b"x" * (1 << 16)

    async def big(connection: RawConnection) -> None:
        received = await connection.read_request()
        if received is None:
            return
        if received.target != "/big":
            await connection.send(ANSWERS["ok"])
            while await connection.read_request() is not None:
                await connection.send(ANSWERS["ok"])
            return
        await connection.send(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % total)
        while sent[0] < total:
            await connection.send(piece)
            sent[0] += len(piece)

    async with RawUpstream(big) as upstream:
        data = merge(
            BASE_CONFIG,
            {"upstream": {"url": f"http://127.0.0.1:{upstream.port}"}, "store": {"path": str(tmp_path / "db")}},
        )
        async with serve_proxy(data) as proxy:
            taken: list[Exchange] = []
            count_exchanges(proxy.runner, taken)
            reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
            writer.write(request("GET", "/big"))
            await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
            # Wait (bounded) until the upstream cannot send any more: the proxy stopped reading it.
            last = -1
            for _ in range(200):
                await asyncio.sleep(0.05)
                if sent[0] == last:
                    break
                last = sent[0]
            server: Any = proxy.runner.server
            buffered = max(c.transport.get_write_buffer_size() for c in server._connections if c.transport)
            assert buffered <= 1 << 20
            assert sent[0] < total
            # Another client is answered meanwhile.
            for _ in range(3):
                answer = await raw(proxy.port, request("GET", "/ok"))
                assert answer.startswith(b"HTTP/1.1 200 OK\r\n") and answer.endswith(b"ok")
            assert len(taken) == 4
            writer.close()


class _PausingSink:
    """An exchange whose client fills up at the response head: it pauses the upstream connection's reading there."""

    def __init__(self, connection: UpstreamConnection) -> None:
        self.connection = connection
        self.ended = asyncio.Event()
        self.failed: BaseException | None = None

    def response_head(self, status: int, reason: bytes, headers: list[tuple[bytes, bytes]]) -> None:
        self.connection.pause_reading()

    def response_body(self, data: bytes) -> None:
        pass

    def response_flush(self) -> None:
        pass

    def response_end(self) -> None:
        self.ended.set()

    def upstream_failed(self, exc: BaseException | None) -> None:
        self.failed = exc or ConnectionError("closed")
        self.ended.set()

    def upstream_writable(self) -> None:
        pass

    def upstream_timed_out(self) -> None:
        self.failed = TimeoutError()
        self.ended.set()


async def test_a_connection_paused_when_its_response_ended_is_reusable() -> None:
    """A response whose end arrives in the same read as the client's pause leaves the upstream connection paused as it
    goes back to the pool; the next exchange on it must still read its response (not wait for a read timeout)."""
    async with RawUpstream() as upstream:
        pool = UpstreamPool("127.0.0.1", upstream.port, None, 4, asyncio.get_running_loop())
        try:
            connection = await pool.acquire(5)
            for _ in range(2):
                sink = _PausingSink(connection)
                connection.begin(sink, False, 5.0)
                connection.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
                await asyncio.wait_for(sink.ended.wait(), 5)
                assert sink.failed is None
                assert pool.idle() is connection  # back in the pool, and handed out again
        finally:
            pool.close()
