"""Memslots and guest_memfd bindings: ``kvm_set_memory_region()`` and ``kvm_gmem_bind()``."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from sortedcontainers import SortedDict

from app.core.errors import EBADF, EBUSY, EEXIST, EINVAL
from app.core.gfn_range import GfnRange, address_spaces, handle_gfn_range, unmap
from app.core.mmu import ZapFilter
from app.models import state
from app.models.kvm import (
    KVM_MEM_GUEST_MEMFD,
    KVM_MEM_LOG_DIRTY_PAGES,
    KVM_MEM_MAX_NR_PAGES,
    KVM_MEM_READONLY,
    PAGE_SHIFT,
    PAGE_SIZE,
    U64_MAX,
    USER_HVA_LIMIT,
    KvmUserspaceMemoryRegion2,
    VmType,
)

if TYPE_CHECKING:
    from app.core.kvm import Kvm


@dataclass(eq=False)
class GuestMemfdFile:
    """A ``[kvm-gmem]`` file; bindings keep it alive after its fd is closed."""

    fd: int
    size: int
    flags: int
    # raw slot -> (offset, size)
    bindings: dict[int, tuple[int, int]] = field(default_factory=dict)

    def bind_conflict(self, offset: int, size: int) -> bool:
        return any(offset < o + s and o < offset + size for o, s in self.bindings.values())

    def model(self) -> state.GuestMemfd:
        return state.GuestMemfd(
            fd=self.fd,
            size=self.size,
            flags=self.flags,
            bindings=[state.GmemBinding(slot=k, offset=o, size=s) for k, (o, s) in sorted(self.bindings.items())],
        )


@dataclass(eq=False)
class Memslot:
    """``struct kvm_memory_slot``."""

    as_id: int
    id: int
    flags: int
    base_gfn: int
    npages: int
    userspace_addr: int
    gmem: GuestMemfdFile | None = None
    gmem_fd: int | None = None
    gmem_offset: int = 0

    @property
    def slot(self) -> int:
        return self.as_id << 16 | self.id

    @property
    def end_gfn(self) -> int:
        return self.base_gfn + self.npages

    @property
    def hva_end(self) -> int:
        return self.userspace_addr + (self.npages << PAGE_SHIFT)

    @property
    def is_gmem(self) -> bool:
        return bool(self.flags & KVM_MEM_GUEST_MEMFD)

    def writable(self, write: bool) -> bool:
        """Writable SPTE unless READONLY, or dirty logging and a read fault."""
        if self.flags & KVM_MEM_READONLY:
            return False
        return write or not self.flags & KVM_MEM_LOG_DIRTY_PAGES

    def model(self) -> state.Memslot:
        return state.Memslot(
            slot=self.slot,
            as_id=self.as_id,
            id=self.id,
            flags=self.flags,
            guest_phys_addr=self.base_gfn << PAGE_SHIFT,
            memory_size=self.npages << PAGE_SHIFT,
            userspace_addr=self.userspace_addr,
            base_gfn=self.base_gfn,
            npages=self.npages,
            guest_memfd=self.gmem_fd if self.is_gmem else None,
            guest_memfd_offset=self.gmem_offset if self.is_gmem else 0,
        )


class AddressSpace:
    """The memslots of one address space, ordered by ``base_gfn`` (non-overlapping)."""

    def __init__(self) -> None:
        self.by_gfn: SortedDict = SortedDict()
        self.by_id: dict[int, Memslot] = {}

    def __len__(self) -> int:
        return len(self.by_id)

    def add(self, slot: Memslot) -> None:
        self.by_gfn[slot.base_gfn] = slot
        self.by_id[slot.id] = slot

    def remove(self, slot: Memslot) -> None:
        del self.by_gfn[slot.base_gfn]
        del self.by_id[slot.id]

    def find(self, gfn: int) -> Memslot | None:
        """``gfn_to_memslot()``."""
        i = self.by_gfn.bisect_right(gfn) - 1
        if i < 0:
            return None
        slot: Memslot = self.by_gfn.peekitem(i)[1]
        return slot if gfn < slot.end_gfn else None

    def overlapping(self, start: int, end: int) -> Iterator[Memslot]:
        """Slots intersecting ``[start, end)`` in gfn order (``kvm_for_each_memslot_in_gfn_range``)."""
        first = self.find(start)
        if first is not None:
            yield first
        for base in self.by_gfn.irange(start, end, inclusive=(False, False)):
            yield self.by_gfn[base]

    def overlaps_other(self, start: int, end: int, exclude: Memslot | None) -> bool:
        return any(s is not exclude for s in self.overlapping(start, end))


@dataclass
class MemslotPlan:
    """What a validated ``KVM_SET_USER_MEMORY_REGION2`` will do."""

    change: state.MemslotChange
    old: Memslot | None
    new: Memslot | None
    gmem: GuestMemfdFile | None = None


def plan_set_memory_region(kvm: Kvm, raw_slot: int, req: KvmUserspaceMemoryRegion2) -> MemslotPlan:
    """Every check of ``kvm_set_memory_region()``, in the kernel's order; changes nothing."""
    spaces, gmem_files = kvm.spaces, kvm.gmem_files
    as_id, sid = raw_slot >> 16, raw_slot & 0xFFFF
    flags, size, gpa, hva = req.flags, req.memory_size, req.guest_phys_addr, req.userspace_addr
    nr_slots = kvm.host.caps.KVM_CAP_NR_MEMSLOTS
    if sid >= nr_slots:
        raise EINVAL(f"slot id {sid} >= KVM_USER_MEM_SLOTS ({nr_slots})")

    # check_memory_region_flags()
    valid = KVM_MEM_LOG_DIRTY_PAGES
    if kvm.has_readonly_mem:
        valid |= KVM_MEM_READONLY
    if kvm.gmem_slots:
        valid |= KVM_MEM_GUEST_MEMFD
    if flags & KVM_MEM_GUEST_MEMFD:
        valid &= ~(KVM_MEM_LOG_DIRTY_PAGES | KVM_MEM_READONLY)
    if flags & ~valid:
        raise EINVAL(f"flags {flags:#x} outside the allowed set {valid:#x}")

    if size % PAGE_SIZE or gpa % PAGE_SIZE or hva % PAGE_SIZE:
        raise EINVAL("memory_size, guest_phys_addr and userspace_addr must be 4 KiB aligned")
    if hva + size > USER_HVA_LIMIT:
        raise EINVAL(f"userspace range ends above the user half ({USER_HVA_LIMIT:#x})")
    if flags & KVM_MEM_GUEST_MEMFD:
        off = req.guest_memfd_offset
        if off % PAGE_SIZE or off + size > U64_MAX:
            raise EINVAL("guest_memfd_offset unaligned or offset + size wraps")
    if as_id >= len(spaces):
        raise EINVAL(f"address space {as_id} >= {len(spaces)} address spaces of this VM")
    if gpa + size > U64_MAX:
        raise EINVAL("guest_phys_addr + memory_size wraps")
    npages = size >> PAGE_SHIFT
    if npages > KVM_MEM_MAX_NR_PAGES:
        raise EINVAL(f"{npages} pages > KVM_MEM_MAX_NR_PAGES")

    space = spaces[as_id]
    old = space.by_id.get(sid)
    if npages == 0:
        if old is None:
            raise EINVAL(f"cannot delete slot {raw_slot:#x}: no such slot")
        return MemslotPlan("delete", old, None)

    base_gfn = gpa >> PAGE_SHIFT
    new = Memslot(as_id, sid, flags, base_gfn, npages, hva)
    if old is not None:
        if old.is_gmem:
            raise EINVAL("a guest_memfd slot can only be deleted")
        if flags & KVM_MEM_GUEST_MEMFD:
            raise EINVAL("KVM_MEM_GUEST_MEMFD cannot be added to an existing slot")
        if hva != old.userspace_addr or npages != old.npages or (flags ^ old.flags) & KVM_MEM_READONLY:
            raise EINVAL("userspace_addr or memory_size changed, or KVM_MEM_READONLY toggled")
        if base_gfn != old.base_gfn:
            change: state.MemslotChange = "move"
        elif flags != old.flags:
            return MemslotPlan("flags_only", old, new)
        else:
            return MemslotPlan("none", old, old)
    else:
        change = "create"

    if space.overlaps_other(base_gfn, base_gfn + npages, exclude=old):
        raise EEXIST(f"[{base_gfn:#x}, {base_gfn + npages:#x}) overlaps another slot in address space {as_id}")

    gmem: GuestMemfdFile | None = None
    if flags & KVM_MEM_GUEST_MEMFD:
        if req.guest_memfd is None:
            raise EBADF("KVM_MEM_GUEST_MEMFD needs a guest_memfd fd (none given)")
        if req.guest_memfd not in gmem_files:
            raise EBADF(f"guest_memfd {req.guest_memfd} is not an open guest_memfd of this VM")
        gmem = gmem_files[req.guest_memfd]
        off = req.guest_memfd_offset
        # kvm_gmem_bind() compares in loff_t: an offset of 2^63 or more is negative, and an
        # offset + size that passes 2^63 overflows to a negative value that passes the check
        # (a real 6.18 host accepts such a binding; verify-host found it).
        if _loff(off) < 0 or _loff(off + size) > gmem.size:
            raise EINVAL(f"guest_memfd_offset + memory_size beyond the file ({gmem.size:#x} bytes)")
        if gmem.bind_conflict(off, size):
            raise EINVAL("range of the guest_memfd already bound to another slot")
        new.gmem, new.gmem_fd, new.gmem_offset = gmem, req.guest_memfd, off

    # kvm_arch_prepare_memory_region()
    max_gfn = kvm.host.max_gfn
    if base_gfn + npages - 1 > max_gfn:
        raise EINVAL(f"last gfn {base_gfn + npages - 1:#x} > max_gfn {max_gfn:#x}")
    return MemslotPlan(change, old, new, gmem)


