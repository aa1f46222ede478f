"""corsproxy's own answers, as values: status, headers and body of every response the proxy writes itself rather than
relays (a preflight, a refusal, an error). The HTTP shell only serialises them — the ordinary handler into an aiohttp
response, the preflight fast path into cached bytes — so both paths answer with the same status, headers and body.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from corsproxy.core.decision import CorsEngine, CorsHeaders, Decision, actual_headers, preflight_headers

__all__ = ["REFUSED_PREFLIGHT", "Answer", "error_answer", "preflight_answer"]

#: The body of a refused preflight: a browser never shows it, a person debugging with curl reads it.
REFUSED_PREFLIGHT = "CORS preflight refused"
#: The type of every non-empty body corsproxy writes itself.
TEXT_PLAIN = "text/plain; charset=utf-8"


@dataclass(frozen=True, slots=True)
class Answer:
    """A response corsproxy writes itself. A non-empty ``text`` is the body, sent as ``text/plain; charset=utf-8``
    with a newline appended; an empty one means no body."""

    status: int
    headers: CorsHeaders
    text: str = ""

    @property
    def body(self) -> bytes:
        return (self.text + "\n").encode("utf-8") if self.text else b""


def preflight_answer(
    engine: CorsEngine, decision: Decision, headers: Iterable[tuple[str, str]] | None = None
) -> Answer:
    """The answer to a preflight: the policy's status without a body when allowed, 403 with a short text when not.
    ``headers`` are the decision's CORS headers when already built (the decision cache keeps them)."""
    cors = tuple(preflight_headers(engine, decision) if headers is None else headers)
    if decision.allowed:
        assert decision.policy is not None
        return Answer(decision.policy.preflight_status, cors)
    return Answer(403, cors, REFUSED_PREFLIGHT)


def error_answer(status: int, text: str, decision: Decision) -> Answer:
    """corsproxy's own 4xx/5xx: readable by an allowed origin, so the browser shows the page the real error rather
    than a CORS failure."""
    return Answer(status, (("Vary", "Origin"), *actual_headers(decision)), text)
