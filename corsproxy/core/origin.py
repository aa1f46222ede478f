"""Origins: the one parser for request ``Origin`` headers and configured origin entries.

Owns the strict parser for what browsers send (Fetch ``#origin-header``), the canonicaliser for what operators write
(lowercase, IDN to punycode, default port dropped), the pattern forms (``https://*.example.com``,
``http://localhost:*``) and the list of store keys a request origin is looked up under (exact and label-aware: never a
substring or regex match). Every write path (config, CLI, admin API, origins file) goes through
:func:`parse_origin_entry`; there is no second parser.

Must not import aiohttp or lmdb: this is pure decision code, tested without sockets.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterator
from dataclasses import dataclass

import idna

from corsproxy.core.problems import Problem, ProblemError

__all__ = [
    "ANY_ORIGIN",
    "MAX_ORIGIN_LENGTH",
    "NULL_ORIGIN",
    "EntryError",
    "OriginEntry",
    "RequestOrigin",
    "lookup_keys",
    "parse_origin_entry",
    "parse_request_origin",
]

#: A serialized origin is at most scheme (a few bytes) + "://" + a 253-byte host + ":65535". Anything longer was not
#: written by a browser (a browser sends one short serialized origin).
MAX_ORIGIN_LENGTH = 320

#: The opaque origin's serialization (Fetch ``#serializing-a-request-origin``); case-sensitive.
NULL_ORIGIN = "null"

#: The configuration entry that allows every origin.
ANY_ORIGIN = "*"

DEFAULT_PORTS = {"http": 80, "https": 443, "ws": 80, "wss": 443}

_SCHEME = r"[a-z][a-z0-9+.\-]*"
# An LDH label: what DNS names are made of; no "_" (a browser never serializes one), no leading or trailing hyphen.
_LABEL = r"[a-z0-9](?:[a-z0-9\-]{0,61}[a-z0-9])?"
_DOMAIN = rf"{_LABEL}(?:\.{_LABEL})*"
_IPV6 = r"\[[0-9a-f:.]+\]"
_PORT = r"[1-9][0-9]{0,4}"

# What a browser sends, already canonical: lowercase, ASCII, no default port, nothing after the port.
_REQUEST_ORIGIN = re.compile(rf"({_SCHEME})://({_DOMAIN}|{_IPV6})(?::({_PORT}))?")

_IPV4_SHAPE = re.compile(r"[0-9]+(?:\.[0-9]+)*")
_WHITESPACE = re.compile(r"\s")


@dataclass(frozen=True, slots=True)
class RequestOrigin:
    """A syntactically valid serialized origin as a browser sends it; ``value`` is byte-for-byte the header."""

    value: str
    scheme: str
    host: str
    port: int | None  # None when the scheme's default port is meant (it is never serialized)

    @property
    def is_ip(self) -> bool:
        return self.host.startswith("[") or _IPV4_SHAPE.fullmatch(self.host) is not None


def _valid_ip_host(host: str) -> bool:
    """An IP literal in the form a browser serializes it (WHATWG URL ``#concept-ipv4-serializer`` and v6)."""
    if host.startswith("["):
        try:
            address = ipaddress.IPv6Address(host[1:-1])
        except ValueError:
            return False
        return address.compressed == host[1:-1]
    try:
        return str(ipaddress.IPv4Address(host)) == host
    except ValueError:
        return False


def _host_is_ip_shaped(host: str) -> bool:
    # WHATWG URL: a host whose last label is numeric is parsed as IPv4, so "a.123" is never a domain.
    return host.startswith("[") or host.rsplit(".", 1)[-1].isdigit()


def parse_request_origin(value: str) -> RequestOrigin | None:
    """Parse a request's ``Origin`` value; ``None`` means malformed (never allowed, never reflected).

    ``null`` is not handled here: callers compare with :data:`NULL_ORIGIN` first, because it is well-formed but opaque.
    """
    if len(value) > MAX_ORIGIN_LENGTH:
        return None
    match = _REQUEST_ORIGIN.fullmatch(value)
    if match is None:
        return None
    scheme, host, port_text = match.groups()
    if len(host) > 253 or (_host_is_ip_shaped(host) and not _valid_ip_host(host)):
        return None
    port: int | None = None
    if port_text is not None:
        port = int(port_text)
        if port > 65535 or DEFAULT_PORTS.get(scheme) == port:
            return None  # a browser never serializes the default port
    return RequestOrigin(value, scheme, host, port)


def lookup_keys(origin: RequestOrigin) -> Iterator[str]:
    """The store keys that could allow ``origin``, most specific first.

    A handful of exact lookups whatever the size of the set: the origin itself, its ``:*`` port form, then
    the ``*.`` form of each parent domain (label-aware by construction: ``https://*.example.com`` is only ever looked up
    for hosts ending in ``.example.com``), and finally ``*``. No scan, no regex.
    """
    scheme, host, port = origin.scheme, origin.host, origin.port
    yield origin.value
    if port is not None:
        yield f"{scheme}://{host}:*"
    if not origin.is_ip:
        suffix = "" if port is None else f":{port}"
        rest = host
        while "." in rest:
            rest = rest.split(".", 1)[1]
            yield f"{scheme}://*.{rest}{suffix}"
            if port is not None:
                yield f"{scheme}://*.{rest}:*"
    yield ANY_ORIGIN


class EntryError(ProblemError):
    """A configured origin entry that cannot be canonicalised; the message says what is wrong and how to fix it, the
    code (``origin_*``) what kind of mistake it is. Its :class:`Problem` is unplaced: each door says where."""

    def __init__(self, message: str, code: str) -> None:
        super().__init__(Problem("", "origin", code, message))


@dataclass(frozen=True, slots=True)
class OriginEntry:
    """A configured origin or pattern in canonical form; ``key`` is what the store holds and lookups produce."""

    key: str
    scheme: str  # "" for "*" and "null"
    host: str  # the host without the "*." prefix
    subdomains: bool  # "https://*.example.com": any host strictly below ``host``
    any_port: bool  # "http://localhost:*": any explicit port

    @property
    def is_any(self) -> bool:
        return self.key == ANY_ORIGIN

    @property
    def is_null(self) -> bool:
        return self.key == NULL_ORIGIN

    @property
    def is_pattern(self) -> bool:
        return self.subdomains or self.any_port or self.is_any

    @property
    def is_loopback(self) -> bool:
        """Loopback names, which browsers treat as potentially trustworthy even over http (Secure Contexts)."""
        return is_loopback_host(self.host)


def is_loopback_host(host: str) -> bool:
    """Whether a host name or IP literal (IPv6 with or without brackets) names this machine's loopback:
    ``localhost``, ``*.localhost`` (RFC 6761 reserves them for loopback), 127.0.0.0/8 or ::1."""
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


_ENTRY_HINT = 'write it as scheme://host[:port], e.g. "https://app.example.com"'


def _canonical_host(raw: str, text: str) -> str:
    if raw.startswith("["):
        if not raw.endswith("]"):
            raise EntryError(f"{text!r}: unterminated IPv6 literal; {_ENTRY_HINT}", "origin_bad_host")
        try:
            return "[" + ipaddress.IPv6Address(raw[1:-1]).compressed + "]"
        except ValueError:
            raise EntryError(f"{text!r}: {raw!r} is not an IPv6 address", "origin_bad_host") from None
    host = raw.lower()
    if _host_is_ip_shaped(host):
        try:
            return str(ipaddress.IPv4Address(host))
        except ValueError:
            raise EntryError(
                f"{text!r}: {raw!r} is neither a domain name nor an IPv4 address", "origin_bad_host"
            ) from None
    if "*" in host:
        raise EntryError(
            f'{text!r}: a wildcard must be a whole label at the start of the host, e.g. "https://*.example.com"',
            "origin_bad_wildcard",
        )
    try:
        # UTS #46 non-transitional processing, as browsers do (WHATWG URL "domain to ASCII").
        ascii_host = idna.encode(host, uts46=True, transitional=False).decode("ascii")
    except idna.IDNAError as exc:
        raise EntryError(f"{text!r}: {raw!r} is not a valid host name ({exc})", "origin_bad_host") from None
    if re.fullmatch(_DOMAIN, ascii_host) is None or len(ascii_host) > 253:
        raise EntryError(
            f"{text!r}: {raw!r} is not a valid host name (letters, digits, hyphens and dots only)", "origin_bad_host"
        )
    return ascii_host


def parse_origin_entry(text: str) -> OriginEntry:
    """Canonicalise one configured origin or pattern, or raise :class:`EntryError` saying why.

    Accepted: ``*``; ``null`` (whether it may be *used* is the policy validator's call); ``scheme://host[:port]``
    with the host optionally starting with ``*.`` and the port optionally ``*``. Uppercase, IDN and default ports are
    canonicalised. Paths, trailing slashes, user info, queries, fragments and regexes are refused, never guessed at.
    """
    if not isinstance(text, str) or not text:
        raise EntryError(f"{text!r}: an origin must be a non-empty string; {_ENTRY_HINT}", "origin_empty")
    fast = parse_request_origin(text)
    if fast is not None:  # already in the canonical form browsers send: nothing to canonicalise (fast bulk import)
        return OriginEntry(fast.value, fast.scheme, fast.host, subdomains=False, any_port=False)
    if _WHITESPACE.search(text):
        raise EntryError(f"{text!r}: whitespace is not allowed in an origin; {_ENTRY_HINT}", "origin_whitespace")
    if len(text) > MAX_ORIGIN_LENGTH:
        raise EntryError(
            f"{text[:40]!r}...: longer than {MAX_ORIGIN_LENGTH} characters, no browser sends that", "origin_too_long"
        )
    if text == ANY_ORIGIN:
        return OriginEntry(ANY_ORIGIN, "", "", subdomains=False, any_port=False)
    if text.lower() == NULL_ORIGIN:
        return OriginEntry(NULL_ORIGIN, "", "", subdomains=False, any_port=False)
    if any(c in text for c in "^$()|\\?+[]{}") and not text.count("[") == text.count("]") == 1:
        raise EntryError(
            f"{text!r}: looks like a regular expression; corsproxy takes exact origins and patterns only: "
            f'"https://app.example.com", "https://*.example.com" (any subdomain), "http://localhost:*" (any port)',
            "origin_regex",
        )
    scheme, sep, rest = text.partition("://")
    if not sep:
        raise EntryError(f"{text!r}: missing scheme; {_ENTRY_HINT}", "origin_no_scheme")
    scheme = scheme.lower()
    if re.fullmatch(_SCHEME, scheme) is None:
        raise EntryError(f"{text!r}: {scheme!r} is not a valid URL scheme", "origin_bad_scheme")
    authority, slash, path = rest.partition("/")
    if slash:
        if path == "":
            raise EntryError(
                f"{text!r}: an origin has no trailing slash; browsers send {text.rstrip('/')!r}, use that",
                "origin_trailing_slash",
            )
        raise EntryError(f"{text!r}: an origin has no path; use {scheme + '://' + authority!r}", "origin_has_path")
    for char, what in (("@", "user info"), ("?", "a query"), ("#", "a fragment")):
        if char in authority:
            raise EntryError(f"{text!r}: an origin has no {what}; {_ENTRY_HINT}", "origin_has_extra")
    if authority.startswith("["):
        close = authority.find("]")
        host_text, port_text = authority[: close + 1], authority[close + 1 :]
        if port_text and not port_text.startswith(":"):
            raise EntryError(f"{text!r}: unexpected text after the IPv6 literal", "origin_bad_host")
        port_text = port_text[1:]
        has_port = bool(authority[close + 1 :])
    else:
        host_text, has_colon, port_text = authority.partition(":")
        has_port = bool(has_colon)
    subdomains = host_text.startswith("*.")
    if subdomains:
        host_text = host_text[2:]
        if scheme not in ("http", "https"):
            raise EntryError(
                f"{text!r}: subdomain wildcards are only meaningful for http and https origins", "origin_bad_wildcard"
            )
    if not host_text:
        raise EntryError(f"{text!r}: missing host; {_ENTRY_HINT}", "origin_no_host")
    host = _canonical_host(host_text, text)
    if subdomains and (host.startswith("[") or _IPV4_SHAPE.fullmatch(host)):
        raise EntryError(f"{text!r}: an IP address has no subdomains; list the address itself", "origin_bad_wildcard")
    any_port = False
    port_suffix = ""
    if has_port:
        if port_text == "*":
            any_port = True
            port_suffix = ":*"
        elif port_text.isdigit() and port_text.isascii() and 0 < int(port_text) <= 65535:
            port = int(port_text)
            if DEFAULT_PORTS.get(scheme) != port:
                port_suffix = f":{port}"
        else:
            raise EntryError(f"{text!r}: {port_text!r} is not a port (1-65535, or * for any port)", "origin_bad_port")
    key = f"{scheme}://{'*.' if subdomains else ''}{host}{port_suffix}"
    return OriginEntry(key, scheme, host, subdomains=subdomains, any_port=any_port)
