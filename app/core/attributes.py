"""Attribute conversions, written once as their protocol steps.

``rfc-v9``: v9's ``kvm_vm_ioctl_set_encrypted_region()`` with the review's fixes (begin before the
stores; on a failed store an exact unwind and still an end). ``linux``:
``kvm_vm_set_mem_attributes()`` (no-op shortcut, ``xa_reserve`` first, ``pre_set_range`` /
stores / ``post_set_range``). The historical variants of the v9 review are small deltas of the
rfc-v9 sequence (``V9Delta``), run only by the interleaving explorer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from app.core.errors import ENOMEM
from app.core.gfn_range import (
    GfnRange,
    handle_gfn_range,
    invalidate_begin,
    invalidate_end,
    invalidate_range_add,
    memslot_ranges,
    unmap,
)
from app.core.kvm import PRIVATE, Kvm
from app.core.mmu import ZapFilter
from app.core.steps import Step, Steps

HUGEPAGE_LEVELS = {"2M": 512, "1G": 262144}
"""``KVM_PAGES_PER_HPAGE()`` for PG_LEVEL_2M and PG_LEVEL_1G, in gfns."""

Unwind = Literal["exact", "as-posted", "naive"]


@dataclass(frozen=True)
class V9Delta:
    """How a historical variant departs from the engine's own rfc-v9 sequence."""

    stores_first: bool = False
    """reviewer-reorder: store, then begin/unmap/end; a failed store only unwinds (no begin/end)."""
    unwind: Unwind = "exact"
    """exact: restore what each store replaced. as-posted: ``for (; i > start; i--) xa_erase(i)``.
    naive: ``for (; i >= start; i--) xa_erase(i)`` with an unsigned ``i``."""


class Unterminated(Exception):
    """The naive unwind reached gfn 0, where ``i--`` wraps and ``i >= start`` stays true."""


