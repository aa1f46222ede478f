"""Explain: why a request would be allowed or refused, and what to change. Used by ``corsproxy explain`` and the admin
API. It runs the server's own :meth:`CorsEngine.decide`, never a copy of it.

Must not import aiohttp or lmdb (the origin set is passed in).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from corsproxy.core.decision import CorsRequest, Decision, Kind, OriginSet, Reason, actual_headers, preflight_headers
from corsproxy.core.settings import DEFAULT_POLICY, Config

__all__ = ["Explanation", "explain"]


@dataclass(frozen=True, slots=True)
class Explanation:
    decision: Decision
    request: str
    why: str
    fix: str
    headers: list[tuple[str, str]]

    @property
    def allowed(self) -> bool:
        return self.decision.allowed

    def as_json(self) -> dict[str, Any]:
        d = self.decision
        return {
            "allowed": d.allowed,
            "reason": d.reason.value,
            "kind": d.kind.value,
            "request": self.request,
            "matched": d.matched,
            "policy": d.policy.name if d.policy else None,
            "route": d.route.prefix if d.route else None,
            "mode": d.mode.value,
            "why": self.why,
            "fix": self.fix,
            "headers": [[n, v] for n, v in self.headers],
        }

    def text(self) -> str:
        d = self.decision
        lines = [
            f"decision: {'allowed' if d.allowed else 'refused'} ({d.reason.value})",
            f"request:  {self.request}",
            f"matched:  {d.matched or '(no entry)'}"
            + (f" — policy {d.policy.name!r}" if d.policy else "")
            + (f" — route {d.route.prefix!r} (routes[{d.route.index}])" if d.route else " — no route (the store)"),
            f"why:      {self.why}",
        ]
        if self.fix:
            lines.append(f"fix:      {self.fix}")
        lines.append("response CORS headers:" if self.headers else "response CORS headers: none")
        lines.extend(f"  {name}: {value}" for name, value in self.headers)
        return "\n".join(lines)


def _policy_path(name: str) -> str:
    return "cors" if name == DEFAULT_POLICY else f"policies.{name}"


def explain(
    config: Config,
    store: OriginSet,
    origin: str,
    method: str | None = None,
    headers: str = "",
    path: str = "/",
    now: float | None = None,
) -> Explanation:
    """Decide a request described by its parts: with ``method`` it is a preflight for that method, else a GET."""
    engine = config.engine
    request_headers = [headers] if headers else []
    if method is not None:
        asked = CorsRequest("OPTIONS", (origin,), (method,), tuple(request_headers), path)
        decision = engine.judge(asked, store, now or time.time())
        request = f"preflight for {method} {path} from {origin}" + (f" with headers {headers}" if headers else "")
        cors_headers = preflight_headers(engine, decision)
    else:
        decision = engine.judge(CorsRequest("GET", (origin,), path=path), store, now or time.time())
        request = f"GET {path} from {origin}"
        cors_headers = [("Vary", "Origin"), *actual_headers(decision)]
    why, fix = _reasoning(config, decision, origin)
    return Explanation(decision, request, why, fix, cors_headers)


def _reasoning(config: Config, d: Decision, origin: str) -> tuple[str, str]:
    policy = d.policy
    where = f"routes[{d.route.index}].allow_origins" if d.route and d.route.origins else "the origin store"
    add = (
        f"add it to routes[{d.route.index}].allow_origins"
        if d.route and d.route.origins
        else f"corsproxy origins add {origin} (or list it in cors.allow_origins)"
    )
    reason = d.reason
    if reason is Reason.ALLOWED:
        assert policy is not None
        kind = "preflight" if d.kind is Kind.PREFLIGHT else "request"
        return f"{d.matched!r} in {where} allows this {kind} under policy {policy.name!r}", ""
    if reason is Reason.SAME_ORIGIN:
        return f"{origin!r} is listed in public_origins: same-origin requests need no CORS headers", ""
    if reason is Reason.ORIGIN_MALFORMED:
        return (
            f"{origin!r} is not one serialized origin as a browser sends it (lowercase scheme://host[:port], no path, "
            "no default port): it is never allowed and never reflected",
            "send the origin exactly as the browser's Origin header shows it",
        )
    if reason is Reason.ORIGIN_NULL:
        return (
            '"null" is the opaque origin of sandboxed iframes, file: pages and cross-origin redirects: '
            "anyone can send it",
            "serve the page from a real origin and allow that origin",
        )
    if reason is Reason.ORIGIN_NOT_ALLOWED:
        return f"no entry in {where} covers {origin!r} (exact, port or subdomain pattern)", add
    if reason is Reason.ORIGIN_EXPIRED:
        return (
            f"{d.matched!r} in {where} has expired",
            f"re-add it with a new expiry, e.g. corsproxy origins add {d.matched} --ttl 7d",
        )
    if reason is Reason.POLICY_UNKNOWN:
        return (
            f"{d.matched!r} names policy {d.detail!r}, which the configuration no longer defines",
            f"define policies.{d.detail} again, or re-add the origin with an existing --policy",
        )
    if reason is Reason.ORIGIN_UNSAFE_FOR_POLICY:
        return (
            f"{d.matched!r} was accepted under an earlier configuration, but policy {d.detail!r} as configured now "
            "would refuse it (e.g. '*' or an http: origin on a policy that has since gained credentials)",
            f"remove it (corsproxy origins remove {d.matched}), move it to another --policy, or see "
            "`corsproxy check` for the exact reason",
        )
    if reason is Reason.PATH_AMBIGUOUS:
        return (
            f"servers read this path as falling under different routes ({d.detail}): corsproxy answers 400 and "
            "forwards nothing",
            "send the path in its plain, normalised form (no '..', ';', '\\', encoded '/' or '.', repeated slashes)",
        )
    assert policy is not None
    path = _policy_path(policy.name)
    if reason is Reason.METHOD_MALFORMED:
        return f"Access-Control-Request-Method {d.detail!r} is not one method token", "send exactly one method"
    if reason is Reason.METHOD_NOT_ALLOWED:
        allowed = ", ".join(sorted(policy.allow_methods)) or "(none)"
        return (
            f"policy {policy.name!r} allows methods {allowed}; {d.detail!r} is not among them "
            "(methods are case-sensitive)",
            f"add {d.detail} to {path}.allow_methods",
        )
    if reason is Reason.HEADERS_MALFORMED:
        return "Access-Control-Request-Headers is not a list of header names within bounds", ""
    if reason is Reason.HEADER_NOT_ALLOWED:
        extra = ' ("*" never covers authorization)' if policy.any_header and d.detail == "authorization" else ""
        return (
            f"policy {policy.name!r} does not allow request header {d.detail!r}{extra}",
            f"add {d.detail} to {path}.allow_headers",
        )
    if reason is Reason.PRIVATE_NETWORK_NOT_ALLOWED:
        return (
            f"the preflight asks for private network access, which policy {policy.name!r} does not allow",
            f"set allow_private_network: true on {path}",
        )
    return reason.value, ""
