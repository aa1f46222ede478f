"""The export line format reads back to exactly the same entries — notes with any characters, expired entries,
policies, expiries — and a note can never inject an entry: a seeded generator over the pure format, the same through
``corsproxy origins export``/``import`` subprocesses, and the injection from the field over the real admin API."""

from __future__ import annotations

import random
from collections.abc import Callable
from pathlib import Path

import pytest

from corsproxy.core.origin_lines import KEEP, format_line, parse_edits, split_words
from corsproxy.store import OriginRecord, OriginStore
from tests.support.config import run_cli
from tests.support.serve import Server, origin_path

NOW = 1_800_000_000.0
# Characters that broke or could break a line-based format: line breaks of every kind (str.splitlines() splits on
# all of these), quotes, comment and escape characters, controls, format characters, astral and lone surrogates.
NASTY = [
    "\n", "\r", "\r\n", "\x0b", "\x0c", "\x1c", "\x1d", "\x1e", "\x85", "\u2028", "\u2029",
    "#", '"', "'", "\\", "\\n", "=", " ", "\t", "\x00", "\x1b", "\x7f", "\ufeff", "\u200b", "\u3000",
    "é", "中文", "😀", "\U000e0001", "\ud800", "https://evil.example.com", " #", "note=", "policy=x",
]  # fmt: skip


def _note(rng: random.Random) -> str:
    return "".join(rng.choice(NASTY) if rng.random() < 0.5 else rng.choice("abc xyz") for _ in range(rng.randrange(12)))


def _entry(rng: random.Random, i: int) -> tuple[str, OriginRecord]:
    host = f"h{i}.example.com"
    key = rng.choice([f"https://{host}", f"https://*.{host}", f"https://{host}:8443", f"http://localhost:{1000 + i}"])
    expires = rng.choice(
        [
            None,
            NOW + rng.randrange(1, 10**8),  # future, whole seconds (what every write path stores now)
            NOW - rng.randrange(1, 10**8),  # already expired: must be exported and read back too
            NOW + rng.randrange(10**8) + rng.randrange(1, 10**6) / 1e6,  # microseconds, from an older store
        ]
    )
    return key, OriginRecord(rng.choice(["default", "partners"]), expires, "cli", 0.0, _note(rng))


@pytest.mark.parametrize("seed", range(5))
def test_export_lines_read_back_to_the_same_entries(seed: int) -> None:
    rng = random.Random(seed)
    entries = dict(_entry(rng, i) for i in range(400))
    lines = [format_line(key, r.policy, r.expires, r.note) for key, r in entries.items()]
    for line in lines:
        assert len(line.splitlines()) == 1 and line.isprintable(), repr(line)
    parsed = parse_edits("\n".join(lines).split("\n"), now=NOW)
    assert not parsed.errors
    read = {
        e.key: (e.policy or "default", None if e.expires is KEEP else e.expires, e.note or "") for e in parsed.edits
    }
    assert read == {key: (r.policy, r.expires, r.note) for key, r in entries.items()}
    # Expired entries are read back, each with a warning that says so.
    expired = sum(1 for r in entries.values() if r.expires is not None and r.expires <= NOW)
    assert expired and len(parsed.warnings) == expired


@pytest.mark.parametrize(
    ("line", "words"),
    [
        pytest.param("https://a.example.com 'note=second one'", ["https://a.example.com", "note=second one"], id="old"),
        pytest.param("""a note='it'"'"'s'""", ["a", "note=it's"], id="shell-joined-quotes"),
        pytest.param('a note="x\\ny\\u00e9\\"" # c', ["a", 'note=x\nyé"'], id="json-escapes-then-comment"),
        pytest.param("a note=x#y", ["a", "note=x#y"], id="hash-inside-a-word"),
        pytest.param("a #note=x", ["a"], id="comment"),
    ],
)
def test_words(line: str, words: list[str]) -> None:
    assert split_words(line) == words


