"""A second round of attacks on the forwarding and preflight fast paths: requests taken in the window before aiohttp's
request loop waits, bodies buffered with their heads, plans kept per request head, response heads held to the end of
an upstream read, and the request log's kept line pieces.

The ordinary path (``fast_forwarding=False``) is the reference wherever both paths answer the same bytes. Memory bounds
are checked on the caches themselves: what a client can make them hold must not grow with what it sends.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import logging
import re
import socket
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from corsproxy.core.decision import Decision, Kind, Reason
from corsproxy.core.log_limit import LineLimiter
from corsproxy.core.outcome import Outcome
from corsproxy.core.settings import Logging
from corsproxy.http.forward import Exchange, Forwarder
from corsproxy.ops.request_log import JsonFormatter, RequestLog, TextFormatter
from tests.support.fwd import ORIGIN, config_on, count_exchanges, normal, raw, request
from tests.support.inprocess import RunningProxy, serve_proxy
from tests.support.raw_upstream import OK, RawConnection, RawUpstream

try:
    import uvloop

    _HAVE_UVLOOP = True
except ImportError:  # the oldest-aiohttp CI run has no uvloop
    _HAVE_UVLOOP = False

LOOPS = ["asyncio", pytest.param("uvloop", marks=pytest.mark.skipif(not _HAVE_UVLOOP, reason="uvloop not installed"))]


def _run(loop: str, scenario: Callable[[], Coroutine[Any, Any, None]]) -> None:
    runner = uvloop.run if loop == "uvloop" else asyncio.run
    runner(asyncio.wait_for(scenario(), 60))


def _forwarder(proxy: RunningProxy) -> Forwarder:
    forwarder = proxy.runner._forwarder
    assert forwarder is not None
    return forwarder


def _plan_bytes(forwarder: Forwarder) -> int:
    """Bytes of request heads the forwarder's plans keep: the keys' header lines and targets, the upstream heads."""
    held = 0
    for key, plan in forwarder._plans.items():
        held += len(key[1]) + sum(len(name) + len(value) for name, value in key[2])
        held += len(plan.head or b"")
    return held


async def _read_head(connection: RawConnection) -> bytes | None:
    """A request head of any size (the raw upstream's reader stops at 64 KiB); None at the end of the connection."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = await connection.reader.read(1 << 16)
        if not chunk:
            return None
        data += chunk
    return data


async def _answer_big_heads(connection: RawConnection) -> None:
    while await _read_head(connection) is not None:
        await connection.send(OK)


async def _response(reader: asyncio.StreamReader) -> bytes:
    """One response with a ``Content-Length`` body (or none), head and body."""
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    length = 0
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":")[1])
    return head + await asyncio.wait_for(reader.readexactly(length), 10)


# -- what a client can make the caches hold -------------------------------------------------------------------------


async def test_plans_for_large_forwarded_heads_stay_within_a_memory_bound(tmp_path: Path) -> None:
    """Every head within the limits (128 lines of up to ``limits.max_header_size`` each: about 2 MiB) is forwarded,
    and its plan keeps its header lines (the key) and its upstream head: without a bound on bytes, 4096 distinct
    heads would keep gigabytes per worker, as much as the client cared to send."""
    line = b"X-Pad-%03d: " + b"a" * 16000 + b"\r\n"
    async with (
        RawUpstream(_answer_big_heads) as upstream,
        serve_proxy(config_on(tmp_path, upstream.port, "big")) as proxy,
    ):
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
        try:
            for n in range(24):  # about 48 MiB of heads, each kept whole without a bound
                extra = b"".join(line % i for i in range(120))
                writer.write(request("GET", f"/big/{n}", extra))
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
                assert head.startswith(b"HTTP/1.1 200 "), head[:80]
                await asyncio.wait_for(reader.readexactly(2), 10)
        finally:
            writer.close()
            await writer.wait_closed()
        assert _plan_bytes(_forwarder(proxy)) <= 1 << 25


