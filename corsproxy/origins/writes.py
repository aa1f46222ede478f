"""Every change to the origin store goes through here: ``corsproxy origins add/remove/import/prune``, the admin API's
PUT/DELETE/import, the origins-file watcher and the config reconciliation. One module, so one ownership rule and one
validation rule, whichever door a write comes in by.

Ownership (the ``source`` of each entry):

* ``config`` (``cors.allow_origins``) and ``file`` (the origins file) entries are *declared*: only their declaration
  changes or removes them. An operator write (CLI, admin API) to a declared entry is refused with where to change it
  instead (the YAML key and config file, or the origins file's path) — otherwise the change would be undone by the next
  reconciliation, or worse, survive the entry's removal from the declaration.
* A declaration takes over an entry an operator added; ``config`` also takes over a ``file`` entry (the host's own
  config is the more specific declaration), while ``file`` leaves ``config``'s entries alone. So removing an origin
  from the declaration that owns it, then reloading, always revokes it.
* An operator write never changes an entry's owner: it changes only the fields it gives (policy, expiry, note) and
  keeps the others. An import is a batch of such writes: lines that match a declared entry exactly change nothing
  and are reported as declared elsewhere; lines that would change one are refused like any other write.
* Every entry is checked against the policy it ends up with (:func:`corsproxy.config.check_origin_entry`), inside
  the same LMDB transaction as the write, so the check and the write see the same state.

Imports the store (lmdb); must not import aiohttp.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Protocol

from corsproxy.core.origin_lines import KEEP, MAX_NOTE_LENGTH, EntryEdit, note_too_long
from corsproxy.core.problems import Problem, ProblemError
from corsproxy.core.safety import check_origin_entry
from corsproxy.core.settings import DEFAULT_POLICY, Config, ConfiguredOrigin, PolicySafety, unknown_policy_problem
from corsproxy.store import Finish, Guard, OriginRecord, OriginStore, Reconciled, Resolve

__all__ = [
    "DECLARED_SOURCES",
    "Declarations",
    "DeclaredElsewhere",
    "WriteReport",
    "WriteTarget",
    "prune_expired",
    "reconcile_config",
    "reconcile_file",
    "reconcile_on_start",
    "remove_entry",
    "write_entries",
]

log = logging.getLogger("corsproxy.origins")


class WriteTarget(Protocol):
    """Where operator writes go: the local store, or in fleet mode PostgreSQL
    (:class:`corsproxy.origins.postgres.PostgresOrigins`), with the store's read-check-write contracts."""

    def apply(
        self, keys: Iterable[str], resolve: Resolve, actor: str, finish: Finish | None = None
    ) -> tuple[int, int]: ...

    def remove(
        self, key: str, actor: str, action: str = "remove", guard: Guard | None = None
    ) -> OriginRecord | None: ...

    def prune_expired(self, now: float, actor: str, keep_sources: Collection[str] = ()) -> list[str]: ...


#: Declared sources, in precedence order: a declaration takes over entries of the sources after it.
DECLARED_SOURCES = ("config", "file")


@dataclass(frozen=True, slots=True)
class Declarations:
    """Where declared entries are declared, for telling the operator where to change them."""

    config_file: str
    origins_file: str | None = None

    @classmethod
    def of(cls, config: Config) -> Declarations:
        return cls(config.source, config.origins_file.path)

    def where(self, source: str) -> str:
        if source == "config":
            return f"cors.allow_origins in {self.config_file}"
        if self.origins_file:
            return f"the origins file {self.origins_file}"
        return (
            f"an origins file that {self.config_file} no longer names (origins_file); the next `corsproxy serve` "
            "start removes such entries"
        )


