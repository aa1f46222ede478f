"""Log volume is not the client's to choose: refusal and malformed-request lines are limited per reason and window,
with a summary of what was left out, while the metrics count every one. Real server, real sockets, captured output."""

from __future__ import annotations

import asyncio
import io
import logging
import socket
from pathlib import Path
from typing import Any

import pytest

from corsproxy.config import ConfigError, parse_config
from corsproxy.core.log_limit import LineLimiter
from tests.support.config import BASE_CONFIG, merge
from tests.support.net import wait_until
from tests.support.serve import Server, scrape, value
from tests.support.upstream import ThreadedUpstream

EVIL = "https://evil.example.net"
APP = "https://app.example.com"
REFUSED_ORIGIN = {"Origin": EVIL, "Access-Control-Request-Method": "PUT"}
REFUSED_METHOD = {"Origin": APP, "Access-Control-Request-Method": "PATCH"}  # PATCH is not in BASE_CONFIG's methods


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _capture(name: str) -> tuple[logging.Logger, io.StringIO]:
    stream = io.StringIO()
    logger = logging.getLogger(name)
    logger.handlers.clear()
    logger.propagate = False
    logger.setLevel(logging.INFO)
    logger.addHandler(logging.StreamHandler(stream))
    return logger, stream


def test_limit_per_reason_then_one_summary_line_per_reason() -> None:
    logger, stream = _capture("test.corsproxy.limit")
    clock = Clock()
    limiter = LineLimiter(logger, lines=5, window=10.0, clock=clock)
    admitted = {"origin_not_allowed": 0, "malformed_request": 0}
    for _ in range(12_350):
        admitted["origin_not_allowed"] += limiter.admit("origin_not_allowed")
    for _ in range(3):
        admitted["malformed_request"] += limiter.admit("malformed_request")
    assert admitted == {"origin_not_allowed": 5, "malformed_request": 3}
    assert stream.getvalue() == ""  # no loop here, so no timer: the summary waits for the window to end
    assert limiter.take_counts() == {"origin_not_allowed": 12_350, "malformed_request": 3}
    assert limiter.take_counts() == {}  # handed out once

    clock.now += 10.0
    assert limiter.admit("origin_not_allowed")  # a new window admits again
    assert stream.getvalue().splitlines() == ["…and 12,345 more origin_not_allowed in the last 10 s (5 logged)"]
    assert limiter.take_counts() == {"origin_not_allowed": 1}  # exact across the window boundary


def test_zero_lines_means_no_limit() -> None:
    logger, stream = _capture("test.corsproxy.unlimited")
    limiter = LineLimiter(logger, lines=0, window=10.0, clock=Clock())
    assert all(limiter.admit("origin_not_allowed") for _ in range(1000))
    limiter.close_window()
    assert stream.getvalue() == ""


async def test_a_flood_that_stops_still_gets_its_summary() -> None:
    """The first suppressed line arms a timer on the loop: nobody has to send another request for the summary."""
    logger, stream = _capture("test.corsproxy.timer")
    limiter = LineLimiter(logger, lines=2, window=0.05)
    for _ in range(10):
        limiter.admit("header_not_allowed")
    for _ in range(200):  # bounded wait, no timing assertion
        if stream.getvalue():
            break
        await asyncio.sleep(0.01)
    assert stream.getvalue().startswith("…and 8 more header_not_allowed in the last ")


@pytest.mark.parametrize(
    ("section", "path", "message"),
    [
        ({"per_reason_lines": -1}, "logging.per_reason_lines", "whole number of lines"),
        ({"per_reason_lines": True}, "logging.per_reason_lines", "whole number of lines"),
        ({"per_reason_lines": 2.5}, "logging.per_reason_lines", "whole number of lines"),
        ({"per_reason_window": 0}, "logging.per_reason_window", "above 0"),
        ({"per_reason_window": "10s"}, "logging.per_reason_window", "number of seconds"),
        ({"per_reason_window": 86400}, "logging.per_reason_window", "at most 3600"),
    ],
    ids=["negative", "bool", "fraction", "zero-window", "string-window", "day-window"],
)
def test_bad_settings_are_refused_with_their_key(section: dict[str, Any], path: str, message: str) -> None:
    with pytest.raises(ConfigError) as raised:
        parse_config(merge(BASE_CONFIG, {"logging": section}))
    assert path in str(raised.value) and message in str(raised.value)


def test_defaults() -> None:
    settings = parse_config(BASE_CONFIG).logging
    assert (settings.per_reason_lines, settings.per_reason_window) == (5, 10.0)
    settings = parse_config(merge(BASE_CONFIG, {"logging": {"per_reason_lines": 0, "per_reason_window": 60}})).logging
    assert (settings.per_reason_lines, settings.per_reason_window) == (0, 60.0)


# -- a real server ---------------------------------------------------------------------------------------------------