async def test_plans_for_oversized_heads_stay_within_a_memory_bound(tmp_path: Path) -> None:
    """A head with a line over ``limits.max_header_size`` (up to twice that reaches the handler) is answered 431 by
    the ordinary path; its plan says so, and must not keep megabytes either."""
    line = b"X-Pad-%03d: " + b"a" * 30000 + b"\r\n"
    async with RawUpstream() as upstream, serve_proxy(config_on(tmp_path, upstream.port, "over")) as proxy:
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
        try:
            for n in range(12):  # about 43 MiB of heads
                writer.write(request("GET", f"/over/{n}", b"".join(line % i for i in range(120))))
                answer = await _response(reader)
                assert answer.startswith(b"HTTP/1.1 431 "), answer[:80]
        finally:
            writer.close()
            await writer.wait_closed()
        assert _plan_bytes(_forwarder(proxy)) <= 1 << 25
    assert not upstream.received


@pytest.fixture
def parent() -> Iterator[logging.Logger]:
    logger = logging.getLogger("corsproxy-attack2-test")
    logger.propagate = False
    logger.setLevel(logging.INFO)
    yield logger
    logger.handlers.clear()


def _direct_setup(parent: logging.Logger, formatter: type[logging.Formatter] = JsonFormatter) -> io.StringIO:
    """corsproxy's own logging setup under ``parent``: one stream handler, corsproxy's formatter (set in the test
    body: pytest adds its capture handlers to the loggers it finds set up before the test runs)."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(formatter())
    parent.handlers[:] = [handler]
    return stream


def _request_log(logger: logging.Logger) -> RequestLog:
    return RequestLog(
        Logging(per_reason_lines=0), logger, LineLimiter(logging.getLogger("corsproxy-attack2-test.limit"), 0)
    )


def test_kept_log_line_pieces_stay_within_a_memory_bound(parent: logging.Logger) -> None:
    """A client chooses its path (up to ``limits.max_header_size``, quotes and backslashes allowed, each escaped in
    two characters in the JSON line), and every allowed request is logged: the pieces kept per path must not grow
    to hundreds of megabytes (4096 entries of a 16 KiB path, kept in the key and twice escaped in the pieces)."""
    stream = _direct_setup(parent)
    log = _request_log(logging.getLogger("corsproxy-attack2-test.request"))
    assert log._direct_handler(logging.INFO) is not None
    decision = Decision(Kind.NON_CORS, Reason.NO_ORIGIN)
    padding = '"\\' * 8000
    for n in range(600):  # about 10 MiB of paths
        log(Outcome("GET", f"/{n}/{padding}", "127.0.0.1", decision, 200, 2, 0.001, 0.0005))
        stream.seek(0)
        stream.truncate()
    held = sum(
        len(str(key[3])) + len(pieces[1]) + len(pieces[2]) + len(pieces[3]) for key, pieces in log._lines.items()
    )
    assert held <= 1 << 23, held


# -- bodies buffered with their heads, or not ------------------------------------------------------------------------


async def _echo_body(connection: RawConnection) -> None:
    """200 with a body naming the target and the body's length as the upstream read it."""
    while (received := await connection.read_request()) is not None:
        body = b"%s %d" % (received.target.encode("latin-1"), len(received.body))
        await connection.send(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))


