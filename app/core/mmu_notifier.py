"""The host MMU notifier: ``kvm_mmu_notifier_invalidate_range_start()`` / ``_end()``."""

from __future__ import annotations

from app.core.errors import EINVAL, ENOENT
from app.core.gfn_range import handle_gfn_range, hva_ranges, invalidate_and_unmap, invalidate_begin, invalidate_end
from app.core.kvm import Kvm, NotifierInvalidation
from app.core.mmu import ZapFilter


def invalidate_range_start(kvm: Kvm, hva_start: int, hva_end: int) -> tuple[NotifierInvalidation, int]:
    """Begin on the first matching slot, range_add + unmap each match, flush once."""
    if hva_start >= hva_end:
        raise EINVAL("hva_start must be below hva_end")
    kvm.take("an invalidation")
    ranges = hva_ranges(kvm, hva_start, hva_end)
    # Private memory has no userspace mapping: KVM_FILTER_SHARED (all mappings outside TDX).
    walk = handle_gfn_range(
        kvm,
        ranges,
        invalidate_and_unmap(kvm, ZapFilter.SHARED, "mmu_notifier"),
        on_lock=lambda: invalidate_begin(kvm, source="mmu_notifier"),
    )
    inv = NotifierInvalidation(kvm.next_notifier_id, hva_start, hva_end, [(r.as_id, r.start, r.end) for r in ranges])
    kvm.next_notifier_id += 1
    kvm.notifiers[inv.id] = inv
    kvm.events.emit("notifier_start", invalidation=inv.id, hva_start=hva_start, hva_end=hva_end, matched=walk.found)
    return inv, walk.zapped


def invalidate_range_end(kvm: Kvm, inv_id: int) -> None:
    """End only if the start matched a slot (the memslots cannot have changed in between)."""
    inv = kvm.notifiers.pop(inv_id, None)
    if inv is None:
        raise ENOENT(f"no open MMU-notifier invalidation {inv_id}")
    kvm.budget.add(-1)
    if inv.gfn_ranges:
        invalidate_end(kvm)
    kvm.events.emit("notifier_end", invalidation=inv_id)
