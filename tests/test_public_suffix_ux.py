"""Wildcards whose subtree holds a public suffix are refused like wildcards over one (CORS-RULES 16).

``https://*.amazonaws.com`` covers ``https://attacker-bucket.s3.amazonaws.com``: anyone can create that bucket, so the
wildcard allows everyone, exactly like ``https://*.herokuapp.com``. The same opt-in applies, on every write path.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from corsproxy.config import ConfigError, parse_config
from corsproxy.store import OriginRecord, OriginStore
from tests.support.config import BASE_CONFIG, merge, run_cli
from tests.support.inprocess import ProxyFactory

CREDENTIALED = {"allow_credentials": True}
PUBLIC = {"allow_credentials": False}

# (origin, policy settings, refused?, text the message must hold)
CASES: dict[str, tuple[str, dict[str, Any], bool, str]] = {
    "above a private suffix (s3.amazonaws.com)": (
        "https://*.amazonaws.com",
        CREDENTIALED,
        True,
        "covers the public suffix 's3.amazonaws.com'",
    ),
    "above a private suffix, no credentials": ("https://*.amazonaws.com", PUBLIC, True, "s3.amazonaws.com"),
    "above up.railway.app": ("https://*.railway.app", CREDENTIALED, True, "'up.railway.app'"),
    "the suffix itself (s3.amazonaws.com)": ("https://*.s3.amazonaws.com", CREDENTIALED, True, "public suffix"),
    "a shared hosting suffix": ("https://*.herokuapp.com", CREDENTIALED, True, "public suffix"),
    "above a wildcard rule (*.compute.herokuapp.com)": ("https://*.compute.herokuapp.com", PUBLIC, True, "suffix"),
    "a tld": ("https://*.com", PUBLIC, True, "public suffix"),
    "under a registrable bucket name": ("https://*.mybucket.s3.amazonaws.com", CREDENTIALED, False, ""),
    "an ordinary domain": ("https://*.example.com", CREDENTIALED, False, ""),
    "an exact origin on a suffix's parent": ("https://amazonaws.com", CREDENTIALED, False, ""),
    "an exact origin under a suffix": ("https://bucket.s3.amazonaws.com", CREDENTIALED, False, ""),
    "loopback names": ("http://*.app.localhost:*", CREDENTIALED, False, ""),
}


def _config(origin: str, **policy: Any) -> dict[str, Any]:
    return merge(BASE_CONFIG, {"cors": {"allow_origins": [origin], **policy}})


@pytest.mark.parametrize(("origin", "policy", "refused", "message"), CASES.values(), ids=CASES.keys())
def test_wildcards_over_public_suffixes(origin: str, policy: dict[str, Any], refused: bool, message: str) -> None:
    data = _config(origin, **policy)
    if not refused:
        parse_config(data, env={})
        return
    with pytest.raises(ConfigError) as info:
        parse_config(data, env={})
    (placed,) = info.value.problems
    assert (placed.path, placed.field, placed.code) == (
        "cors.allow_origins[0]",
        "origin",
        "public_suffix_wildcard",
    )
    problem = str(placed)
    assert problem.startswith("cors.allow_origins[0]: ")
    assert message in problem
    assert "dangerously_allow_public_suffix_wildcards: true" in problem


def test_the_opt_in_accepts_and_warns() -> None:
    config = parse_config(_config("https://*.amazonaws.com", dangerously_allow_public_suffix_wildcards=True), env={})
    assert any("s3.amazonaws.com" in w and "dangerously_allow_public_suffix_wildcards" in w for w in config.warnings)


def test_cli_add_refuses(write_config: Callable[..., Path]) -> None:
    result = run_cli("origins", "add", "https://*.railway.app", "--config", str(write_config()))
    assert result.returncode == 2
    assert "up.railway.app" in result.stderr


async def test_an_entry_stored_before_is_refused_at_request_time(tmp_path: Path, make_proxy: ProxyFactory) -> None:
    # An older corsproxy accepted the wildcard; the engine re-checks every matched entry against today's rules.
    with OriginStore(str(tmp_path / "origins.lmdb")) as store:
        store.put("https://*.amazonaws.com", OriginRecord(source="cli"), "cli:test")
    client = await make_proxy()
    origin = "https://attacker-bucket.s3.amazonaws.com"
    response = await client.options("/x", headers={"Origin": origin, "Access-Control-Request-Method": "GET"})
    assert response.status == 403
    assert not [name for name in response.headers if name.lower().startswith("access-control-")]
    actual = await client.get("/x", headers={"Origin": origin})
    assert "Access-Control-Allow-Origin" not in actual.headers
    assert "Access-Control-Allow-Credentials" not in actual.headers