class DeclaredElsewhere(ProblemError):
    """An operator write to a declared entry: refused, with where to make the change (code ``declared_elsewhere``)."""

    def __init__(self, key: str, source: str, where: str, verb: str = "change") -> None:
        self.key = key
        self.source = source
        self.where = where
        then = (
            "then reload (`POST /reload` or SIGHUP)" if source == "config" else "corsproxy re-reads the file by itself"
        )
        message = (
            f"{key} is declared in {where} (source {source!r}): {verb} it there, {then}; a change made here would be "
            "undone by the next reconciliation"
        )
        super().__init__(Problem("", "origin", "declared_elsewhere", message))


@dataclass
class WriteReport:
    """What :func:`write_entries` did. ``written`` is false when an all-or-nothing batch was refused."""

    written: bool = True
    added: list[str] = field(default_factory=list)
    updated: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)
    declared: list[str] = field(default_factory=list)  # import lines equal to a declared entry: nothing to do
    # (edit, why: unplaced problems, each of its field), conflicts included; the door that asked says where.
    refused: list[tuple[EntryEdit, tuple[Problem, ...]]] = field(default_factory=list)
    conflicts: list[DeclaredElsewhere] = field(default_factory=list)
    warnings: list[tuple[EntryEdit, str]] = field(default_factory=list)


class _Abort(Exception):
    """Raised inside the write transaction to roll an all-or-nothing batch back."""


def _merged(edit: EntryEdit, stored: OriginRecord | None, owner: str) -> OriginRecord:
    """The record an edit leaves: given fields replaced, the others kept (defaults for a new entry); owner kept."""
    if stored is None:
        expires = None if edit.expires is KEEP else edit.expires
        return OriginRecord(edit.policy or DEFAULT_POLICY, expires, owner, 0.0, edit.note or "")
    return OriginRecord(
        stored.policy if edit.policy is None else edit.policy,
        stored.expires if edit.expires is KEEP else edit.expires,
        stored.source,
        0.0,  # the store keeps the original "added" time
        stored.note if edit.note is None else edit.note,
    )


def _check(edit: EntryEdit, policy: str, safety: Mapping[str, PolicySafety]) -> tuple[list[Problem], list[Problem]]:
    if edit.note is not None and len(edit.note) > MAX_NOTE_LENGTH:
        return [note_too_long(edit.note)], []
    flags = safety.get(policy)
    if flags is None:
        defined = ", ".join(sorted(safety))
        if edit.policy is None:
            message = f"its stored policy {policy!r} is no longer defined; give a policy (defined: {defined})"
            return [Problem("", "policy", "stored_policy_undefined", message)], []
        return [unknown_policy_problem(policy, safety)], []
    return check_origin_entry(edit.entry, flags)


def write_entries(
    store: WriteTarget,
    edits: Iterable[EntryEdit],
    *,
    safety: Mapping[str, PolicySafety],
    declarations: Declarations,
    actor: str,
    owner: str,
    batch: bool = False,
    all_or_nothing: bool = False,
    commit: bool = True,
) -> WriteReport:
    """Apply operator edits (``owner`` is the source of entries they create: ``cli`` or ``admin:NAME``).

    ``batch`` (an import): an edit that leaves a declared entry as it is is reported in ``declared``, not refused.
    ``all_or_nothing``: any refused edit rolls the whole batch back (``written`` false); otherwise the refused ones
    are reported and the rest committed, in one transaction either way. ``commit=False`` checks everything and
    writes nothing (``written`` false).
    """
    report = WriteReport()
    by_key: dict[str, EntryEdit] = {}
    for edit in edits:
        if edit.key in by_key:
            report.warnings.append((edit, f"{edit.key} appears again; the later line wins"))
        by_key[edit.key] = edit

    def resolve(key: str, stored: OriginRecord | None) -> OriginRecord | None:
        edit = by_key[key]
        record = _merged(edit, stored, owner)
        if stored is not None and stored.source in DECLARED_SOURCES:
            if batch and record.same_rule(stored):
                report.declared.append(key)
                return None
            conflict = DeclaredElsewhere(key, stored.source, declarations.where(stored.source))
            report.conflicts.append(conflict)
            report.refused.append((edit, conflict.problems))
            return None
        errors, warnings = _check(edit, record.policy, safety)
        if errors:
            report.refused.append((edit, tuple(errors)))
            return None
        report.warnings.extend((edit, w.message) for w in warnings)
        if stored is not None and record.same_rule(stored):
            report.unchanged.append(key)
            return None
        (report.added if stored is None else report.updated).append(key)
        return record

    def finish() -> None:
        if not commit or (all_or_nothing and report.refused):
            raise _Abort

    try:
        store.apply(list(by_key), resolve, actor, finish)
    except _Abort:
        report.written = False
        report.added.clear()
        report.updated.clear()
        report.unchanged.clear()
    return report


