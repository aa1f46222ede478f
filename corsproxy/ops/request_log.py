"""Logs: one structured line per request, and the formatters every corsproxy (and gunicorn) log line goes through.

Owns the log line shape: ``time, client, method, path, origin, decision, reason, status, bytes,
upstream latency`` for each request, sampling of allowed requests (``logging.sample_allowed``) while refusals and
failures are logged up to ``logging.per_reason_lines`` per reason and window (:mod:`corsproxy.core.log_limit`), and the
choice between JSON (for log pipelines) and plain text (for a human at a terminal).

Must not import aiohttp or lmdb: it sees requests only as :class:`corsproxy.core.outcome.Outcome` values.
"""

from __future__ import annotations

import asyncio
import json
import json.encoder
import logging
import os
import random
import sys
import time
from typing import TYPE_CHECKING, Any

from corsproxy.core.decision import Decision, Kind
from corsproxy.core.log_limit import REQUEST_LINES, LineLimiter
from corsproxy.core.settings import Logging

if TYPE_CHECKING:
    from corsproxy.core.outcome import Outcome

__all__ = ["REQUEST_LOGGER", "JsonFormatter", "RequestLog", "TextFormatter", "log_dict_config", "wants_json"]

#: The logger request lines go to; operators can route it apart from the rest (``logging.getLogger`` name).
REQUEST_LOGGER = "corsproxy.request"

#: The rate-limit key of a line that is not a refusal: the upstream failure type, else a 5xx answer.
_FAILURE_KEYS = {error: f"upstream_{error}" for error in ("timeout", "connect", "protocol", "disconnect")}

# Attributes every LogRecord has; anything else on a record came in through ``extra=`` and belongs in the JSON line.
_RECORD_ATTRS = frozenset(logging.makeLogRecord({}).__dict__) | {"message", "asctime", "taskName"}


def _iso_millis(created: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(created)) + f".{int(created % 1 * 1000):03d}Z"


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ``time``, ``level``, ``logger``, ``pid``, ``message`` and any ``extra`` fields."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "time": _iso_millis(record.created),
            "level": record.levelname.lower(),
            "logger": record.name,
            "pid": record.process,
            "message": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key not in _RECORD_ATTRS and not key.startswith("_"):
                line[key] = value
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line, separators=(",", ":"), default=str)


class TextFormatter(logging.Formatter):
    """For a human at a terminal: ``time level [pid] message``; request fields are already in the message."""

    def format(self, record: logging.LogRecord) -> str:
        text = f"{_iso_millis(record.created)} {record.levelname:<7} [{record.process}] {record.getMessage()}"
        if record.exc_info:
            text += "\n" + self.formatException(record.exc_info)
        return text


def wants_json(settings: Logging, stream: Any = None) -> bool:
    """``format: auto`` means JSON unless stderr is a terminal (a person is watching)."""
    if settings.format != "auto":
        return settings.format == "json"
    stream = sys.stderr if stream is None else stream
    try:
        return not os.isatty(stream.fileno())
    except (AttributeError, OSError, ValueError):
        return True


def log_dict_config(settings: Logging) -> dict[str, Any]:
    """A ``logging.config.dictConfig`` document: corsproxy's and gunicorn's loggers, one handler on stderr.

    Handed to gunicorn as ``logconfig_dict`` so that the arbiter's own lines (worker booted, worker died) come out in
    the same format as the request lines; workers inherit it across the fork.
    """
    formatter = JsonFormatter if wants_json(settings) else TextFormatter
    level = settings.level.upper()
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"corsproxy": {"()": f"{formatter.__module__}.{formatter.__qualname__}"}},
        "handlers": {
            "stderr": {"class": "logging.StreamHandler", "formatter": "corsproxy", "stream": "ext://sys.stderr"},
        },
        "root": {"level": "WARNING", "handlers": ["stderr"]},
        "loggers": {
            "corsproxy": {"level": level, "handlers": ["stderr"], "propagate": False},
            "gunicorn.error": {"level": level, "handlers": ["stderr"], "propagate": False},
            "gunicorn.access": {"level": "CRITICAL", "handlers": [], "propagate": False},
            "aiohttp": {"level": "WARNING", "handlers": ["stderr"], "propagate": False},
        },
    }


