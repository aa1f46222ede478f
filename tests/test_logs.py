"""Request logs of a real server: one JSON line per request, refusals always logged, allowed ones sampled, plain text
on request."""

from __future__ import annotations

import io
import json
import logging
from pathlib import Path

from corsproxy.core.decision import Decision, Kind, Reason
from corsproxy.core.log_limit import LineLimiter
from corsproxy.core.outcome import Outcome
from corsproxy.core.settings import Logging
from corsproxy.ops.request_log import JsonFormatter, RequestLog, TextFormatter, log_dict_config, wants_json
from tests.support.net import wait_until
from tests.support.serve import Server
from tests.support.upstream import ThreadedUpstream

APP = "https://app.example.com"
FIELDS = {"time", "client", "method", "path", "origin", "decision", "reason", "status", "bytes", "upstream_ms"}


def test_one_json_line_per_request(served: Server) -> None:
    paths = [f"/logged/{i}?q={i}" for i in range(6)]
    for path in paths[:4]:
        served.proxy("GET", path, headers={"Origin": APP})
    served.proxy(
        "OPTIONS", paths[4], headers={"Origin": "https://evil.example.net", "Access-Control-Request-Method": "PUT"}
    )
    served.proxy("GET", paths[5])

    def lines() -> list[dict[str, object]]:
        return [line for line in served.request_logs() if str(line.get("path", "")).startswith("/logged/")]

    wait_until(lambda: len(lines()) >= 6, timeout=10, what="six request lines")
    logged = lines()
    assert sorted(str(line["path"]) for line in logged) == sorted(paths)  # exactly one line each
    by_path = {line["path"]: line for line in logged}
    for line in logged:
        assert set(line) >= FIELDS, line
        assert line["client"] == "127.0.0.1" and str(line["time"]).endswith("Z")
    allowed = by_path[paths[0]]
    assert allowed["decision"] == "allowed" and allowed["reason"] == "allowed" and allowed["origin"] == APP
    assert allowed["status"] == 200 and isinstance(allowed["bytes"], int) and allowed["bytes"] > 0
    assert isinstance(allowed["upstream_ms"], float)
    refused = by_path[paths[4]]
    assert (refused["decision"], refused["reason"], refused["status"]) == ("refused", "origin_not_allowed", 403)
    assert refused["upstream_ms"] is None and refused["method"] == "OPTIONS"
    plain = by_path[paths[5]]
    assert (plain["decision"], plain["reason"], plain["origin"]) == ("n/a", "no_origin", None)


def test_sampling_keeps_every_refusal_and_text_format(tmp_path: Path, upstream_thread: ThreadedUpstream) -> None:
    server = Server(
        tmp_path, upstream_thread.port, workers=1, logging={"format": "text", "sample_allowed": 0.0}
    ).start()
    try:
        for i in range(5):
            server.proxy("GET", f"/sampled/{i}", headers={"Origin": APP})
        server.proxy("GET", "/sampled/refused", headers={"Origin": "https://evil.example.net"})
        wait_until(lambda: "/sampled/refused" in server.log_text(), timeout=10, what="the refusal line")
        text = server.log_text()
        assert "/sampled/0" not in text  # allowed: sampled away
        line = next(line for line in text.splitlines() if "/sampled/refused" in line)
        assert "refused (origin_not_allowed)" in line and "origin=https://evil.example.net" in line
        assert not line.startswith("{")
    finally:
        assert server.stop() == 0


# -- the pieces, without a server ---------------------------------------------------------------------------------


def _outcome(reason: Reason, kind: Kind = Kind.ACTUAL, status: int = 200) -> Outcome:
    decision = Decision(kind, reason, origin="https://a.example.com")
    return Outcome("GET", "/p", "127.0.0.1", decision, status, 10, 0.01, 0.005)


def test_sampling_rate_is_honoured() -> None:
    stream = io.StringIO()
    logger = logging.getLogger("test.corsproxy.sampling")
    logger.propagate = False
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        # Sampling never drops a refusal; the per-reason limit (tests/test_log_limits.py) is set above 7 here.
        log = RequestLog(Logging(sample_allowed=0.25), logger, LineLimiter(logger, lines=10))
        draws = iter([0.1, 0.3, 0.9, 0.2] * 25)
        log._random = lambda: next(draws)  # a fixed sequence instead of chance: two of every four pass
        for _ in range(100):
            log(_outcome(Reason.ALLOWED))
        for _ in range(7):
            log(_outcome(Reason.ORIGIN_NOT_ALLOWED))
        log(_outcome(Reason.ALLOWED, status=502))  # corsproxy's own errors are never sampled away
    finally:
        logger.removeHandler(handler)
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert sum(line["decision"] == "allowed" and line["status"] == 200 for line in lines) == 50
    assert sum(line["decision"] == "refused" for line in lines) == 7
    assert sum(line["status"] == 502 for line in lines) == 1


def test_format_choice() -> None:
    class Tty(io.StringIO):
        def fileno(self) -> int:
            raise OSError("not a real stream")

    assert wants_json(Logging(format="json"))
    assert not wants_json(Logging(format="text"))
    assert wants_json(Logging(format="auto"), Tty())  # cannot tell: machine-readable is the safe default
    config = log_dict_config(Logging(format="text", level="warning"))
    assert config["formatters"]["corsproxy"]["()"].endswith("TextFormatter")
    assert config["loggers"]["corsproxy"]["level"] == "WARNING"
    record = logging.makeLogRecord({"msg": "hello %s", "args": ("world",), "levelname": "INFO", "extra_field": 1})
    assert TextFormatter().format(record).endswith("hello world")
    assert json.loads(JsonFormatter().format(record))["extra_field"] == 1
