"""The event queue: a heap ordered by (time, insertion number), so that events
at the same time fire in the order they were scheduled and a run is a pure
function of its seed."""

from __future__ import annotations

import heapq
import itertools
from typing import Any


class EventQueue:
    def __init__(self) -> None:
        self._heap: list[tuple[float, int, str, Any]] = []
        self._seq = itertools.count()
        self.fired = 0

    def push(self, t: float, kind: str, data: Any = None) -> None:
        heapq.heappush(self._heap, (t, next(self._seq), kind, data))

    def pop(self) -> tuple[float, str, Any] | None:
        if not self._heap:
            return None
        t, _, kind, data = heapq.heappop(self._heap)
        self.fired += 1
        return t, kind, data

    def __len__(self) -> int:
        return len(self._heap)
