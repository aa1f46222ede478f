"""Fleet mode over time: a line whose ``expires`` has passed is skipped with a warning and never holds back the rest
of the file (revocations included, and a new replica's readiness); ``ttl`` is refused in the file, since replicas
starting at different times would each count it from their own start."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from corsproxy.config import parse_config
from corsproxy.origins.file import OriginsFileWatcher, parse_origins_file
from corsproxy.store import OriginStore
from tests.support.config import BASE_CONFIG
from tests.support.net import wait_until
from tests.support.serve import Server, origin_path
from tests.support.upstream import ThreadedUpstream

SAFETY = parse_config(BASE_CONFIG, env={}).safety
PAST = "2020-01-01T00:00:00Z"


@pytest.fixture
def store(tmp_path: Path) -> Iterator[OriginStore]:
    s = OriginStore(tmp_path / "origins.lmdb")
    yield s
    s.close()


def _replace(path: Path, text: str) -> None:
    aside = path.with_suffix(".tmp")
    aside.write_text(text)
    os.replace(aside, path)


@pytest.mark.parametrize(
    ("name", "text"),
    [
        pytest.param("o.txt", f"https://old.example.com expires={PAST}\nhttps://ok.example.com\n", id="lines"),
        pytest.param(
            "o.yaml", f"- {{origin: 'https://old.example.com', expires: {PAST}}}\n- https://ok.example.com\n", id="yaml"
        ),
        pytest.param(
            "o.yaml", f"- 'https://old.example.com expires={PAST}'\n- https://ok.example.com\n", id="yaml-line"
        ),
    ],
)
def test_an_expired_line_is_skipped_with_a_warning(name: str, text: str) -> None:
    parsed = parse_origins_file(Path(name), text, SAFETY)
    assert not parsed.errors
    assert list(parsed.entries) == ["https://ok.example.com"]
    assert [n for n, _ in parsed.warnings] == [1] and "has passed; line skipped" in parsed.warnings[0][1]


@pytest.mark.parametrize(
    ("name", "text"),
    [
        pytest.param("o.txt", f"https://x.example.com\nhttps://x.example.com expires={PAST}\n", id="lines"),
        pytest.param(
            "o.yaml", f"- https://x.example.com\n- {{origin: 'https://x.example.com', expires: {PAST}}}\n", id="yaml"
        ),
        pytest.param("o.yaml", f"- https://x.example.com\n- 'https://x.example.com expires={PAST}'\n", id="yaml-line"),
    ],
)
def test_a_later_expired_line_still_wins_over_an_earlier_one(name: str, text: str) -> None:
    parsed = parse_origins_file(Path(name), text, SAFETY)
    assert not parsed.errors and parsed.entries == {} and [n for n, _ in parsed.warnings] == [2]
    # ... and a still later live line wins again.
    again = parse_origins_file(
        Path(name), text + ("- https://x.example.com\n" if name == "o.yaml" else "https://x.example.com\n"), SAFETY
    )
    assert list(again.entries) == ["https://x.example.com"]


def test_an_expired_line_that_is_bad_otherwise_is_still_an_error() -> None:
    parsed = parse_origins_file(
        Path("o.txt"), f"https://ok.example.com\nhttps://x.example.com/path expires={PAST}\n", SAFETY
    )
    assert [n for n, _ in parsed.errors] == [2]


@pytest.mark.parametrize(
    ("name", "text"),
    [
        pytest.param("o.txt", "https://ok.example.com\nhttps://t.example.com ttl=7d\n", id="lines"),
        pytest.param("o.yaml", "- https://ok.example.com\n- {origin: 'https://t.example.com', ttl: 7d}\n", id="yaml"),
    ],
)
def test_ttl_is_refused_in_the_file_pointing_at_expires(name: str, text: str) -> None:
    parsed = parse_origins_file(Path(name), text, SAFETY)
    assert [n for n, _ in parsed.errors] == [2]
    assert "not accepted in the origins file" in parsed.errors[0][1] and "expires=" in parsed.errors[0][1]


def test_an_expired_line_does_not_hold_back_a_revocation(tmp_path: Path, store: OriginStore) -> None:
    path = tmp_path / "origins.txt"
    path.write_text("https://keep.example.com\nhttps://revoke.example.com\n")
    watcher = OriginsFileWatcher(str(path), store, lambda: SAFETY, 0.1, tmp_path / "watch.lock")
    assert watcher.poll() is not None
    _replace(path, f"https://keep.example.com\nhttps://stale.example.com expires={PAST}\n")
    result = watcher.poll()
    assert result is not None and result.applied and result.removed == ("https://revoke.example.com",)
    assert [k for k, _ in store.items()] == ["https://keep.example.com"]


def test_a_replica_with_an_empty_store_becomes_ready(tmp_path: Path, upstream_thread: ThreadedUpstream) -> None:
    path = tmp_path / "origins.txt"
    path.write_text(f"https://stale.example.com expires={PAST}\nhttps://live.example.com\n")
    server = Server(tmp_path, upstream_thread.port, workers=1, origins_file={"path": str(path), "poll_interval": 0.2})
    server.start()
    try:
        wait_until(lambda: server.admin("GET", "/readyz", token=None).status == 200, timeout=15, what="readiness")
        assert server.admin("GET", origin_path("https://live.example.com")).status == 200
        assert server.admin("GET", origin_path("https://stale.example.com")).status == 404
        assert "has passed; line skipped" in server.log_text()
    finally:
        assert server.stop() == 0