async def _in_parts(port: int, parts: list[bytes]) -> bytes:
    """Send ``parts`` on one connection, each in its own write a moment after the previous one; read until the proxy
    closes the connection or is quiet."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    out = b""
    try:
        for part in parts:
            writer.write(part)
            with contextlib.suppress(ConnectionError):
                await writer.drain()
            with contextlib.suppress(TimeoutError):
                out += await asyncio.wait_for(reader.read(65536), 0.15)
        with contextlib.suppress(TimeoutError, ConnectionError):
            while chunk := await asyncio.wait_for(reader.read(65536), 0.6):
                out += chunk
    finally:
        writer.close()
    return out


CHUNKED = b"Transfer-Encoding: chunked\r\n"
SPLIT_BODIES: list[tuple[str, list[bytes]]] = [
    ("length-split", [request("POST", "/s", b"Content-Length: 10\r\n", b"hello"), b"world"]),
    ("length-head-alone", [request("POST", "/s", b"Content-Length: 10\r\n"), b"helloworld"]),
    ("chunked-split", [request("POST", "/s", CHUNKED, b"5\r\nhello\r\n"), b"5\r\nworld\r\n", b"0\r\n\r\n"]),
    ("chunked-last-alone", [request("POST", "/s", CHUNKED, b"5\r\nhello\r\n"), b"0\r\n\r\n"]),
    (
        "chunked-over-limit-later",
        [request("POST", "/s", CHUNKED, b"258\r\n" + b"a" * 600 + b"\r\n"), b"258\r\n" + b"b" * 600 + b"\r\n0\r\n\r\n"],
    ),
    (
        "chunked-over-limit-at-once",
        [request("POST", "/s", CHUNKED, b"258\r\n" + b"a" * 600 + b"\r\n258\r\n" + b"b" * 600 + b"\r\n0\r\n\r\n")],
    ),
    ("chunked-bad-after-good", [request("POST", "/s", CHUNKED, b"5\r\nhello\r\n"), b"zz\r\nxx\r\n0\r\n\r\n"]),
    ("chunked-bad-after-good-at-once", [request("POST", "/s", CHUNKED, b"5\r\nhello\r\nzz\r\nxx\r\n0\r\n\r\n")]),
    ("chunked-then-get", [request("POST", "/s", CHUNKED, b"5\r\nhello\r\n"), b"0\r\n\r\n" + request("GET", "/t")]),
    ("length-then-get", [request("POST", "/s", b"Content-Length: 5\r\n", b"hel"), b"lo" + request("GET", "/t")]),
    ("length-over-limit-declared", [request("POST", "/s", b"Content-Length: 1001\r\n", b"a" * 500), b"a" * 501]),
]


#: (Over the declared limit: the ordinary path answers 413; a bad chunk in the head's segment: the parser refuses it
#: before the fast path sees a request.)
@pytest.mark.parametrize(("name", "parts"), SPLIT_BODIES, ids=[name for name, _ in SPLIT_BODIES])
async def test_bodies_in_parts_are_forwarded_and_refused_alike(tmp_path: Path, name: str, parts: list[bytes]) -> None:
    answers, seen = [], []
    async with RawUpstream(_echo_body) as upstream:
        for fast in (True, False):
            config = config_on(tmp_path, upstream.port, f"split-{fast}", limits={"max_body_size": 1000})
            async with serve_proxy(config, fast_forwarding=fast) as proxy:
                taken: list[Exchange] = []
                if fast:
                    count_exchanges(proxy.runner, taken)
                before = len(upstream.received)
                answers.append(normal(await _in_parts(proxy.port, parts)))
                await asyncio.sleep(0.05)  # an upstream read still under way is recorded before the comparison
                seen.append([(r.head.split(b"\r\n", 1)[0], r.body, r.complete) for r in upstream.received[before:]])
                if fast and name not in ("length-over-limit-declared", "chunked-bad-after-good-at-once"):
                    assert taken, "the fast path did not take the request"
    assert answers[0].startswith(b"HTTP/1."), answers[0]  # (the parser's own 400 is an HTTP/1.0 answer)
    assert answers[0] == answers[1], answers
    assert [s for s in seen[0] if s[2]] == [s for s in seen[1] if s[2]], seen  # the same complete requests upstream


# -- requests taken in the window before aiohttp's request loop waits ----------------------------------------------
# The client is a thread with a blocking socket: it sends its next bytes the moment it has read an answer, truly
# concurrently with the proxy's event loop, which is when they land in the window (see test_fwd_fastpath_gap.py).


class _Answers:
    """Responses read off a blocking socket one at a time (``Content-Length`` framed, or none)."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buffer = b""

    def _more(self) -> bool:
        try:
            chunk = self.sock.recv(65536)
        except ConnectionError:
            chunk = b""
        self.buffer += chunk
        return bool(chunk)

    def next(self) -> bytes:
        """One response, head and body; b"" when the proxy closed the connection first."""
        while b"\r\n\r\n" not in self.buffer:
            if not self._more():
                return b""
        head, _, rest = self.buffer.partition(b"\r\n\r\n")
        length = 0
        for line in head.split(b"\r\n"):
            if line.lower().startswith(b"content-length:"):
                length = int(line.split(b":")[1])
        while len(rest) < length:
            assert self._more(), "connection closed mid-body"
            head, _, rest = self.buffer.partition(b"\r\n\r\n")
        self.buffer = rest[length:]
        return head + b"\r\n\r\n" + rest[:length]


