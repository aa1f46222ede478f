"""Origin-safety policy: which origin entries would open a hole under which policy.

One check (:func:`check_origin_entry`) for every write path (configuration, CLI, admin API, origins file) and the
engine's request-time re-check of a matched store entry (:func:`entry_checker`). The Public Suffix List ships
inside the ``publicsuffixlist`` package: never a download at run time.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from functools import cache, lru_cache

from publicsuffixlist import PSLFILE, PublicSuffixList, encode_idn

from corsproxy.core.origin import EntryError, OriginEntry, parse_origin_entry
from corsproxy.core.problems import Problem
from corsproxy.core.settings import PolicySafety

#: Sites where anyone can publish a page under the listed origin (allowing them allows everyone).
CODE_HOSTING_DOMAINS = (
    "codepen.io",
    "cdpn.io",
    "jsfiddle.net",
    "jshell.net",
    "jsbin.com",
    "codesandbox.io",
    "csb.app",
    "stackblitz.io",
    "stackblitz.com",
    "webcontainer.io",
    "plnkr.co",
    "glitch.me",
    "replit.dev",
    "repl.co",
)


@cache
def _public_suffixes() -> PublicSuffixList:
    # The list ships inside the package: never a download at run time.
    return PublicSuffixList()


@cache
def _suffixes_at_or_below() -> dict[str, str]:
    """Every domain that is a public suffix or has one below it, mapped to one such suffix (for the message).

    Built once from the list bundled with ``publicsuffixlist``, so that a wildcard's check is one dict lookup: a
    wildcard over ``amazonaws.com`` covers ``s3.amazonaws.com``, where anyone can create a bucket, just as a
    wildcard over ``herokuapp.com`` covers everyone's apps. Exception rules (``!www.ck``) name registrable domains
    and are skipped; a wildcard rule (``*.compute.herokuapp.com``) makes its base public too, as the list's own
    linter reads it.
    """
    below: dict[str, str] = {}
    with open(PSLFILE, encoding="utf-8") as source:
        for line in source:
            rule = line.split(" ", 1)[0].strip().lower()
            if not rule or rule.startswith(("//", "!")):
                continue
            shown = rule
            if rule.startswith("*."):
                rule = rule[2:]
            try:
                domain = encode_idn(rule)
            except UnicodeError:
                continue
            # Walk up from the suffix: it and each parent have a suffix at or below them; the message names the
            # nearest one (s3.amazonaws.com rather than execute-api.af-south-1.amazonaws.com).
            while domain:
                if len(shown) < len(below.get(domain, shown + ".")):
                    below[domain] = shown
                dot = domain.find(".")
                domain = domain[dot + 1 :] if dot >= 0 else ""
    return below


def check_origin_entry(entry: OriginEntry, policy: PolicySafety) -> tuple[list[Problem], list[Problem]]:
    """Errors and warnings for allowing ``entry`` under ``policy``, as unplaced problems of the field ``origin``
    (each door says where). Shared by every write path."""
    errors: list[Problem] = []
    warnings: list[Problem] = []
    creds = policy.allow_credentials
    opt_in_note = "(policy {name!r} sets {flag}: this is dangerous, see the README)"

    def warn(code: str, message: str) -> None:
        warnings.append(Problem("", "origin", code, message))

    def gate(code: str, flag: str, message: str) -> None:
        # The same code either way: a tool can tell which rule fired, refused or opted into.
        if getattr(policy, flag):
            warn(code, f"{message} {opt_in_note.format(name=policy.name, flag=flag)}")
        else:
            errors.append(
                Problem(
                    "", "origin", code, f"{message}; if you really mean it, set {flag}: true on policy {policy.name!r}"
                )
            )

    if entry.is_any:
        if creds:
            gate(
                "any_origin_with_credentials",
                "dangerously_allow_any_origin_with_credentials",
                '"*" with allow_credentials: true would let every website make credentialed requests as the user '
                "(browsers forbid the combination, so it can only be done by reflecting any origin) — list the "
                "origins, or use a policy with allow_credentials: false",
            )
        return errors, warnings
    if entry.is_null:
        gate(
            "null_origin",
            "dangerously_allow_null_origin",
            '"null" is the origin of sandboxed iframes, file: and data: documents and cross-origin redirects — any '
            "site can produce it, so allowing it allows everyone; allow the real origins instead",
        )
        return errors, warnings
    if entry.scheme == "http" and creds and not entry.is_loopback:
        gate(
            "http_origin_with_credentials",
            "dangerously_allow_http_origins",
            f"{entry.key!r} is plain http on a policy with credentials: anyone on the network path can inject "
            f"script into that origin and act as the user — use {entry.key.replace('http://', 'https://', 1)!r}",
        )
    if entry.subdomains:
        psl = _public_suffixes()
        hosting = _code_hosting_domain(entry.host)
        if hosting is not None:
            gate(
                "code_hosting_wildcard",
                "dangerously_allow_public_suffix_wildcards",
                f"{entry.key!r} covers every page anyone publishes on {hosting} (a code-hosting site) — list the "
                "exact origins you need",
            )
        elif psl.privatesuffix(entry.host) is None and not entry.is_loopback:
            gate(
                "public_suffix_wildcard",
                "dangerously_allow_public_suffix_wildcards",
                f"{entry.key!r} covers every site under the public suffix {entry.host!r} (anyone can register "
                f'or publish there) — pin a registrable domain, e.g. "{entry.scheme}://*.yourname.{entry.host}"',
            )
        elif (suffix := _suffixes_at_or_below().get(entry.host)) is not None and not entry.is_loopback:
            gate(
                "public_suffix_wildcard",
                "dangerously_allow_public_suffix_wildcards",
                f"{entry.key!r} covers the public suffix {suffix!r} below {entry.host!r} (anyone can register or "
                f"publish there, e.g. https://anyone.{suffix.removeprefix('*.')}) — list the exact origins you "
                "need, or a wildcard under a name you control",
            )
        elif creds:
            warn(
                "credentialed_subdomain_wildcard",
                f"{entry.key!r} allows credentialed requests from every subdomain of {entry.host!r}: one subdomain "
                "with an XSS or a takeover exposes your users — prefer listing the subdomains",
            )
    domain = _code_hosting_domain(entry.host)
    if domain is not None:
        warn(
            "code_hosting_origin",
            f"{entry.key!r} is on {domain}, where anyone can publish pages: allowing it allows everyone there",
        )
    return errors, warnings


_CODE_HOSTING = frozenset(CODE_HOSTING_DOMAINS)


def entry_checker(safety: Mapping[str, PolicySafety]) -> Callable[[str, str], bool]:
    """The engine's request-time re-check of a matched store entry against the policies as configured now."""

    # Built with each compiled config (a reload gets a new, empty cache: it never answers for old policies), but it
    # cannot be filled at load: its keys are store entries, which any process (CLI, admin API, origins file, another
    # host's sync) writes at any time, and a store may hold millions. So the entries requests actually match are
    # memoised — bounded, so a large store or a scan over many allowed origins cannot grow it without limit.
    @lru_cache(maxsize=16384)
    def entry_is_safe(key: str, policy: str) -> bool:
        flags = safety.get(policy)
        if flags is None:
            return True  # an unknown policy is refused on its own (policy_unknown)
        try:
            entry = parse_origin_entry(key)
        except EntryError:
            return False
        errors, _warnings = check_origin_entry(entry, flags)
        return not errors

    return entry_is_safe


def _code_hosting_domain(host: str) -> str | None:
    """The code-hosting domain ``host`` is (or is under), by walking its parents: a few set lookups per entry."""
    while True:
        if host in _CODE_HOSTING:
            return host
        dot = host.find(".")
        if dot < 0:
            return None
        host = host[dot + 1 :]
