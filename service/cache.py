"""A small cache of values kept for a fixed time each, for the API's hot paths (tokens, data
paths): a look-up costs no I/O and no lock; past ``max_entries`` live values it starts over."""

from __future__ import annotations

import time
from typing import Generic, TypeVar

K = TypeVar("K")
V = TypeVar("V")


class TtlCache(Generic[K, V]):
    """Each value kept ``ttl`` seconds from when it was put; ``ttl`` 0 keeps nothing."""

    def __init__(self, ttl: float, max_entries: int) -> None:
        self.ttl, self.max_entries = ttl, max_entries
        self._entries: dict[K, tuple[float, V]] = {}  # key -> (until, value)

    def lookup(self, key: K) -> tuple[bool, V | None]:
        """``(True, value)`` while ``key``'s value is live, else ``(False, None)``."""
        entry = self._entries.get(key)
        if entry is None or entry[0] <= time.monotonic():
            return False, None
        return True, entry[1]

    def put(self, key: K, value: V) -> None:
        if self.ttl <= 0:
            return
        if len(self._entries) >= self.max_entries:
            self._entries = {}
        self._entries[key] = (time.monotonic() + self.ttl, value)