#: A script: (bytes to send, answers to read then) steps on one connection; a None answer count reads until close.
Script = list[tuple[bytes, int | None]]


def _play(port: int, script: Script, rounds: int) -> list[bytes]:
    answers = []
    for _ in range(rounds):
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            read = _Answers(sock)
            for data, count in script:
                if data:
                    try:
                        sock.sendall(data)
                    except ConnectionError:
                        answers.append(b"<send refused>")
                        break
                if count is None:
                    while answer := read.next():
                        answers.append(answer)
                    answers.append(b"<closed>")
                    break
                answers.extend(read.next() or b"<closed>" for _ in range(count))
    return [normal(answer) for answer in answers]


def _get(target: str, extra: bytes = b"") -> bytes:
    return request("GET", target, extra)


ABSOLUTE = _get("http://proxy.test/ordinary")  # the ordinary path's: the fast paths leave absolute-form targets
PREFLIGHT = request("OPTIONS", "/pre", b"Access-Control-Request-Method: PUT\r\n")
SCRIPTS: dict[str, Script] = {
    # answered, then two fast-path requests sent at once: their answers in order, each to its own request
    "pipelined-after-ordinary": [(ABSOLUTE, 1), (_get("/a") + PREFLIGHT + _get("/b"), 3)],
    # an ordinary answer to a request whose body it does not read (a refused target): aiohttp reads the body away
    # (lingering) before the next request; the body's bytes must never be taken for a request
    "unread-body-then-get": [
        (request("POST", "/x#frag", b"Content-Length: 40\r\n"), 1),
        (b"GET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n" + b"z" * 6, 0),
        (_get("/after"), 1),
    ],
    # Connection: close: the next request, sent as soon as the answer is read, gets nothing
    "close-then-get": [(_get("http://proxy.test/c", b"Connection: close\r\n"), 1), (_get("/late"), None)],
    "http10-then-get": [(b"GET /old HTTP/1.0\r\nHost: x\r\n" + ORIGIN + b"\r\n", 1), (_get("/late"), None)],
    "http10-keepalive-then-get": [
        (b"GET /old HTTP/1.0\r\nHost: x\r\nConnection: keep-alive\r\n" + ORIGIN + b"\r\n", 1),
        (_get("/next"), 1),
    ],
    # a refused upgrade (the ordinary path answers it), then a request that takes the fast path
    "upgrade-refused-then-get": [
        (
            _get(
                "/ws",
                b"Connection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\n"
                b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nOrigin: https://evil.test\r\n",
            ),
            1,
        ),
        (_get("/after-ws"), 1),
    ],
    # a malformed request: 400 and close, whatever follows
    "malformed-then-get": [(b"GET /x HTTP/1.1\r\nBad Header\r\n\r\n", 1), (_get("/late"), None)],
    "tiny-writes": [(ABSOLUTE, 1), *((bytes([byte]), 0) for byte in _get("/tiny")), (b"", 1)],
}


