"""The origin line format shared by ``origins import``/``export``, the admin import endpoint and the origins file.

One entry per line: the origin or pattern, then optional ``policy=NAME``, ``expires=2026-12-31T00:00:00Z``,
``ttl=7d`` (not in the origins file) and ``note="free text"``. Blank lines and ``#`` comments are ignored.

A value is a bare word, a double-quoted string with JSON escapes (``"line one\\nline two"``, ``\\"``, ``\\\\``,
``\\uXXXX``) or a single-quoted literal (``'free text'``, no escapes); quoted parts may be joined within a word
(``'note=it'"'"'s'``, what shell quoting produces). An unquoted ``#`` at the start of a word starts a comment.
:func:`format_line` writes every note as one double-quoted JSON string with every line break and other
non-printable character escaped, so an exported line is always one line and reads back to the same entry: a note
can never smuggle an entry into an import (a note holding ``"\\nhttps://evil.example.com"`` stays a note).

Two readings of a line:

* :func:`parse_lines` — a *declaration* (the origins file): every field not given takes its default. ``ttl=`` is
  refused, since replicas starting at different times would each count it from their own start; an ``expires``
  already past skips the line with a warning.
* :func:`parse_edits` — an *edit* (``origins import``, admin import): the fields a line gives, the others kept from
  the stored entry (see :mod:`corsproxy.origins.writes`, which also checks each entry against its final policy).

Must not import aiohttp or lmdb.
"""

from __future__ import annotations

import datetime as dt
import enum
import json
import math
import re
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Final

from corsproxy.core.origin import EntryError, OriginEntry, parse_origin_entry
from corsproxy.core.problems import Problem, ProblemError
from corsproxy.core.safety import check_origin_entry
from corsproxy.core.settings import (
    DEFAULT_POLICY,
    ConfiguredOrigin,
    PolicySafety,
    parse_duration,
    parse_expiry,
    unknown_policy_problem,
)

__all__ = [
    "KEEP",
    "MAX_NOTE_LENGTH",
    "EntryEdit",
    "ParsedEdits",
    "ParsedLines",
    "format_line",
    "note_too_long",
    "parse_edits",
    "parse_entry",
    "parse_expires_field",
    "parse_lines",
    "skip_if_expired",
    "split_words",
]


class _Keep(enum.Enum):
    KEEP = "keep"


#: "Not given": an edit leaves the stored value as it is (a new entry gets the default).
KEEP: Final = _Keep.KEEP

#: ``expires=never`` (or ``--expires never``) clears an expiry in an edit.
NEVER = "never"


#: Characters of an entry's note: room for a ticket reference and a sentence, not a document. The note is kept in
#: the entry and in each audit event that records it, and every list, export and history prints it.
MAX_NOTE_LENGTH = 1000


@dataclass
class ParsedLines:
    entries: dict[str, ConfiguredOrigin] = field(default_factory=dict)
    errors: list[tuple[int, str]] = field(default_factory=list)  # (line number, reason)
    warnings: list[tuple[int, str]] = field(default_factory=list)
    expired: set[str] = field(default_factory=set)  # keys whose (last) line had expired: skipped


@dataclass(frozen=True, slots=True)
class EntryEdit:
    """An operator's write to one entry. ``None`` policy or note and ``KEEP`` expiry keep what is stored (a new entry
    gets the default policy, no note, no expiry); ``expires=None`` means "never expires"."""

    entry: OriginEntry
    policy: str | None = None
    expires: float | _Keep | None = KEEP
    note: str | None = None
    line: int | None = None  # where it came from, for error reports

    @property
    def key(self) -> str:
        return self.entry.key


@dataclass
class ParsedEdits:
    edits: list[EntryEdit] = field(default_factory=list)
    errors: list[tuple[int, str]] = field(default_factory=list)
    warnings: list[tuple[int, str]] = field(default_factory=list)


# -- words --------------------------------------------------------------------------------------------------------

_SEPARATORS = " \t\r\n\f\v"
_PLAIN_RUN = re.compile(r"[^ \t\r\n\f\v\"'\\]+")
_NEEDS_SPLIT = re.compile(r"[ \t\r\n\f\v\"'\\#]")


def split_words(line: str) -> list[str]:
    """The words of one line (see the module docstring); ``ValueError`` says what is wrong with the quoting."""
    words: list[str] = []
    i, n = 0, len(line)
    while i < n:
        if line[i] in _SEPARATORS:
            i += 1
            continue
        if line[i] == "#":
            break  # a comment runs to the end of the line
        parts: list[str] = []
        while i < n and line[i] not in _SEPARATORS:
            c = line[i]
            if c == '"':
                j = i + 1
                while j < n and line[j] != '"':
                    j += 2 if line[j] == "\\" else 1
                if j >= n:
                    raise ValueError(f"no closing double quote for the one at column {i + 1}")
                try:
                    parts.append(json.loads(line[i : j + 1], strict=False))
                except ValueError:
                    raise ValueError(
                        f'bad escape in the quoted text at column {i + 1}: inside "..." write \\" \\\\ \\n \\t '
                        "or \\uXXXX (JSON escapes), or use '...' for text taken literally"
                    ) from None
                i = j + 1
            elif c == "'":
                j = line.find("'", i + 1)
                if j < 0:
                    raise ValueError(f"no closing single quote for the one at column {i + 1}")
                parts.append(line[i + 1 : j])
                i = j + 1
            elif c == "\\":
                raise ValueError(f"a backslash outside quotes at column {i + 1}: put the value in quotes")
            else:
                match = _PLAIN_RUN.match(line, i)
                assert match is not None
                parts.append(match.group())
                i = match.end()
        words.append("".join(parts))
    return words


