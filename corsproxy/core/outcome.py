"""What one finished request came to, as the observers (metrics, request log) see it: a plain value, built in one
place by the HTTP shell whichever path answered."""

from __future__ import annotations

from dataclasses import dataclass

from corsproxy.core.decision import Decision


@dataclass(frozen=True, slots=True)
class Outcome:
    """One finished request, as observers (metrics, request log) see it."""

    method: str
    path: str
    client: str
    decision: Decision
    status: int
    bytes_sent: int
    duration: float  # seconds, whole request
    upstream_latency: float | None  # seconds to the upstream's response head; None when not forwarded
    upstream_error: str | None = None  # "timeout" | "connect" | "protocol" | "disconnect"
