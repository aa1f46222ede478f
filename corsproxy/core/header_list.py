"""Parsing of ``Access-Control-Request-Headers`` and of configured header-name lists.

Browsers send the value lowercase, sorted and comma-joined (Fetch ``#cors-unsafe-request-header-names``), but
intermediaries add optional whitespace, empty list elements or split it over several field lines (RFC 9110 §5.3,
§5.6.1). The parser accepts all of that, bounded so that a hostile value costs little: it never builds more than
:data:`MAX_NAMES` names and gives up after :data:`MAX_EMPTY_ELEMENTS` empty elements (as rs/cors does).

Must not import aiohttp or lmdb.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

__all__ = ["MAX_EMPTY_ELEMENTS", "MAX_NAMES", "MAX_VALUE_LENGTH", "is_token", "parse_request_header_names"]

#: More distinct header names than any real request carries; a preflight asking for more is refused.
MAX_NAMES = 64
#: RFC 9110 §5.6.1 says recipients must accept "a reasonable number" of empty elements.
MAX_EMPTY_ELEMENTS = 16
#: Sum of the field lines' lengths.
MAX_VALUE_LENGTH = 4096

# RFC 9110 §5.6.2 token.
_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")


def is_token(text: str) -> bool:
    return _TOKEN.fullmatch(text) is not None


def parse_request_header_names(lines: Iterable[str]) -> tuple[str, ...] | None:
    """Return the lowercase, de-duplicated, sorted names; ``()`` for none; ``None`` when malformed or over a bound."""
    names: set[str] = set()
    empty = 0
    length = 0
    for line in lines:
        length += len(line)
        if length > MAX_VALUE_LENGTH:
            return None
        for element in line.split(","):
            name = element.strip(" \t")
            if not name:
                empty += 1
                if empty > MAX_EMPTY_ELEMENTS:
                    return None
                continue
            if _TOKEN.fullmatch(name) is None:
                return None
            names.add(name.lower())
            if len(names) > MAX_NAMES:
                return None
    return tuple(sorted(names))
