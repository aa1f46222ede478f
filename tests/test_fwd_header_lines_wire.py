"""Every request header line reaches the upstream as received — same order, same name spelling, same value —
including repeated names spelled differently; forwarding fields in any spelling a WSGI/CGI upstream would read as
one are dropped. Checked on the exact bytes a raw upstream reads off the wire."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support.config import BASE_CONFIG, merge
from tests.support.inprocess import running_proxy
from tests.support.net import raw_exchange
from tests.support.raw_upstream import RawUpstream


def _config(tmp_path: Path, upstream_port: int, **override: object) -> dict[str, object]:
    data = merge(
        BASE_CONFIG, {"store": {"path": str(tmp_path / "db")}, "upstream": {"url": f"http://127.0.0.1:{upstream_port}"}}
    )
    return merge(data, dict(override))


FORWARDING = [("X-Forwarded-For", "127.0.0.1"), ("X-Forwarded-Proto", "http"), ("X-Forwarded-Host", "api.example.com")]


async def _forward(tmp_path: Path, lines: list[str], **override: object) -> list[tuple[str, str]]:
    """Send one GET with these header lines; the header lines the upstream received, as (name, value)."""
    async with RawUpstream() as upstream, running_proxy(_config(tmp_path, upstream.port, **override)) as port:
        request = "GET /x HTTP/1.1\r\nHost: api.example.com\r\n" + "".join(f"{line}\r\n" for line in lines)
        answer = await raw_exchange(port, (request + "Connection: close\r\n\r\n").encode("latin-1"))
        assert answer.startswith(b"HTTP/1.1 200"), answer
        (received,) = upstream.received
    return received.headers


async def test_repeated_names_in_several_spellings_all_arrive_in_order(tmp_path: Path) -> None:
    lines = [
        "X-Dup: first",
        "Accept: */*",
        "X-Dup: second",
        "x-dup: third",
        "X-DUP: fourth",
        "cookie: a=1",
        "Cookie: b=2",
        "x-API-key: k",
        "Origin: https://app.example.com",
    ]
    received = await _forward(tmp_path, lines)
    sent = [tuple(line.split(": ", 1)) for line in lines]
    # The client's Host line is where corsproxy's Host goes (first); then every line byte for byte, in order; then
    # corsproxy's own forwarding fields.
    assert received[0][0] == "Host"
    assert received[1:] == [*sent, *FORWARDING]


async def test_single_spellings_are_kept_as_received(tmp_path: Path) -> None:
    lines = ["x-lower: 1", "X-UPPER: 2", "X-Mixed-Case: 3", "content-type: text/plain"]
    received = await _forward(tmp_path, lines)
    assert received[1:] == [*(tuple(line.split(": ", 1)) for line in lines), *FORWARDING]


SPOOFED = [
    "X_Forwarded_For: 6.6.6.6",
    "x_forwarded_for: 6.6.6.6",
    "X-Forwarded_For: 6.6.6.6",
    "X_Real_IP: 6.6.6.6",
    "x_real-ip: 6.6.6.6",
    "X_Forwarded_Host: evil.example",
    "X_Forwarded_Proto: https",
    "X_Forwarded_Port: 1",
]


@pytest.mark.parametrize("trusted", [False, True], ids=["untrusted peer", "trusted peer"])
async def test_underscore_spellings_of_forwarding_fields_are_dropped(tmp_path: Path, trusted: bool) -> None:
    override = {"forwarding": {"trusted_proxies": ["127.0.0.0/8"]}} if trusted else {}
    received = await _forward(tmp_path, [*SPOOFED, "X_Custom_Field: kept"], **override)
    names = [name for name, _ in received]
    assert not [name for name in names if "_" in name and name.lower() != "x_custom_field"]
    assert ("X_Custom_Field", "kept") in received  # other underscored names are not forwarding fields: kept
    assert all("6.6.6.6" not in value and "evil.example" not in value for _, value in received)
    assert [value for name, value in received if name == "X-Forwarded-For"] == ["127.0.0.1"]


@pytest.mark.parametrize(
    "line", ["X-Original-URL: /admin/users", "X-Rewrite-URL: /admin/users", "X-Forwarded-Prefix: /admin"]
)
async def test_path_rewriting_fields_from_a_client_are_dropped(tmp_path: Path, line: str) -> None:
    """Upstreams that route by these fields would serve another path than the one corsproxy judged the request by."""
    received = await _forward(tmp_path, [line, "X-Other: kept"])
    assert line.split(":", maxsplit=1)[0].lower() not in {name.lower() for name, _ in received}
    assert ("X-Other", "kept") in received
