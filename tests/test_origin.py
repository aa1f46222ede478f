"""The origin parser and canonicaliser as tables (CORS-RULES 3-6). No sockets: the core is pure."""

from __future__ import annotations

import pytest

from corsproxy.core.origin import MAX_ORIGIN_LENGTH, EntryError, lookup_keys, parse_origin_entry, parse_request_origin

WELL_FORMED = [
    ("https://app.example.com", ("https", "app.example.com", None)),
    ("http://localhost:3000", ("http", "localhost", 3000)),
    ("http://127.0.0.1:8080", ("http", "127.0.0.1", 8080)),
    ("http://[::1]:8080", ("http", "[::1]", 8080)),
    ("https://xn--bcher-kva.example", ("https", "xn--bcher-kva.example", None)),
    (
        "chrome-extension://abcdefghijklmnopabcdefghijklmnop",
        ("chrome-extension", "abcdefghijklmnopabcdefghijklmnop", None),
    ),
    ("https://a-b.c-d.example:65535", ("https", "a-b.c-d.example", 65535)),
]


@pytest.mark.parametrize(("value", "parts"), WELL_FORMED, ids=[v for v, _ in WELL_FORMED])
def test_request_origin_well_formed(value: str, parts: tuple[str, str, int | None]) -> None:
    origin = parse_request_origin(value)
    assert origin is not None
    assert (origin.scheme, origin.host, origin.port) == parts
    assert origin.value == value


MALFORMED = {
    "uppercase host": "https://App.example.com",
    "uppercase scheme": "HTTPS://app.example.com",
    "trailing slash": "https://app.example.com/",
    "path": "https://app.example.com/x",
    "default https port": "https://app.example.com:443",
    "default http port": "http://app.example.com:80",
    "port zero": "https://app.example.com:0",
    "port too big": "https://app.example.com:65536",
    "leading zero port": "https://app.example.com:0443",
    "empty port": "https://app.example.com:",
    "list of origins": "https://a.example.com https://b.example.com",
    "comma list": "https://a.example.com,https://b.example.com",
    "leading space": " https://app.example.com",
    "backtick escape": "https://app.example.com%60.evil.net",
    "underscore": "https://app_x.example.com",
    "crlf": "https://app.example.com\r\nX-Injected: 1",
    "userinfo": "https://user@app.example.com",
    "query": "https://app.example.com?x",
    "unicode host": "https://bücher.example",
    "no scheme": "app.example.com",
    "empty": "",
    "wildcard": "https://*.example.com",
    "bad ipv4": "http://256.0.0.1",
    "ipv4 leading zero": "http://127.000.0.1",
    "numeric last label": "http://a.123",
    "ipv6 not compressed": "http://[0:0:0:0:0:0:0:1]",
    "label starts with hyphen": "https://-a.example.com",
    "empty label": "https://a..example.com",
    "too long": "https://" + "a" * MAX_ORIGIN_LENGTH + ".com",
    "null uppercase": "Null",
}


@pytest.mark.parametrize("value", MALFORMED.values(), ids=MALFORMED.keys())
def test_request_origin_malformed(value: str) -> None:
    assert parse_request_origin(value) is None


ENTRIES = {
    "exact": ("https://app.example.com", "https://app.example.com"),
    "uppercase canonicalised": ("HTTPS://App.Example.COM", "https://app.example.com"),
    "default port dropped": ("https://app.example.com:443", "https://app.example.com"),
    "explicit port kept": ("https://app.example.com:8443", "https://app.example.com:8443"),
    "idn to punycode": ("https://Bücher.example", "https://xn--bcher-kva.example"),
    "subdomain wildcard": ("https://*.Example.org", "https://*.example.org"),
    "port wildcard": ("http://localhost:*", "http://localhost:*"),
    "both wildcards": ("https://*.example.org:*", "https://*.example.org:*"),
    "any": ("*", "*"),
    "null": ("null", "null"),
    "ipv6 compressed": ("http://[0:0:0:0:0:0:0:1]:8080", "http://[::1]:8080"),
}


@pytest.mark.parametrize(("text", "key"), ENTRIES.values(), ids=ENTRIES.keys())
def test_entry_canonicalised(text: str, key: str) -> None:
    assert parse_origin_entry(text).key == key


BAD_ENTRIES = {
    "wildcard not a label": ("https://*example.com", "a wildcard must be a whole label"),
    "wildcard in the middle": ("https://app.*.example.com", "a wildcard must be a whole label"),
    "trailing slash": ("https://app.example.com/", "no trailing slash"),
    "path": ("https://app.example.com/api", "has no path"),
    "regex": (r"^https://.*\.example\.com$", "regular expression"),
    "missing scheme": ("app.example.com", "missing scheme"),
    "bad port": ("https://app.example.com:99999", "is not a port"),
    "user info": ("https://u@app.example.com", "no user info"),
    "whitespace": ("https://app.example.com ", "whitespace"),
    "underscore host": ("https://a_b.example.com", "not a valid host name"),
    "wildcard ip": ("https://*.127.0.0.1", "an IP address has no subdomains"),
    "empty": ("", "non-empty"),
}


@pytest.mark.parametrize(("text", "message"), BAD_ENTRIES.values(), ids=BAD_ENTRIES.keys())
def test_entry_refused_with_reason(text: str, message: str) -> None:
    with pytest.raises(EntryError, match=message):
        parse_origin_entry(text)


def _keys(value: str) -> list[str]:
    origin = parse_request_origin(value)
    assert origin is not None
    return list(lookup_keys(origin))


def test_lookup_keys_are_label_aware_and_bounded() -> None:
    assert _keys("https://a.b.example.com") == [
        "https://a.b.example.com",
        "https://*.b.example.com",
        "https://*.example.com",
        "https://*.com",
        "*",
    ]
    assert _keys("http://localhost:3000") == ["http://localhost:3000", "http://localhost:*", "*"]
    assert _keys("http://127.0.0.1:8080") == ["http://127.0.0.1:8080", "http://127.0.0.1:*", "*"]


# Pattern semantics (CORS-RULES 4-5): what each configured entry must and must not cover. A request origin is
# covered exactly when one of its lookup keys is the entry's key.
COVERAGE = [
    ("https://app.example.com", "https://app.example.com", True),
    ("https://app.example.com", "https://app.example.com.evil.net", False),
    ("https://app.example.com", "https://evilapp.example.com", False),
    ("https://app.example.com", "https://appxexample.com", False),
    ("https://app.example.com", "http://app.example.com", False),
    ("https://app.example.com", "https://app.example.com:8443", False),
    ("https://*.example.com", "https://a.example.com", True),
    ("https://*.example.com", "https://a.b.example.com", True),
    ("https://*.example.com", "https://example.com", False),
    ("https://*.example.com", "https://evilexample.com", False),
    ("https://*.example.com", "https://a.example.com.evil.net", False),
    ("https://*.example.com", "http://a.example.com", False),
    ("https://*.example.com", "https://a.example.com:8443", False),
    ("http://localhost:*", "http://localhost:3000", True),
    ("http://localhost:*", "http://localhost", False),
    ("http://localhost:*", "http://localhost.evil.net:3000", False),
    ("http://localhost:*", "https://localhost:3000", False),
    ("https://*.example.org:*", "https://a.example.org:8443", True),
]


@pytest.mark.parametrize(("entry", "origin", "covered"), COVERAGE, ids=[f"{e} vs {o}" for e, o, _ in COVERAGE])
def test_pattern_coverage(entry: str, origin: str, covered: bool) -> None:
    assert (parse_origin_entry(entry).key in _keys(origin)) is covered
