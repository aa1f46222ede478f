"""The decision table's configuration and its named preflight cases (the rs/cors shape: each case gives the reason
and the *complete* set of CORS response headers). Judged by the decision core in ``test_decision.py``, and answered
by both paths of the real proxy in ``test_fast_preflight.py`` and by the decision cache in
``test_decision_cache.py``."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from corsproxy.core.decision import Reason
from tests.support.config import BASE_CONFIG, merge

__all__ = ["ALLOW_DEFAULT", "CONFIG", "PREFLIGHTS", "PREFLIGHT_VARY", "REFUSED", "Preflight", "allow"]

CONFIG: dict[str, Any] = merge(
    BASE_CONFIG,
    {
        "cors": {
            "allow_origins": [
                "https://app.example.com",
                "https://*.example.org",
                "http://localhost:*",
                {"origin": "https://x.partner.net", "policy": "partners"},
                {"origin": "https://pna.example.com", "policy": "private"},
                {"origin": "https://star.example.com", "policy": "anyheaders"},
            ]
        },
        "policies": {
            "partners": {"allow_methods": ["GET"], "allow_credentials": False, "max_age": 60, "expose_headers": []},
            "private": {"allow_private_network": True},
            "anyheaders": {"allow_headers": ["*"], "allow_methods": ["*"], "allow_credentials": True},
        },
        "routes": [{"path": "/public/", "allow_origins": ["*"], "policy": "public"}],
    },
)
CONFIG["policies"]["public"] = {"allow_credentials": False, "allow_methods": ["GET", "HEAD"], "max_age": 300}

PREFLIGHT_VARY = "Origin, Access-Control-Request-Method, Access-Control-Request-Headers, " + (
    "Access-Control-Request-Private-Network"
)
ALLOW_DEFAULT = {
    "Vary": PREFLIGHT_VARY,
    "Access-Control-Allow-Credentials": "true",
    "Access-Control-Allow-Methods": "DELETE, GET, POST, PUT",
    "Access-Control-Max-Age": "600",
}
REFUSED = {"Vary": PREFLIGHT_VARY}


@dataclass
class Preflight:
    origin: list[str]
    method: list[str]
    headers: list[str] = field(default_factory=list)
    path: str = "/api/x"
    private_network: bool = False


def allow(origin: str, **extra: str) -> dict[str, str]:
    return {**ALLOW_DEFAULT, "Access-Control-Allow-Origin": origin, **extra}


PREFLIGHTS: dict[str, tuple[Preflight, Reason, dict[str, str]]] = {
    "exact origin": (
        Preflight(["https://app.example.com"], ["PUT"], ["content-type"]),
        Reason.ALLOWED,
        allow("https://app.example.com", **{"Access-Control-Allow-Headers": "content-type"}),
    ),
    "subdomain pattern": (
        Preflight(["https://a.b.example.org"], ["DELETE"]),
        Reason.ALLOWED,
        allow("https://a.b.example.org"),
    ),
    "port pattern": (Preflight(["http://localhost:5173"], ["POST"]), Reason.ALLOWED, allow("http://localhost:5173")),
    "headers with spaces, empties, two lines, mixed case": (
        Preflight(["https://app.example.com"], ["POST"], [" Content-Type ,, ", "X-Api-Key,authorization"]),
        Reason.ALLOWED,
        allow("https://app.example.com", **{"Access-Control-Allow-Headers": "authorization, content-type, x-api-key"}),
    ),
    "look-alike suffix": (Preflight(["https://app.example.com.evil.net"], ["GET"]), Reason.ORIGIN_NOT_ALLOWED, REFUSED),
    "look-alike prefix": (Preflight(["https://evilapp.example.com"], ["GET"]), Reason.ORIGIN_NOT_ALLOWED, REFUSED),
    "look-alike dot": (Preflight(["https://appxexample.com"], ["GET"]), Reason.ORIGIN_NOT_ALLOWED, REFUSED),
    "other scheme": (Preflight(["http://app.example.com"], ["GET"]), Reason.ORIGIN_NOT_ALLOWED, REFUSED),
    "other port": (Preflight(["https://app.example.com:8443"], ["GET"]), Reason.ORIGIN_NOT_ALLOWED, REFUSED),
    "pattern apex": (Preflight(["https://example.org"], ["GET"]), Reason.ORIGIN_NOT_ALLOWED, REFUSED),
    "pattern look-alike": (Preflight(["https://evilexample.org"], ["GET"]), Reason.ORIGIN_NOT_ALLOWED, REFUSED),
    "two origin lines": (
        Preflight(["https://app.example.com", "https://app.example.com"], ["GET"]),
        Reason.ORIGIN_MALFORMED,
        REFUSED,
    ),
    "uppercase origin": (Preflight(["https://APP.example.com"], ["GET"]), Reason.ORIGIN_MALFORMED, REFUSED),
    "null origin": (Preflight(["null"], ["GET"]), Reason.ORIGIN_NULL, REFUSED),
    "method case-sensitive": (Preflight(["https://app.example.com"], ["put"]), Reason.METHOD_NOT_ALLOWED, REFUSED),
    "method not listed": (Preflight(["https://app.example.com"], ["PATCH"]), Reason.METHOD_NOT_ALLOWED, REFUSED),
    "two method lines": (
        Preflight(["https://app.example.com"], ["PUT", "PUT"]),
        Reason.METHOD_MALFORMED,
        REFUSED,
    ),
    "method not a token": (Preflight(["https://app.example.com"], ["P UT"]), Reason.METHOD_MALFORMED, REFUSED),
    "header not allowed": (
        Preflight(["https://app.example.com"], ["PUT"], ["x-other"]),
        Reason.HEADER_NOT_ALLOWED,
        REFUSED,
    ),
    "header not a token": (
        Preflight(["https://app.example.com"], ["PUT"], ["x a"]),
        Reason.HEADERS_MALFORMED,
        REFUSED,
    ),
    "too many empty elements": (
        Preflight(["https://app.example.com"], ["PUT"], ["," * 40]),
        Reason.HEADERS_MALFORMED,
        REFUSED,
    ),
    "too many names": (
        Preflight(["https://app.example.com"], ["PUT"], [",".join(f"x-{i}" for i in range(100))]),
        Reason.HEADERS_MALFORMED,
        REFUSED,
    ),
    "per-origin policy narrows methods": (
        Preflight(["https://x.partner.net"], ["PUT"]),
        Reason.METHOD_NOT_ALLOWED,
        REFUSED,
    ),
    "per-origin policy: no credentials, own max-age": (
        Preflight(["https://x.partner.net"], ["GET"]),
        Reason.ALLOWED,
        {
            "Vary": PREFLIGHT_VARY,
            "Access-Control-Allow-Origin": "https://x.partner.net",
            "Access-Control-Allow-Methods": "GET",
            "Access-Control-Max-Age": "60",
        },
    ),
    "wildcard headers never cover authorization": (
        Preflight(["https://star.example.com"], ["PUT"], ["x-anything", "authorization"]),
        Reason.HEADER_NOT_ALLOWED,
        REFUSED,
    ),
    "wildcards with credentials echo the request": (
        Preflight(["https://star.example.com"], ["PATCH"], ["x-anything"]),
        Reason.ALLOWED,
        {
            **allow("https://star.example.com"),
            "Access-Control-Allow-Methods": "PATCH",
            "Access-Control-Allow-Headers": "x-anything",
        },
    ),
    "private network not enabled": (
        Preflight(["https://app.example.com"], ["GET"], private_network=True),
        Reason.PRIVATE_NETWORK_NOT_ALLOWED,
        REFUSED,
    ),
    "private network enabled": (
        Preflight(["https://pna.example.com"], ["GET"], private_network=True),
        Reason.ALLOWED,
        allow("https://pna.example.com", **{"Access-Control-Allow-Private-Network": "true"}),
    ),
    "public route answers * without credentials": (
        Preflight(["https://anyone.example.net"], ["GET"], path="/public/data"),
        Reason.ALLOWED,
        {
            "Vary": PREFLIGHT_VARY,
            "Access-Control-Allow-Origin": "*",
            "Access-Control-Allow-Methods": "GET, HEAD",
            "Access-Control-Max-Age": "300",
        },
    ),
    "public route keeps its own methods": (
        Preflight(["https://anyone.example.net"], ["PUT"], path="/public/data"),
        Reason.METHOD_NOT_ALLOWED,
        REFUSED,
    ),
    "path parameter cannot skip the route": (
        Preflight(["https://anyone.example.net"], ["GET"], path="/public/..;/admin"),
        Reason.PATH_AMBIGUOUS,  # servers read it under /public/ or outside it: refused (400)
        REFUSED,
    ),
    "backslashes are separators": (
        Preflight(["https://anyone.example.net"], ["GET"], path="/public\\..\\admin"),
        Reason.PATH_AMBIGUOUS,  # servers read it under /public/ or outside it: refused (400)
        REFUSED,
    ),
    "dot segments cannot reach another route": (
        Preflight(["https://anyone.example.net"], ["GET"], path="/public/..%2Fadmin"),
        Reason.PATH_AMBIGUOUS,  # servers read it under /public/ or outside it: refused (400)
        REFUSED,
    ),
}
