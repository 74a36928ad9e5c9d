"""The in-process cache backend: a least-recently-used map with expiry.

Values are kept encoded, as Redis keeps them, so that a service behaves the same
on both backends (a value read back is a copy; tuples come back as lists).
"""

from __future__ import annotations

import time
from collections import OrderedDict

__all__ = ["MemoryBackend"]


class MemoryBackend:
    """At most ``max_entries`` values; the least recently used goes first."""

    distributed = False
    """Only this process sees the values: single flight needs no lock in a store."""

    def __init__(self, max_entries: int) -> None:
        self.max_entries = max_entries
        self._entries: OrderedDict[str, tuple[float, bytes]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    async def get(self, key: str) -> bytes | None:
        entry = self._entries.get(key)
        if entry is None:
            return None
        deadline, data = entry
        if deadline <= time.monotonic():
            del self._entries[key]
            return None
        self._entries.move_to_end(key)
        return data

    async def set(self, key: str, data: bytes, ttl: float) -> None:
        entries = self._entries
        entries[key] = (time.monotonic() + ttl, data)
        entries.move_to_end(key)
        while len(entries) > self.max_entries:
            entries.popitem(last=False)

    async def delete(self, key: str) -> bool:
        return self._entries.pop(key, None) is not None

    async def ping(self) -> None:
        return None

    async def close(self) -> None:
        self._entries.clear()

    # The lock of a distributed backend; never called on this one.

    async def try_lock(self, key: str, token: str, ttl: float) -> bool:  # pragma: no cover
        raise NotImplementedError

    async def unlock(self, key: str, token: str) -> None:  # pragma: no cover
        raise NotImplementedError

    async def peek(self, key: str, lock: str) -> tuple[bytes | None, bool]:  # pragma: no cover
        raise NotImplementedError