_FIELDS = {"policy", "expires", "ttl", "note"}


def _read_lines(lines: Iterable[str], errors: list[tuple[int, str]]) -> Iterator[tuple[int, str, dict[str, str]]]:
    """Each entry line's number, origin and fields; a malformed line goes to ``errors`` (with its number) instead."""
    for number, raw in enumerate(lines, 1):
        try:
            read = _read_line(raw)
        except ValueError as exc:
            errors.append((number, str(exc)))
            continue
        if read is not None:
            yield number, *read


def _read_line(raw: str) -> tuple[str, dict[str, str]] | None:
    """The origin and its ``name=value`` fields, ``None`` for a blank or comment line; ``ValueError`` if malformed."""
    line = raw.strip()
    if not line or line.startswith("#"):
        return None
    words = split_words(line) if _NEEDS_SPLIT.search(line) else [line]  # the common, fast case of a big import
    if not words:
        return None
    options: dict[str, str] = {}
    for word in words[1:]:
        name, eq, value = word.partition("=")
        if not eq or name not in _FIELDS:
            raise ValueError(f"{word!r} is not one of policy=NAME, expires=TIME, ttl=DURATION, note=TEXT")
        if name in options:
            raise ValueError(f"{name}= is given twice; keep one")
        options[name] = value
    return words[0], options


# -- declarations (the origins file) ------------------------------------------------------------------------------


def parse_entry(
    text: str,
    safety: Mapping[str, PolicySafety],
    *,
    policy: str | None = None,
    expires: str | None = None,
    ttl: str | None = None,
    note: str = "",
    now: float | None = None,
) -> tuple[ConfiguredOrigin, list[Problem]]:
    """Validate one declared entry; raise :class:`ProblemError` with every problem (unplaced, each of its field),
    else return it and its warnings."""
    policy = policy or DEFAULT_POLICY
    problems: list[Problem] = []
    if len(note) > MAX_NOTE_LENGTH:
        problems.append(note_too_long(note))
    if policy not in safety:
        problems.append(unknown_policy_problem(policy, safety))
    when: float | None = None
    if expires is not None and ttl is not None:
        problems.append(EXPIRES_AND_TTL)
    elif expires is not None:
        try:
            when = parse_expiry(expires)
        except ValueError as exc:
            problems.append(Problem("", "expires", "invalid_expires", str(exc)))
        else:
            if when <= (time.time() if now is None else now):
                problems.append(expires_past(expires))
    elif ttl is not None:
        try:
            when = (time.time() if now is None else now) + parse_duration(ttl)
        except ValueError as exc:
            problems.append(Problem("", "ttl", "invalid_ttl", str(exc)))
    try:
        entry = parse_origin_entry(text)
    except EntryError as exc:
        raise ProblemError(*exc.problems, *problems) from None
    warnings: list[Problem] = []
    if policy in safety:
        errors, warnings = check_origin_entry(entry, safety[policy])
        problems.extend(errors)
    if problems:
        raise ProblemError(*problems)
    return ConfiguredOrigin(entry.key, policy, when, note), warnings


def note_too_long(note: str) -> Problem:
    return Problem(
        "", "note", "note_too_long", f"the note is {len(note)} characters long; at most {MAX_NOTE_LENGTH} are kept"
    )


EXPIRES_AND_TTL = Problem("", "expires", "expires_and_ttl", "give either an expiry time or a ttl, not both")


def expires_past(expires: str) -> Problem:
    return Problem("", "expires", "expires_past", f"{expires!r} is already past: the entry would never be allowed")


#: Why the origins file takes no ``ttl``: said wherever it is refused.
TTL_IN_FILE = (
    "a ttl is not accepted in the origins file: each replica would count it from its own start (and again after "
    "every restart), so replicas would disagree on when the entry expires; write the moment instead, "
    "expires=2026-12-31T00:00:00Z (e.g. `date -u -d '+30 days' +%Y-%m-%dT%H:%M:%SZ`)"
)


def skip_if_expired(out: ParsedLines, number: int, origin: Any, expires: Any, now: float) -> bool:
    """Whether a declared line's ``expires`` has passed; if so it is skipped with a warning, and an earlier line for
    the same origin is dropped too (the later line wins, as for any repeated origin). A line that is bad in any
    other way is left to :func:`parse_entry` to report."""
    if expires is None or not isinstance(origin, str):
        return False
    try:
        if parse_expiry(expires) > now:
            return False
        key = parse_origin_entry(origin).key
    except (ValueError, EntryError):
        return False
    out.entries.pop(key, None)
    out.expired.add(key)
    out.warnings.append(
        (number, f"{key}: expires={expires} has passed; line skipped (the origin is not allowed): renew or delete it")
    )
    return True


