"""Read-side views of a ``Kvm``: the models the API returns, built from the engine's state."""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Callable, Iterator
from itertools import accumulate, islice, pairwise
from typing import Any

from app.core.kvm import PRIVATE, GuestMemfdFile, HostMapping, Kvm, Memslot, NotifierInvalidation
from app.core.mmu import UNMAPPED, spte_private, spte_writable
from app.core.runs import Run
from app.models import state
from app.models.kvm import PAGE_SHIFT


def vm(kvm: Kvm) -> state.Vm:
    return state.Vm(
        id=kvm.id,
        name=kvm.name,
        type=kvm.type,
        type_value=kvm.type.value_code,
        semantics=kvm.semantics,
        profile=kvm.host.name,
        kernel=kvm.host.kernel,
        has_private_mem=kvm.has_private_mem,
        address_spaces=kvm.nr_as,
        memslot_count=sum(len(s) for s in kvm.spaces),
        mmu=mmu(kvm),
    )


def mmu(kvm: Kvm) -> state.Mmu:
    inv = kvm.inval
    return state.Mmu(
        mmu_invalidate_seq=inv.seq,
        mmu_invalidate_in_progress=inv.in_progress,
        mmu_invalidate_range_start=inv.range_start,
        mmu_invalidate_range_end=inv.range_end,
        mapped_pages=kvm.mmu.mapped_pages,
        open_notifier_invalidations=len(kvm.notifiers),
        stats=kvm.stats.model_copy(),  # a copy: the answer must not move with the live counters
    )


def usage(kvm: Kvm) -> dict[str, int]:
    """What /metrics sums over VMs: sizes, counters and the invalidation state."""
    return {
        "memslots": sum(len(s) for s in kvm.spaces),
        "attribute_runs": len(kvm.attributes),
        "mapping_runs": kvm.mmu.runs(),
        "mapped_pages": kvm.mmu.mapped_pages,
        "open_notifier_invalidations": len(kvm.notifiers),
        "mmu_invalidate_in_progress": kvm.inval.in_progress,
        "mmu_invalidate_seq": kvm.inval.seq,
        **kvm.stats.model_dump(),
    }


def page_of_runs(runs: Iterator[Any], limit: int, end_of: Callable[[Any], int]) -> tuple[list[Any], int | None]:
    """Take ``limit`` items; the cursor is the end of the last one exactly when more remain."""
    out = list(islice(runs, limit + 1))
    if len(out) > limit:
        out = out[:limit]
        return out, end_of(out[-1])
    return out, None


def attribute_runs(kvm: Kvm, start: int, end: int, limit: int) -> tuple[list[state.AttributeRun], int | None]:
    """Runs alike in the VM's attributes and in what a fault reads as private: the same runs,
    except in place, where the VM's attributes stay 0 and the files say what is private."""
    private = _coalesce((s, e, int(p)) for s, e, p in kvm.private_runs(start, end))
    runs = (
        state.AttributeRun(start_gfn=s, end_gfn=e, attributes=a, private=bool(p))
        for s, e, a, p in _zip_runs(kvm.attributes.runs(start, end), private)
    )
    return page_of_runs(runs, limit, lambda r: r.end_gfn)


def _coalesce(runs: Iterator[Run]) -> Iterator[Run]:
    """Adjacent runs of one value as one (two slots side by side read alike)."""
    held: Run | None = None
    for r in runs:
        if held is not None and held[1] == r[0] and held[2] == r[2]:
            held = (held[0], r[1], r[2])
            continue
        if held is not None:
            yield held
        held = r
    if held is not None:
        yield held


def mapping_runs(kvm: Kvm, as_id: int, start: int, end: int, limit: int) -> tuple[list[state.MappingRun], int | None]:
    kvm.check_as(as_id)
    runs = (
        state.MappingRun(as_id=as_id, start_gfn=s, end_gfn=e, private=spte_private(v), writable=spte_writable(v))
        for s, e, v in kvm.mmu.mapped_runs(as_id, start, end)
    )
    return page_of_runs(runs, limit, lambda r: r.end_gfn)