async def _echo_target(connection: RawConnection) -> None:
    while (received := await connection.read_request()) is not None:
        body = received.target.encode("latin-1") + b" %d" % len(received.body)
        await connection.send(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))


@pytest.mark.parametrize("loop", LOOPS)
@pytest.mark.parametrize("name", list(SCRIPTS))
def test_requests_in_the_window_are_answered_as_the_ordinary_path_answers(tmp_path: Path, name: str, loop: str) -> None:
    script = SCRIPTS[name]

    async def scenario() -> None:
        answers: list[list[bytes]] = []
        async with RawUpstream(_echo_target) as upstream:
            for fast in (True, False):
                config = config_on(tmp_path, upstream.port, f"w-{fast}")
                async with serve_proxy(config, fast_forwarding=fast, fast_preflights=fast) as proxy:
                    answers.append(await asyncio.to_thread(_play, proxy.port, script, 8))
            assert not [r for r in upstream.received if b"smuggled" in r.head]
        assert answers[0] == answers[1]

    _run(loop, scenario)


def _inject_after_ordinary_answers(proxy: RunningProxy, after: bytes, injected: list[bytes]) -> None:
    """Every connection of ``proxy``, once the ordinary handler has written an answer, receives ``after`` in the
    window before aiohttp's request loop runs on: from a callback queued while the handler's task was finishing (its
    answer's access-log call), so it runs after that task ends and before the loop's wake-up. That is where bytes
    land when the client is quick, made certain instead of likely (uvloop runs I/O before queued callbacks)."""
    server: Any = proxy.runner.server
    make = server._new_handler

    def hooked(**kwargs: Any) -> Any:
        protocol = make(**kwargs)
        log_access = protocol.log_access

        def access_logged(*args: Any) -> None:
            log_access(*args)
            if not injected:
                injected.append(after)
                asyncio.get_running_loop().call_soon(protocol.data_received, after)

        protocol.log_access = access_logged
        return protocol

    server._new_handler = hooked


WINDOW: dict[str, tuple[bytes, bytes, int | None]] = {
    # (first request, for the ordinary path; bytes that land in the window; answers the client then gets, None:
    # one, then the proxy closes the connection)
    "keep-alive": (ABSOLUTE, _get("/next") + PREFLIGHT + _get("/last"), 4),
    "connection-close": (_get("http://proxy.test/c", b"Connection: close\r\n"), _get("/late"), None),
    "http10": (b"GET /old HTTP/1.0\r\nHost: x\r\n" + ORIGIN + b"\r\n", _get("/late"), None),
    "unread-body": (
        request("POST", "/x#frag", b"Content-Length: 40\r\n"),
        b"GET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n" + b"z" * 6 + _get("/after"),
        2,
    ),
    "unread-body-close": (
        request("POST", "/x#frag", b"Content-Length: 40\r\nConnection: close\r\n"),
        b"GET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n" + b"z" * 6 + _get("/after"),
        None,
    ),
    "refused-upgrade": (
        _get(
            "/ws",
            b"Connection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\n"
            b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nOrigin: https://evil.test\r\n",
        ),
        _get("/after-ws"),
        2,
    ),
}


