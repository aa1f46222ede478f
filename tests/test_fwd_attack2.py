"""A second round of attacks on the forwarding and preflight fast paths: requests taken in the window before aiohttp's
request loop waits, bodies buffered with their heads, plans kept per request head, response heads held to the end of
an upstream read, and the request log's kept line pieces.

The ordinary path (``fast_forwarding=False``) is the reference wherever both paths answer the same bytes. Memory bounds
are checked on the caches themselves: what a client can make them hold must not grow with what it sends.
"""

from __future__ import annotations

import asyncio
import io
import logging
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any

import pytest

from corsproxy.core.decision import Decision, Kind, Reason
from corsproxy.core.log_limit import LineLimiter
from corsproxy.core.outcome import Outcome
from corsproxy.core.settings import Logging
from corsproxy.http.forward import Forwarder
from corsproxy.ops.request_log import JsonFormatter, RequestLog
from tests.support.fwd import config_on, request
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
    assert log._direct_for(logging.INFO) is not None
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