def _raw(port: int, data: bytes) -> bytes:
    """Send raw bytes on a fresh connection and read until the server closes it."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(data)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


MALFORMED = b"GET / HTTP/1.1\r\nHost: x\r\nno colon in this header line\r\n\r\n"
#: Past the parser's ceiling (twice limits.max_header_size): aiohttp's error quotes what it read.
OVERSIZED = b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 40_000 + b"\r\n\r\n"


def _request_lines(server: Server, reason: str) -> list[dict[str, Any]]:
    return [line for line in server.request_logs() if line.get("reason") == reason and "path" in line]


def _proxy_lines(server: Server, text: str) -> list[dict[str, Any]]:
    return [line for line in server.logs() if text in str(line.get("message", ""))]


def test_flood_logs_a_few_lines_per_reason_and_metrics_count_all(
    tmp_path: Path, upstream_thread: ThreadedUpstream
) -> None:
    # One worker, so that the per-process limit is the whole server's; a window longer than the test, so that the
    # summaries come when the worker stops — on SIGTERM, nothing counted is lost.
    server = Server(
        tmp_path, upstream_thread.port, workers=1, logging={"format": "json", "per_reason_lines": 3,
                                                            "per_reason_window": 3600},
    ).start()  # fmt: skip
    try:
        for _ in range(40):
            assert server.proxy("OPTIONS", "/flood", headers=REFUSED_ORIGIN).status == 403
        for _ in range(25):
            assert server.proxy("OPTIONS", "/flood", headers=REFUSED_METHOD).status == 403
        for _ in range(30):
            assert b" 400 " in _raw(server.port, MALFORMED).split(b"\r\n", 1)[0]
        for _ in range(8):
            assert b" 431 " in _raw(server.port, OVERSIZED).split(b"\r\n", 1)[0]
        assert server.proxy("GET", "/fine", headers={"Origin": APP}).status == 200
        wait_until(lambda: _request_lines(server, "allowed"), timeout=10, what="the allowed request's line")

        samples = scrape(server)
        assert value(samples, "corsproxy_requests_total", kind="preflight", reason="origin_not_allowed") == 40
        assert value(samples, "corsproxy_requests_total", kind="preflight", reason="method_not_allowed") == 25
        assert value(samples, "corsproxy_malformed_requests_total", type="malformed_request") == 30
        assert value(samples, "corsproxy_malformed_requests_total", type="head_too_large") == 8

        assert len(_request_lines(server, "origin_not_allowed")) == 3
        assert len(_request_lines(server, "method_not_allowed")) == 3
        assert len(_proxy_lines(server, "malformed request from")) == 3
        oversized = _proxy_lines(server, "over the parser ceiling")
        assert len(oversized) == 3
        assert len(_request_lines(server, "allowed")) == 1  # allowed lines follow sample_allowed, not this limit
    finally:
        assert server.stop() == 0

    summaries = {line["reason"]: line for line in server.logs() if "suppressed" in line}
    assert set(summaries) == {"origin_not_allowed", "method_not_allowed", "malformed_request", "head_too_large"}
    assert summaries["origin_not_allowed"]["suppressed"] == 37
    assert summaries["method_not_allowed"]["suppressed"] == 22
    assert summaries["malformed_request"]["suppressed"] == 27
    assert summaries["head_too_large"]["suppressed"] == 5
    origin_summary = summaries["origin_not_allowed"]
    assert origin_summary["logger"] == "corsproxy.request" and origin_summary["level"] == "warning"
    assert origin_summary["message"].startswith("…and 37 more origin_not_allowed in the last ")
    assert summaries["malformed_request"]["logger"] == "corsproxy"


def test_summary_comes_when_the_window_ends_and_logging_resumes(
    tmp_path: Path, upstream_thread: ThreadedUpstream
) -> None:
    server = Server(
        tmp_path, upstream_thread.port, workers=1, logging={"format": "text", "per_reason_lines": 2,
                                                            "per_reason_window": 0.5},
    ).start()  # fmt: skip
    try:
        sent = 0
        # Bounded: stop once the summary is out (the window has passed), or after 400 requests.
        while "more origin_not_allowed in the last" not in server.log_text() and sent < 400:
            server.proxy("OPTIONS", f"/first/{sent}", headers=REFUSED_ORIGIN)
            sent += 1
        wait_until(
            lambda: "more origin_not_allowed in the last" in server.log_text(), timeout=10, what="the summary line"
        )
        summary = next(line for line in server.log_text().splitlines() if "more origin_not_allowed" in line)
        assert " WARNING " in summary and "(2 logged)" in summary
        # The next window admits lines again.
        server.proxy("OPTIONS", "/after-the-window", headers=REFUSED_ORIGIN)
        wait_until(lambda: "/after-the-window" in server.log_text(), timeout=10, what="a line in the new window")
    finally:
        assert server.stop() == 0
    first = [line for line in server.log_text().splitlines() if "/first/" in line and "origin_not_allowed" in line]
    assert 2 <= len(first) < sent  # the first window's two, and then some left out
