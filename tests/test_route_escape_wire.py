"""Route escapes on the wire: the real proxy (with and without the preflight fast path) in front of a raw upstream
that records every byte. An ambiguous path or a fragment is answered 400 by corsproxy, in enforce and report-only
mode, for preflights and actual requests alike, and never reaches the upstream."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support.raw_upstream import RawUpstream
from tests.support.routes import ask_twice, get_request, preflight_request, routed_proxy

EVIL = "https://evil.com"
APP = "https://app.example.com"


ESCAPES = [
    ("/admin/..;/public/", EVIL),
    ("/admin/..;/x", APP),
    ("/admin/..%5cpublic/", EVIL),
    ("/admin/..%2fpublic/", EVIL),
    ("/admin/%2e%2e/public/", EVIL),
    ("/legacy/..;/admin/x", APP),
    ("/public/..;/admin/x", EVIL),
    ("//admin/x", APP),
    ("/ADMIN/x", APP),
    ("/admin%20/x", APP),
    ("/admin/#x", APP),
    ("/public#/../admin/x", EVIL),
    ("/admin/x#y", EVIL),
]


@pytest.mark.parametrize("fast", [True, False], ids=["fast path", "handler only"])
@pytest.mark.parametrize("mode", ["enforce", "report-only"])
@pytest.mark.parametrize(("path", "origin"), ESCAPES)
async def test_escapes_are_refused_and_never_forwarded(
    tmp_path: Path, fast: bool, mode: str, path: str, origin: str
) -> None:
    async with RawUpstream() as upstream, routed_proxy(tmp_path, upstream.port, fast, mode=mode) as port:
        for request in (get_request(path, origin), preflight_request(path, origin)):
            status, headers, body = await ask_twice(port, request)
            assert status == 400, (request, status, body)
            assert headers["Vary"] == "Origin"
            assert not [name for name in headers if name.lower().startswith("access-control-")]  # refused here
            assert "Server" not in headers
            assert b"fragment" in body if "#" in path else b"ambiguous request path" in body
        assert upstream.received == []


async def test_an_origin_allowed_under_every_reading_can_read_the_400(tmp_path: Path) -> None:
    """/public/..;/x is /public/ (``*``) to some servers and the default policy (credentialed app origin) to others:
    the app origin may read corsproxy's 400 under either, so it gets the least-privileged CORS headers."""
    async with RawUpstream() as upstream, routed_proxy(tmp_path, upstream.port, True) as port:
        status, headers, _ = await ask_twice(port, get_request("/public/..;/x", APP))
        assert status == 400
        assert {k: v for k, v in headers.items() if k.startswith("Access-Control-")} == {
            "Access-Control-Allow-Origin": "*",
            "Access-Control-Expose-Headers": "x-request-id",
        }
        assert headers["Vary"] == "Origin"
        assert upstream.received == []


@pytest.mark.parametrize("target", ["/public/a%2Fb?x=/../admin", "/admin/x;v=1", "/admin//x", "/api/x%20y", "/x/..;/y"])
async def test_unambiguous_paths_are_forwarded_byte_for_byte(tmp_path: Path, target: str) -> None:
    async with RawUpstream() as upstream, routed_proxy(tmp_path, upstream.port, True) as port:
        status, _, _ = await ask_twice(port, get_request(target, "https://admin.example.com"))
        assert status == 200
        assert [received.target for received in upstream.received] == [target, target]


async def test_a_fragment_is_refused_without_routes_too(tmp_path: Path) -> None:
    async with RawUpstream() as upstream, routed_proxy(tmp_path, upstream.port, True, routes=None) as port:
        status, headers, body = await ask_twice(port, get_request("/api/x#frag", APP))
        assert status == 400 and b"fragment" in body
        assert headers["Access-Control-Allow-Origin"] == APP  # corsproxy's own error, readable by an allowed origin
        assert upstream.received == []


@pytest.mark.parametrize("target", ["http://api.example.com/..;/secret", "http://api.example.com/a/..;/..;/secret"])
async def test_an_absolute_form_target_cannot_climb_above_the_base_path(tmp_path: Path, target: str) -> None:
    """An absolute-form target is forwarded as its path: that path is what the climb check reads."""
    async with RawUpstream() as upstream:
        override = {"upstream": {"url": f"http://127.0.0.1:{upstream.port}/base"}, "routes": None}
        async with routed_proxy(tmp_path, upstream.port, True, **override) as port:
            status, _, body = await ask_twice(port, get_request(target, APP))
            assert status == 400 and b"climbs above" in body
            assert upstream.received == []