@pytest.mark.parametrize("loop", LOOPS)
@pytest.mark.parametrize("name", list(WINDOW))
def test_bytes_landing_before_the_request_loop_waits_are_answered_in_order(
    tmp_path: Path, name: str, loop: str
) -> None:
    first, after, count = WINDOW[name]

    async def scenario() -> None:
        answers: list[list[bytes]] = []
        taken: list[Exchange] = []
        async with RawUpstream(_echo_target) as upstream:
            for fast in (True, False):
                config = config_on(tmp_path, upstream.port, f"i-{fast}")
                async with serve_proxy(config, fast_forwarding=fast, fast_preflights=fast) as proxy:
                    injected: list[bytes] = []
                    _inject_after_ordinary_answers(proxy, after, injected)
                    if fast:
                        count_exchanges(proxy.runner, taken)
                    script: Script = [(first, None)] if count is None else [(first, count)]
                    answers.append(await asyncio.to_thread(_play, proxy.port, script, 1))
                    assert injected
            assert not [r for r in upstream.received if b"smuggled" in r.head]
        assert len(answers[0]) == (2 if count is None else count), answers[0]  # (the answer and the close)
        assert answers[0] == answers[1]
        if name == "keep-alive":
            assert [exchange.message.path for exchange in taken] == ["/next", "/last"]

    _run(loop, scenario)


# -- plans kept per request head ------------------------------------------------------------------------------------


async def test_a_plan_is_never_shared_between_a_trusted_and_an_untrusted_peer(tmp_path: Path) -> None:
    """The same head bytes from a trusted proxy (127.0.0.1) and from anyone else (127.0.0.2): the first's
    X-Forwarded-For is appended to, the second's replaced — whichever comes first, a plan made for one is not used
    for the other."""
    head = _get("/who", b"X-Forwarded-For: 6.6.6.6\r\nX-Forwarded-Proto: https\r\nX-Forwarded-Host: evil.test\r\n")
    for order in (("127.0.0.1", "127.0.0.2"), ("127.0.0.2", "127.0.0.1")):
        async with RawUpstream(_echo_target) as upstream:
            config = config_on(tmp_path, upstream.port, f"t-{order[0]}", forwarding={"trusted_proxies": ["127.0.0.1"]})
            async with serve_proxy(config) as proxy:
                taken: list[Exchange] = []
                count_exchanges(proxy.runner, taken)
                for source in order * 2:
                    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port, local_addr=(source, 0))
                    try:
                        writer.write(head)
                        assert (await _response(reader)).startswith(b"HTTP/1.1 200 ")
                    finally:
                        writer.close()
                        await writer.wait_closed()
                assert len(taken) == 4
        for source, received in zip(order * 2, upstream.received, strict=True):
            if source == "127.0.0.1":
                assert received.values("X-Forwarded-For") == ["6.6.6.6, 127.0.0.1"]
                assert received.values("X-Forwarded-Host") == ["evil.test"]
                assert received.values("X-Forwarded-Proto") == ["https"]
            else:
                assert received.values("X-Forwarded-For") == ["127.0.0.2"]
                assert received.values("X-Forwarded-Host") == ["proxy.test"]
                assert received.values("X-Forwarded-Proto") == ["http"]


RELOADS: dict[str, dict[str, Any]] = {
    "methods": {"cors": {"allow_methods": ["GET"]}},
    "credentials": {"cors": {"allow_credentials": False}},
    "expose": {"cors": {"expose_headers": ["x-other"]}},
    "report-only": {"mode": "report-only"},
    "preserve-host": {"forwarding": {"preserve_host": True}},
    # (Not compared: a new upstream URL. The ordinary path keeps the base URL its client session was made with until
    # a restart, the fast path uses the new one at once.)
}


@pytest.mark.parametrize("name", list(RELOADS))
async def test_a_reload_changes_the_next_answer_as_on_the_ordinary_path(tmp_path: Path, name: str) -> None:
    """A plan kept for a head, then a configuration swapped in (as a reload swaps ``ProxyState.config``): the very
    next answer on the same connection, and what the upstream is sent, are what the ordinary path makes of it."""
    from corsproxy.config import parse_config
    from corsproxy.http.app import STATE
    from tests.support.config import merge

    outcomes = []
    async with RawUpstream(_echo_target) as upstream:
        for fast in (True, False):
            data = config_on(tmp_path, upstream.port, f"r-{fast}")
            change = RELOADS[name]
            before = len(upstream.received)
            async with serve_proxy(data, fast_forwarding=fast) as proxy:
                reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
                try:
                    answers = []
                    for n in range(3):
                        if n == 2:
                            proxy.app[STATE].config = parse_config(merge(data, change), env={})
                        writer.write(request("DELETE", "/d", b"X-Request-Id: 1\r\n"))
                        answers.append(normal(await _response(reader)))
                finally:
                    writer.close()
                    await writer.wait_closed()
            outcomes.append((answers, [r.head for r in upstream.received[before:]]))
    assert outcomes[0] == outcomes[1]