def _loff(value: int) -> int:
    """A u64 as the kernel's signed ``loff_t``."""
    return value - (1 << 64) if value >= 1 << 63 else value


def set_memory_region(kvm: Kvm, raw_slot: int, req: KvmUserspaceMemoryRegion2) -> state.MemslotUpdate:
    """``kvm_set_memory_region()``: plan (every check), then commit create/move/flags-only/delete."""
    plan = plan_set_memory_region(kvm, raw_slot, req)
    if plan.change == "none":
        return state.MemslotUpdate(change="none", memslot=plan.old.model() if plan.old else None, pages_zapped=0)
    if kvm.notifiers:
        # kvm_swap_active_memslots() would sleep until mn_active_invalidate_count is 0.
        raise EBUSY(f"{len(kvm.notifiers)} MMU-notifier invalidation(s) open; end them first")
    old, new = plan.old, plan.new
    space = kvm.spaces[raw_slot >> 16]
    zapped = 0
    if old is not None and plan.change in ("delete", "move"):
        zapped = flush_shadow_memslot(kvm, old, plan.change)
    if old is not None:
        space.remove(old)
        if old.gmem is not None and plan.change == "delete":
            del old.gmem.bindings[old.slot]  # kvm_gmem_unbind()
    if new is not None:
        space.add(new)
        if plan.gmem is not None:
            plan.gmem.bindings[new.slot] = (new.gmem_offset, new.npages << PAGE_SHIFT)
    target = new or old
    assert target is not None
    kvm.events.emit(
        "memslot",
        change=plan.change,
        slot=target.slot,
        base_gfn=target.base_gfn,
        npages=target.npages,
        flags=target.flags,
        pages_zapped=zapped,
    )
    return state.MemslotUpdate(change=plan.change, memslot=new.model() if new else None, pages_zapped=zapped)


def flush_shadow_memslot(kvm: Kvm, old: Memslot, cause: str) -> int:
    """``kvm_arch_flush_shadow_memslot()``: with ``KVM_X86_QUIRK_SLOT_ZAP_ALL`` (on by default,
    honoured only for default VMs since 6.12) every mapping of the VM, else the old slot's;
    rfc-v9 predates the quirk, when the kernel always zapped everything."""
    zap_all = not kvm.linux or kvm.type is VmType.default
    ranges = address_spaces(kvm) if zap_all else [GfnRange(old.as_id, old, old.base_gfn, old.end_gfn)]
    walk = handle_gfn_range(kvm, ranges, lambda r: unmap(kvm, r, ZapFilter.ALL, "memslot_" + cause))
    return walk.zapped
