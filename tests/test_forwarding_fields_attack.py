"""Client-identity and scheme fields beyond X-Forwarded-*/X-Real-IP/Forwarded that common upstreams believe: Rack
(X-Forwarded-Ssl, X-Forwarded-Scheme), Spring's ForwardedHeaderFilter (X-Forwarded-Ssl), Rails' RemoteIp (Client-IP),
and the client-IP libraries of Express and Django (X-Client-IP, True-Client-IP, X-Cluster-Client-IP, CF-Connecting-IP,
Fastly-Client-IP). From an untrusted peer each is a lie (``X-Forwarded-Ssl: on`` makes Rack think the request came
over TLS): dropped, in any spelling; from a trusted proxy kept. Checked on the wire against a raw upstream."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import BASE_CONFIG, merge
from tests.raw_upstream import RawUpstream, raw_exchange, running_proxy

FIELDS = [
    "X-Forwarded-Ssl",
    "X-Forwarded-Scheme",
    "X-Url-Scheme",
    "Front-End-Https",
    "X-Forwarded-Server",
    "Client-IP",
    "X-Client-IP",
    "True-Client-IP",
    "X-Cluster-Client-IP",
    "CF-Connecting-IP",
    "Fastly-Client-IP",
    "X-Original-Forwarded-For",
]


@pytest.mark.parametrize("trusted", [False, True], ids=["untrusted peer", "trusted proxy"])
async def test_identity_and_scheme_fields_follow_the_trusted_proxy_rule(tmp_path: Path, trusted: bool) -> None:
    lines = "".join(f"{name}: 1.2.3.4\r\n{name.replace('-', '_')}: 1.2.3.4\r\n" for name in FIELDS)
    request = f"GET /x HTTP/1.1\r\nHost: h\r\n{lines}Connection: close\r\n\r\n".encode()
    async with RawUpstream() as upstream:
        config = merge(
            BASE_CONFIG,
            {
                "store": {"path": str(tmp_path / "db")},
                "upstream": {"url": f"http://127.0.0.1:{upstream.port}"},
                "forwarding": {"trusted_proxies": ["127.0.0.1/32"] if trusted else []},
            },
        )
        async with running_proxy(config) as port:
            answer = await raw_exchange(port, request)
    assert answer.startswith(b"HTTP/1.1 200 ")
    (received,) = upstream.received
    names = [name for name, _ in received.headers]
    assert not [name for name in names if "_" in name]  # underscore spellings: never a proxy's own
    assert [name for name in names if name in FIELDS] == (FIELDS if trusted else [])