class RequestLog:
    """An observer for :attr:`ProxyState.observers`: writes one line per finished request.

    Allowed requests are sampled with probability ``sample_allowed`` (busy sites log a fraction). Refusals and
    corsproxy's own errors (5xx, upstream failures) are what an operator looks for, so they are not sampled; but any
    client can send them by the thousand, so ``limiter`` writes at most ``logging.per_reason_lines`` of each reason per
    window and a summary of the rest (the process's :data:`~corsproxy.core.log_limit.REQUEST_LINES` unless one is
    given).
    """

    def __init__(
        self, settings: Logging, logger: logging.Logger | None = None, limiter: LineLimiter | None = None
    ) -> None:
        self.sample_allowed = settings.sample_allowed
        self.logger = logger or logging.getLogger(REQUEST_LOGGER)
        self.limiter = REQUEST_LINES if limiter is None else limiter
        self._random = random.random
        self._pid = os.getpid()
        self._second = -1
        self._stamp = ""
        self._pending: list[str] = []
        self._pending_handler: logging.StreamHandler[Any] | None = None
        self._parts: dict[int, tuple[Decision, str, str]] = {}  # see _decision_parts
        self._logger_json = _quote(self.logger.name) + ',"pid":' + str(self._pid)
        self._direct: dict[int, tuple[int, logging.StreamHandler[Any] | None]] = {}  # see _direct_for
        self._lines: dict[tuple[object, ...], tuple[Decision, str, str, str]] = {}  # see _write_direct
        self._lines_size = 0  # characters the kept pieces hold, see _LINE_PIECES_KEPT

    def __call__(self, outcome: Outcome) -> None:
        # Both gates come before anything is built: with logging.level above info (or allowed requests sampled out),
        # an observer that formats nothing costs a request a dict lookup, not a dozen fields.
        level = logging.WARNING if outcome.status >= 500 else logging.INFO
        if not self.logger.isEnabledFor(level):
            return
        decision = outcome.decision
        refused = decision.kind is not Kind.NON_CORS and not decision.allowed
        error = outcome.upstream_error
        if refused or error is not None or level > logging.INFO:
            # A dict increment and a clock read before anything is formatted: a flood costs no more than that.
            key = decision.reason if refused else _FAILURE_KEYS.get(error, "upstream_error") if error else "status_5xx"
            if not self.limiter.admit(key):
                return
        elif self.sample_allowed < 1.0 and (self.sample_allowed <= 0.0 or self._random() >= self.sample_allowed):
            return
        upstream_ms = None if outcome.upstream_latency is None else round(outcome.upstream_latency * 1000, 3)
        now = time.time()
        handler = self._direct_for(level, int(now))
        if handler is not None:
            self._write_direct(handler, level, outcome, upstream_ms, now)
            return
        verdict = _verdict(decision)
        fields = {
            "client": outcome.client,
            "method": outcome.method,
            "path": outcome.path,
            "origin": decision.origin,
            "kind": decision.kind.value,
            "decision": verdict,
            "reason": decision.reason.value,
            "status": outcome.status,
            "bytes": outcome.bytes_sent,
            "duration_ms": round(outcome.duration * 1000, 3),
            "upstream_ms": upstream_ms,
            "upstream_error": outcome.upstream_error,
        }
        args = (
            outcome.client or "-",
            outcome.method,
            outcome.path,
            decision.kind.value,
            decision.origin or "-",
            verdict,
            decision.reason.value,
            outcome.status,
            outcome.bytes_sent,
            "-" if upstream_ms is None else f"{upstream_ms}ms",
        )
        self.logger.log(level, _MESSAGE, *args, extra=fields)

    def _direct_for(self, level: int, second: int) -> logging.StreamHandler[Any] | None:
        """:meth:`_direct_handler`, looked up again once a second (a change to the logging setup is seen within one
        second) instead of a walk up the logger tree for every line."""
        known = self._direct.get(level)
        if known is None or known[0] != second:
            known = self._direct[level] = (second, self._direct_handler(level))
        return known[1]

    def _direct_handler(self, level: int) -> logging.StreamHandler[Any] | None:
        """The one stream handler a request line would reach, when the logging setup is corsproxy's own (a single
        ``StreamHandler`` with corsproxy's formatter, no filters on the way): then the line is formatted here,
        exactly as that formatter would, without a ``LogRecord`` and the caller lookup ``logging`` makes for each.
        Any other setup (an operator's handlers, filters, formatters) gets the ordinary ``logger.log``."""
        found: logging.Handler | None = None
        logger: logging.Logger | None = self.logger
        while logger is not None:
            if logger.filters:
                return None
            for handler in logger.handlers:
                if found is not None:
                    return None
                found = handler
            if not logger.propagate:
                break
            logger = logger.parent
        if (
            type(found) is not logging.StreamHandler
            or found.filters
            or level < found.level
            or type(found.formatter) not in (JsonFormatter, TextFormatter)
        ):
            return None
        return found

    def _write_direct(
        self, handler: logging.StreamHandler[Any], level: int, outcome: Outcome, upstream_ms: float | None, now: float
    ) -> None:
        """The line ``logging`` would write through ``handler``'s formatter, built by concatenation: the parts that
        depend only on the decision are made once per decision (a busy proxy sees the same few over and over), and
        the JSON values are encoded by the json module's own C string encoder, as ``json.dumps`` encodes them."""
        second = int(now)
        if second != self._second:
            self._second = second
            self._stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now))
        stamp = f"{self._stamp}.{int(now % 1 * 1000):03d}Z"  # as _iso_millis writes it
        decision = outcome.decision
        client, method, path, status, sent, error = (
            outcome.client,
            outcome.method,
            outcome.path,
            outcome.status,
            outcome.bytes_sent,
            outcome.upstream_error,
        )
        upstream = "-" if upstream_ms is None else f"{upstream_ms}ms"
        json_line = type(handler.formatter) is JsonFormatter
        # What a line says besides its time, duration and upstream latency repeats request after request (the same
        # client, target, decision and answer): its pieces are kept per those values (the decision by identity).
        key = (id(decision), client, method, path, status, sent, error, level, json_line)
        pieces = self._lines.get(key)
        if pieces is None or pieces[0] is not decision:
            pieces = self._line_pieces(decision, client, method, path, status, sent, error, level, json_line)
            size = len(path) + len(pieces[1]) + len(pieces[2])
            if len(self._lines) >= 4096 or self._lines_size + size > _LINE_PIECES_KEPT:
                self._lines.clear()  # bounded, in count and in characters: clients choose paths and origins
                self._lines_size = 0
            self._lines[key] = pieces
            self._lines_size += size
        if json_line:
            line = "".join(
                (
                    '{"time":"',
                    stamp,
                    pieces[1],
                    upstream,
                    pieces[2],
                    repr(round(outcome.duration * 1000, 3)),
                    ',"upstream_ms":',
                    "null" if upstream_ms is None else repr(upstream_ms),
                    pieces[3],
                )
            )
        else:
            line = f"{stamp}{pieces[1]}{upstream}"
        # Lines written in one event-loop iteration go out in one write at its end (a busy worker finishes many
        # requests per iteration), not one write and flush each; outside a loop, at once.
        if self._pending_handler is not handler and self._pending:
            self._flush()
        self._pending.append(line + handler.terminator)
        if len(self._pending) == 1:
            self._pending_handler = handler
            try:
                asyncio.get_running_loop().call_soon(self._flush)
            except RuntimeError:
                self._flush()

    def _line_pieces(
        self,
        decision: Decision,
        client: str,
        method: str,
        path: str,
        status: int,
        sent: int,
        error: str | None,
        level: int,
        json_line: bool,
    ) -> tuple[Decision, str, str, str]:
        """The fixed pieces of a line: JSON, what goes between the time and the upstream latency in the message,
        from there to the duration, and after the upstream latency; text, what follows the time up to the latency."""
        parts = self._parts.get(id(decision))
        if parts is None or parts[0] is not decision:
            parts = self._decision_parts(decision)
        message = f"{client or '-'} {method} {path} {parts[1]} {status:d} {sent:d}B upstream="
        if not json_line:
            name = "WARNING" if level == logging.WARNING else "INFO"
            return decision, f" {name:<7} [{self._pid}] {message}", "", ""
        quoted = _quote(message)  # the latency goes before its closing quote: digits, "." and "ms" need no escape
        head = "".join(
            (
                '","level":"warning","logger":' if level == logging.WARNING else '","level":"info","logger":',
                self._logger_json,
                ',"message":',
                quoted[:-1],
            )
        )
        middle = "".join(
            (
                '","client":',
                _quote(client),
                ',"method":',
                _quote(method),
                ',"path":',
                _quote(path),
                parts[2],
                repr(status),
                ',"bytes":',
                repr(sent),
                ',"duration_ms":',
            )
        )
        tail = ',"upstream_error":' + ("null" if error is None else _quote(error)) + "}"
        return decision, head, middle, tail

    def _decision_parts(self, decision: Decision) -> tuple[Decision, str, str]:
        """What a line says of its decision: the message's ``"kind" origin=... verdict (reason)`` and the JSON from
        ``"origin"`` to ``"status":``, kept per decision (identity: the decision cache hands out the same objects)."""
        verdict = _verdict(decision)
        kind, reason = decision.kind.value, decision.reason.value
        text = f'"{kind}" origin={decision.origin or "-"} {verdict} ({reason})'
        origin = "null" if decision.origin is None else _quote(decision.origin)
        json_part = (
            f',"origin":{origin},"kind":{_quote(kind)},"decision":{_quote(verdict)},"reason":{_quote(reason)},"status":'
        )
        if len(self._parts) >= 4096:
            self._parts.clear()  # bounded: refusals of ever-new origins make ever-new decisions
        made = self._parts[id(decision)] = (decision, text, json_part)
        return made

    def _flush(self) -> None:
        handler, lines = self._pending_handler, self._pending
        self._pending = []
        if handler is None or not lines:
            return
        with handler.lock or _NO_LOCK:
            try:
                handler.stream.write("".join(lines))
                handler.flush()
            except Exception:
                handler.handleError(logging.makeLogRecord({"msg": lines[0]}))


_MESSAGE = '%s %s %s "%s" origin=%s %s (%s) %d %dB upstream=%s'
#: Characters the kept line pieces may hold in all: a path can be ``limits.max_header_size`` long and is kept three
#: times (the key, the message, the path field; quotes and backslashes escaped in two), so a bound on the count alone
#: would let any client make a worker keep hundreds of megabytes. Lines of paths clients repeat are a few hundred.
_LINE_PIECES_KEPT = 1 << 22
#: A JSON string literal, as json.dumps writes one (ensure_ascii): the C encoder when the json module has it.
_quote = json.encoder.encode_basestring_ascii


def _verdict(decision: Decision) -> str:
    return "n/a" if decision.kind is Kind.NON_CORS else ("allowed" if decision.allowed else "refused")


class _NoLock:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


_NO_LOCK = _NoLock()
