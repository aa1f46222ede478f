"""Migrating from an origin regex: turn the common shapes into exact entries and safe patterns, and say what changed.

Handles what nginx maps and framework ``allow_origin_regex`` settings are usually made of: anchors, escaped and
unescaped dots, groups with alternation (``(app|admin)``), optional groups and characters (``(www\\.)?``,
``https?``), host wildcards (``.*``, ``.+``, ``[a-z0-9-]+``, ``[^.]+``) and port digits (``(:\\d+)?``). Anything else is
flagged as not convertible rather than guessed. Given real origins, :func:`compare_samples` shows which ones the
regex accepted that the converted entries do not — usually the holes the regex had.

The comparison runs the user's regex itself (Python's ``re``, as most middlewares apply it), in a child process with a
time budget: a regex can backtrack catastrophically (``.*.*.*.*x``, nested repetition) and ``re`` cannot be
interrupted, while refusing "dangerous" constructs up front would also refuse the ordinary ``.*\\.example\\.com`` and
a bounded re-implementation would no longer show what the regex really did. The converter itself is bounded by the
pattern: at most :data:`MAX_NESTING` nested groups and :data:`MAX_ALTERNATIVES` expansions.

Must not import aiohttp or lmdb.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections.abc import Iterable
from dataclasses import dataclass, field

from corsproxy.core.decision import StaticOriginSet
from corsproxy.core.origin import EntryError, lookup_keys, parse_origin_entry, parse_request_origin

__all__ = ["Conversion", "RegexImportError", "SampleTimeout", "compare_samples", "convert_regex"]

MAX_ALTERNATIVES = 256
#: Origin regexes nest a group or two; thousands of nested groups are an attack on the parser (and on ``re``'s).
MAX_NESTING = 32
#: Seconds the regex may spend on the whole sample file (``--sample-timeout``).
SAMPLE_TIMEOUT = 10.0
_ANY = "\x00A"  # a run of host characters of any length (possibly with dots)
_DIGITS = "\x00D"  # one or more digits
_SOME_DIGITS = "\x00d"  # a bounded number of digits (\d, \d{4}, [0-9]{2,5}): a port wildcard widens it
_LABEL = "\x00L"  # a run of host characters without dots: one label


class RegexImportError(ValueError):
    """The regex uses a construct the importer does not convert; the message says which and where."""


class SampleTimeout(RegexImportError):
    """The regex ran out of time on a sample; the comparison of the samples before it is kept."""

    def __init__(self, message: str, only_regex: list[str], only_entries: list[str], line: int, origin: str):
        super().__init__(message)
        self.only_regex = only_regex
        self.only_entries = only_entries
        self.line = line
        self.origin = origin


@dataclass
class Conversion:
    entries: list[str] = field(default_factory=list)  # canonical keys, deduplicated, in first-seen order
    notes: list[str] = field(default_factory=list)  # how the meaning changed (narrowed holes, anchoring...)
    unconverted: list[str] = field(default_factory=list)  # alternatives that could not be expressed safely


# -- a tiny parser for the regex subset -----------------------------------------------------------------------------

Alternative = list[str]  # literal text, with _ANY / _DIGITS markers


class _Parser:
    def __init__(self, pattern: str) -> None:
        self.text = pattern
        self.pos = 0
        self.depth = 0
        self.notes: list[str] = []

    def error(self, message: str) -> RegexImportError:
        shown = self.text if len(self.text) <= 120 else self.text[:117] + "..."
        return RegexImportError(f"at position {self.pos} of {shown!r}: {message}")

    def peek(self) -> str:
        return self.text[self.pos] if self.pos < len(self.text) else ""

    def parse_alternation(self) -> list[str]:
        """Alternatives of the expression up to ``)`` or the end."""
        results = self.parse_sequence()
        while self.pos < len(self.text) and self.text[self.pos] == "|":
            self.pos += 1
            results = results + self.parse_sequence()
            if len(results) > MAX_ALTERNATIVES:
                raise self.error(f"expands to more than {MAX_ALTERNATIVES} origins")
        return results

    def parse_sequence(self) -> list[str]:
        results = [""]
        while self.pos < len(self.text) and self.text[self.pos] not in "|)":
            atom = self.parse_atom()
            atom = self.parse_quantifier(atom)
            results = [r + a for r in results for a in atom]
            if len(results) > MAX_ALTERNATIVES:
                raise self.error(f"expands to more than {MAX_ALTERNATIVES} origins")
        return results

    def parse_atom(self) -> list[str]:
        char = self.peek()
        start = self.pos
        self.pos += 1
        if char == "(":
            if self.text.startswith("?:", self.pos):
                self.pos += 2
            elif self.peek() == "?":
                raise self.error("lookarounds and named groups are not converted")
            self.depth += 1
            if self.depth > MAX_NESTING:
                raise self.error(f"more than {MAX_NESTING} nested groups: not an origin regex")
            inner = self.parse_alternation()
            self.depth -= 1
            if self.peek() != ")":
                raise self.error("unbalanced parenthesis")
            self.pos += 1
            return inner
        if char == "\\":
            escaped = self.peek()
            self.pos += 1
            if escaped == "d":
                return [_SOME_DIGITS]
            if escaped.isalnum():  # \w, \s, \b, \x61, \n, \u0041...: classes and codes, not literal letters
                raise self.error(f"\\{escaped} is not converted")
            return [escaped]
        if char == "[":
            end = self.text.find("]", self.pos + 1)
            if end < 0:
                raise self.error("unbalanced [")
            body = self.text[self.pos : end]
            self.pos = end + 1
            if body in ("0-9", "\\d"):
                return [_SOME_DIGITS]
            if (body.startswith("^") and "." in body) or re.fullmatch(r"[a-zA-Z0-9\-_.\\]+", body):
                return ["\x00C" + body]  # a host-character class; only meaningful when repeated
            raise self.error(f"character class [{body}] is not converted")
        if char == ".":
            return ["\x00."]  # an unescaped dot: any character
        if char in "^$":
            raise self.error(f"anchor {char!r} in the middle of the pattern is not converted")
        if char in "*+?{":
            self.pos = start
            raise self.error(f"quantifier {char!r} with nothing to repeat")
        return [char]

    def parse_quantifier(self, atom: list[str]) -> list[str]:
        char = self.peek()
        if char == "?":
            self.pos += 1
            return [*atom, ""]
        if char and char in "*+{":
            unbounded = char in "*+"
            if char == "{":
                end = self.text.find("}", self.pos)
                if end < 0:
                    raise self.error("unbalanced {")
                unbounded = self.text[self.pos : end].endswith(",")  # {2,} has no upper bound
                self.pos = end + 1
            else:
                self.pos += 1
            if self.peek() == "?":
                self.pos += 1  # lazy: same language
            if atom == [_SOME_DIGITS]:
                return [_DIGITS if unbounded else _SOME_DIGITS]
            if atom == ["\x00."]:
                return [_ANY]
            if len(atom) == 1 and atom[0].startswith("\x00C"):
                body = atom[0][2:]
                dotless = body.startswith("^") if "." in body else True
                return [_LABEL if dotless else _ANY]
            raise self.error("repetition of anything but a host wildcard or digits is not converted")
        if len(atom) == 1 and atom[0].startswith("\x00C"):
            raise self.error("a single-character class is not converted")
        return atom


def _expand(pattern: str) -> tuple[list[str], list[str]]:
    notes: list[str] = []
    body = pattern
    if body.startswith("^"):
        body = body[1:]
    else:
        notes.append("the regex is not anchored with ^: it also matched origins that merely END with the pattern")
    if body.endswith("$") and not body.endswith("\\$"):
        body = body[:-1]
    else:
        notes.append("the regex is not anchored with $: it also matched origins that merely START with the pattern")
    parser = _Parser(body)
    alternatives = parser.parse_alternation()
    if parser.pos != len(body):
        raise parser.error("unbalanced parenthesis")
    return alternatives, notes


def _to_entry(alternative: str, conversion: Conversion) -> list[str]:
    """Keys for one expanded alternative, or [] (recorded as unconverted)."""
    if "\x00." in alternative.replace(_ANY, ""):
        shown = alternative.replace("\x00.", ".")
        conversion.notes.append(
            f"unescaped '.' in {_show(shown)} matched any character (e.g. 'x' in place of the dot); "
            "converted as a literal dot"
        )
        alternative = alternative.replace("\x00.", ".")
    if _LABEL in alternative:
        conversion.notes.append(
            f"{_show(alternative)}: the class matched exactly one label; a corsproxy *. pattern matches one or more "
            "(a.b.example.com too) — list the hosts instead if that matters"
        )
        alternative = alternative.replace(_LABEL, _ANY)
    scheme, sep, rest = alternative.partition("://")
    if not sep or "\x00" in scheme:
        conversion.unconverted.append(f"{_show(alternative)}: no literal scheme://")
        return []
    host, colon, port = rest.partition(":")
    port_suffix = ""
    if colon:
        if port == _DIGITS:
            port_suffix = ":*"
        elif port == _SOME_DIGITS:
            port_suffix = ":*"
            conversion.notes.append(
                f"{_show(alternative)}: the regex matched ports of a limited number of digits (such as :\\d{{4}} "
                "or :[0-9]); a corsproxy port wildcard :* matches every port — list the ports instead if that "
                "matters"
            )
        elif port.isdigit():
            port_suffix = f":{port}"
        else:
            conversion.unconverted.append(f"{_show(alternative)}: the port is not digits")
            return []
    hosts: list[str]
    if _ANY not in host:
        hosts = [host]
    elif host.startswith(_ANY + ".") and _ANY not in host[len(_ANY) :]:
        hosts = ["*" + host[len(_ANY) :]]
    elif host.startswith(_ANY) and _ANY not in host[len(_ANY) :]:
        apex = host[len(_ANY) :]
        hosts = [apex, "*." + apex]
        conversion.notes.append(
            f"{_show(alternative)} also matched look-alikes such as {scheme}://evil{apex} (no dot before the "
            f"domain): narrowed to {scheme}://{apex} and {scheme}://*.{apex}"
        )
    else:
        conversion.unconverted.append(f"{_show(alternative)}: a wildcard that is not a leading whole label")
        return []
    keys: list[str] = []
    for candidate in hosts:
        text = f"{scheme}://{candidate}{port_suffix}"
        try:
            keys.append(parse_origin_entry(text).key)
        except EntryError as exc:
            conversion.unconverted.append(f"{_show(alternative)}: {exc}")
    return keys


def _show(alternative: str) -> str:
    return (
        alternative.replace(_ANY, "<any>")
        .replace(_LABEL, "<label>")
        .replace(_DIGITS, "<digits>")
        .replace(_SOME_DIGITS, "<some digits>")
        .replace("\x00.", ".")
    )


def convert_regex(pattern: str) -> Conversion:
    """Convert ``pattern``; raise :class:`RegexImportError` when its syntax is outside the supported subset."""
    alternatives, notes = _expand(pattern)
    conversion = Conversion(notes=notes)
    seen: set[str] = set()
    for alternative in alternatives:
        for key in _to_entry(alternative, conversion):
            if key not in seen:
                seen.add(key)
                conversion.entries.append(key)
    conversion.notes = list(dict.fromkeys(conversion.notes))
    return conversion


#: Run in a child process: the user's regex over the samples, one JSON string per line in, one 0/1 per line out,
#: unbuffered (``-u``) so that the answers given before a timeout are not lost when the child is killed.
_MATCHER = """\
import json, re, sys
regex = re.compile(json.loads(sys.stdin.readline()))
for line in sys.stdin:
    sys.stdout.write("1\\n" if regex.search(json.loads(line)) else "0\\n")
