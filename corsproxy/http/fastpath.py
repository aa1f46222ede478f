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
from corsproxy.core.decision import CorsRequest, Decision, DecisionCache, route_key
from corsproxy.core.forwarding import climbs_above_root
from corsproxy.http.app import STATE, observe, oversized_head, peer, refused_target

__all__ = ["DateLine", "FastAnswer", "PreflightResponder", "plain_message"]

_REASONS = {200: b"OK", 204: b"No Content", 403: b"Forbidden"}

#: Answers a complete request message on an idle connection with the bytes of a whole response, or ``None``.
FastAnswer = Callable[[RawRequestMessage, web.RequestHandler], "bytes | None"]


def plain_message(message: RawRequestMessage) -> bool:
    """A message the fast paths may answer: HTTP/1.1 kept alive, no upgrade, no ``Expect`` (the ordinary path answers
    expectations: 100 once the upstream is ready, 417 for unknown ones). Anything else is left to the ordinary path."""
    return (
        not message.should_close
        and not message.upgrade
        and message.version == aiohttp.HttpVersion11
        and "Expect" not in message.headers
    )


class PreflightResponder:
    """The fast path's answer function for one application (see the module docstring for what it answers).

    Beside the decision cache it keeps the *serialised* answer per request shape — the CORS field lines and the routes
    the target reaches, the key :class:`~corsproxy.core.decision.DecisionCache` uses — so a repeated preflight costs
    a few header lookups and a dict hit: no request value, decision or answer is built. The entries follow the
    decision cache's rules: dropped when the origin set's generation or the engine changes, not used past the matched
    entry's expiry, bounded.
    """

    def __init__(self, app: web.Application) -> None:
        self._app = app
        self._bytes: dict[Answer, tuple[bytes, bytes]] = {}
        self._date_line = DateLine()
        # shape -> (head, body, status, decision, valid until); a head of b"" marks a shape the ordinary path answers
        self._answers: dict[tuple[object, ...], tuple[bytes, bytes, int, Decision, float]] = {}
        self._decider: DecisionCache | None = None
        self._generation = -1

    def __call__(self, message: RawRequestMessage, protocol: web.RequestHandler) -> bytes | None:
        if message.method != "OPTIONS" or not plain_message(message):
            return None
        headers = message.headers
        path = message.path
        origins = tuple(headers.getall("Origin", ()))
        methods = tuple(headers.getall("Access-Control-Request-Method", ()))
        if not methods or not origins or not path.startswith("/") or "#" in path:
            return None  # a fragment is refused by the ordinary path, with its reason
        state = self._app.get(STATE)
        if state is None:
            return None
        config = state.config
        if oversized_head("OPTIONS", path, message.raw_headers, config.limits.max_header_size) is not None:
            return None  # the ordinary path answers 414/431
        if config.upstream.base_path and climbs_above_root(path):
            return None  # the ordinary path answers 400 with the reason
        started = time.monotonic()
        now = time.time()
        decider = state.decider()
        store = state.store
        generation = store.generation()
        if decider is not self._decider or generation != self._generation:
            self._answers.clear()
            self._decider = decider
            self._generation = generation
        engine = decider.engine
        request_headers = tuple(headers.getall("Access-Control-Request-Headers", ()))
        private_network = headers.get("Access-Control-Request-Private-Network") == "true"
        key = (origins, methods, request_headers, private_network, route_key(engine, path))
        hit = self._answers.get(key)
        if hit is None or now >= hit[4]:
            asked = CorsRequest("OPTIONS", origins, methods, request_headers, path, private_network)
            decision, cors_headers, valid_until = decider.judge_until(asked, store, now)
            if engine.report_only(decision) or cors_headers is None or refused_target(path, path, decision, config):
                head, body, status = b"", b"", 0  # report-only, response-dependent headers, an ambiguous path
            else:
                answer = preflight_answer(engine, decision, cors_headers)
                (head, body), status = self._serialized(answer), answer.status
            hit = (head, body, status, decision, valid_until)
            if valid_until > now:  # not for what the decision cache does not memoise either (several Origin lines)
                if len(self._answers) >= 4096:
                    self._answers.clear()  # bounded like the decision cache
                self._answers[key] = hit
        head, body, status, decision, _ = hit
        if not head:
            return None
        observe(state, "OPTIONS", path, peer(protocol), decision, status, len(body), started)
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


class DateLine:
    """The ``Date`` header line of a response written now (RFC 9110 §6.6.1), made again once a second."""

    __slots__ = ("_line", "_second")

    def __init__(self) -> None:
        self._second = -1
        self._line = b""

    def __call__(self) -> bytes:
        now = int(time.time())
        if now != self._second:
            self._second = now
            self._line = b"Date: " + formatdate(now, usegmt=True).encode("ascii") + b"\r\n"
        return self._line