def gfn_info(kvm: Kvm, gfn: int) -> state.GfnInfo:
    attrs = kvm.attributes.value_at(gfn)
    slots, maps = [], []
    for as_id, space in enumerate(kvm.spaces):
        slot = space.find(gfn)
        if slot is not None:
            slots.append(_gfn_memslot(slot, gfn))
        v = kvm.mmu.lookup(as_id, gfn)
        if v != UNMAPPED:
            maps.append(state.GfnMapping(as_id=as_id, private=spte_private(v), writable=spte_writable(v)))
    return state.GfnInfo(
        gfn=gfn, gpa=gfn << PAGE_SHIFT, attributes=attrs, private=kvm.gfn_is_private(gfn), memslots=slots, mappings=maps
    )


def _gfn_memslot(slot: Memslot, gfn: int) -> state.GfnMemslotRef:
    """A memslot holding ``gfn``, and the page of its guest_memfd behind it if a file is bound."""
    ref = state.GfnMemslotRef(as_id=slot.as_id, slot=slot.slot, id=slot.id, gmem_only=slot.gmem_only)
    if slot.gmem is None:
        return ref
    pgoff = slot.gmem_pgoff(gfn)
    allocated = _is_allocated(slot.gmem.allocated.value_at(pgoff))
    return ref.model_copy(update={"guest_memfd": slot.gmem_fd, "gmem_pgoff": pgoff, "gmem_allocated": allocated})


def memslot(slot: Memslot) -> state.Memslot:
    return state.Memslot(
        slot=slot.slot,
        as_id=slot.as_id,
        id=slot.id,
        flags=slot.flags,
        guest_phys_addr=slot.base_gfn << PAGE_SHIFT,
        memory_size=slot.npages << PAGE_SHIFT,
        userspace_addr=slot.userspace_addr,
        base_gfn=slot.base_gfn,
        npages=slot.npages,
        guest_memfd=slot.gmem_fd if slot.is_gmem else None,
        guest_memfd_offset=slot.gmem_offset if slot.is_gmem else 0,
        gmem_only=slot.gmem_only,
    )


def guest_memfd(gmem: GuestMemfdFile) -> state.GuestMemfd:
    return state.GuestMemfd(
        fd=gmem.fd,
        size=gmem.size,
        flags=gmem.flags,
        bindings=[state.GmemBinding(slot=k, offset=o, size=s) for k, (o, s) in sorted(gmem.bindings.items())],
        allocated_pages=gmem.allocated_pages(),
        mappings=sorted(gmem.mmaps),
    )


def file_runs(gmem: GuestMemfdFile, start: int, end: int, limit: int) -> tuple[list[state.FileRun], int | None]:
    """Runs of a file's pages in ``[start, end)`` (byte offsets) alike in being allocated and private."""
    lo, hi = start >> PAGE_SHIFT, min(end >> PAGE_SHIFT, gmem.npages)
    private = [(s, e, int(p)) for s, e, p in gmem.private_runs(lo, hi)]
    runs = (
        state.FileRun(start=s << PAGE_SHIFT, end=e << PAGE_SHIFT, allocated=bool(a), private=bool(p))
        for s, e, a, p in _zip_runs(gmem.allocated.runs(lo, hi), iter(private))
    )
    return page_of_runs(runs, limit, lambda r: r.end)


def _zip_runs(a: Iterator[Run], b: Iterator[Run]) -> Iterator[tuple[int, int, int, int]]:
    """Two run lists covering the same range, as the runs where neither changes: O(both)."""
    ra, rb = next(a, None), next(b, None)
    while ra is not None and rb is not None:
        end = min(ra[1], rb[1])
        yield max(ra[0], rb[0]), end, ra[2], rb[2]
        if ra[1] == end:
            ra = next(a, None)
        if rb[1] == end:
            rb = next(b, None)


def host_pin(kvm: Kvm, pin_id: int) -> state.HostPin:
    gmem = kvm.host_pins[pin_id]
    first, npages = gmem.pins[pin_id]
    fd = gmem.fd if kvm.is_open(gmem) else None
    return state.HostPin(id=pin_id, fd=fd, offset=first << PAGE_SHIFT, size=npages << PAGE_SHIFT)


def host_mapping(kvm: Kvm, m: HostMapping) -> state.HostMapping:
    open_fd = m.file.fd if kvm.is_open(m.file) else None
    return state.HostMapping(id=m.id, fd=open_fd, offset=m.pgoff << PAGE_SHIFT, length=m.npages << PAGE_SHIFT)