"""


def compare_samples(
    pattern: str, entries: Iterable[str], origins: Iterable[str], *, timeout: float = SAMPLE_TIMEOUT
) -> tuple[list[str], list[str]]:
    """Origins the regex accepted (``re.search``, as nginx and most middlewares apply it) that the entries refuse,
    and the reverse. The regex gets ``timeout`` seconds for all the samples; past it, :class:`SampleTimeout` names
    the sample it was stuck on and carries the comparison of the ones before."""
    allowed = StaticOriginSet(dict.fromkeys(entries, "default"))
    samples: list[tuple[int, str]] = []
    for number, line in enumerate(origins, 1):
        origin = line.strip()
        if origin and not origin.startswith("#"):
            samples.append((number, origin))
    payload = json.dumps(pattern) + "\n" + "".join(json.dumps(origin) + "\n" for _, origin in samples)
    child = subprocess.Popen(
        [sys.executable, "-I", "-u", "-c", _MATCHER],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        encoding="utf-8",
    )
    timed_out = False
    try:
        output, errors = child.communicate(payload, timeout=timeout)
    except subprocess.TimeoutExpired:
        timed_out = True
        child.kill()
        output, errors = child.communicate()
    answers = output.split()
    if not timed_out and (child.returncode != 0 or len(answers) != len(samples)):
        last = errors.strip().splitlines()[-1:] or [f"exit status {child.returncode}"]
        raise RegexImportError(f"the regex could not be run on the samples: {last[0]}")
    only_regex: list[str] = []
    only_entries: list[str] = []
    for (_, origin), answer in zip(samples, answers, strict=False):
        parsed = parse_request_origin(origin)
        by_entries = parsed is not None and allowed.find(lookup_keys(parsed), 0.0) is not None
        by_regex = answer == "1"
        if by_regex and not by_entries:
            only_regex.append(origin)
        elif by_entries and not by_regex:
            only_entries.append(origin)
    if timed_out:
        number, origin = samples[min(len(answers), len(samples) - 1)]
        raise SampleTimeout(
            f"the regex ran for more than {timeout:g} s and was stopped at sample line {number} ({origin[:80]!r}): "
            "it backtracks catastrophically on such input (several .* in a row, or nested repetition); the "
            f"comparison covers the {len(answers)} sample(s) before it — simplify the regex, or raise "
            "--sample-timeout",
            only_regex,
            only_entries,
            number,
            origin,
        )
    return only_regex, only_entries
