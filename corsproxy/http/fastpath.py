"""The preflight fast path: CORS preflights answered below aiohttp's request machinery, from cached response bytes.

aiohttp spends most of a preflight's time on the ``Request`` object, the handler task, the router, middlewares and the
``Response`` (bench/RESULTS.md has the profile), against a small fraction for a cached CORS decision. A preflight
needs none of it: it has no body, is never forwarded, and its answer is a pure function of the decision. So when a
connection is idle and a complete ``OPTIONS`` message with ``Access-Control-Request-Method`` arrives, the connection
protocol (:mod:`corsproxy.http.protocol`) hands it to :class:`PreflightResponder`, which decides it through the same
:class:`~corsproxy.core.decision.DecisionCache` and builds the same :func:`~corsproxy.core.answer.preflight_answer` as
the ordinary handler, and returns it serialised. Anything unusual — HTTP/1.0, ``Connection: close``, a body,
report-only mode, an oversized head, an absolute-form target — returns ``None`` and takes the ordinary path, so the
CORS rules live in one place and this only removes overhead.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from email.utils import formatdate

import aiohttp
from aiohttp import web
from aiohttp.http_parser import RawRequestMessage

from corsproxy.core.answer import TEXT_PLAIN, Answer, preflight_answer
from corsproxy.core.decision import CorsRequest
from corsproxy.http.app import STATE, observe, oversized_head, peer, refused_target

__all__ = ["FastAnswer", "PreflightResponder"]

_REASONS = {200: b"OK", 204: b"No Content", 403: b"Forbidden"}

#: Answers a complete request message on an idle connection with the bytes of a whole response, or ``None``.
FastAnswer = Callable[[RawRequestMessage, web.RequestHandler], "bytes | None"]


class PreflightResponder:
    """The fast path's answer function for one application (see the module docstring for what it answers)."""

    def __init__(self, app: web.Application) -> None:
        self._app = app
        self._bytes: dict[Answer, tuple[bytes, bytes]] = {}
        self._date_second = -1
        self._date = b""

    def __call__(self, message: RawRequestMessage, protocol: web.RequestHandler) -> bytes | None:
        if (
            message.method != "OPTIONS"
            or message.should_close
            or message.upgrade
            or message.version != aiohttp.HttpVersion11
        ):
            return None
        headers = message.headers
        if "Expect" in headers:
            return None  # the ordinary path answers expectations (417 for unknown ones)
        path = message.path
        asked = CorsRequest.from_fields("OPTIONS", path, lambda name: headers.getall(name, ()))
        if not asked.request_methods or not asked.origins or not path.startswith("/"):
            return None
        state = self._app.get(STATE)
        if state is None:
            return None
        config = state.config
        engine = config.engine
        if oversized_head("OPTIONS", path, message.raw_headers, config.limits.max_header_size) is not None:
            return None  # the ordinary path answers 414/431
        started = time.monotonic()
        decision, cors_headers = state.decider().judge(asked, state.store, time.time())
        if engine.report_only(decision) or cors_headers is None:
            return None
        if refused_target(path, path, decision, config) is not None:
            return None  # the ordinary path answers 400 with the reason
        answer = preflight_answer(engine, decision, cors_headers)
        head, body = self._serialized(answer)
        observe(state, "OPTIONS", path, peer(protocol), decision, answer.status, len(body), started)
        return head + self._date_line() + b"\r\n" + body

    def _serialized(self, answer: Answer) -> tuple[bytes, bytes]:
        """The head (without ``Date`` and the blank line) and body of ``answer``, as the ordinary path writes them."""
        cached = self._bytes.get(answer)
        if cached is not None:
            return cached
        lines = [b"HTTP/1.1 %d %s\r\n" % (answer.status, _REASONS.get(answer.status, b"OK"))]
        body = answer.body
        if body:
            # Where the ordinary path's text response has it: set when the response is built, before its headers.
            lines.append(b"Content-Type: %s\r\n" % TEXT_PLAIN.encode("ascii"))
        lines.extend(f"{name}: {value}\r\n".encode("latin-1") for name, value in answer.headers)
        if answer.status != 204:
            lines.append(b"Content-Length: %d\r\n" % len(body))
        if len(self._bytes) >= 4096:
            self._bytes.clear()  # bounded like the decision cache it mirrors
        cached = self._bytes[answer] = (b"".join(lines), body)
        return cached

    def _date_line(self) -> bytes:
        now = int(time.time())
        if now != self._date_second:
            self._date_second = now
            self._date = b"Date: " + formatdate(now, usegmt=True).encode("ascii") + b"\r\n"
        return self._date
