"""The MMU invalidation protocol: ``mmu_invalidate_{seq,in_progress,range_*}``."""

from __future__ import annotations


class MmuInvalidation:
    """The four fields of ``struct kvm`` that make racing page faults retry."""

    __slots__ = ("in_progress", "range_end", "range_start", "seq")

    def __init__(self) -> None:
        self.seq = 0
        self.in_progress = 0
        # None is the kernel's INVALID_GPA: no range added since 0 -> 1.
        self.range_start: int | None = None
        self.range_end: int | None = None

    def begin(self) -> None:
        """``kvm_mmu_invalidate_begin()``."""
        self.in_progress += 1
        if self.in_progress == 1:
            self.range_start = self.range_end = None

    def range_add(self, start: int, end: int) -> None:
        """``kvm_mmu_invalidate_range_add()``: ranges only widen while invalidations overlap."""
        if self.range_start is None or self.range_end is None:
            self.range_start, self.range_end = start, end
        else:
            self.range_start = min(self.range_start, start)
            self.range_end = max(self.range_end, end)

    def end(self) -> None:
        """``kvm_mmu_invalidate_end()``: seq first, then the count (the smp_wmb pairing)."""
        self.seq += 1
        self.in_progress -= 1

    def retry_reason(self, gfn: int, snapshot: int) -> str | None:
        """``mmu_invalidate_retry_gfn()``: why a fault on ``gfn`` must retry, or None."""
        start, end = self.range_start, self.range_end
        if self.in_progress > 0 and start is not None and end is not None and start <= gfn < end:
            return "invalidation_in_progress"
        if self.seq != snapshot:
            return "mmu_seq_changed"
        return None
