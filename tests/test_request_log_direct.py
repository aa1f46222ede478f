"""The request log's direct writer (used when the logging setup is corsproxy's own) must write exactly the line the
logging module would: the same JSON object (every field, same order) or the same text line, ``time`` aside; and any
other setup must still go through ``logging``."""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import re
from collections.abc import Iterator

import pytest

from corsproxy.core.decision import Decision, Kind, Reason
from corsproxy.core.log_limit import LineLimiter
from corsproxy.core.outcome import Outcome
from corsproxy.core.settings import Logging
from corsproxy.ops.request_log import JsonFormatter, RequestLog, TextFormatter

_TIME = re.compile(r'"time":"[^"]*"')


class _OtherHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Not corsproxy's own setup: the request log must use ``logging`` for it."""


OUTCOMES = [
    Outcome(
        "GET",
        "/A?b=1",
        "127.0.0.1",
        Decision(Kind.ACTUAL, Reason.ALLOWED, origin="https://a.test"),
        200,
        5,
        0.0012345,
        0.0004,
    ),
    Outcome("OPTIONS", "/p", "", Decision(Kind.NON_CORS, Reason.NO_ORIGIN), 204, 0, 0.00001, None),
    Outcome(
        "POST",
        '/q"\\',
        "::1",
        Decision(Kind.ACTUAL, Reason.ALLOWED, origin="https://é.test"),
        502,
        27,
        0.5,
        None,
        "connect",
    ),
    Outcome(
        "PATCH",
        "/\u00fc\t\x7f?q=\u2028",
        "",
        Decision(Kind.PREFLIGHT, Reason.ORIGIN_NOT_ALLOWED),
        403,
        1234567,
        1e-7,
        12.3456789,
    ),
]


@pytest.fixture
def parent() -> Iterator[logging.Logger]:
    logger = logging.getLogger("corsproxy-direct-test")
    logger.propagate = False
    logger.setLevel(logging.INFO)
    yield logger
    logger.handlers.clear()


@pytest.mark.parametrize("formatter", [JsonFormatter, TextFormatter])
@pytest.mark.parametrize("outcome", OUTCOMES, ids=["allowed", "non-cors", "failure", "refused-odd-path"])
def test_direct_line_is_the_logging_line(
    parent: logging.Logger, formatter: type[logging.Formatter], outcome: Outcome
) -> None:
    lines = []
    for handler_class in (logging.StreamHandler, _OtherHandler):
        stream = io.StringIO()
        handler = handler_class(stream)
        handler.setFormatter(formatter())
        parent.handlers[:] = [handler]
        log = RequestLog(Logging(per_reason_lines=0), logging.getLogger("corsproxy-direct-test.request"),
                         LineLimiter(logging.getLogger("corsproxy-direct-test.limit"), 0))  # fmt: skip
        direct = log._direct_handler(logging.INFO)
        assert (direct is handler) is (handler_class is logging.StreamHandler)
        log(outcome)
        # The same request again, another duration and upstream latency: the second line is made from kept pieces.
        latency = None if outcome.upstream_latency is None else outcome.upstream_latency * 3 + 1e-6
        log(dataclasses.replace(outcome, duration=outcome.duration * 7 + 0.25, upstream_latency=latency))
        lines.append(stream.getvalue())
    assert lines[0].endswith("\n") and lines[0].count("\n") == 2
    for ours_line, theirs_line in zip(lines[0].splitlines(), lines[1].splitlines(), strict=True):
        if formatter is JsonFormatter:
            ours, theirs = json.loads(ours_line), json.loads(theirs_line)
            assert list(ours) == list(theirs)
            ours.pop("time"), theirs.pop("time")
            assert ours == theirs
            # and character for character, as json.dumps writes it (escapes, number forms), the time value aside
            assert _TIME.sub('"time":"-"', ours_line) == _TIME.sub('"time":"-"', theirs_line)
        else:
            assert ours_line.split(" ", 1)[1] == theirs_line.split(" ", 1)[1]


def test_a_filter_or_second_handler_takes_the_logging_path(parent: logging.Logger) -> None:
    first, second = logging.StreamHandler(io.StringIO()), logging.StreamHandler(io.StringIO())
    for handler in (first, second):
        handler.setFormatter(JsonFormatter())
    log = RequestLog(Logging(), logging.getLogger("corsproxy-direct-test.request"))
    parent.handlers[:] = [first]
    assert log._direct_handler(logging.INFO) is first
    parent.handlers[:] = [first, second]
    assert log._direct_handler(logging.INFO) is None
    parent.handlers[:] = [first]
    first.addFilter(lambda record: True)
    assert log._direct_handler(logging.INFO) is None
