"""The per-process decision cache must never answer differently from the engine it caches (issue 6 speed, CORS-RULES
correctness): same answers for every table case, stale after any store write or expiry, bounded in size."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from corsproxy.config import parse_config
from corsproxy.core.decision import CorsRequest, DecisionCache, Reason, actual_headers, preflight_headers
from corsproxy.core.settings import Config
from corsproxy.origins.writes import reconcile_config
from corsproxy.store import OriginRecord, OriginStore
from tests.support.decision_table import CONFIG, PREFLIGHTS, Preflight


@pytest.fixture
def config() -> Config:
    return parse_config(CONFIG, env={})


@pytest.fixture
def store(tmp_path: Path, config: Config) -> Iterator[OriginStore]:
    with OriginStore(tmp_path / "db") as s:
        reconcile_config(s, config.origins)
        yield s


@pytest.mark.parametrize("case", [c for c, _, _ in PREFLIGHTS.values()], ids=PREFLIGHTS.keys())
def test_cache_answers_like_the_engine(config: Config, store: OriginStore, case: Preflight) -> None:
    cache = DecisionCache(config.engine)
    asked = CorsRequest(
        "OPTIONS", tuple(case.origin), tuple(case.method), tuple(case.headers), case.path, case.private_network
    )
    expected = config.engine.judge(asked, store, 0.0)
    for _ in range(2):  # a miss, then a hit
        decision, headers = cache.judge(asked, store, 0.0)
        assert decision == expected
        assert headers == tuple(preflight_headers(config.engine, expected))


def test_cache_sees_writes_from_the_store(config: Config, store: OriginStore) -> None:
    cache = DecisionCache(config.engine)
    asked = CorsRequest("GET", ("https://new.example.net",))
    assert cache.judge(asked, store, 0.0)[0].reason is Reason.ORIGIN_NOT_ALLOWED
    store.put("https://new.example.net", OriginRecord(), "test")
    decision, headers = cache.judge(asked, store, 0.0)
    assert decision.reason is Reason.ALLOWED
    assert headers == tuple(actual_headers(decision))
    store.remove("https://new.example.net", "test")
    assert cache.judge(asked, store, 0.0)[0].reason is Reason.ORIGIN_NOT_ALLOWED


def test_cached_allow_ends_at_the_entry_expiry(config: Config, store: OriginStore) -> None:
    store.put("https://trial.example.net", OriginRecord(expires=100.0), "test")
    cache = DecisionCache(config.engine)
    asked = CorsRequest("GET", ("https://trial.example.net",))
    assert cache.judge(asked, store, 50.0)[0].reason is Reason.ALLOWED
    assert cache.judge(asked, store, 99.0)[0].reason is Reason.ALLOWED
    assert cache.judge(asked, store, 100.0)[0].reason is Reason.ORIGIN_EXPIRED


def test_cache_is_bounded(config: Config, store: OriginStore) -> None:
    cache = DecisionCache(config.engine, max_entries=10)
    for i in range(100):
        cache.judge(CorsRequest("GET", (f"https://o{i}.example.net",)), store, 0.0)
        assert len(cache._entries) <= 10


def test_two_origin_lines_are_never_cached(config: Config, store: OriginStore) -> None:
    cache = DecisionCache(config.engine)
    decision, headers = cache.judge(CorsRequest("GET", ("https://app.example.com",) * 2), store, 0.0)
    assert decision.reason is Reason.ORIGIN_MALFORMED
    assert headers == ()
    assert cache._entries == {}


@pytest.mark.parametrize("field", ["origin", "request_headers"])
def test_shapes_with_long_fields_are_judged_not_kept(config: Config, store: OriginStore, field: str) -> None:
    """A client sends each field up to limits.max_header_size long: a shape that long is answered like any other, but
    not kept (8192 of them would keep hundreds of megabytes); an ordinary one still is."""
    cache = DecisionCache(config.engine)
    long_headers = (",".join(f"x-h{i}" for i in range(2000)),)
    origin = "https://" + "a" * 3000 + ".example.org" if field == "origin" else "https://app.example.com"
    asked = CorsRequest("OPTIONS", (origin,), ("PUT",), long_headers if field == "request_headers" else ())
    decision, headers = cache.judge(asked, store, 0.0)
    assert decision == config.engine.judge(asked, store, 0.0)
    assert headers == tuple(preflight_headers(config.engine, decision))
    assert cache._entries == {}
    cache.judge(CorsRequest("OPTIONS", ("https://app.example.com",), ("PUT",)), store, 0.0)
    assert len(cache._entries) == 1


def test_cache_key_covers_method_headers_and_private_network(config: Config, store: OriginStore) -> None:
    cache = DecisionCache(config.engine)
    origin = ("https://app.example.com",)
    shapes = [
        (["PUT"], [], False, Reason.ALLOWED),
        (["PATCH"], [], False, Reason.METHOD_NOT_ALLOWED),
        (["PUT"], ["content-type"], False, Reason.ALLOWED),
        (["PUT"], ["x-other"], False, Reason.HEADER_NOT_ALLOWED),
        (["PUT"], [], True, Reason.PRIVATE_NETWORK_NOT_ALLOWED),
    ]
    for _ in range(2):
        for methods, headers, pna, reason in shapes:
            asked = CorsRequest("OPTIONS", origin, tuple(methods), tuple(headers), "/", pna)
            decision, _ = cache.judge(asked, store, 0.0)
            assert decision.reason is reason, (methods, headers, pna)
