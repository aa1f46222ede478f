"""The origin line format shared by ``origins import``/``export``, the admin import endpoint and the origins file.

One entry per line: the origin or pattern, then optional ``policy=NAME``, ``expires=2026-12-31T00:00:00Z``,
``ttl=7d`` and ``note="free text"``. Blank lines and ``#`` comments are ignored. Every entry passes the same checks as
``cors.allow_origins`` (:func:`corsproxy.config.check_origin_entry`).

Must not import aiohttp or lmdb.
"""

from __future__ import annotations

import shlex
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from corsproxy.config import (
    DEFAULT_POLICY,
    ConfiguredOrigin,
    PolicySafety,
    check_origin_entry,
    parse_duration,
    parse_expiry,
)
from corsproxy.origin import EntryError, parse_origin_entry

__all__ = ["MAX_NOTE_LENGTH", "ParsedLines", "format_line", "parse_entry", "parse_lines"]

#: Characters of an entry's note: room for a ticket reference and a sentence, not a document. The note is kept in
#: the entry and in each audit event that records it, and every list, export and history prints it.
MAX_NOTE_LENGTH = 1000


@dataclass
class ParsedLines:
    entries: dict[str, ConfiguredOrigin] = field(default_factory=dict)
    errors: list[tuple[int, str]] = field(default_factory=list)  # (line number, reason)
    warnings: list[tuple[int, str]] = field(default_factory=list)


def parse_entry(
    text: str,
    safety: Mapping[str, PolicySafety],
    *,
    policy: str | None = None,
    expires: str | None = None,
    ttl: str | None = None,
    note: str = "",
    now: float | None = None,
) -> tuple[ConfiguredOrigin, list[str]]:
    """Validate one entry for a write path; raise ``ValueError`` with every reason, else return it and its warnings."""
    policy = policy or DEFAULT_POLICY
    problems: list[str] = []
    if len(note) > MAX_NOTE_LENGTH:
        problems.append(f"the note is {len(note)} characters long; at most {MAX_NOTE_LENGTH} are kept")
    if policy not in safety:
        problems.append(f"unknown policy {policy!r}; defined policies: {', '.join(sorted(safety))}")
    when: float | None = None
    if expires is not None and ttl is not None:
        problems.append("give either an expiry time or a ttl, not both")
    elif expires is not None:
        try:
            when = parse_expiry(expires)
        except ValueError as exc:
            problems.append(str(exc))
        else:
            if when <= (time.time() if now is None else now):
                problems.append(f"{expires!r} is already past: the entry would never be allowed")
    elif ttl is not None:
        try:
            when = (time.time() if now is None else now) + parse_duration(ttl)
        except ValueError as exc:
            problems.append(str(exc))
    try:
        entry = parse_origin_entry(text)
    except EntryError as exc:
        raise ValueError("; ".join([str(exc), *problems])) from None
    warnings: list[str] = []
    if policy in safety:
        errors, warnings = check_origin_entry(entry, safety[policy])
        problems.extend(errors)
    if problems:
        raise ValueError("; ".join(problems))
    return ConfiguredOrigin(entry.key, policy, when, note), warnings


_FIELDS = {"policy", "expires", "ttl", "note"}


def parse_lines(lines: Iterable[str], safety: Mapping[str, PolicySafety], now: float | None = None) -> ParsedLines:
    """Parse the line format; each bad line is reported with its number and reason, the good ones are kept."""
    out = ParsedLines()
    for number, raw in enumerate(lines, 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if " " in line or "\t" in line:
            try:
                words = shlex.split(line, comments=True)
            except ValueError as exc:
                out.errors.append((number, f"cannot split the line into words: {exc}"))
                continue
        else:
            words = [line]  # the common case, and the fast one for a million-line import
        options: dict[str, str] = {}
        bad = ""
        for word in words[1:]:
            name, eq, value = word.partition("=")
            if not eq or name not in _FIELDS:
                bad = f"{word!r} is not one of policy=NAME, expires=TIME, ttl=DURATION, note=TEXT"
                break
            options[name] = value
        if bad:
            out.errors.append((number, bad))
            continue
        try:
            entry, warnings = parse_entry(words[0], safety, now=now, **options)
        except ValueError as exc:
            out.errors.append((number, str(exc)))
            continue
        out.warnings.extend((number, w) for w in warnings)
        if entry.key in out.entries:
            out.warnings.append((number, f"{entry.key} appears again; the later line wins"))
        out.entries[entry.key] = entry
    return out


def format_line(key: str, policy: str, expires: float | None, note: str) -> str:
    """One export line; :func:`parse_lines` reads it back to the same entry."""
    words = [key]
    if policy != DEFAULT_POLICY:
        words.append(f"policy={policy}")
    if expires is not None:
        words.append("expires=" + time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(expires)))
    if note:
        words.append(shlex.quote(f"note={note}"))
    return " ".join(words)