class Conversion:
    """One attribute change of ``[start, end)`` to ``value``, as the kernel's protocol steps.

    ``fine``: each per-gfn store is its own step (the explorer, where a lockless reader may see
    any prefix); otherwise one range assignment does them all (same step, coarser grain).
    """

    def __init__(self, kvm: Kvm, start: int, end: int, value: int, *, fine: bool = False) -> None:
        self.kvm, self.start, self.end, self.value, self.fine = kvm, start, end, value, fine
        self.noop = False
        self.invalidated = False
        self.zapped = 0
        self.flushed = False
        self._saved: list[tuple[int, int, int]] = []  # what the stores replaced, for an exact unwind

    # ------------------------------------------------------------------ rfc-v9

    def rfc_v9(self, delta: V9Delta = V9Delta()) -> Steps:
        """v9 ``kvm_vm_ioctl_set_encrypted_region()``; mmu_lock held from begin to end."""
        kvm, start, end = self.kvm, self.start, self.end
        yield Step("validate", holds_mmu_lock=False)
        failed = take_allocation_failure(kvm, start, end, self.value)
        if delta.stores_first:
            yield from self._stores(failed, locked=True)
            if failed is not None:
                yield from self._unwind(failed, delta.unwind)
                raise ENOMEM(f"attribute store {failed} of {end - start} failed; unwound, no invalidation ran")
        yield Step("invalidate_begin", holds_mmu_lock=True)
        # v9's begin took the range itself.
        invalidate_begin(kvm, start_gfn=start, end_gfn=end)
        kvm.inval.range_add(start, end)
        self.invalidated = True
        if not delta.stores_first:
            yield from self._stores(failed, locked=True)
            if failed is not None:
                yield from self._unwind(failed, delta.unwind)
                yield Step("invalidate_end", holds_mmu_lock=False)
                self._end_after_failure()
                raise ENOMEM(f"attribute store {failed} of {end - start} failed; restored the previous attributes")
        yield Step("unmap", holds_mmu_lock=True)
        walk = handle_gfn_range(kvm, memslot_ranges(kvm, start, end), self._unmap_all)
        self.zapped, self.flushed = walk.zapped, walk.flushed
        yield Step("invalidate_end", holds_mmu_lock=False)
        invalidate_end(kvm)
        kvm.stats.attribute_updates += 1

    def _end_after_failure(self) -> None:
        """The review's point: a fault may have read a store that was just undone, so the error
        path must bump the seq too."""
        invalidate_end(self.kvm)

    def _unmap_all(self, r: GfnRange) -> int:
        return unmap(self.kvm, r, ZapFilter.ALL, "attributes")

    # ------------------------------------------------------------------- linux

    def linux(self) -> Steps:
        """``kvm_vm_set_mem_attributes()``: mmu_lock only inside pre_set_range and post_set_range."""
        kvm, start, end, value = self.kvm, self.start, self.end, self.value
        yield Step("validate", holds_mmu_lock=False)
        if kvm.attributes.is_uniform(start, end, value):
            self.noop = True
            kvm.stats.attribute_updates += 1
            kvm.events.emit("attributes_noop", start_gfn=start, end_gfn=end, attributes=value)
            return
        # Since 7.3 (119e9db233ad) storing empty attributes reserves no xarray entries: a
        # to-shared conversion has no allocation to fail, and an armed fail-nth stays armed.
        reserves = bool(value) or not kvm.host.at_least("7.3")
        failed = take_allocation_failure(kvm, start, end, value, injectable=reserves)
        if failed is not None:
            kvm.events.emit("attributes_reserve_failed", start_gfn=start, end_gfn=end, failed_gfn=start + failed - 1)
            raise ENOMEM(f"xa_reserve {failed} of {end - start} failed; nothing changed")
        ranges = list(memslot_ranges(kvm, start, end))
        if ranges:
            yield Step("pre_set_range", holds_mmu_lock=False)
            walk = handle_gfn_range(kvm, ranges, self._pre_set, on_lock=lambda: invalidate_begin(kvm))
            self.invalidated, self.zapped, self.flushed = True, walk.zapped, walk.flushed
        yield from self._stores(None, locked=False)
        if ranges:
            yield Step("post_set_range", holds_mmu_lock=False)
            invalidate_end(kvm)
        kvm.stats.attribute_updates += 1

    def _pre_set(self, r: GfnRange) -> int:
        """``kvm_pre_set_memory_attributes()`` + x86 ``kvm_arch_pre_set_memory_attributes()``."""
        kvm = self.kvm
        invalidate_range_add(kvm, r.as_id, r.start, r.end)
        assert r.slot is not None
        slot_start, slot_end = r.slot.base_gfn, r.slot.end_gfn
        for name, n in HUGEPAGE_LEVELS.items():
            # A head or tail hugepage that could be mapped now (inside the slot, not mixed) must
            # not be faulted in as a hugepage while its attributes change: widen the range.
            head, tail = r.start - r.start % n, (r.end - 1) - (r.end - 1) % n
            head_uncovered = head != r.start or head + n > r.end
            if head_uncovered and slot_start <= head and head + n <= slot_end and self._uniform(head, head + n):
                invalidate_range_add(kvm, r.as_id, head, head + n, hugepage=name)
            if tail != head and tail + n > r.end and tail + n <= slot_end and self._uniform(tail, tail + n):
                invalidate_range_add(kvm, r.as_id, tail, tail + n, hugepage=name)
        # Only the changing range is unmapped, and outside TDX every kind of mapping in it.
        opposite = ZapFilter.SHARED if self.value & PRIVATE else ZapFilter.PRIVATE
        return unmap(kvm, r, opposite, "attributes")

    def _uniform(self, start: int, end: int) -> bool:
        """``!hugepage_test_mixed()``: one attribute value over the whole hugepage."""
        attrs = self.kvm.attributes
        return attrs.is_uniform(start, end, attrs.value_at(start))

    # ------------------------------------------------------- stores and unwinds

    def _stores(self, failed: int | None, *, locked: bool) -> Steps:
        """``xa_store()`` of every gfn, in gfn order; with ``failed``, store number ``failed`` fails."""
        kvm, start, end, value = self.kvm, self.start, self.end, self.value
        stop = end if failed is None else start + failed - 1
        self._saved = list(kvm.attributes.runs(start, stop)) if failed is not None else []
        if self.fine:
            for gfn in range(start, stop):
                yield Step(f"store {gfn:#x}", holds_mmu_lock=locked)
                kvm.attributes.assign(gfn, gfn + 1, value)
                kvm.events.emit("attributes_store", start_gfn=gfn, end_gfn=gfn + 1, attributes=value)
        elif start < stop:
            yield Step("store", holds_mmu_lock=locked)
            kvm.attributes.assign(start, stop, value)
            kvm.events.emit("attributes_store", start_gfn=start, end_gfn=stop, attributes=value)
        if failed is not None:
            yield Step(f"store {stop:#x} fails", holds_mmu_lock=locked)
            kvm.events.emit("attributes_store_failed", start_gfn=start, end_gfn=end, failed_gfn=stop)

    def _unwind(self, failed: int, how: Unwind) -> Steps:
        """Undo the stores before the failed one, under mmu_lock (the rfc-v9 family holds it)."""
        kvm, start = self.kvm, self.start
        fail_gfn = start + failed - 1
        if how == "exact":
            kvm.events.emit("attributes_rollback", start_gfn=start, end_gfn=fail_gfn)
            if not self.fine:
                yield Step("rollback", holds_mmu_lock=True)
                for s, e, v in self._saved:
                    kvm.attributes.assign(s, e, v)
                return
            for s, e, v in reversed(self._saved):
                for gfn in reversed(range(s, e)):
                    yield Step(f"restore {gfn:#x}", holds_mmu_lock=True)
                    kvm.attributes.assign(gfn, gfn + 1, v)
            return
        # The posted loops erase from the failing index down; in v9's shared-only array an
        # erased gfn reads as private, whatever it held before.
        gfn, last = fail_gfn, (start + 1 if how == "as-posted" else start)
        while gfn >= last:
            yield Step(f"erase {gfn:#x}", holds_mmu_lock=True)
            kvm.attributes.assign(gfn, gfn + 1, PRIVATE)
            if gfn == 0:
                yield Step("i-- wraps to 2^64-1", holds_mmu_lock=True)
                raise Unterminated("unsigned i wrapped below gfn 0: the unwind loop never ends")
            gfn -= 1


def take_allocation_failure(kvm: Kvm, start: int, end: int, value: int, *, injectable: bool = True) -> int | None:
    """Consume an armed fail-nth (if this call allocates: ``injectable``) and apply the run
    budgets: the failing allocation's number, or None."""
    npages = end - start
    if injectable:
        nth, kvm.fail_nth = kvm.fail_nth, None
        if nth is not None and nth <= npages:
            return nth
    # A budget runs out part way; which entry fails does not change the outcome. One assign
    # adds at most two runs, so the service-wide check needs no exact count.
    if kvm.attributes.exceeds_after_assign(start, end, value, kvm.limits.max_attribute_runs):
        kvm.events.emit("budget_exhausted", budget="max_attribute_runs")
        return npages
    if not kvm.budget.room(2):
        kvm.events.emit("budget_exhausted", budget="max_service_items")
        return npages
    return None
