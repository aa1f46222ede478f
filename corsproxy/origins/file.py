"""Fleet mode: watch ``origins_file`` and reconcile the store's ``file``-owned entries to exactly what it lists.

The file is the fleet's source of truth (a Kubernetes ConfigMap, a mounted secret, a file written by config
management); each host's LMDB store is its local, read-optimised copy. The watcher polls the file's identity (inode,
size, mtime) every ``poll_interval`` seconds and, when it changed, hashes the content; a new hash is parsed with the
shared line format (:func:`corsproxy.core.origin_lines.parse_lines`, or a YAML list) and reconciled with
``source="file"`` in one LMDB transaction (:func:`corsproxy.origins.writes.reconcile_file`: the file takes over
entries the CLI or admin API added, and leaves ``cors.allow_origins``' own). A file with any bad line is refused
whole: the errors are logged and the last good state stays, because applying only the good lines would silently drop
the origins the bad lines meant. A line whose ``expires`` has passed is not bad — it is skipped with a warning, so one
stale line never holds back the rest (revocations included). ``ttl`` is refused: every replica would count it from
its own start, so replicas would disagree; the file says ``expires``.

With several workers only one of them watches: the holder of an exclusive ``flock`` on a file next to the store. The
lock dies with its process, so when that worker exits another one takes over at its next poll. Reconciliation is
idempotent anyway (an unchanged entry writes nothing, not even an audit event).

Must not import aiohttp; the store is passed in.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import json
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from corsproxy.core.origin_lines import TTL_IN_FILE, ParsedLines, parse_entry, parse_lines, skip_if_expired
from corsproxy.core.settings import PolicySafety
from corsproxy.origins.lead import HostLock, write_status
from corsproxy.origins.writes import reconcile_file
from corsproxy.store import OriginStore, StoreError

__all__ = ["OriginsFileWatcher", "SyncResult", "applied", "parse_origins_file"]

log = logging.getLogger("corsproxy.origins_file")

_YAML_SUFFIXES = (".yaml", ".yml")


def parse_origins_file(
    path: Path, text: str, safety: Mapping[str, PolicySafety], now: float | None = None
) -> ParsedLines:
    """The line format, or for ``*.yaml``/``*.yml`` a list whose items are lines or ``{origin, policy, ...}`` maps."""
    now = time.time() if now is None else now
    if path.suffix not in _YAML_SUFFIXES:
        # Lines end at "\n" only: str.splitlines() also breaks at U+2028, U+0085 and other separators.
        return parse_lines(text.split("\n"), safety, now)
    out = ParsedLines()
    try:
        data: Any = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        out.errors.append((mark.line + 1 if mark is not None else 0, f"invalid YAML: {exc}"))
        return out
    if isinstance(data, dict) and "origins" in data:
        data = data["origins"]
    if data is None:
        return out
    if not isinstance(data, list):
        out.errors.append((1, "must be a list of origins (or a mapping with an 'origins' list)"))
        return out
    for number, item in enumerate(data, 1):
        if isinstance(item, str):
            one = parse_lines([item], safety, now)
            out.errors.extend((number, reason) for _, reason in one.errors)
            out.warnings.extend((number, warning) for _, warning in one.warnings)
            for key in one.expired:
                out.entries.pop(key, None)
                out.expired.add(key)
            for key, entry in one.entries.items():
                out.entries[key] = entry
                out.expired.discard(key)
            continue
        if not isinstance(item, dict) or not isinstance(item.get("origin"), str):
            out.errors.append((number, "an item is an origin string or a mapping {origin: ..., policy: ..., ...}"))
            continue
        unknown = set(item) - {"origin", "policy", "expires", "note"}
        if unknown:
            reason = TTL_IN_FILE if "ttl" in unknown else f"unknown key(s) {', '.join(sorted(map(str, unknown)))}"
            out.errors.append((number, reason))
            continue
        expires = item.get("expires")
        if skip_if_expired(out, number, item["origin"], expires, now):
            continue
        try:
            entry, warnings = parse_entry(
                item["origin"],
                safety,
                policy=item.get("policy"),
                expires=None if expires is None else _yaml_time(expires),
                note=str(item.get("note") or ""),
                now=now,
            )
        except ValueError as exc:
            out.errors.append((number, str(exc)))
            continue
        out.warnings.extend((number, w.message) for w in warnings)
        out.entries[entry.key] = entry
        out.expired.discard(entry.key)
    return out


def _yaml_time(value: Any) -> str:
    """YAML turns an unquoted ``2026-12-31T00:00:00Z`` into a datetime; give parse_entry the ISO text back."""
    if isinstance(value, dt.datetime):
        moment = value if value.tzinfo is not None else value.replace(tzinfo=dt.UTC)
        return moment.isoformat()
    return str(value)


def applied(path: str, store_dir: Path) -> bool:
    """Whether some worker has put this origins file into the store at least once (readiness in fleet mode).

    Until then a replica would answer with an origin set that is missing the fleet's list, so ``/readyz`` says no;
    a file broken from the very first start therefore keeps a new replica out of the load balancer.
    """
    try:
        record = json.loads((store_dir / "origins-file.applied").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(record, dict) and record.get("path") == str(Path(path))


@dataclass(frozen=True, slots=True)
class SyncResult:
    applied: bool
    changed: tuple[str, ...] = ()
    removed: tuple[str, ...] = ()
    skipped: tuple[str, ...] = ()
    errors: tuple[tuple[int, str], ...] = ()


class OriginsFileWatcher:
    """Polls one file and reconciles it into ``store``. ``safety`` is read on every sync, so a reload applies."""

    def __init__(
        self,
        path: str,
        store: OriginStore,
        safety: Callable[[], Mapping[str, PolicySafety]],
        poll_interval: float,
        lock_path: Path,
        on_sync: Callable[[SyncResult], None] | None = None,
    ) -> None:
        self.path = Path(path)
        self.store = store
        self.safety = safety
        self.poll_interval = poll_interval
        self.lock_path = lock_path
        self.on_sync = on_sync
        self._identity: tuple[int, int, int, int] | None = None
        self._digest: str | None = None
        self._lock = HostLock(lock_path)
        self._missing_logged = False
        self._deferred: tuple[str, ...] = ()  # entries of the last applied file left to cors.allow_origins

    # -- leadership ---------------------------------------------------------------------------------------------

    def try_lead(self) -> bool:
        """Become the one watcher of this store, if no live process is; non-blocking."""
        return self._lock.try_acquire(
            lambda: log.info("watching %s for origin changes (every %gs)", self.path, self.poll_interval)
        )

    def release(self) -> None:
        self._lock.release()

    # -- one poll -----------------------------------------------------------------------------------------------

    def poll(self) -> SyncResult | None:
        """Check the file once; reconcile when its content changed. ``None`` when there was nothing to do."""
        try:
            st = self.path.stat()
        except OSError as exc:
            if not self._missing_logged:
                log.error("origins file %s cannot be read (%s): keeping the last good origin set", self.path, exc)
                self._missing_logged = True
            self._identity = None
            return None
        self._missing_logged = False
        identity = (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
        if self._deferred and self._config_let_go():
            self._identity = self._digest = None  # apply the unchanged file again: it owns those entries now
        if identity == self._identity:
            return None
        try:
            raw = self.path.read_bytes()
        except OSError as exc:
            log.error("origins file %s cannot be read (%s): keeping the last good origin set", self.path, exc)
            return None
        self._identity = identity
        digest = hashlib.sha256(raw).hexdigest()
        if digest == self._digest:
            return None
        return self._apply(raw, digest)

    def _apply(self, raw: bytes, digest: str) -> SyncResult:
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            result = SyncResult(False, errors=((0, f"not UTF-8 text: {exc}"),))
        else:
            parsed = parse_origins_file(self.path, text, self.safety())
            for number, warning in parsed.warnings:
                log.warning("%s:%d: %s", self.path, number, warning)
            if parsed.errors:
                result = SyncResult(False, errors=tuple(parsed.errors))
            else:
                changed, removed, skipped, _ = reconcile_file(self.store, parsed.entries, str(self.path))
                result = SyncResult(True, tuple(changed), tuple(removed), tuple(skipped))
        if result.applied:
            self._digest = digest
            self._deferred = result.skipped
            self._write_marker(digest)
            log.log(
                logging.INFO if result.changed or result.removed else logging.DEBUG,
                "origins file %s applied: %d added or changed, %d removed",
                self.path,
                len(result.changed),
                len(result.removed),
                extra={"changed": list(result.changed), "removed": list(result.removed)},
            )
        else:
            self._deferred = ()  # not applied: nothing of it is in charge to hand back until the file is fixed
            # Not remembered as seen: the same broken content is reported again only when the file changes.
            for number, reason in result.errors:
                log.error("%s:%d: refused: %s", self.path, number, reason)
            log.error(
                "origins file %s refused (%d bad line(s)): keeping the last good origin set",
                self.path,
                len(result.errors),
            )
        if self.on_sync is not None:
            self.on_sync(result)
        return result

    def _config_let_go(self) -> bool:
        """Whether an entry the file lists, left to ``cors.allow_origins`` when the file was applied, is no longer the
        config's: a reload dropped it from the config, so the file's line is in charge again. (The reload's reconcile
        may run after this watcher's first poll of the new generation, so it cannot be left to that poll.)"""
        for key in self._deferred:
            record = self.store.get(key)
            if record is None or record.source != "config":
                return True
        return False

    # -- the "applied" marker ------------------------------------------------------------------------------------

    @property
    def marker_path(self) -> Path:
        return self.lock_path.with_name("origins-file.applied")

    def _write_marker(self, digest: str) -> None:
        """Record that this file's content is in the store, for every worker's ``/readyz`` (see :func:`applied`)."""
        record = json.dumps({"path": str(self.path), "sha256": digest, "time": time.time()})
        write_status(self.marker_path, record)

    # -- the loop -----------------------------------------------------------------------------------------------

    async def run(self) -> None:
        """Poll forever (until cancelled); file I/O, parsing and the LMDB write run off the event loop."""
        try:
            while True:
                if await asyncio.to_thread(self.try_lead):
                    try:
                        await asyncio.to_thread(self.poll)
                    except StoreError as exc:
                        # No room in the store (its message says which setting): one line, not a traceback on
                        # every poll. Removals were applied all the same; the additions are retried each poll.
                        log.error("origins file %s not applied: %s; retrying at the next poll", self.path, exc)
                    except Exception:
                        log.exception("origins file %s: sync failed; retrying at the next poll", self.path)
                await asyncio.sleep(self.poll_interval)
        finally:
            self.release()
