"""Changes to the origin set that a cache kept beside the decision cache must follow (see the fast paths' cache
tests): the origin added, revoked, or added with an expiry about a second away."""

from __future__ import annotations

import asyncio
import time

from corsproxy.store import OriginRecord, OriginStore

__all__ = ["CHANGES", "apply", "until_past"]

#: One request after each: nothing, added, nothing, revoked, nothing, added expiring in about a second.
CHANGES = ("none", "add", "none", "remove", "none", "expiring")


def apply(store: OriginStore, origin: str, change: str) -> float | None:
    """Make ``change`` (one of :data:`CHANGES`) to ``origin``; the expiry it set, if any."""
    if change == "add":
        store.put(origin, OriginRecord(), "test")
    elif change == "remove":
        store.remove(origin, "test")
    elif change == "expiring":
        expires = time.time() + 1.0
        store.put(origin, OriginRecord(expires=expires), "test")
        return expires
    return None


async def until_past(moment: float) -> None:
    """Wait (bounded: 2 s) until the wall clock is past ``moment``."""
    for _ in range(40):
        if time.time() > moment:
            return
        await asyncio.sleep(0.05)
    assert time.time() > moment