# -- response heads held to the end of an upstream read -------------------------------------------------------------


def _scripted(writes: list[bytes]) -> Callable[[RawConnection], Coroutine[Any, Any, None]]:
    """An upstream answering each request with ``writes``, one write each, a moment apart; an empty write closes
    the connection there."""

    async def handler(connection: RawConnection) -> None:
        while await connection.read_request() is not None:
            for data in writes:
                if not data:
                    connection.writer.transport.abort()
                    return
                await connection.send(data)
                await asyncio.sleep(0.05)

    return handler


ANSWERS: dict[str, tuple[str, list[bytes]]] = {
    "head-then-body": ("GET", [b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\n", b"ab", b"cd"]),
    "chunked-pieces": ("GET", [b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n", b"2\r\nab\r\n", b"0\r\n\r\n"]),
    "interim-then-final": ("GET", [b"HTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n", OK]),
    "interim-and-head": ("GET", [b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n", b"ok"]),
    "head-request": ("HEAD", [b"HTTP/1.1 200 OK\r\nContent-Length: 40\r\n\r\n"]),
    "no-content": ("GET", [b"HTTP/1.1 204 No Content\r\nX-A: 1\r\n\r\n"]),
    "not-modified": ("GET", [b'HTTP/1.1 304 Not Modified\r\nETag: "x"\r\nContent-Length: 9\r\n\r\n']),
    "until-close": ("GET", [b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n", b"part", b"rest"]),
}


@pytest.mark.parametrize("name", list(ANSWERS))
async def test_responses_in_pieces_are_relayed_as_the_ordinary_path_relays_them(tmp_path: Path, name: str) -> None:
    method, writes = ANSWERS[name]
    answers = []
    for fast in (True, False):
        async with (
            RawUpstream(_scripted(writes)) as upstream,
            serve_proxy(config_on(tmp_path, upstream.port, f"p-{fast}"), fast_forwarding=fast) as proxy,
        ):
            answers.append(normal(await raw(proxy.port, request(method, "/p"))))
    assert answers[0].startswith(b"HTTP/1.1 "), answers[0]
    assert answers[0] == answers[1], answers


@pytest.mark.parametrize(
    "writes",
    [
        [b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc", b""],
        [b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n", b""],
        [b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n", b""],
        [b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n"],
    ],
    ids=["length-cut", "chunked-cut", "head-alone-cut", "bad-chunk-with-head"],
)
async def test_a_response_cut_after_its_head_never_looks_complete(tmp_path: Path, writes: list[bytes]) -> None:
    """The head is held to the end of the read; the upstream then dies (or sends garbage): the client gets the head
    and a cut connection, never a response that looks whole (a last chunk, the announced length)."""
    async with (
        RawUpstream(_scripted(writes)) as upstream,
        serve_proxy(config_on(tmp_path, upstream.port, "cut")) as proxy,
    ):
        taken: list[Exchange] = []
        count_exchanges(proxy.runner, taken)
        answer = await raw(proxy.port, request("GET", "/cut") + request("GET", "/never"))
    assert [exchange.error for exchange in taken] == ["disconnect"]
    assert answer.startswith(b"HTTP/1.1 200 OK\r\n"), answer  # the head was sent (held to the end of its read)
    assert not answer.endswith(b"0\r\n\r\n")
    head, _, body = answer.partition(b"\r\n\r\n")
    if b"Content-Length: 10" in head:
        assert len(body) < 10
    assert answer.count(b"HTTP/1.1 ") == 1  # the pipelined request behind it is not answered on a cut connection


# -- the request log's kept line pieces -------------------------------------------------------------------------------

_TEXT = st.text(st.characters(codec="utf-8"), max_size=12) | st.sampled_from(
    ['"', "\\", "\u2028", "\x00\x1b", "é", "\udcff", "a\nb"]
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    path=_TEXT,
    client=_TEXT,
    origin=st.none() | _TEXT,
    error=st.none() | _TEXT,
    status=st.sampled_from([200, 403, 502]),
    latency=st.none() | st.floats(0, 1e6),
    json_lines=st.booleans(),
)
def test_direct_lines_are_the_logging_lines_for_any_text(
    parent: logging.Logger,
    path: str,
    client: str,
    origin: str | None,
    error: str | None,
    status: int,
    latency: float | None,
    json_lines: bool,
) -> None:
    """Whatever a path, client, origin or upstream error holds (quotes, backslashes, control and line-separator
    characters, non-ASCII, surrogates), the line made from kept pieces — the first time and the second — is the one
    ``logging`` writes with the same formatter."""
    formatter = JsonFormatter if json_lines else TextFormatter
    decision = Decision(Kind.ACTUAL, Reason.ALLOWED, origin=origin)
    outcome = Outcome("GET", "/" + path, client, decision, status, 7, 0.25, latency, error)
    lines = []
    for handler_class in (logging.StreamHandler, _OtherHandler):
        stream = io.StringIO()
        handler = handler_class(stream)
        handler.setFormatter(formatter())
        parent.handlers[:] = [handler]
        log = _request_log(logging.getLogger("corsproxy-attack2-test.request"))
        assert (log._direct_handler(logging.INFO) is handler) is (handler_class is logging.StreamHandler)
        log(outcome)
        log(outcome)
        lines.append(_STAMP.sub("-", stream.getvalue()))
    assert lines[0] == lines[1]
    assert lines[0].count("\n") == 2 or not json_lines


class _OtherHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Not corsproxy's own setup: the request log must use ``logging`` for it."""


_STAMP = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z")


@pytest.mark.parametrize("method", ["GET", "POST"])
async def test_a_pooled_connection_closed_under_a_request_is_answered_as_on_the_ordinary_path(
    tmp_path: Path, method: str
) -> None:
    """The upstream answers once, then closes its connection when the next request arrives, answering nothing: what
    a pooled connection the upstream had just closed looks like. The fast path now sends bodies on pooled connections
    directly; an idempotent request is sent again on a new connection, a POST (and its body) is not."""
    statuses = []
    for fast in (True, False):
        served = 0

        async def once_then_close(connection: RawConnection) -> None:
            nonlocal served
            while await connection.read_request() is not None:
                served += 1
                if served == 2:
                    connection.writer.transport.abort()
                    return
                await connection.send(OK)

        async with (
            RawUpstream(once_then_close) as upstream,
            serve_proxy(config_on(tmp_path, upstream.port, f"stale-{fast}"), fast_forwarding=fast) as proxy,
        ):
            reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
            try:
                writer.write(request("GET", "/first"))
                assert (await _response(reader)).startswith(b"HTTP/1.1 200 ")
                body = b"" if method == "GET" else b"Content-Length: 5\r\n"
                writer.write(request(method, "/second", body, b"hello" if body else b""))
                statuses.append((await _response(reader)).split(b"\r\n", 1)[0])
            finally:
                writer.close()
                await writer.wait_closed()
            statuses.append(b"%d" % len([r for r in upstream.received if b"/second" in r.head]))
    assert statuses[0:2] == statuses[2:4], statuses
    assert statuses[0:2] == ([b"HTTP/1.1 200 OK", b"2"] if method == "GET" else [b"HTTP/1.1 502 Bad Gateway", b"1"])
