"""In-place conversion (queued for 7.4): ``KVM_SET_MEMORY_ATTRIBUTES2`` on a guest_memfd, v8's
``kvm_gmem_set_attributes()``, written as its steps so the explorer can race them.

Private/shared lives in the file (its inode), shared by every binding: the checks, then under the
file's invalidate lock the no-op shortcut, the preallocation of the attribute store, for a
to-private conversion the host's page tables unmapped and the pages' references checked (a pin
refuses with ``EAGAIN``), and past that point nothing fails: invalidate start over every binding
(both shared and private mappings), store, invalidate end.
"""

from __future__ import annotations

from dataclasses import dataclass

from app.core.errors import EAGAIN, EINVAL, ENOMEM, ENOTTY
from app.core.gfn_range import handle_gfn_range, invalidate_and_unmap, invalidate_begin, invalidate_end
from app.core.guest_memfd import binding_ranges, fdget
from app.core.kvm import PRIVATE, GuestMemfdFile, Kvm
from app.core.mmu import ZapFilter
from app.core.steps import Step, Steps
from app.models.kvm import PAGE_SHIFT, PAGE_SIZE, U64_MAX, KvmMemoryAttributes2


@dataclass(frozen=True)
class InPlaceDelta:
    """How a wrong order departs from ``kvm_gmem_set_attributes()``: run only by the explorer."""

    store_first: bool = False
    """Store the attributes before invalidate start (a fault between them maps the old kind)."""
    pin_check: bool = True
    """False: convert to private without checking the pages' references (a pinned page becomes
    private while the host or a device still holds it)."""
    seq_bump: bool = True
    """False: invalidate end drops in_progress without bumping mmu_invalidate_seq."""


def check(kvm: Kvm, fd: int, req: KvmMemoryAttributes2) -> GuestMemfdFile:
    """``kvm_gmem_ioctl()`` -> ``kvm_gmem_set_attributes()``'s checks, in the kernel's order (the
    mode first, before the argument is even read). Changes nothing."""
    gmem = fdget(kvm.gmem_files, fd, stdio=ENOTTY)  # a stdio file has no such ioctl
    if not kvm.in_place:
        raise ENOTTY(
            f"KVM_SET_MEMORY_ATTRIBUTES2: this VM keeps private/shared in the VM (host profile {kvm.host.name}, "
            f"{kvm.semantics.value}): it converts with {kvm.converts_with}"
        )
    if req.flags:
        raise EINVAL(f"flags {req.flags:#x} must be 0")
    if any(req.reserved):
        raise EINVAL("reserved must be all 0")
    if not kvm.has_private_mem:
        raise EINVAL(f"a {kvm.type.value} VM has no private memory")
    if req.attributes & ~PRIVATE:
        raise EINVAL(f"attributes {req.attributes:#x}: only KVM_MEMORY_ATTRIBUTE_PRIVATE ({PRIVATE:#x}) is supported")
    if req.size == 0 or req.offset + req.size > U64_MAX:
        raise EINVAL("size must not be 0, and offset + size must not wrap past 2^64")
    if req.offset % PAGE_SIZE or req.size % PAGE_SIZE:
        raise EINVAL(f"offset {req.offset:#x} and size {req.size:#x} must be page aligned")
    if req.offset + req.size > gmem.size:
        raise EINVAL(f"offset + size past the end of the file ({gmem.size:#x} bytes)")
    return gmem


class GmemConversion:
    """One ``KVM_SET_MEMORY_ATTRIBUTES2`` of pages ``[start, end)`` of a file to ``value``.

    ``fine``: each page's store is its own step (the explorer); otherwise one range store.
    """

    def __init__(self, kvm: Kvm, gmem: GuestMemfdFile, offset: int, size: int, value: int, *, fine: bool = False):
        assert gmem.attributes is not None
        self.kvm, self.gmem, self.value, self.fine = kvm, gmem, value, fine
        self.attributes = gmem.attributes
        self.start, self.end = offset >> PAGE_SHIFT, (offset + size) >> PAGE_SHIFT
        self.noop = False
        self.invalidated = False
        self.zapped = 0
        self.flushed = False

    def steps(self, delta: InPlaceDelta = InPlaceDelta()) -> Steps:
        kvm, gmem, start, end, value = self.kvm, self.gmem, self.start, self.end, self.value
        yield Step("validate", holds_mmu_lock=False)
        if self.attributes.is_uniform(start, end, value):
            self.noop = True  # kvm_gmem_range_has_attributes(): nothing to invalidate
            kvm.stats.attribute_updates += 1
            kvm.events.emit("gmem_attributes_noop", fd=gmem.fd, start_pgoff=start, end_pgoff=end, attributes=value)
            return
        # The attribute store is preallocated (one allocation, neighbours merged): fail-nth 1
        # fails it; a later one is consumed, as this call makes no other allocation.
        nth, kvm.fail_nth = kvm.fail_nth, None
        if nth == 1 or not kvm.budget.room(2):
            raise ENOMEM(
                f"preallocating the attributes of file pages [{start:#x}, {end:#x}) failed",
                error_offset=start << PAGE_SHIFT,
            )
        if value & PRIVATE:
            yield Step("unmap_mapping_pages", holds_mmu_lock=False)
            # The host's page tables lose the range (the VMAs stay): later host accesses fault,
            # and a private page then SIGBUSes. Only references beyond the page cache's remain.
            kvm.events.emit("host_unmap", fd=gmem.fd, start_pgoff=start, end_pgoff=end)
            if delta.pin_check:
                yield Step("check_refcounts", holds_mmu_lock=False)
                pinned = gmem.first_pinned(start, end)
                if pinned is not None:
                    raise EAGAIN(
                        f"page {pinned:#x} of the file is pinned (GUP or IOMMU): unpin it and retry",
                        error_offset=pinned << PAGE_SHIFT,
                    )
        if delta.store_first:
            yield from self._stores()
        yield Step("invalidate_start", holds_mmu_lock=False, takes_mmu_lock=True)
        # kvm_gmem_invalidate_start(): every binding of the inode; what becomes private loses its
        # shared mappings and the reverse (the filter counts only on TDX, see Kvm.unmap_filter).
        opposite = ZapFilter.SHARED if value & PRIVATE else ZapFilter.PRIVATE
        walk = handle_gfn_range(
            kvm,
            binding_ranges(kvm, gmem, start, end),
            invalidate_and_unmap(kvm, opposite, "gmem_attributes"),
            on_lock=lambda: invalidate_begin(kvm, source="guest_memfd"),
        )
        self.invalidated, self.zapped, self.flushed = walk.found, walk.zapped, walk.flushed
        if not delta.store_first:
            yield from self._stores()
        yield Step("invalidate_end", holds_mmu_lock=False, takes_mmu_lock=True)
        if self.invalidated:
            if delta.seq_bump:
                invalidate_end(kvm)
            else:
                kvm.inval.in_progress -= 1
        kvm.stats.attribute_updates += 1

    def _stores(self) -> Steps:
        kvm, start, end, value = self.kvm, self.start, self.end, self.value
        spans = [(p, p + 1) for p in range(start, end)] if self.fine else [(start, end)]
        for s, e in spans:
            yield Step(f"store {s:#x}" if self.fine else "store", holds_mmu_lock=False)
            self.attributes.assign(s, e, value)
            kvm.events.emit("gmem_attributes_store", fd=self.gmem.fd, start_pgoff=s, end_pgoff=e, attributes=value)
