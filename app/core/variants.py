"""The explorer's conversion variants: the engine's own rfc-v9 and linux conversions, and the v9
review's historical orderings as ``V9Delta``s of the rfc-v9 sequence; and which scenarios
(``app.models.scenario``) the engine can run."""

from __future__ import annotations

from dataclasses import dataclass
from typing import get_args

from app.core.attributes import V9Delta
from app.core.errors import EINVAL
from app.core.in_place import InPlaceDelta
from app.models.kvm import GFN_LIMIT, Semantics
from app.models.names import VariantName
from app.models.scenario import Scenario

MAX_NPAGES = 8


@dataclass(frozen=True)
class PunchDelta:
    """How a wrong order departs from the engine's ``kvm_gmem_punch_hole()``."""

    free_first: bool = False
    """Free the pages (truncate), then invalidate: mappings point at freed pages in between."""
    seq_bump: bool = True
    """False: invalidate end drops in_progress without bumping mmu_invalidate_seq."""


@dataclass(frozen=True)
class Variant:
    name: VariantName
    description: str
    semantics: Semantics
    delta: V9Delta | None = None
    punch: PunchDelta | None = None
    """Not None: the other actor is a punch-hole of the range's file, not a conversion."""
    in_place: InPlaceDelta | None = None
    """Not None: the conversion is KVM_SET_MEMORY_ATTRIBUTES2 on the range's file (a 7.4 host in place)."""

    @property
    def historical(self) -> bool:
        """Not one of the engine's own sequences (a reviewed variant or a wrong order)."""
        own = (None, PunchDelta(), InPlaceDelta())
        return self.delta is not None or self.punch not in own or self.in_place not in own


VARIANTS = {
    v.name: v
    for v in (
        Variant(
            "rfc-v9",
            "The engine's own rfc-v9 conversion: begin before the stores, exact unwind, end (seq bump) on the error "
            "path too; mmu_lock held throughout.",
            Semantics.rfc_v9,
        ),
        Variant(
            "linux",
            "The engine's own kvm_vm_set_mem_attributes(): xa_reserve first (a failure changes nothing), "
            "pre_set_range (begin + unmap under mmu_lock), stores under slots_lock only, post_set_range (end).",
            Semantics.linux,
        ),
        Variant(
            "v9-as-posted",
            "rfc-v9 with the unwind as posted: for (; i > start; i--) xa_erase(i). It erases the failing index, "
            "leaves start converted and makes every erased gfn private whatever it was.",
            Semantics.rfc_v9,
            V9Delta(unwind="as-posted"),
        ),
        Variant(
            "v9-naive-unwind",
            "rfc-v9 with the obvious fix i >= start: with an unsigned i it never ends when start is gfn 0.",
            Semantics.rfc_v9,
            V9Delta(unwind="naive"),
        ),
        Variant(
            "reviewer-reorder",
            "The order proposed in review: the stores first, then begin, unmap and end; a failed store only unwinds "
            "(exactly), so no seq bump tells a racing fault that it read a value that was undone.",
            Semantics.rfc_v9,
            V9Delta(stores_first=True),
        ),
        Variant(
            "punch-hole",
            "The engine's own kvm_gmem_punch_hole() on the range's file (mmap-able, so the slot is gmem-only and "
            "every fault takes its page from it): invalidate begin over every binding (unmap), free the pages, "
            "invalidate end (seq bump). The scenario's to and fail_nth do not apply.",
            Semantics.linux,
            punch=PunchDelta(),
        ),
        Variant(
            "punch-hole-free-first",
            "A wrong order: free the pages first, then invalidate. The guest's mappings point at freed pages until "
            "the unmap, and a fault that resolved its page before the free maps it.",
            Semantics.linux,
            punch=PunchDelta(free_first=True),
        ),
        Variant(
            "punch-hole-no-seq-bump",
            "A wrong order: invalidate end drops mmu_invalidate_in_progress without bumping mmu_invalidate_seq, so a "
            "fault that resolved its page before the hole installs it after the hole is done.",
            Semantics.linux,
            punch=PunchDelta(seq_bump=False),
        ),
        Variant(
            "in-place",
            "The engine's own kvm_gmem_set_attributes() (7.4, in place) on the range's file: no-op check, "
            "preallocation (fail_nth 1 fails it), to private: host page tables unmapped and a pinned page refused "
            "(EAGAIN), then invalidate start over every binding (unmap), the stores, invalidate end (seq bump).",
            Semantics.linux,
            in_place=InPlaceDelta(),
        ),
        Variant(
            "in-place-store-first",
            "A wrong order: the file's attributes are stored before invalidate start, so a mapping the vCPU "
            "installed of the old kind outlives the store until the unmap (the host may fault in a page the guest "
            "still maps private).",
            Semantics.linux,
            in_place=InPlaceDelta(store_first=True),
        ),
        Variant(
            "in-place-no-pin-check",
            "A wrong order: to private without checking the pages' references, so a page the host holds pinned "
            "(GUP, an IOMMU mapping) becomes private while a device can still reach it. Give the scenario pinned "
            "offsets.",
            Semantics.linux,
            in_place=InPlaceDelta(pin_check=False),
        ),
        Variant(
            "in-place-no-seq-bump",
            "A wrong order: invalidate end drops mmu_invalidate_in_progress without bumping mmu_invalidate_seq, so a "
            "fault that read the old attribute installs it after the conversion is done.",
            Semantics.linux,
            in_place=InPlaceDelta(seq_bump=False),
        ),
    )
}
assert tuple(VARIANTS) == get_args(VariantName)


def check(sc: Scenario) -> None:
    """EINVAL unless the engine can run ``sc``."""
    if sc.variant not in VARIANTS:
        raise EINVAL(f"unknown variant {sc.variant!r}; one of {', '.join(VARIANTS)}")
    if not 1 <= sc.npages <= MAX_NPAGES:
        raise EINVAL(f"npages must be 1..{MAX_NPAGES}")
    if sc.start_gfn + sc.npages >= GFN_LIMIT:
        raise EINVAL(f"the range must end below gfn 2^52 - 1 (start_gfn {sc.start_gfn:#x})")
    if not 0 <= sc.fault_gfn_offset < sc.npages:
        raise EINVAL(f"fault_gfn_offset {sc.fault_gfn_offset} outside [0, {sc.npages})")
    bad = sorted({o for o in sc.initial_private or () if not 0 <= o < sc.npages})
    if bad:
        raise EINVAL(f"initial_private offsets {bad} outside [0, {sc.npages})")
    if sc.fail_nth is not None and sc.fail_nth < 1:
        raise EINVAL("fail_nth must be >= 1")
    if sc.pinned and VARIANTS[sc.variant].in_place is None:
        raise EINVAL("pinned applies to the in-place variants only (a pin is what their reference check sees)")
    bad = sorted({o for o in sc.pinned or () if not 0 <= o < sc.npages})
    if bad:
        raise EINVAL(f"pinned offsets {bad} outside [0, {sc.npages})")