def parse_lines(lines: Iterable[str], safety: Mapping[str, PolicySafety], now: float | None = None) -> ParsedLines:
    """Read the origins file's line format: each bad line is reported with its number and reason, the good ones kept.

    An expired line is not an error: it is skipped with a warning, so one stale line never blocks the rest of the file
    (revocations included). ``ttl=`` is an error (:data:`TTL_IN_FILE`).
    """
    now = time.time() if now is None else now
    out = ParsedLines()
    for number, origin, options in _read_lines(lines, out.errors):
        if "ttl" in options:
            out.errors.append((number, TTL_IN_FILE))
            continue
        if skip_if_expired(out, number, origin, options.get("expires"), now):
            continue
        try:
            entry, warnings = parse_entry(origin, safety, now=now, **options)
        except ValueError as exc:
            out.errors.append((number, str(exc)))
            continue
        out.warnings.extend((number, w.message) for w in warnings)
        if entry.key in out.entries:
            out.warnings.append((number, f"{entry.key} appears again; the later line wins"))
        out.entries[entry.key] = entry
        out.expired.discard(entry.key)
    return out


# -- edits (imports) ----------------------------------------------------------------------------------------------


def parse_expires_field(
    expires: str | None, ttl: str | None, now: float, *, allow_past: bool
) -> tuple[float | _Keep | None, str | None]:
    """The expiry an edit sets (``KEEP`` when neither is given, ``None`` for ``never``) and a warning, if any.

    Expiries are whole seconds (a ttl rounds up), so that an export writes them exactly and reads back the same.
    :class:`ProblemError` (a ``ValueError``) says what is wrong, as a problem of ``expires`` or ``ttl``.
    """
    if expires is not None and ttl is not None:
        raise ProblemError(EXPIRES_AND_TTL)
    if ttl is not None:
        try:
            return float(math.ceil(now + parse_duration(ttl))), None
        except ValueError as exc:
            raise ProblemError(Problem("", "ttl", "invalid_ttl", str(exc))) from None
    if expires is None:
        return KEEP, None
    if expires.strip().lower() == NEVER:
        return None, None
    try:
        when = parse_expiry(expires)
    except ValueError as exc:
        raise ProblemError(Problem("", "expires", "invalid_expires", str(exc))) from None
    if when <= now:
        if not allow_past:
            raise ProblemError(expires_past(expires))
        return when, f"expires={expires} has passed: kept as an expired entry (refused until renewed)"
    return when, None


def parse_edits(lines: Iterable[str], now: float | None = None) -> ParsedEdits:
    """Read the line format as edits (``origins import``): syntax, origins and times here; policies and ownership are
    checked where the write happens (:func:`corsproxy.origins.writes.write_entries`), against the entry's final
    policy. An expired entry is kept as such (an export of expired entries reads back the same) with a warning."""
    now = time.time() if now is None else now
    out = ParsedEdits()
    for number, origin, options in _read_lines(lines, out.errors):
        try:
            entry = parse_origin_entry(origin)
            expires, warning = parse_expires_field(options.get("expires"), options.get("ttl"), now, allow_past=True)
        except (ValueError, EntryError) as exc:
            out.errors.append((number, str(exc)))
            continue
        if warning is not None:
            out.warnings.append((number, f"{entry.key}: {warning}"))
        out.edits.append(EntryEdit(entry, options.get("policy"), expires, options.get("note"), number))
    return out


# -- export -------------------------------------------------------------------------------------------------------


def _quote(text: str) -> str:
    """``text`` as one double-quoted JSON string holding only printable characters (and spaces)."""
    quoted = json.dumps(text, ensure_ascii=False)
    if quoted.isprintable():
        return quoted
    out: list[str] = []
    for c in quoted:
        if c.isprintable():
            out.append(c)
        elif ord(c) > 0xFFFF:  # JSON spells astral characters as a surrogate pair
            high, low = divmod(ord(c) - 0x10000, 0x400)
            out.append(f"\\u{0xD800 + high:04x}\\u{0xDC00 + low:04x}")
        else:
            out.append(f"\\u{ord(c):04x}")
    return "".join(out)


def _iso(expires: float) -> str:
    moment = dt.datetime.fromtimestamp(expires, dt.UTC)
    if expires == int(expires):
        return moment.strftime("%Y-%m-%dT%H:%M:%SZ")
    return moment.strftime("%Y-%m-%dT%H:%M:%S.%fZ")  # a store written before expiries were whole seconds


def format_line(key: str, policy: str, expires: float | None, note: str) -> str:
    """One export line, always a single line; :func:`parse_edits` reads it back to the same entry."""
    words = [key]
    if policy != DEFAULT_POLICY:
        words.append(f"policy={policy}")
    if expires is not None:
        words.append("expires=" + _iso(expires))
    if note:
        words.append("note=" + _quote(note))
    return " ".join(words)
