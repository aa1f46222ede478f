"""What the proxy changes in a message on its way through, as pure functions: hop-by-hop fields, ``X-Forwarded-*``,
``Host`` and the trusted-proxy rule.

Owns header arithmetic only. Imports neither aiohttp nor lmdb: headers come in and go out as ``(name, value)`` pairs
in wire order, so the rules are tested as tables without sockets.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from urllib.parse import unquote

from corsproxy.core.origin import DEFAULT_PORTS

__all__ = [
    "FORWARDING_FIELDS",
    "HOP_BY_HOP",
    "WEBSOCKET_HANDSHAKE_FIELDS",
    "ForwardContext",
    "TrustedProxies",
    "climbs_above_root",
    "hop_by_hop_names",
    "host_header",
    "is_websocket_upgrade",
    "request_headers",
    "response_headers",
]

Header = tuple[str, str]

#: RFC 9110 §7.6.1 hop-by-hop fields, plus ``Proxy-Connection`` and ``Keep-Alive`` that HTTP/1.0 proxies used.
#: Dropped in both directions, together with every field a message's ``Connection`` names.
HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "proxy-authorization",
        "proxy-authenticate",
    }
)

#: Fields that tell the upstream who the client is. From a peer that is not a trusted proxy they are lies waiting to
#: be believed (an upstream rate-limiting on ``X-Real-IP`` or logging ``Forwarded: for=``), so they are dropped and
#: corsproxy writes its own ``X-Forwarded-*``.
FORWARDING_FIELDS = frozenset(
    {
        "x-forwarded-for",
        "x-forwarded-proto",
        "x-forwarded-host",
        "x-forwarded-port",
        "x-real-ip",
        "forwarded",
        # The same lies in the names other upstreams read: the scheme (Rack's X-Forwarded-Ssl/-Scheme, Spring's
        # X-Forwarded-Ssl; "on" there makes the app believe the request came over TLS) and the client address
        # (Rails' Client-IP, the client-IP libraries of Express and Django, CDN names).
        "x-forwarded-ssl",
        "x-forwarded-scheme",
        "x-url-scheme",
        "front-end-https",
        "x-forwarded-server",
        "client-ip",
        "x-client-ip",
        "true-client-ip",
        "x-cluster-client-ip",
        "cf-connecting-ip",
        "fastly-client-ip",
        "x-original-forwarded-for",
        # Fields that make an upstream route another path than the request line's (Spring's X-Forwarded-Prefix,
        # the X-Original-URL / X-Rewrite-URL of IIS URL Rewrite that Symfony and Zend once honoured): from a client
        # they would move a request out from under the route corsproxy judged it by.
        "x-forwarded-prefix",
        "x-original-url",
        "x-rewrite-url",
    }
)

#: The WebSocket handshake fields of RFC 6455 §4.1: the proxy runs its own handshake with each side.
WEBSOCKET_HANDSHAKE_FIELDS = frozenset(
    {"sec-websocket-key", "sec-websocket-version", "sec-websocket-extensions", "sec-websocket-protocol"}
)

#: Not hop-by-hop, but answered by corsproxy itself (RFC 9110 §10.1.1 lets a proxy send the 100 on its own).
_ANSWERED_HERE = frozenset({"expect"})


def hop_by_hop_names(connection_lines: Iterable[str]) -> frozenset[str]:
    """The hop-by-hop names of one message: the fixed set plus every token its ``Connection`` lines list
    (RFC 9110 §7.6.1; nginx forwards the named ones, which lets a client strip e.g. ``X-Forwarded-For`` downstream)."""
    named = {token.strip().lower() for line in connection_lines for token in line.split(",")}
    named.discard("")
    return HOP_BY_HOP | named


@dataclass(frozen=True, slots=True)
class TrustedProxies:
    """The peers whose forwarding fields are believed: ``forwarding.trusted_proxies``, compiled once."""

    networks: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()

    @classmethod
    def parse(cls, cidrs: Sequence[str]) -> TrustedProxies:
        """The compiled form of CIDR strings the configuration has validated."""
        return cls(tuple(ipaddress.ip_network(text, strict=False) for text in cidrs))

    def trusts(self, peer: str) -> bool:
        if not self.networks or not peer:
            return False
        try:
            address = ipaddress.ip_address(peer.split("%", 1)[0])  # drop an IPv6 zone id
        except ValueError:
            return False  # a unix socket or something else without an address: never trusted
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            address = address.ipv4_mapped
        return any(address in network for network in self.networks)


def host_header(scheme: str, host: str, port: int) -> str:
    """``Host`` for an upstream address: brackets around IPv6 literals, the port only when it is not the default."""
    name = f"[{host}]" if ":" in host and not host.startswith("[") else host
    return name if DEFAULT_PORTS.get(scheme) == port else f"{name}:{port}"


@dataclass(frozen=True, slots=True)
class ForwardContext:
    """What the forwarding fields are computed from: the direct peer and how it reached corsproxy."""

    peer: str  # the address of the TCP peer, "" when unknown
    scheme: str  # "http" or "https", the scheme of corsproxy's own listener
    client_host: str | None  # the request's Host, as received
    upstream_host: str  # the upstream's own Host value
    preserve_host: bool = False
    trusted: TrustedProxies = TrustedProxies()


def request_headers(received: Sequence[Header], context: ForwardContext, websocket: bool = False) -> list[Header]:
    """The header lines sent to the upstream, in received order, then ``Host`` and the forwarding fields.

    Hop-by-hop fields are dropped (RFC 9110 §7.6.1); ``Expect`` is answered here; for a WebSocket handshake its own
    ``Sec-WebSocket-*`` fields are left to the upstream handshake. From a trusted proxy, ``X-Forwarded-For`` is
    appended to and the other forwarding fields are kept; from anyone else they are replaced.
    """
    drop = hop_by_hop_names(value for name, value in received if name.lower() == "connection")
    trusted = context.trusted.trusts(context.peer)
    out: list[Header] = []
    prior_for: list[str] = []
    prior_proto = prior_host = None
    for name, value in received:
        lower = name.lower()
        if lower in drop or lower == "host" or lower in _ANSWERED_HERE:
            continue
        if websocket and lower in WEBSOCKET_HANDSHAKE_FIELDS:
            continue
        if "_" in lower and lower.replace("_", "-") in FORWARDING_FIELDS:
            # WSGI and CGI servers map "-" and "_" alike (X_Forwarded_For is HTTP_X_FORWARDED_FOR to them): such a
            # spelling is never a proxy's own, so it is dropped from anyone (nginx drops underscored names too).
            continue
        if lower in FORWARDING_FIELDS:
            if not trusted:
                continue
            if lower == "x-forwarded-for":
                prior_for.append(value)
                continue
            if lower == "x-forwarded-proto":
                prior_proto = value
                continue
            if lower == "x-forwarded-host":
                prior_host = value
                continue
        out.append((name, value))
    host = context.client_host if context.preserve_host and context.client_host else context.upstream_host
    chain = ", ".join(item.strip() for line in prior_for for item in line.split(",") if item.strip())
    peer = context.peer or "unknown"
    out.append(("Host", host))
    out.append(("X-Forwarded-For", f"{chain}, {peer}" if chain else peer))
    out.append(("X-Forwarded-Proto", prior_proto or context.scheme))
    forwarded_host = prior_host or context.client_host
    if forwarded_host:
        out.append(("X-Forwarded-Host", forwarded_host))
    return out


def response_headers(received: Sequence[Header]) -> list[Header]:
    """The upstream's header lines minus hop-by-hop ones, in order; repeated lines (``Set-Cookie``) stay separate."""
    drop = hop_by_hop_names(value for name, value in received if name.lower() == "connection")
    return [(name, value) for name, value in received if name.lower() not in drop]


