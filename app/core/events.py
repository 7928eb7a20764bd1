"""A bounded per-VM trace of every protocol step, so users can see why a counter moved."""

from __future__ import annotations

import time
from collections import deque
from typing import Any

from app.core.budget import UNBOUNDED, ServiceBudget

_OWN_FIELDS = frozenset({"id", "time", "type"})


class EventLog:
    """Oldest-first ring of events with monotonically increasing ids."""

    def __init__(self, maxlen: int, budget: ServiceBudget = UNBOUNDED) -> None:
        self._events: deque[dict[str, Any]] = deque(maxlen=maxlen)
        self.next_id = 1
        self.budget = budget

    def __len__(self) -> int:
        return len(self._events)

    def emit(self, type_: str, **fields: Any) -> None:
        if fields.keys() & _OWN_FIELDS:
            raise ValueError(f"event field names id, time and type are the log's own: {sorted(fields)}")
        events = self._events
        if len(events) < (events.maxlen or 0):
            if self.budget.fits(1) or not events:
                self.budget.add(1)
            else:  # the service is full: this log makes room by dropping its oldest event
                events.popleft()
        events.append({"id": self.next_id, "time": time.time(), "type": type_, **fields})
        self.next_id += 1

    def release(self) -> None:
        self.budget.add(-len(self._events))

    def page(self, after: int, limit: int) -> tuple[list[dict[str, Any]], int | None]:
        """Events with id > ``after``; the second item is the cursor when more remain."""
        events = self._events
        if not events:
            return [], None
        # ids are contiguous inside the ring, so the first wanted index is arithmetic.
        first_id = events[0]["id"]
        start = max(0, after + 1 - first_id)
        out = [events[i] for i in range(start, min(len(events), start + limit))]
        more = start + limit < len(events)
        return out, (out[-1]["id"] if more and out else None)
