"""The origin matcher as a property: an entry allows an origin exactly when the entry's key is among the origin's
lookup keys, that is exactly when a plain reading of the entry says so (same scheme; the same host, or for
``*.host`` a host strictly below it; the same port, or for ``:*`` any explicit port) — and never for the look-alikes
loose matchers let through: a suffix or a prefix glued to the host, an extra label, another port, another scheme.

Checked three ways for each generated pair: the reading below, membership in :func:`lookup_keys`, and the decision
engine itself with the entry as its only origin. Derandomized (a fixed seed) so that CI runs the same cases every
time; no example database is written.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from corsproxy.config import parse_config
from corsproxy.core.decision import CorsRequest, Reason, StaticOriginSet
from corsproxy.core.origin import DEFAULT_PORTS, RequestOrigin, lookup_keys, parse_origin_entry, parse_request_origin
from corsproxy.core.settings import Config
from tests.support.config import BASE_CONFIG, merge

SETTINGS = settings(
    max_examples=400, derandomize=True, database=None, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)

# Without credentials the safety rules refuse no entry at request time, so "allowed" is the matcher's answer alone.
CONFIG: Config = parse_config(
    merge(BASE_CONFIG, {"cors": {"allow_credentials": False}, "store": {"path": "/nonexistent/unused"}}), env={}
)


@dataclass(frozen=True)
class Spec:
    """An origin entry as an operator writes it."""

    scheme: str
    host: str
    subdomains: bool  # "*.host"
    port: int | str | None  # None: the scheme's default; "*": any explicit port

    @property
    def text(self) -> str:
        port = "" if self.port is None else f":{self.port}"
        return f"{self.scheme}://{'*.' if self.subdomains else ''}{self.host}{port}"

    def covers(self, origin: RequestOrigin) -> bool:
        """The plain reading of the entry, written without lookup keys."""
        if origin.scheme != self.scheme:
            return False
        host_ok = origin.host.endswith("." + self.host) if self.subdomains else origin.host == self.host
        port_ok = origin.port is not None if self.port == "*" else origin.port == self.port
        return host_ok and port_ok


def origin(scheme: str, host: str, port: int | None) -> RequestOrigin:
    value = f"{scheme}://{host}" + ("" if port is None else f":{port}")
    parsed = parse_request_origin(value)
    assert parsed is not None, value
    return parsed


SCHEMES = st.sampled_from(["http", "https"])
# Short labels from a small alphabet, so that generated hosts often share labels with the entry's host; one hyphen at
# most (IDNA reserves "--" in the third and fourth position).
LABELS = st.from_regex(r"[a-c0-2]{1,3}(-[a-c0-2]{1,2})?", fullmatch=True)
TLDS = st.sampled_from(["com", "net", "example", "io"])  # alphabetic: a numeric last label would make an IPv4 host
HOSTS = st.builds(lambda labels, tld: ".".join([*labels, tld]), st.lists(LABELS, min_size=1, max_size=3), TLDS)
PORTS = st.one_of(st.none(), st.sampled_from([80, 443, 3000, 8080, 8443, 65535]))
SPECS = st.builds(Spec, SCHEMES, HOSTS, st.booleans(), st.one_of(PORTS, st.just("*")))


def sent_port(scheme: str, port: int | None) -> int | None:
    """A default port is no port: a browser never sends it (and the canonicaliser drops it from an entry)."""
    return None if port == DEFAULT_PORTS.get(scheme) else port


def normalised(spec: Spec) -> Spec:
    port = spec.port if spec.port == "*" or spec.port is None else sent_port(spec.scheme, int(spec.port))
    return Spec(spec.scheme, spec.host, spec.subdomains, port)


def allowed_by_engine(spec: Spec, request: RequestOrigin) -> bool:
    entries = StaticOriginSet({parse_origin_entry(spec.text).key: "default"})
    decision = CONFIG.engine.judge(CorsRequest("GET", (request.value,)), entries, 0.0)
    assert decision.reason in (Reason.ALLOWED, Reason.ORIGIN_NOT_ALLOWED), decision
    return decision.reason is Reason.ALLOWED


def check(spec: Spec, request: RequestOrigin) -> bool:
    """The three answers agree; returns that answer."""
    key = parse_origin_entry(spec.text).key
    by_keys = key in set(lookup_keys(request))
    assert by_keys == spec.covers(request), (spec.text, request.value, key, list(lookup_keys(request)))
    assert allowed_by_engine(spec, request) == by_keys, (spec.text, request.value)
    return by_keys


@st.composite
def covered(draw: st.DrawFn) -> tuple[Spec, RequestOrigin]:
    """An entry and an origin it allows (built from the entry, so that the allowed side is not left to chance)."""
    spec = normalised(draw(SPECS))
    host = spec.host
    if spec.subdomains:
        host = ".".join([*draw(st.lists(LABELS, min_size=1, max_size=2)), host])
    port: int | None = None
    if spec.port == "*":
        port = draw(st.sampled_from([3000, 8080, 65535, 80 if spec.scheme == "https" else 443]))
    elif spec.port is not None:
        port = int(spec.port)
    return spec, origin(spec.scheme, host, port)


@SETTINGS
@given(SPECS, SCHEMES, HOSTS, PORTS)
def test_any_pair_the_three_answers_agree(spec: Spec, scheme: str, host: str, port: int | None) -> None:
    spec = normalised(spec)
    check(spec, origin(scheme, host, sent_port(scheme, port)))


@SETTINGS
@given(covered())
def test_an_origin_built_to_match_is_allowed(pair: tuple[Spec, RequestOrigin]) -> None:
    spec, request = pair
    assert check(spec, request), (spec.text, request.value)


def look_alikes(spec: Spec, request: RequestOrigin, glue: str) -> dict[str, RequestOrigin]:
    """Origins one step from an allowed ``request`` that the entry must refuse, by family."""
    scheme, host, port = request.scheme, request.host, request.port
    word = glue.strip("-")  # a label of its own: starts with a letter, never all digits
    other_scheme = "https" if scheme == "http" else "http"
    other_port = next(p for p in (8443, 3000, 8080) if p != port)
    families = {
        "suffix": origin(scheme, f"{host}{glue}", port),  # app.example.comx, app.example.com-evil
        "dotted-suffix": origin(scheme, f"{host}.{word}", port),  # app.example.com.evil
        "prefix": origin(scheme, f"{word}{spec.host}", port),  # evilapp.example.com, evilexample.com
        "hyphen-prefix": origin(scheme, f"{word}-{spec.host}", port),
        "scheme": origin(other_scheme, host, sent_port(other_scheme, port)),
    }
    if spec.subdomains:
        families["apex"] = origin(scheme, spec.host, port)  # *.example.com never covers example.com itself
    else:
        families["extra-label"] = origin(scheme, f"{word}.{host}", port)
    if spec.port == "*":
        families["no-port"] = origin(scheme, host, None)
    else:
        families["other-port"] = origin(scheme, host, other_port)
        if port is not None:
            families["no-port"] = origin(scheme, host, None)
    return families


GLUE = st.sampled_from(["x", "evil", "-evil", "a0", "zz"])


@SETTINGS
@given(covered(), GLUE)
def test_look_alikes_of_an_allowed_origin_are_refused(pair: tuple[Spec, RequestOrigin], glue: str) -> None:
    spec, request = pair
    assert check(spec, request)
    for family, alike in look_alikes(spec, request, glue).items():
        assert not check(spec, alike), (family, spec.text, alike.value)


@pytest.mark.parametrize(
    ("entry", "origin_value"),
    [
        pytest.param("https://app.example.com", "https://app.example.com.evil.net", id="suffix"),
        pytest.param("https://app.example.com", "https://evilapp.example.com", id="prefix"),
        pytest.param("https://app.example.com", "https://evil.app.example.com", id="extra-label"),
        pytest.param("https://app.example.com", "https://app.example.com:8443", id="port"),
        pytest.param("https://app.example.com", "http://app.example.com", id="scheme"),
        pytest.param("https://*.example.com", "https://example.com", id="wildcard-apex"),
        pytest.param("https://*.example.com", "https://evilexample.com", id="wildcard-prefix"),
        pytest.param("https://*.example.com", "https://a.example.com.evil.net", id="wildcard-suffix"),
        pytest.param("http://localhost:*", "http://localhost", id="any-port-needs-a-port"),
        pytest.param("http://localhost:*", "https://localhost:3000", id="any-port-scheme"),
    ],
)
def test_named_look_alikes_are_refused(entry: str, origin_value: str) -> None:
    """The families above as fixed cases, readable on their own."""
    request = parse_request_origin(origin_value)
    assert request is not None
    assert parse_origin_entry(entry).key not in set(lookup_keys(request))
    entries = StaticOriginSet({parse_origin_entry(entry).key: "default"})
    assert CONFIG.engine.judge(CorsRequest("GET", (origin_value,)), entries, 0.0).reason is Reason.ORIGIN_NOT_ALLOWED
