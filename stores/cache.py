"""A least-recently-used cache bounded by bytes, for features too large to keep them all."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class ByteLRU(Generic[K, V]):
    """Holds values up to ``budget`` bytes in all (each sized once by ``sizeof`` when put);
    putting one evicts the least recently used first, so the bytes held never exceed the
    budget. A value larger than the whole budget is not kept."""

    def __init__(self, budget: int, sizeof: Callable[[V], int]) -> None:
        if budget < 0:
            raise ValueError(f"a cache budget cannot be negative (got {budget} bytes)")
        self.budget, self.sizeof = budget, sizeof
        self._entries: OrderedDict[K, tuple[V, int]] = OrderedDict()
        self.held = 0  # bytes of the values held now
        self.evictions = 0

    def __contains__(self, key: K) -> bool:
        return key in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def values(self) -> list[V]:
        """The values held, least recently used first."""
        return [value for value, _ in self._entries.values()]

    def get(self, key: K) -> V | None:
        entry = self._entries.get(key)
        if entry is None:
            return None
        self._entries.move_to_end(key)
        return entry[0]

    def put(self, key: K, value: V) -> bool:
        """Keep ``value`` under ``key`` (replacing what was there); False when it is larger
        than the whole budget and so not kept."""
        self.pop(key)
        size = self.sizeof(value)
        if size > self.budget:
            return False
        while self.held + size > self.budget:
            _, (_, freed) = self._entries.popitem(last=False)
            self.held -= freed
            self.evictions += 1
        self._entries[key] = (value, size)
        self.held += size
        return True

    def pop(self, key: K) -> V | None:
        entry = self._entries.pop(key, None)
        if entry is None:
            return None
        self.held -= entry[1]
        return entry[0]