def remove_entry(store: WriteTarget, key: str, *, declarations: Declarations, actor: str) -> OriginRecord | None:
    """Remove an operator-owned entry (``None`` if absent); a declared one raises :class:`DeclaredElsewhere`."""

    def guard(stored: OriginRecord) -> None:
        if stored.source in DECLARED_SOURCES:
            raise DeclaredElsewhere(key, stored.source, declarations.where(stored.source), "remove")

    return store.remove(key, actor, guard=guard)


def prune_expired(store: WriteTarget, actor: str, now: float | None = None) -> list[str]:
    """Remove expired operator-owned entries; expired declared ones stay until their declaration drops them (pruning
    them would only be undone by the next reconciliation)."""
    return store.prune_expired(time.time() if now is None else now, actor, keep_sources=DECLARED_SOURCES)


# -- declarations -------------------------------------------------------------------------------------------------


def _declared(source: str, entries: Mapping[str, ConfiguredOrigin]) -> dict[str, OriginRecord]:
    return {key: OriginRecord(e.policy, e.expires, source, 0.0, e.note) for key, e in entries.items()}


def _log_take_overs(result: Reconciled, where: str) -> None:
    for key, previous in result.taken_over:
        log.warning(
            "%s now declares %s, which source %r owned: the declaration owns it from now on (removing it there "
            "revokes it)",
            where,
            key,
            previous,
        )


def reconcile_config(store: OriginStore, origins: Mapping[str, ConfiguredOrigin]) -> Reconciled:
    """Make the store's ``config`` entries exactly ``cors.allow_origins``; run on every start and before every CLI
    command, so the store and the config never disagree for long."""
    result = store.reconcile(_declared("config", origins), source="config")
    _log_take_overs(result, "cors.allow_origins")
    return result


def reconcile_file(store: OriginStore, entries: Mapping[str, ConfiguredOrigin], path: str) -> Reconciled:
    """Make the store's ``file`` entries exactly the origins file's; ``cors.allow_origins`` keeps its own."""
    result = store.reconcile(_declared("file", entries), source="file", defer_to=("config",))
    _log_take_overs(result, path)
    for key in result.skipped:
        log.warning("%s lists %s, which cors.allow_origins declares: the config's entry is in charge", path, key)
    return result


def reconcile_on_start(store: OriginStore, config: Config) -> Reconciled:
    """The server's start: the config's entries, and without ``origins_file`` the file's old entries revoked (fleet
    mode turned off must not leave the fleet's list allowed, unremovable by anyone)."""
    result = reconcile_config(store, config.origins)
    # A source no longer configured leaves nothing behind: its entries are revoked (fleet mode turned off takes the
    # entries copied from PostgreSQL, an origins file dropped from the config those it had declared).
    gone = (
        ("postgresql", config.store.postgresql is None, "store.postgresql is not set", "copied from PostgreSQL"),
        ("file", not config.origins_file.path, "origins_file is not set", "the origins file had declared"),
    )
    for source, dropped, setting, whose in gone:
        removed = store.reconcile({}, source=source).removed if dropped else []
        if removed:
            entries = "entry" if len(removed) == 1 else "entries"
            log.warning("%s: removed %d %s %s", setting, len(removed), entries, whose)
    return result
