"""Route × origin composition (the README's truth table, as a table) and the regex importer."""

from __future__ import annotations

from typing import Any

import pytest

from corsproxy.config import parse_config
from corsproxy.core.decision import CorsRequest, Mode, Reason, StaticOriginSet
from corsproxy.core.regex_import import RegexImportError, compare_samples, convert_regex
from tests.support.config import BASE_CONFIG, merge

ROUTED: dict[str, Any] = merge(
    BASE_CONFIG,
    {
        "cors": {
            "allow_origins": ["https://app.example.com", {"origin": "https://p.example.net", "policy": "partners"}]
        },
        "policies": {
            "partners": {"allow_methods": ["GET"], "allow_credentials": False},
            "admin": {"allow_methods": ["GET", "POST"]},
            "public": {"allow_credentials": False},
        },
        "routes": [
            {"path": "/admin/", "allow_origins": ["https://admin.example.com"], "policy": "admin"},
            {"path": "/public/", "allow_origins": ["*"], "policy": "public"},
            {"path": "/legacy", "mode": "report-only"},
        ],
    },
)

# (path, origin) -> (reason, policy name or None, mode)
TRUTH_TABLE = {
    "no route, origin in store": ("/api/x", "https://app.example.com", Reason.ALLOWED, "default", Mode.ENFORCE),
    "no route, per-origin policy": ("/api/x", "https://p.example.net", Reason.ALLOWED, "partners", Mode.ENFORCE),
    "no route, origin unknown": ("/api/x", "https://other.example.com", Reason.ORIGIN_NOT_ALLOWED, None, Mode.ENFORCE),
    "route list, origin listed": ("/admin/users", "https://admin.example.com", Reason.ALLOWED, "admin", Mode.ENFORCE),
    "route list, origin only in store": (
        "/admin/users",
        "https://app.example.com",
        Reason.ORIGIN_NOT_ALLOWED,
        None,
        Mode.ENFORCE,
    ),
    "route list is *": ("/public/x", "https://anyone.example.org", Reason.ALLOWED, "public", Mode.ENFORCE),
    "route without list uses the store": (
        "/legacy/x",
        "https://p.example.net",
        Reason.ALLOWED,
        "partners",
        Mode.REPORT_ONLY,
    ),
    "route without list, origin unknown": (
        "/legacy",
        "https://other.example.com",
        Reason.ORIGIN_NOT_ALLOWED,
        None,
        Mode.REPORT_ONLY,
    ),
    "prefix is segment-aware": ("/legacyx", "https://app.example.com", Reason.ALLOWED, "default", Mode.ENFORCE),
    "store origin on admin route via dot segments": (
        "/public/../admin/x",
        "https://anyone.example.org",
        Reason.PATH_AMBIGUOUS,  # nginx reads /admin/x, Express /public/..: refused, never judged by /public/
        None,
        Mode.ENFORCE,
    ),
}


@pytest.mark.parametrize(("path", "origin", "reason", "policy", "mode"), TRUTH_TABLE.values(), ids=TRUTH_TABLE.keys())
def test_route_origin_truth_table(path: str, origin: str, reason: Reason, policy: str | None, mode: Mode) -> None:
    config = parse_config(ROUTED, env={})
    store = StaticOriginSet({k: e.policy for k, e in config.origins.items()})
    decision = config.engine.judge(CorsRequest("GET", (origin,), path=path), store, 0.0)
    assert decision.reason is reason
    assert (decision.policy.name if decision.allowed and decision.policy else None) == policy
    assert decision.mode is mode


CONVERSIONS = {
    "optional www": (r"^https://(www\.)?example\.com$", ["https://www.example.com", "https://example.com"], []),
    "subdomains": (r"^https://.*\.example\.com$", ["https://*.example.com"], []),
    "hole: no dot before domain": (
        r"^https://.*example\.com$",
        ["https://example.com", "https://*.example.com"],
        ["look-alikes such as https://evilexample.com"],
    ),
    "alternation, optional s, port digits": (
        r"^https?://(app|admin)\.example\.com(:\d+)?$",
        [
            "https://app.example.com:*",
            "https://app.example.com",
            "https://admin.example.com:*",
            "https://admin.example.com",
            "http://app.example.com:*",
            "http://app.example.com",
            "http://admin.example.com:*",
            "http://admin.example.com",
        ],
        [],
    ),
    "unanchored, unescaped": (
        "https://example.com",
        ["https://example.com"],
        ["not anchored with ^", "not anchored with $", "unescaped '.'"],
    ),
    "one-label class widens": (r"^https://[a-z0-9-]+\.example\.com$", ["https://*.example.com"], ["exactly one label"]),
}


@pytest.mark.parametrize(("regex", "entries", "notes"), CONVERSIONS.values(), ids=CONVERSIONS.keys())
def test_convert_regex(regex: str, entries: list[str], notes: list[str]) -> None:
    conversion = convert_regex(regex)
    assert conversion.entries == entries
    assert conversion.unconverted == []
    for note in notes:
        assert any(note in n for n in conversion.notes), conversion.notes
    if not notes:
        assert conversion.notes == []


@pytest.mark.parametrize(
    "regex",
    [r"^https://(?=x)y$", r"^https://ex(a+)mple\.com$", r"^https://\w+\.com$", r"^(https://a", r"^https://\x61\.com$"],
)
def test_unsupported_regex_is_refused(regex: str) -> None:
    with pytest.raises(RegexImportError):
        convert_regex(regex)


def test_compare_samples_shows_the_holes() -> None:
    only_regex, only_entries = compare_samples(
        r"^https://.*example\.com$",
        ["https://example.com", "https://*.example.com"],
        ["https://example.com", "https://a.example.com", "https://evil-example.com", "# comment", ""],
    )
    assert only_regex == ["https://evil-example.com"]
    assert only_entries == []
