"""The bound on the whole service: attribute runs, mapping runs and stored events of every VM.

Each VM's run maps and event log report how many items they gained or lost; a call that would
grow the total past the bound fails with ENOMEM like a per-VM budget, and a full service keeps
event logs from growing by dropping each VM's oldest events first.
"""

from __future__ import annotations

import threading


class ServiceBudget:
    """Items held across every VM, against one limit (``max_service_items``)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0
        self._lock = threading.Lock()  # VMs update it from their own locks, concurrently

    def add(self, items: int) -> None:
        if items:
            with self._lock:
                self.used += items

    def room(self, items: int) -> bool:
        """Whether ``items`` more still fit."""
        return self.used + items <= self.limit


UNBOUNDED = ServiceBudget(1 << 62)
"""For run maps and logs that belong to no service (the explorer's scratch VMs, tests)."""