def is_websocket_upgrade(method: str, connection_lines: Iterable[str], upgrade_lines: Iterable[str]) -> bool:
    """RFC 6455 §4.1: a GET whose ``Connection`` lists ``upgrade`` and whose ``Upgrade`` lists ``websocket``."""
    if method != "GET":
        return False
    connection = {token.strip().lower() for line in connection_lines for token in line.split(",")}
    upgrade = {token.strip().lower() for line in upgrade_lines for token in line.split(",")}
    return "upgrade" in connection and "websocket" in upgrade


def climbs_above_root(target: str) -> bool:
    """Whether a request target's path uses ``..`` segments (plain, ``%2e``-encoded once or twice, IIS's ``%u002e``,
    with ``;`` parameters or backslashes) to climb above ``/``. Appended to ``upstream.url``'s base path, such a path
    would reach the upstream as ``/api/../secret``, which most servers resolve outside the prefix corsproxy is
    configured to expose. Decoded as often as the route readings decode (a second decoding hop, HTTP.sys's
    ``%uXXXX``), since the upstream behind the base path may be any of those servers."""
    path = target.split("?", 1)[0]
    if "%" in path:
        once = unquote(_percent_u_decode(path))
        return _climbs(once) or ("%" in once and _climbs(unquote(_percent_u_decode(once))))
    return _climbs(path)


def _percent_u_decode(path: str) -> str:
    return _PERCENT_U.sub(lambda match: chr(int(match[1], 16)), path)


_PERCENT_U = re.compile(r"%[uU]([0-9a-fA-F]{4})")


def _climbs(path: str) -> bool:
    depth = 0
    for raw_segment in path.replace("\\", "/").split("/"):
        segment = raw_segment.split(";", 1)[0]
        if segment == "..":
            depth -= 1
            if depth < 0:
                return True
        elif segment not in ("", "."):
            depth += 1
    return False
