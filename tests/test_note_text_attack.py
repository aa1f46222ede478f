"""What ``corsproxy origins list`` and ``origins add`` print of a note. Notes hold any characters (they round-trip
through export/import), and anyone with a write path — an admin token holder, an import file, the origins file — sets
them; the operator then reads them in a terminal. Printed raw, a note with ``\\r\\x1b[2K`` erased its own entry from
the listing (an origin added, invisible to the operator), a ``\\n`` forged a line, and a lone surrogate made the
command die with a UnicodeEncodeError traceback. Real CLI subprocesses against a real store."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from tests.support.config import run_cli

NOTES = {
    "https://hidden.example.net": "\\r\\u001b[2K",  # carriage return + "erase line"
    "https://forged.example.net": "x\\nhttps://fake.example.net\\tpolicy=default\\tsource=config",
    "https://surrogate.example.net": "\\ud800",
    "https://bidi.example.net": "\\u202egnp.exe",  # right-to-left override
    "https://plain.example.net": "contract 42 — 中文 😀",
}


def _printable_lines(text: str) -> list[str]:
    lines = text.split("\n")
    assert lines[-1] == ""
    for line in lines[:-1]:
        assert all(c.isprintable() or c == "\t" for c in line), repr(line)
    return lines[:-1]


def test_origins_list_prints_every_note_on_its_own_line_escaped(
    write_config: Callable[..., Path], tmp_path: Path
) -> None:
    config = write_config()
    lines = tmp_path / "import.txt"
    lines.write_text("".join(f'{key} note="{note}"\n' for key, note in NOTES.items()), encoding="utf-8")
    imported = run_cli("origins", "import", str(lines), "--config", str(config))
    assert imported.returncode == 0, imported.stderr
    listed = run_cli("origins", "list", "--config", str(config))
    assert listed.returncode == 0, listed.stderr
    shown = _printable_lines(listed.stdout)
    for key in NOTES:
        assert len([line for line in shown if line.startswith(key + "\t")]) == 1, key  # one line per entry
    assert not [line for line in shown if line.startswith("https://fake.example.net")]
    assert "contract 42 — 中文 😀" in listed.stdout  # printable text stays readable


def test_origins_add_echoes_the_note_escaped(write_config: Callable[..., Path]) -> None:
    config = write_config()
    added = run_cli("origins", "add", "https://b.example.net", "--note", "a\r\x1b[2Kb\u2028c", "--config", str(config))
    assert added.returncode == 0, added.stderr
    _printable_lines(added.stdout)


def test_cli_import_ends_lines_at_newline_only_like_the_admin_import(
    write_config: Callable[..., Path], tmp_path: Path
) -> None:
    """A raw carriage return inside a quoted note is part of the note for the admin API's import and the origins
    file; the CLI must not read the same file as two lines (an entry the other readers never see)."""
    config = write_config()
    lines = tmp_path / "import.txt"
    lines.write_bytes(b'https://d.example.net note="a\rhttps://evil.example.net"\r\nhttps://e.example.net\r\n')
    for source in (str(lines), "-"):
        stdin = lines.read_bytes().decode("utf-8") if source == "-" else None
        imported = run_cli("origins", "import", source, "--config", str(config), input=stdin)
        assert imported.returncode == 0, imported.stderr
        assert "refused 0" in imported.stdout
    listed = run_cli("origins", "list", "--config", str(config))
    keys = [line.split("\t", 1)[0] for line in listed.stdout.splitlines()]
    assert "https://d.example.net" in keys and "https://e.example.net" in keys
    assert not [key for key in keys if "evil" in key]
