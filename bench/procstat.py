"""What the benchmark reads about a process from ``/proc``: CPU time, resident and private memory, peak RSS.

Linux only; every reader returns ``None``-free numbers or raises ``OSError`` when the process is gone.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

__all__ = ["Memory", "children", "cpu_seconds", "memory", "reset_peak_rss", "tree"]

_TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of ``pid`` (all its threads), from ``/proc/PID/stat`` fields 14 and 15."""
    raw = Path(f"/proc/{pid}/stat").read_text()
    fields = raw[raw.rindex(")") + 2 :].split()  # the command name may contain spaces and parentheses
    utime, stime = int(fields[11]), int(fields[12])
    return (utime + stime) / _TICKS


@dataclass(frozen=True, slots=True)
class Memory:
    """In KiB, as the kernel reports them."""

    rss: int
    pss: int
    private_clean: int  # includes file-backed pages (LMDB) that only this process has mapped
    private_dirty: int
    anonymous: int  # memory that is not backed by any file: heap, Python objects, buffers
    peak_rss: int  # VmHWM: the high-water mark since start or since the last reset_peak_rss

    @property
    def private(self) -> int:
        return self.private_clean + self.private_dirty


def memory(pid: int) -> Memory:
    values: dict[str, int] = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]:
        name, _, rest = line.partition(":")
        parts = rest.split()
        if parts and parts[0].isdigit():
            values[name] = int(parts[0])
    peak = 0
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            peak = int(line.split()[1])
    return Memory(
        rss=values.get("Rss", 0),
        pss=values.get("Pss", 0),
        private_clean=values.get("Private_Clean", 0),
        private_dirty=values.get("Private_Dirty", 0),
        anonymous=values.get("Anonymous", 0),
        peak_rss=peak,
    )


def reset_peak_rss(pid: int) -> bool:
    """Reset VmHWM to the current RSS (``clear_refs`` value 5, Linux ≥ 4.0); ``False`` when not permitted."""
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def children(pid: int) -> list[int]:
    """Direct children of ``pid`` (e.g. an nginx master's worker)."""
    out: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            out.extend(int(x) for x in (task / "children").read_text().split())
        except OSError:
            continue
    return out


def tree(pid: int) -> list[int]:
    """``pid`` and all its descendants: a pre-fork server (gunicorn arbiter, nginx master) and its workers."""
    out = [pid]
    for child in children(pid):
        try:
            out.extend(tree(child))
        except OSError:
            continue  # exited meanwhile
    return out