@pytest.mark.parametrize(
    ("line", "reason"),
    [
        pytest.param('a note="open', "no closing double quote", id="unclosed-double"),
        pytest.param("a note='open", "no closing single quote", id="unclosed-single"),
        pytest.param('a note="\\q"', "bad escape", id="bad-escape"),
        pytest.param("a note=x\\y", "backslash outside quotes", id="bare-backslash"),
        pytest.param("https://a.example.com note=a note=b", "given twice", id="twice"),
    ],
)
def test_bad_quoting_is_refused_with_the_line(line: str, reason: str) -> None:
    parsed = parse_edits(["https://ok.example.com", line], now=NOW)
    assert [n for n, _ in parsed.errors] == [2] and reason in parsed.errors[0][1]
    assert [e.key for e in parsed.edits] == ["https://ok.example.com"]


def test_cli_export_import_round_trip(write_config: Callable[..., Path], tmp_path: Path) -> None:
    policies = {"partners": {"allow_methods": ["GET"], "allow_credentials": False}}
    source = write_config(policies=policies)
    rng = random.Random(42)
    entries = dict(_entry(rng, i) for i in range(150))
    # Written straight into the store, as any write path may have left them (expired ones included).
    store_path = tmp_path / "origins.lmdb"
    assert run_cli("origins", "list", "-c", str(source)).returncode == 0  # creates the store, config reconciled
    with OriginStore(store_path) as store:
        store.put_many(entries.items(), "cli:test")
    exported = run_cli("origins", "export", "-c", str(source))
    assert exported.returncode == 0, exported.stderr
    other = write_config("other.yaml", policies=policies, store={"path": str(tmp_path / "other.lmdb")})
    imported = run_cli("origins", "import", "-", "-c", str(other), input=exported.stdout)
    assert imported.returncode == 0, imported.stderr
    with OriginStore(store_path) as a, OriginStore(tmp_path / "other.lmdb") as b:
        assert {k: (r.policy, r.expires, r.note) for k, r in a.iter_all()} == {
            k: (r.policy, r.expires, r.note) for k, r in b.iter_all()
        }
    assert run_cli("origins", "export", "-c", str(other)).stdout == exported.stdout


INJECTED = "https://evil.example.com"


def test_a_newline_in_a_note_never_injects_an_origin(served: Server, tmp_path: Path) -> None:
    key = "https://contract.example.com"
    note = f"contract 42\n{INJECTED} #"
    assert served.admin("PUT", origin_path(key), body={"note": note}).status == 201
    exported = run_cli("origins", "export", "-c", str(served.config_path))
    assert exported.returncode == 0
    assert [line for line in exported.stdout.split("\n") if line.startswith(INJECTED)] == []

    # Read back through both import paths, into the same store.
    cli = run_cli("origins", "import", "-", "-c", str(served.config_path), input=exported.stdout)
    assert cli.returncode == 0, cli.stderr
    admin = served.admin("POST", "/origins/import?partial=true", raw=exported.stdout.encode())
    assert admin.status == 200 and admin.json()["refused"] == [], admin.body
    # And into a fresh store, where every line is new.
    (tmp_path / "fresh.yaml").write_text(
        served.config_path.read_text().replace(str(served.tmp / "origins.lmdb"), str(tmp_path / "fresh.lmdb"))
    )
    fresh = run_cli("origins", "import", "-", "-c", str(tmp_path / "fresh.yaml"), input=exported.stdout)
    assert fresh.returncode == 0, fresh.stderr
    with OriginStore(tmp_path / "fresh.lmdb") as store:
        assert store.get(INJECTED) is None and store.get(key).note == note  # type: ignore[union-attr]

    assert served.admin("GET", origin_path(INJECTED)).status == 404
    assert served.admin("GET", origin_path(key)).json()["note"] == note
    preflight = {"Origin": INJECTED, "Access-Control-Request-Method": "GET"}
    assert served.proxy("OPTIONS", "/x", headers=preflight).status == 403
