"""Leadership of a per-host job: the origins-file watcher and the PostgreSQL syncer each run in one process per host.

Every worker tries, now and then, to take an exclusive ``flock`` on a file beside the store; the one that holds it
leads. The kernel drops the lock when the descriptor closes — also when the process dies, however it dies — so another
worker takes over at its next try, with no lease to expire and nothing to clean up.
"""

from __future__ import annotations

import fcntl
import logging
import os
from collections.abc import Callable
from pathlib import Path

__all__ = ["HostLock", "write_status"]

log = logging.getLogger("corsproxy")

#: Marks a lock that a parent process holds for this one (see :meth:`HostLock.held_by_parent`).
_PARENTS = -1


class HostLock:
    """A non-blocking exclusive lock on ``path``, held until :meth:`release` or the process's end."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def try_acquire(self, on_acquired: Callable[[], None] | None = None) -> bool:
        """Whether this process leads now: already, or by taking the lock (then ``on_acquired`` runs, once)."""
        if self._fd is not None:
            return True
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            return False
        self._fd = fd
        if on_acquired is not None:
            on_acquired()
        return True

    def held_by_parent(self) -> None:
        """This process works for the parent that holds the lock: act as the holder, without a descriptor."""
        self._fd = _PARENTS

    def release(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None and fd != _PARENTS:
            os.close(fd)  # closing the descriptor drops the flock


def write_status(path: Path, text: str) -> None:
    """Replace the small status file a per-host job keeps beside the store (read by ``check`` and the other
    workers) in one rename, so no reader sees half of it; a failure is logged, never raised: it is only a report."""
    aside = path.with_suffix(".tmp")
    try:
        aside.write_text(text)
        os.replace(aside, path)
    except OSError as exc:
        log.warning("cannot write %s: %s", path, exc)
