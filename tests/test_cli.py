"""The ``corsproxy`` command, run as real subprocesses against a real LMDB store (and a real server where it serves)."""

from __future__ import annotations

import asyncio
import json
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestServer

from tests.support.config import REPO, run_cli
from tests.support.net import free_port
from tests.support.serve import Demo, Server


def test_check_ok(write_config: Callable[..., Path]) -> None:
    result = run_cli("check", "--config", str(write_config()))
    assert result.returncode == 0, result.stderr
    assert "OK — 3 configured origin(s)" in result.stdout


def test_check_lists_every_problem(write_config: Callable[..., Path]) -> None:
    path = write_config(cors={"allow_origins": ["*", "https://*example.com"], "allow_credentails": True})
    result = run_cli("check", "--config", str(path))
    assert result.returncode == 2
    assert "has 3 problem(s)" in result.stderr
    assert "cors.allow_origins[0]:" in result.stderr
    assert "cors.allow_origins[1]: 'https://*example.com': a wildcard must be a whole label" in result.stderr
    assert 'cors.allow_credentails: unknown key — did you mean "allow_credentials"?' in result.stderr


def test_config_path_from_environment(write_config: Callable[..., Path]) -> None:
    result = run_cli("check", env={"CORSPROXY_CONFIG": str(write_config())})
    assert result.returncode == 0, result.stderr


def test_origins_add_list_remove_history(write_config: Callable[..., Path]) -> None:
    path = str(write_config(policies={"partners": {"allow_methods": ["GET"]}}))
    add = run_cli("origins", "add", "HTTPS://X.Partner.NET:443", "--policy", "partners", "--ttl", "7d", "-c", path)
    assert add.returncode == 0, add.stderr
    assert "added https://x.partner.net (policy partners)" in add.stdout
    listing = run_cli("origins", "list", "--filter", "partner", "-c", path)
    assert listing.stdout.startswith("https://x.partner.net\tpolicy=partners\tsource=cli expires ")
    remove = run_cli("origins", "remove", "https://x.partner.net", "-c", path)
    assert remove.returncode == 0 and "removed https://x.partner.net" in remove.stdout
    again = run_cli("origins", "remove", "https://x.partner.net", "-c", path)
    assert again.returncode == 1 and "not in the store" in again.stderr
    output = run_cli("origins", "history", "--origin", "https://x.partner.net", "-c", path).stdout
    history = [json.loads(line) for line in output.splitlines()]
    assert [(e["action"], e["origin"]) for e in history] == [
        ("add", "https://x.partner.net"),
        ("remove", "https://x.partner.net"),
    ]
    assert history[0]["actor"].startswith("cli")


REFUSED_ADDS = {
    "null": (["null"], "dangerously_allow_null_origin"),
    "star with credentials": (["*"], "dangerously_allow_any_origin_with_credentials"),
    "public suffix": (["https://*.github.io"], "public suffix"),
    "not a label": (["https://*example.com"], "whole label"),
    "unknown policy": (["https://a.example.com", "--policy", "nope"], "unknown policy 'nope'"),
    "bad ttl": (["https://a.example.com", "--ttl", "soon"], "not a duration"),
    "expiry in the past": (["https://a.example.com", "--expires", "2020-01-01T00:00:00Z"], "already past"),
}


@pytest.mark.parametrize(("args", "message"), list(REFUSED_ADDS.values()), ids=list(REFUSED_ADDS))
def test_origins_add_refusals(write_config: Callable[..., Path], args: list[str], message: str) -> None:
    path = str(write_config())
    result = run_cli("origins", "add", *args, "-c", path)
    assert result.returncode == 2
    assert message in result.stderr, result.stderr
    assert "https://a.example.com" not in run_cli("origins", "list", "-c", path).stdout


def test_import_reports_each_bad_line_and_commits_the_rest(write_config: Callable[..., Path], tmp_path: Path) -> None:
    path = str(write_config())
    lines = "\n".join(
        [
            "# partners",
            "https://one.example.com",
            "https://two.example.com note='second one'",
            "https://*example.com",
            "",
            "null",
            "https://three.example.com expires=2030-01-01T00:00:00Z",
            "https://four.example.com colour=blue",
        ]
    )
    result = run_cli("origins", "import", "-", "-c", path, input=lines)
    assert result.returncode == 1
    assert "imported 3 origin(s) (3 new, 0 replaced), refused 3" in result.stdout
    assert "-:4: refused:" in result.stderr and "whole label" in result.stderr
    assert "-:6: refused:" in result.stderr
    assert "-:8: refused: 'colour=blue'" in result.stderr
    exported = run_cli("origins", "export", "-c", path).stdout.splitlines()
    assert 'https://two.example.com note="second one"' in exported
    assert "https://three.example.com expires=2030-01-01T00:00:00Z" in exported
    # export -> import round trip into a fresh store gives the same export
    other = str(write_config("other.yaml", store={"path": str(tmp_path / "other.lmdb")}))
    (tmp_path / "export.txt").write_text("\n".join(exported) + "\n")
    assert run_cli("origins", "import", str(tmp_path / "export.txt"), "-c", other).returncode == 0
    assert run_cli("origins", "export", "-c", other).stdout.splitlines() == exported


