"""``kvm_handle_gfn_range()``: the one walk over memslot ranges, and the protocol steps it runs.

Attribute changes, the MMU notifier, guest_memfd close and memslot delete/move all unmap
through ``handle_gfn_range()``; they differ only in the ranges they hand it, the handler run
per range and the ``on_lock`` hook run once, on the first range (as in ``kvm_main.c``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from app.core.kvm import GuestMemfdFile, Kvm, Memslot
from app.core.mmu import ZapFilter
from app.models.kvm import GFN_LIMIT, PAGE_SHIFT, PAGE_SIZE


@dataclass(frozen=True, slots=True)
class GfnRange:
    """``struct kvm_gfn_range``: one memslot's part of a range (``slot`` None: a whole address space)."""

    as_id: int
    slot: Memslot | None
    start: int
    end: int


@dataclass(frozen=True, slots=True)
class Walk:
    found: bool  # at least one range: on_lock ran
    zapped: int
    flushed: bool


Handler = Callable[[GfnRange], int]


def handle_gfn_range(
    kvm: Kvm,
    ranges: Iterable[GfnRange],
    handler: Handler,
    *,
    on_lock: Callable[[], None] | None = None,
    flush_on_ret: bool = True,
) -> Walk:
    """``kvm_handle_gfn_range()``: ``on_lock`` at the first range, ``handler`` on each, one TLB
    flush at the end if any handler unmapped something and ``flush_on_ret``."""
    found, zapped = False, 0
    for r in ranges:
        if not found:
            found = True
            if on_lock is not None:
                on_lock()
        zapped += handler(r)
    return Walk(found, zapped, flush_on_ret and flush_remote_tlbs_if(kvm, zapped))


# ------------------------------------------------------------------ the ranges


def memslot_ranges(kvm: Kvm, start: int, end: int) -> Iterator[GfnRange]:
    """``kvm_for_each_memslot_in_gfn_range()`` over every address space: each slot's intersection."""
    for as_id in range(kvm.nr_as):
        for slot in kvm.spaces[as_id].overlapping(start, end):
            yield GfnRange(as_id, slot, max(start, slot.base_gfn), min(end, slot.end_gfn))


def hva_ranges(kvm: Kvm, hva_start: int, hva_end: int) -> list[GfnRange]:
    """``__kvm_handle_hva_range()``: every slot whose userspace range overlaps, clipped to gfns."""
    out = []
    for as_id, space in enumerate(kvm.spaces):
        for slot in space.by_gfn.values():
            if slot.userspace_addr < hva_end and hva_start < slot.hva_end:
                a, b = max(hva_start, slot.userspace_addr), min(hva_end, slot.hva_end)
                # hva_to_gfn(hva_end + PAGE_SIZE - 1): a partly covered last page counts.
                gs = slot.base_gfn + ((a - slot.userspace_addr) >> PAGE_SHIFT)
                ge = slot.base_gfn + ((b + PAGE_SIZE - 1 - slot.userspace_addr) >> PAGE_SHIFT)
                out.append(GfnRange(as_id, slot, gs, ge))
    return out


def gmem_ranges(kvm: Kvm, gmem: GuestMemfdFile) -> list[GfnRange]:
    """``kvm_gmem_for_each_slot()`` over a whole file: the gfns of every bound slot."""
    out = []
    for raw in sorted(gmem.bindings):
        slot = kvm.spaces[raw >> 16].by_id[raw & 0xFFFF]
        out.append(GfnRange(slot.as_id, slot, slot.base_gfn, slot.end_gfn))
    return out


def address_spaces(kvm: Kvm) -> list[GfnRange]:
    """Every gfn of every address space: ``kvm_mmu_zap_all_fast()``'s reach."""
    return [GfnRange(as_id, None, 0, GFN_LIMIT) for as_id in range(kvm.nr_as)]


# ------------------------------------------------------------- protocol steps


def invalidate_begin(kvm: Kvm, **event: Any) -> None:
    """``kvm_mmu_invalidate_begin()``."""
    kvm.inval.begin()
    kvm.events.emit("invalidate_begin", in_progress=kvm.inval.in_progress, **event)


def invalidate_range_add(kvm: Kvm, as_id: int, start: int, end: int, **event: Any) -> None:
    """``kvm_mmu_invalidate_range_add()``."""
    kvm.inval.range_add(start, end)
    kvm.events.emit("invalidate_range_add", as_id=as_id, start_gfn=start, end_gfn=end, **event)


def invalidate_end(kvm: Kvm) -> None:
    """``kvm_mmu_invalidate_end()``: seq++, then in_progress--."""
    kvm.inval.end()
    kvm.events.emit("invalidate_end", seq=kvm.inval.seq, in_progress=kvm.inval.in_progress)


def unmap(kvm: Kvm, r: GfnRange, wanted: ZapFilter, cause: str) -> int:
    """``kvm_unmap_gfn_range()``: zap the SPTEs of ``r`` that the VM's MMU lets ``wanted`` reach."""
    what = kvm.unmap_filter(wanted)
    zapped = kvm.mmu.zap(r.as_id, r.start, r.end, what)
    if zapped:
        kvm.stats.pages_zapped += zapped
        kvm.events.emit(
            "unmap", as_id=r.as_id, start_gfn=r.start, end_gfn=r.end, filter=what.value, pages=zapped, cause=cause
        )
    return zapped


def invalidate_and_unmap(kvm: Kvm, wanted: ZapFilter, cause: str) -> Handler:
    """``kvm_mmu_unmap_gfn_range()`` as a handler: range_add, then unmap."""

    def handler(r: GfnRange) -> int:
        invalidate_range_add(kvm, r.as_id, r.start, r.end)
        return unmap(kvm, r, wanted, cause)

    return handler


def flush_remote_tlbs_if(kvm: Kvm, zapped: int) -> bool:
    """``kvm_flush_remote_tlbs()`` once, only if something was unmapped."""
    if zapped:
        kvm.stats.tlb_flushes += 1
        kvm.events.emit("tlb_flush")
    return bool(zapped)
