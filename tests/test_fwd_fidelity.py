"""Issue 4, fidelity: what the upstream receives and what the client gets back, byte for byte, over real sockets."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import aiohttp
import pytest

from tests.support.inprocess import running_proxy
from tests.support.net import raw_exchange
from tests.support.raw_upstream import RawConnection, RawUpstream

ALLOWED = "https://app.example.com"


def proxy_config(config_data: Callable[..., dict[str, Any]], port: int, **override: Any) -> dict[str, Any]:
    return config_data(upstream={"url": f"http://127.0.0.1:{port}"}, **override)


def reply(data: bytes) -> Callable[[RawConnection], Any]:
    async def handler(connection: RawConnection) -> None:
        while await connection.read_request() is not None:
            await connection.send(data)

    return handler


def split_response(data: bytes) -> tuple[str, list[tuple[str, str]], bytes]:
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = [(n, v.strip()) for n, _, v in (line.partition(":") for line in lines[1:])]
    return lines[0], headers, body


def values(headers: list[tuple[str, str]], name: str) -> list[str]:
    return [v for n, v in headers if n.lower() == name.lower()]


TARGETS = [
    "/a%2Fb/c%20d;v=1?x=1&x=2&y=%2F",
    "/p;a=1;b=2/~user/!$&'()*+,=:@?q=a%26b&q=&empty",
    "/%E2%82%AC/./../x//y?k=%zz-not-decoded",
    "/search?q=a+b&q=a%20b&%3D=%3F",
]


@pytest.mark.parametrize("target", TARGETS, ids=["slash-space-semicolon", "subdelims", "dots-kept", "plus-vs-20"])
async def test_method_target_and_body_reach_upstream_byte_for_byte(
    config_data: Callable[..., dict[str, Any]], target: str
) -> None:
    async with RawUpstream() as up, running_proxy(proxy_config(config_data, up.port)) as port:
        body = bytes(range(256)) * 3
        request = (
            f"PATCH {target} HTTP/1.1\r\nHost: proxy.test\r\nContent-Length: {len(body)}\r\n"
            "X-Custom:  spaced value \r\nConnection: close\r\n\r\n"
        ).encode() + body
        answer = await raw_exchange(port, request)
    assert answer.startswith(b"HTTP/1.1 200 OK\r\n")
    (seen,) = up.received
    assert seen.request_line == f"PATCH {target} HTTP/1.1"
    assert seen.body == body
    assert seen.values("Content-Length") == [str(len(body))]
    assert seen.values("X-Custom") == ["spaced value"]


async def test_no_headers_are_invented(config_data: Callable[..., dict[str, Any]]) -> None:
    """No User-Agent, Accept, Accept-Encoding or Content-Type the client did not send; only Host and X-Forwarded-*."""
    async with RawUpstream() as up, running_proxy(proxy_config(config_data, up.port)) as port:
        await raw_exchange(
            port, b"POST /x HTTP/1.1\r\nHost: proxy.test\r\nContent-Length: 3\r\nConnection: close\r\n\r\nabc"
        )
    (seen,) = up.received
    names = sorted(name.lower() for name, _ in seen.headers)
    assert names == ["content-length", "host", "x-forwarded-for", "x-forwarded-host", "x-forwarded-proto"]
    assert seen.values("Host") == [f"127.0.0.1:{up.port}"]
    assert seen.body == b"abc"


async def test_response_head_and_body_come_back_untouched(config_data: Callable[..., dict[str, Any]]) -> None:
    gz = b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\x03KL\x04\x00\x8a\xa3\x06\xd1\x02\x00\x00\x00"
    upstream_reply = (
        b"HTTP/1.1 201 Made It\r\n"
        b"Content-Type: application/json\r\n"
        b"Content-Encoding: gzip\r\n"
        b'ETag: "v1"\r\n'
        b"Last-Modified: Tue, 15 Nov 1994 12:45:26 GMT\r\n"
        b"Set-Cookie: a=1; Path=/\r\n"
        b"Set-Cookie: b=2, c=3; HttpOnly\r\n"
        b"Server: upstream/1.0\r\n"
        b"Content-Length: " + str(len(gz)).encode() + b"\r\n\r\n" + gz
    )
    async with RawUpstream(reply(upstream_reply)) as up, running_proxy(proxy_config(config_data, up.port)) as port:
        answer = await raw_exchange(
            port, b"GET /x HTTP/1.1\r\nHost: p\r\nAccept-Encoding: gzip\r\nConnection: close\r\n\r\n"
        )
    status, headers, body = split_response(answer)
    assert status == "HTTP/1.1 201 Made It"
    assert body == gz  # no decompression, no re-compression
    assert values(headers, "Content-Length") == [str(len(gz))]
    assert values(headers, "Content-Encoding") == ["gzip"]
    assert values(headers, "ETag") == ['"v1"']
    assert values(headers, "Last-Modified") == ["Tue, 15 Nov 1994 12:45:26 GMT"]
    assert values(headers, "Set-Cookie") == ["a=1; Path=/", "b=2, c=3; HttpOnly"]  # separate lines, never joined
    assert values(headers, "Server") == ["upstream/1.0"]
    assert values(headers, "Transfer-Encoding") == []
    assert up.received[0].values("Accept-Encoding") == ["gzip"]


async def test_no_headers_are_invented_on_the_way_down(config_data: Callable[..., dict[str, Any]]) -> None:
    """No Content-Type or Server the upstream did not send; Date is added (RFC 9110 §6.6.1), Vary carries Origin."""
    upstream_reply = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
    async with RawUpstream(reply(upstream_reply)) as up, running_proxy(proxy_config(config_data, up.port)) as port:
        answer = await raw_exchange(port, b"GET /x HTTP/1.1\r\nHost: p\r\nConnection: close\r\n\r\n")
    _, headers, body = split_response(answer)
    assert sorted(name.lower() for name, _ in headers) == ["connection", "content-length", "date", "vary"]
    assert values(headers, "Vary") == ["Origin"]
    assert body == b"ok"


@pytest.mark.parametrize("status", [204, 304])
async def test_bodiless_statuses_stay_bodiless(config_data: Callable[..., dict[str, Any]], status: int) -> None:
    upstream_reply = f'HTTP/1.1 {status} X\r\nETag: "e"\r\n\r\n'.encode()
    async with RawUpstream(reply(upstream_reply)) as up, running_proxy(proxy_config(config_data, up.port)) as port:
        # Two requests on one connection: a stray body byte would corrupt the second response.
        answer = await raw_exchange(
            port, b"GET /a HTTP/1.1\r\nHost: p\r\n\r\nGET /b HTTP/1.1\r\nHost: p\r\nConnection: close\r\n\r\n"
        )
    first, second = answer.split(b"HTTP/1.1 ")[1:]
    for part in (first, second):
        status_line, headers, body = split_response(b"HTTP/1.1 " + part)
        assert status_line.startswith(f"HTTP/1.1 {status}")
        assert body == b""
        assert values(headers, "Transfer-Encoding") == []
        assert values(headers, "ETag") == ['"e"']
    assert len(up.received) == 2


async def test_head_keeps_content_length_without_body(config_data: Callable[..., dict[str, Any]]) -> None:
    upstream_reply = b"HTTP/1.1 200 OK\r\nContent-Length: 1234\r\nContent-Type: text/plain\r\n\r\n"
    async with RawUpstream(reply(upstream_reply)) as up, running_proxy(proxy_config(config_data, up.port)) as port:
        answer = await raw_exchange(
            port, b"HEAD /x HTTP/1.1\r\nHost: p\r\n\r\nHEAD /y HTTP/1.1\r\nHost: p\r\nConnection: close\r\n\r\n"
        )
    assert answer.count(b"HTTP/1.1 200 OK") == 2
    _, headers, _ = split_response(answer.split(b"HTTP/1.1 200 OK")[1])
    assert values(headers, "Content-Length") == ["1234"]
    assert [r.request_line for r in up.received] == ["HEAD /x HTTP/1.1", "HEAD /y HTTP/1.1"]


async def test_hop_by_hop_dropped_on_the_way_up(config_data: Callable[..., dict[str, Any]]) -> None:
    async with RawUpstream() as up, running_proxy(proxy_config(config_data, up.port)) as port:
        await raw_exchange(
            port,
            b"GET /x HTTP/1.1\r\nHost: p\r\nConnection: keep-alive, X-Secret-Hop, close\r\nKeep-Alive: timeout=5\r\n"
            b"X-Secret-Hop: 1\r\nProxy-Connection: keep-alive\r\nTE: trailers\r\nTrailer: X-T\r\n"
            b"Proxy-Authorization: Basic Zm9vOmJhcg==\r\nUpgrade: h2c\r\nX-End-To-End: kept\r\n\r\n",
        )
    (seen,) = up.received
    names = {name.lower() for name, _ in seen.headers}
    for dropped in (
        "x-secret-hop",
        "keep-alive",
        "proxy-connection",
        "te",
        "trailer",
        "proxy-authorization",
        "upgrade",
    ):
        assert dropped not in names
    assert seen.values("X-End-To-End") == ["kept"]


async def test_hop_by_hop_dropped_on_the_way_down(config_data: Callable[..., dict[str, Any]]) -> None:
    upstream_reply = (
        b"HTTP/1.1 200 OK\r\nConnection: keep-alive, X-Upstream-Hop\r\nKeep-Alive: timeout=5\r\n"
        b"X-Upstream-Hop: internal\r\nProxy-Authenticate: Basic\r\nTrailer: X-T\r\nUpgrade: h2c\r\n"
        b"X-End-To-End: kept\r\nContent-Length: 2\r\n\r\nok"
    )
    async with RawUpstream(reply(upstream_reply)) as up, running_proxy(proxy_config(config_data, up.port)) as port:
        answer = await raw_exchange(port, b"GET /x HTTP/1.1\r\nHost: p\r\nConnection: close\r\n\r\n")
    _, headers, body = split_response(answer)
    names = {name.lower() for name, _ in headers}
    assert not names & {"x-upstream-hop", "keep-alive", "proxy-authenticate", "trailer", "upgrade"}
    assert values(headers, "X-End-To-End") == ["kept"]
    assert body == b"ok"


FORWARDING_CASES = [
    # (trusted_proxies, incoming forwarding lines, expected X-Forwarded-For, -Proto, -Host, X-Real-IP kept?)
    ([], [], "127.0.0.1", "http", "proxy.test", False),
    ([], ["X-Forwarded-For: 6.6.6.6", "X-Real-IP: 6.6.6.6", "X-Forwarded-Proto: https"], "127.0.0.1", "http",
     "proxy.test", False),
    (["10.0.0.0/8"], ["X-Forwarded-For: 6.6.6.6"], "127.0.0.1", "http", "proxy.test", False),
    (["127.0.0.0/8"], ["X-Forwarded-For: 203.0.113.9, 10.1.1.1", "X-Forwarded-For: 10.2.2.2",
                       "X-Forwarded-Proto: https", "X-Forwarded-Host: www.example.com", "X-Real-IP: 203.0.113.9"],
     "203.0.113.9, 10.1.1.1, 10.2.2.2, 127.0.0.1", "https", "www.example.com", True),
    (["127.0.0.1"], [], "127.0.0.1", "http", "proxy.test", False),
]  # fmt: skip


@pytest.mark.parametrize(
    ("trusted", "incoming", "xff", "proto", "xfh", "real_ip_kept"),
    FORWARDING_CASES,
    ids=["plain", "spoofed-untrusted", "other-proxy-trusted", "trusted-chain", "trusted-no-prior"],
)
async def test_x_forwarded_headers(
    config_data: Callable[..., dict[str, Any]],
    trusted: list[str],
    incoming: list[str],
    xff: str,
    proto: str,
    xfh: str,
    real_ip_kept: bool,
) -> None:
    config = proxy_config(config_data, 0, forwarding={"trusted_proxies": trusted})
    async with RawUpstream() as up:
        config["upstream"]["url"] = f"http://127.0.0.1:{up.port}"
        async with running_proxy(config) as port:
            head = "".join(f"{line}\r\n" for line in incoming)
            await raw_exchange(port, f"GET / HTTP/1.1\r\nHost: proxy.test\r\n{head}Connection: close\r\n\r\n".encode())
    (seen,) = up.received
    assert seen.values("X-Forwarded-For") == [xff]
    assert seen.values("X-Forwarded-Proto") == [proto]
    assert seen.values("X-Forwarded-Host") == [xfh]
    assert bool(seen.values("X-Real-IP")) is real_ip_kept
    assert seen.values("Host") == [f"127.0.0.1:{up.port}"]


async def test_preserve_host(config_data: Callable[..., dict[str, Any]]) -> None:
    async with RawUpstream() as up:
        config = proxy_config(config_data, up.port, forwarding={"preserve_host": True})
        async with running_proxy(config) as port:
            await raw_exchange(port, b"GET / HTTP/1.1\r\nHost: api.example.com\r\nConnection: close\r\n\r\n")
    assert up.received[0].values("Host") == ["api.example.com"]


async def test_expect_100_continue_sent_once_upstream_wants_the_body(
    config_data: Callable[..., dict[str, Any]],
) -> None:
    async with RawUpstream() as up, running_proxy(proxy_config(config_data, up.port)) as port:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(
            b"PUT /up HTTP/1.1\r\nHost: p\r\nContent-Length: 5\r\nExpect: 100-continue\r\nConnection: close\r\n\r\n"
        )
        interim = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert interim == b"HTTP/1.1 100 Continue\r\n\r\n"
        writer.write(b"hello")
        final = await asyncio.wait_for(reader.read(), 5)
        writer.close()
    assert final.startswith(b"HTTP/1.1 200 OK")
    (seen,) = up.received
    assert seen.body == b"hello"
    assert seen.values("Expect") == []  # answered by corsproxy (RFC 9110 §10.1.1)


async def test_expect_refused_origin_gets_no_100(config_data: Callable[..., dict[str, Any]]) -> None:
    """A blocked request is answered 403 before the client uploads anything, and never reaches the upstream."""
    async with RawUpstream() as up:
        config = proxy_config(config_data, up.port, block_disallowed="unsafe_methods")
        async with running_proxy(config) as port:
            answer = await raw_exchange(
                port,
                b"POST /x HTTP/1.1\r\nHost: p\r\nOrigin: https://evil.example\r\nContent-Length: 5\r\n"
                b"Expect: 100-continue\r\nConnection: close\r\n\r\n",
                timeout=3,
            )
    assert answer.startswith(b"HTTP/1.1 403")
    assert b"100 Continue" not in answer
    assert up.received == []


async def test_unknown_expectation_is_417(config_data: Callable[..., dict[str, Any]]) -> None:
    async with RawUpstream() as up, running_proxy(proxy_config(config_data, up.port)) as port:
        answer = await raw_exchange(
            port, b"GET / HTTP/1.1\r\nHost: p\r\nExpect: teapot\r\nConnection: close\r\n\r\n", timeout=3
        )
    assert answer.startswith(b"HTTP/1.1 417")
    assert up.received == []


async def test_own_errors_carry_cors_headers_for_allowed_origin(config_data: Callable[..., dict[str, Any]]) -> None:
    config = proxy_config(config_data, 9)  # discard port: nothing listens, connection refused
    async with running_proxy(config) as port, aiohttp.ClientSession() as session:
        async with session.get(f"http://127.0.0.1:{port}/x", headers={"Origin": ALLOWED}) as response:
            assert response.status == 502
            assert response.headers["Access-Control-Allow-Origin"] == ALLOWED
            assert response.headers["Vary"] == "Origin"
        async with session.get(f"http://127.0.0.1:{port}/x", headers={"Origin": "https://evil.example"}) as response:
            assert response.status == 502
            assert "Access-Control-Allow-Origin" not in response.headers
