"""The bound on the whole service: attribute runs, mapping runs and stored events of every VM.

Each VM's run maps and event log report how many items they gained or lost; a call that would
grow the total past the bound fails with ENOMEM like a per-VM budget, and a full service keeps
event logs from growing by dropping each VM's oldest events first.

Whether a call fits depends on every other VM, so a journal replay cannot decide it again: the
journal marks each call the budget refused, and replay answers ``room()`` as recorded.
"""

from __future__ import annotations

import threading


class ServiceBudget:
    """Items held across every VM, against one limit (``max_service_items``)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0
        self._lock = threading.Lock()  # VMs update it from their own locks, concurrently
        self._call = threading.local()  # per thread: one VM's call runs in one thread
        self.replaying: bool | None = None
        """During a journal replay, the answer ``room()`` gave when the call was made."""

    def add(self, items: int) -> None:
        if items:
            with self._lock:
                self.used += items

    def room(self, items: int) -> bool:
        """Whether ``items`` more still fit (a call's decision: a refusal is recorded)."""
        ok = self.used + items <= self.limit if self.replaying is None else self.replaying
        if not ok:
            self._call.refused = True
        return ok

    def fits(self, items: int) -> bool:
        """Whether ``items`` more still fit, deciding no call's outcome (an event log dropping its oldest)."""
        return self.used + items <= self.limit

    def begin_call(self) -> None:
        self._call.refused = False

    def refused_call(self) -> bool:
        """Whether ``room()`` said no since ``begin_call()`` in this thread."""
        return bool(getattr(self._call, "refused", False))


UNBOUNDED = ServiceBudget(1 << 62)
"""For run maps and logs that belong to no service (the explorer's scratch VMs, tests)."""
