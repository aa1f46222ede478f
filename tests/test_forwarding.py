"""The pure forwarding rules (corsproxy.core.forwarding) as tables: no sockets needed."""

from __future__ import annotations

import pytest

import corsproxy.core.forwarding as forwarding
from corsproxy.core.forwarding import (
    ForwardContext,
    TrustedProxies,
    hop_by_hop_names,
    host_header,
    is_websocket_upgrade,
    request_headers,
    response_headers,
)


def test_public_api() -> None:
    assert sorted(forwarding.__all__) == sorted(
        [
            "FORWARDING_FIELDS",
            "HOP_BY_HOP",
            "WEBSOCKET_HANDSHAKE_FIELDS",
            "ForwardContext",
            "TrustedProxies",
            "climbs_above_root",
            "hop_by_hop_names",
            "host_header",
            "is_websocket_upgrade",
            "request_headers",
            "response_headers",
        ]
    )


@pytest.mark.parametrize(
    ("lines", "extra"),
    [
        ([], set()),
        (["close"], {"close"}),
        (["Keep-Alive, X-Foo", " x-bar ,,"], {"x-foo", "x-bar"}),
        ([" , "], set()),
    ],
    ids=["none", "close", "named-fields", "empty-items"],
)
def test_hop_by_hop_names(lines: list[str], extra: set[str]) -> None:
    assert hop_by_hop_names(lines) == forwarding.HOP_BY_HOP | extra


@pytest.mark.parametrize(
    ("cidrs", "peer", "trusted"),
    [
        ([], "127.0.0.1", False),
        (["10.0.0.0/8"], "10.1.2.3", True),
        (["10.0.0.0/8"], "11.1.2.3", False),
        (["10.0.0.0/8"], "::ffff:10.1.2.3", True),
        (["fd00::/8"], "fd12::1", True),
        (["fd00::/8"], "fe80::1%eth0", False),
        (["127.0.0.1/32"], "", False),
        (["127.0.0.1/32"], "not-an-ip", False),
    ],
    ids=["none", "in", "out", "v4-mapped", "v6", "v6-zone-out", "unknown-peer", "garbage-peer"],
)
def test_trusted_proxies(cidrs: list[str], peer: str, trusted: bool) -> None:
    assert TrustedProxies.parse(cidrs).trusts(peer) is trusted


@pytest.mark.parametrize(
    ("scheme", "host", "port", "expected"),
    [
        ("http", "api.internal", 80, "api.internal"),
        ("http", "api.internal", 443, "api.internal:443"),
        ("https", "api.internal", 443, "api.internal"),
        ("https", "api.internal", 8443, "api.internal:8443"),
        ("http", "::1", 8000, "[::1]:8000"),
    ],
)
def test_host_header(scheme: str, host: str, port: int, expected: str) -> None:
    assert host_header(scheme, host, port) == expected


def context(**kw: object) -> ForwardContext:
    base: dict[str, object] = {
        "peer": "192.0.2.7",
        "scheme": "https",
        "client_host": "api.example.com",
        "upstream_host": "backend:8000",
    }
    base.update(kw)
    return ForwardContext(**base)  # type: ignore[arg-type]


def test_request_headers_full_set() -> None:
    """The complete output for a typical request: order kept, hop-by-hop and Expect gone, forwarding fields last."""
    received = [
        ("Host", "api.example.com"),
        ("Connection", "keep-alive, X-Hop"),
        ("X-Hop", "1"),
        ("Cookie", "a=1"),
        ("Cookie", "b=2"),
        ("Expect", "100-continue"),
        ("TE", "trailers"),
        ("X-Forwarded-For", "6.6.6.6"),
        ("Forwarded", "for=6.6.6.6"),
        ("Origin", "https://app.example.com"),
    ]
    assert request_headers(received, context()) == [
        ("Cookie", "a=1"),
        ("Cookie", "b=2"),
        ("Origin", "https://app.example.com"),
        ("Host", "backend:8000"),
        ("X-Forwarded-For", "192.0.2.7"),
        ("X-Forwarded-Proto", "https"),
        ("X-Forwarded-Host", "api.example.com"),
    ]


def test_request_headers_from_trusted_proxy() -> None:
    received = [
        ("X-Forwarded-For", "203.0.113.1,10.0.0.2"),
        ("X-Forwarded-Proto", "http"),
        ("X-Forwarded-Host", "www.example.com"),
        ("Forwarded", "for=203.0.113.1"),
        ("X-Real-IP", "203.0.113.1"),
    ]
    out = request_headers(received, context(peer="10.0.0.3", trusted=TrustedProxies.parse(["10.0.0.0/8"])))
    assert out == [
        ("Forwarded", "for=203.0.113.1"),
        ("X-Real-IP", "203.0.113.1"),
        ("Host", "backend:8000"),
        ("X-Forwarded-For", "203.0.113.1, 10.0.0.2, 10.0.0.3"),
        ("X-Forwarded-Proto", "http"),
        ("X-Forwarded-Host", "www.example.com"),
    ]


def test_request_headers_preserve_host_and_websocket() -> None:
    received = [
        ("Host", "api.example.com"),
        ("Upgrade", "websocket"),
        ("Connection", "Upgrade"),
        ("Sec-WebSocket-Key", "abc"),
        ("Sec-WebSocket-Version", "13"),
        ("Sec-WebSocket-Protocol", "chat"),
        ("Sec-WebSocket-Extensions", "permessage-deflate"),
    ]
    out = request_headers(received, context(preserve_host=True), websocket=True)
    assert [name for name, _ in out] == ["Host", "X-Forwarded-For", "X-Forwarded-Proto", "X-Forwarded-Host"]
    assert out[0] == ("Host", "api.example.com")


def test_response_headers_keep_repeats_and_drop_hops() -> None:
    received = [
        ("Set-Cookie", "a=1"),
        ("Connection", "close, X-Internal"),
        ("X-Internal", "secret"),
        ("Set-Cookie", "b=2"),
        ("Transfer-Encoding", "chunked"),
        ("Proxy-Authenticate", "Basic"),
        ("ETag", '"x"'),
    ]
    assert response_headers(received) == [("Set-Cookie", "a=1"), ("Set-Cookie", "b=2"), ("ETag", '"x"')]


@pytest.mark.parametrize(
    ("method", "connection", "upgrade", "expected"),
    [
        ("GET", ["Upgrade"], ["websocket"], True),
        ("GET", ["keep-alive, Upgrade"], ["WebSocket"], True),
        ("POST", ["Upgrade"], ["websocket"], False),
        ("GET", ["keep-alive"], ["websocket"], False),
        ("GET", ["Upgrade"], ["h2c"], False),
    ],
)
def test_is_websocket_upgrade(method: str, connection: list[str], upgrade: list[str], expected: bool) -> None:
    assert is_websocket_upgrade(method, connection, upgrade) is expected


@pytest.mark.parametrize(
    ("target", "climbs"),
    [
        ("/", False),
        ("/a/../b", False),
        ("/a/./b/..", False),
        ("/..", True),
        ("/../x", True),
        ("/%2e%2e/x", True),
        ("/%2E%2E/x", True),
        ("/a/..;/../x", True),
        ("/a\\..\\..\\x", True),
        ("/x?path=/../../etc", False),
    ],
)
def test_climbs_above_root(target: str, climbs: bool) -> None:
    assert forwarding.climbs_above_root(target) is climbs
