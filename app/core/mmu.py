"""The SPTEs: which ``(as_id, gfn)`` are mapped, private or shared, writable or not."""

from __future__ import annotations

from collections.abc import Iterator
from enum import Enum

from app.core.budget import UNBOUNDED, ServiceBudget
from app.core.runs import Run, RunMap
from app.models.kvm import GFN_LIMIT

UNMAPPED = 0
_PRESENT = 1
_PRIVATE = 2
_WRITABLE = 4


def spte(private: bool, writable: bool) -> int:
    """Encode a present mapping as a small int (one cached object per kind)."""
    return _PRESENT | (_PRIVATE if private else 0) | (_WRITABLE if writable else 0)


def spte_private(value: int) -> bool:
    return bool(value & _PRIVATE)


def spte_writable(value: int) -> bool:
    return bool(value & _WRITABLE)


class ZapFilter(Enum):
    """``enum kvm_gfn_range_filter``: which mappings an unmap may touch."""

    ALL = "all"
    SHARED = "shared"  # KVM_FILTER_SHARED
    PRIVATE = "private"  # KVM_FILTER_PRIVATE

    def matches(self, value: int) -> bool:
        if value == UNMAPPED:
            return False
        if self is ZapFilter.ALL:
            return True
        return spte_private(value) == (self is ZapFilter.PRIVATE)


class Mmu:
    """Per-address-space run maps of SPTEs plus the mapped-page count."""

    def __init__(self, nr_as: int, budget: ServiceBudget = UNBOUNDED) -> None:
        self.spaces = [RunMap(GFN_LIMIT, UNMAPPED, budget) for _ in range(nr_as)]
        self.mapped_pages = 0

    def runs(self) -> int:
        """Mapping runs across address spaces (what the per-VM budget counts)."""
        return sum(len(s) for s in self.spaces)

    def lookup(self, as_id: int, gfn: int) -> int:
        return self.spaces[as_id].value_at(gfn)

    def mapped_runs(self, as_id: int, start: int, end: int) -> Iterator[Run]:
        """Present runs of one address space in ``[start, end)``."""
        return (r for r in self.spaces[as_id].runs(start, end) if r[2] != UNMAPPED)

    def load(self, as_id: int, present: list[Run]) -> None:
        """Replace one address space by its present runs (in order, not overlapping): O(n)."""
        cover: list[Run] = []
        at = 0
        for start, end, value in present:
            if at < start:
                cover.append((at, start, UNMAPPED))
            cover.append((start, end, value))
            at = end
        cover.append((at, GFN_LIMIT, UNMAPPED))
        self.mapped_pages -= sum(e - s for s, e, _ in self.mapped_runs(as_id, 0, GFN_LIMIT))
        self.spaces[as_id].load(cover)
        self.mapped_pages += sum(e - s for s, e, _ in present)

    def set(self, as_id: int, start: int, end: int, value: int) -> None:
        """Install (or clear) ``value`` on ``[start, end)``, keeping mapped_pages exact."""
        space = self.spaces[as_id]
        self.mapped_pages -= sum(e - s for s, e, _ in self.mapped_runs(as_id, start, end))
        space.assign(start, end, value)
        if value != UNMAPPED:
            self.mapped_pages += end - start

    def zap(self, as_id: int, start: int, end: int, what: ZapFilter) -> int:
        """``kvm_unmap_gfn_range()``: clear matching SPTEs, return how many went."""
        victims = [(s, e) for s, e, v in self.spaces[as_id].runs(start, end) if what.matches(v)]
        for s, e in victims:
            self.set(as_id, s, e, UNMAPPED)
        return sum(e - s for s, e in victims)