def notifier(inv: NotifierInvalidation) -> state.NotifierInvalidation:
    return state.NotifierInvalidation(
        id=inv.id,
        hva_start=inv.hva_start,
        hva_end=inv.hva_end,
        gfn_ranges=[state.GfnRange(as_id=a, start_gfn=s, end_gfn=e) for a, s, e in inv.gfn_ranges],
    )


def _is_private(value: int) -> bool:
    return bool(value & PRIVATE)


def _is_mapped(value: int) -> bool:
    return value != UNMAPPED


def _is_allocated(value: int) -> bool:
    return bool(value)


def memory_map(kvm: Kvm, start: int, end: int, buckets: int) -> state.MemoryMap:
    """Counts per bucket from prefix sums over the runs: O((buckets + slots in the window) x log
    runs), however fragmented the VM or its guest_memfds are. Buckets split ``[start, end)`` into
    near-equal parts of >= 1 gfn."""
    n = min(buckets, end - start)
    edges = [start + (end - start) * i // n for i in range(n + 1)]
    per_as = [list(space.overlapping(start, end)) for space in kvm.spaces]
    slots = [slot for space in per_as for slot in space]
    cover = _SlotCover(slots)
    files = [_FilePages(space) for space in per_as]
    out = []
    for a, b in pairwise(edges):
        out.append(
            state.MemoryMapBucket(
                start_gfn=a,
                end_gfn=b,
                private_pages=_private_pages(kvm, a, b),
                memslot_pages=cover.covered(a, b),
                mapped_pages=[space.count(a, b, _is_mapped) for space in kvm.mmu.spaces],
                gmem_allocated_pages=[f.allocated(a, b) for f in files],
            )
        )
    inv, window = kvm.inval, None
    rs, re_ = inv.range_start, inv.range_end
    if inv.in_progress and rs is not None and re_ is not None and rs < end and start < re_:
        window = state.GfnWindow(start_gfn=rs, end_gfn=re_)
    return state.MemoryMap(
        start_gfn=start,
        end_gfn=end,
        buckets=out,
        memslots=[memslot(slot) for slot in slots],
        invalidation=window,
    )


def _private_pages(kvm: Kvm, start: int, end: int) -> int:
    """Private pages of ``[start, end)``: O(log runs), in place O(the files' runs in the range)."""
    if not kvm.in_place:
        return kvm.attributes.count(start, end, _is_private)
    return sum(e - s for s, e, private in kvm.private_runs(start, end) if private)


class _SlotCover:
    """The union of the window's memslots (address spaces may overlap), with prefix sums, so each
    bucket's covered pages are two bisects instead of a pass over every slot."""

    def __init__(self, slots: list[Memslot]) -> None:
        self.starts: list[int] = []
        self.ends: list[int] = []
        for base, end in sorted((s.base_gfn, s.end_gfn) for s in slots):
            if self.ends and base <= self.ends[-1]:
                self.ends[-1] = max(self.ends[-1], end)
            else:
                self.starts.append(base)
                self.ends.append(end)
        self.cum = [0, *accumulate(e - s for s, e in zip(self.starts, self.ends, strict=True))]

    def below(self, x: int) -> int:
        """Covered pages in ``[0, x)``."""
        i = bisect_right(self.starts, x) - 1
        if i < 0:
            return 0
        return self.cum[i] + min(x, self.ends[i]) - self.starts[i]

    def covered(self, start: int, end: int) -> int:
        return self.below(end) - self.below(start)


class _FilePages:
    """The allocated guest_memfd pages behind one address space's memslots, for buckets asked in
    increasing order: each bucket visits only the bound slots it overlaps, and each count is a
    prefix-sum lookup in the file's page runs (``RunMap.count()``), so a bucket costs
    O(slots it overlaps x log runs), never O(pages)."""

    def __init__(self, slots: list[Memslot]) -> None:
        self.slots = [s for s in slots if s.gmem is not None]  # in gfn order, disjoint
        self.first = 0  # slots before it end at or before the last bucket's start

    def allocated(self, start: int, end: int) -> int:
        slots = self.slots
        while self.first < len(slots) and slots[self.first].end_gfn <= start:
            self.first += 1
        n = 0
        for i in range(self.first, len(slots)):
            slot = slots[i]
            if slot.base_gfn >= end:
                break
            assert slot.gmem is not None
            lo, hi = max(start, slot.base_gfn), min(end, slot.end_gfn)
            n += slot.gmem.allocated.count(slot.gmem_pgoff(lo), slot.gmem_pgoff(hi), _is_allocated)
        return n