def test_explain(write_config: Callable[..., Path]) -> None:
    path = str(write_config(policies={"partners": {"allow_methods": ["GET"]}}))
    run_cli("origins", "add", "https://x.partner.net", "--policy", "partners", "-c", path)
    refused = run_cli("explain", "--origin", "https://x.partner.net", "--method", "PUT", "--path", "/api", "-c", path)
    assert refused.returncode == 1
    assert "decision: refused (method_not_allowed)" in refused.stdout
    assert "fix:      add PUT to policies.partners.allow_methods" in refused.stdout
    allowed = run_cli("explain", "--origin", "https://a.example.org", "--json", "-c", path)
    assert allowed.returncode == 0
    answer = json.loads(allowed.stdout)
    assert (answer["reason"], answer["matched"], answer["policy"]) == ("allowed", "https://*.example.org", "default")
    look_alike = run_cli("explain", "--origin", "https://evil-example.org", "-c", path)
    assert "origin_not_allowed" in look_alike.stdout and "corsproxy origins add" in look_alike.stdout


def test_import_regex(write_config: Callable[..., Path], tmp_path: Path) -> None:
    path = str(write_config())
    samples = tmp_path / "seen.txt"
    samples.write_text("https://example.com\nhttps://a.example.com\nhttps://evil-example.com\n")
    result = run_cli("origins", "import-regex", r"^https://.*example\.com$", "--sample-file", str(samples), "-c", path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["https://example.com", "https://*.example.com"]
    assert "regex only: https://evil-example.com" in result.stderr
    assert "https://*.example.com" not in run_cli("origins", "list", "-c", path).stdout  # printing does not write
    applied = run_cli("origins", "import-regex", r"^https://(www\.)?example\.com$", "--apply", "-c", path)
    assert applied.returncode == 0
    listed = run_cli("origins", "list", "-c", path).stdout
    assert "https://www.example.com" in listed and "https://example.com" in listed


async def _preflight(session: aiohttp.ClientSession, port: int, origin: str) -> aiohttp.ClientResponse:
    headers: Any = {"Origin": origin, "Access-Control-Request-Method": "GET"}
    async with session.options(f"http://127.0.0.1:{port}/x", headers=headers) as response:
        await response.read()
        return response


async def test_serve_honours_an_origin_added_by_the_cli(tmp_path: Path, upstream: TestServer) -> None:
    assert upstream.port is not None
    port = free_port()
    # The port comes from the environment (CORSPROXY_PORT wins over listen.port); no admin listener, text logs.
    server = Server(
        tmp_path, upstream.port, workers=None, port=port, env={"CORSPROXY_PORT": str(port)}, admin=None, logging=None
    )
    server.data["listen"]["port"] = 0
    path = str(server.config_path)
    with server.start():
        async with aiohttp.ClientSession() as session:
            assert (await _preflight(session, port, "https://late.example.net")).status == 403
            add = await asyncio.to_thread(run_cli, "origins", "add", "https://late.example.net", "-c", path)
            assert add.returncode == 0, add.stderr
            assert (await _preflight(session, port, "https://late.example.net")).status == 204
            async with session.get(
                f"http://127.0.0.1:{port}/hello", headers={"Origin": "https://late.example.net"}
            ) as r:
                assert r.status == 200
                assert r.headers["Access-Control-Allow-Origin"] == "https://late.example.net"
        assert server.stop(signal.SIGTERM) == 0
    output = server.log_text()
    assert f"listening on http://127.0.0.1:{port}" in output
    assert "3 origin(s) in the store" in output


def test_serve_refuses_a_bad_config(write_config: Callable[..., Path]) -> None:
    path = write_config(cors={"allow_origins": ["null"]}, upstream={"url": "gopher://x"})
    result = run_cli("serve", "--config", str(path), timeout=30)
    assert result.returncode == 2
    assert "cors.allow_origins[0]" in result.stderr and "upstream.url" in result.stderr


async def test_demo(tmp_path: Path) -> None:
    with Demo(tmp_path, env={"PYTHONPATH": str(REPO)}) as demo:
        port = demo.port
        async with aiohttp.ClientSession() as session:
            assert (await _preflight(session, port, "https://app.example.com")).status == 204
            assert (await _preflight(session, port, "https://evil-example.com")).status == 403
            async with session.get(f"http://127.0.0.1:{port}/api/hello") as response:
                assert (await response.json())["path"] == "/api/hello"


def test_check_warns_about_entries_whose_policy_was_removed(write_config: Callable[..., Path]) -> None:
    with_policy = str(write_config(policies={"partners": {"allow_methods": ["GET"]}}))
    assert run_cli("origins", "add", "https://x.partner.net", "--policy", "partners", "-c", with_policy).returncode == 0
    without = str(write_config("without.yaml"))
    result = run_cli("check", "-c", without)
    assert result.returncode == 0
    assert "store entry refused at request time: https://x.partner.net names policy 'partners'" in result.stderr
    explained = run_cli("explain", "--origin", "https://x.partner.net", "-c", without)
    assert "policy_unknown" in explained.stdout


async def test_entry_that_became_unsafe_is_refused_and_reported(
    write_config: Callable[..., Path], upstream: TestServer
) -> None:
    """'*' added while the policy had no credentials must not become 'reflect every origin with credentials'."""
    without = str(write_config(cors={"allow_credentials": False}))
    assert run_cli("origins", "add", "*", "-c", without).returncode == 0
    with_credentials = str(write_config("creds.yaml"))
    check = run_cli("check", "-c", with_credentials)
    assert "store entry refused at request time: * (source cli)" in check.stderr
    explained = run_cli("explain", "--origin", "https://evil.example.net", "-c", with_credentials)
    assert explained.returncode == 1 and "origin_unsafe_for_policy" in explained.stdout
    public = run_cli("explain", "--origin", "https://evil.example.net", "-c", without)
    assert public.returncode == 0 and "Access-Control-Allow-Origin: *" in public.stdout
