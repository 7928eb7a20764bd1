"""Memslots: ``kvm_set_memory_region()`` (``virt/kvm/kvm_main.c``), planned then committed.

The plan holds every check, in the kernel's order, and changes nothing; the snapshot loader
builds a VM's memslots through the same plan, so an import accepts exactly what the ioctl does.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from app.core import guest_memfd, views
from app.core.errors import EBUSY, EEXIST, EINVAL
from app.core.gfn_range import GfnRange, address_spaces, handle_gfn_range, unmap
from app.core.kvm import GuestMemfdFile, Kvm, Memslot
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


@dataclass
class MemslotPlan:
    """What a validated ``KVM_SET_USER_MEMORY_REGION2`` will do."""

    change: state.MemslotChange
    old: Memslot | None
    new: Memslot | None
    gmem: GuestMemfdFile | None = None


def plan_set_memory_region(
    kvm: Kvm, raw_slot: int, req: KvmUserspaceMemoryRegion2, fds: Mapping[int, GuestMemfdFile] | None = None
) -> MemslotPlan:
    """Every check of ``kvm_set_memory_region()``, in the kernel's order; changes nothing. ``fds``
    is the fd table ``req.guest_memfd`` is looked up in: the VM's open files, unless the snapshot
    loader hands its own."""
    spaces = kvm.spaces
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
        raise EINVAL(
            f"memory_size, guest_phys_addr and userspace_addr must be 4 KiB aligned "
            f"(memory_size {size:#x}, guest_phys_addr {gpa:#x}, userspace_addr {hva:#x})"
        )
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
        fd, off = req.guest_memfd, req.guest_memfd_offset
        gmem = guest_memfd.check_bind(kvm, kvm.gmem_files if fds is None else fds, fd, off, size)
        new.gmem_fd, new.gmem_offset = fd, off

    # kvm_arch_prepare_memory_region()
    max_gfn = kvm.host.max_gfn
    if base_gfn + npages - 1 > max_gfn:
        raise EINVAL(f"last gfn {base_gfn + npages - 1:#x} > max_gfn {max_gfn:#x}")
    if gmem is not None and kvm.linux and kvm.host.gmem_bind_split:  # kvm_gmem_commit_memory_region()
        guest_memfd.check_bind_overlap(kvm, gmem, req.guest_memfd_offset, size)
    return MemslotPlan(change, old, new, gmem)


def set_memory_region(kvm: Kvm, raw_slot: int, req: KvmUserspaceMemoryRegion2) -> state.MemslotUpdate:
    """``kvm_set_memory_region()``: plan (every check), then commit create/move/flags-only/delete."""
    plan = plan_set_memory_region(kvm, raw_slot, req)
    if plan.change == "none":
        return state.MemslotUpdate(change="none", memslot=views.memslot(plan.old) if plan.old else None, pages_zapped=0)
    if kvm.notifiers:
        # kvm_swap_active_memslots() would sleep until mn_active_invalidate_count is 0.
        raise EBUSY(f"{len(kvm.notifiers)} MMU-notifier invalidation(s) open; end them first")
    if plan.change == "create":
        kvm.take("a memslot")  # kzalloc() of the new slot
    old, new = plan.old, plan.new
    zapped = 0
    if old is not None and plan.change in ("delete", "move"):
        zapped = flush_shadow_memslot(kvm, old, plan.change)
    install(kvm, plan)
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
    return state.MemslotUpdate(change=plan.change, memslot=views.memslot(new) if new else None, pages_zapped=zapped)


def install(kvm: Kvm, plan: MemslotPlan) -> None:
    """``kvm_swap_active_memslots()`` with the bind or unbind it implies: the plan takes effect
    (a created slot was already taken from the service budget, a deleted one is given back)."""
    old, new = plan.old, plan.new
    if old is not None:
        kvm.spaces[old.as_id].remove(old)
        if plan.change == "delete":
            guest_memfd.unbind(kvm, old)
            kvm.budget.add(-1)
    if new is not None:
        kvm.spaces[new.as_id].add(new)
        if plan.gmem is not None:
            guest_memfd.bind(plan.gmem, new)


def flush_shadow_memslot(kvm: Kvm, old: Memslot, cause: str) -> int:
    """``kvm_arch_flush_shadow_memslot()``: with ``KVM_X86_QUIRK_SLOT_ZAP_ALL`` (on by default,
    honoured only for default VMs since 6.12) every mapping of the VM, else the old slot's;
    rfc-v9 predates the quirk, when the kernel always zapped everything."""
    zap_all = not kvm.linux or kvm.type is VmType.default
    ranges = address_spaces(kvm) if zap_all else [GfnRange(old.as_id, old, old.base_gfn, old.end_gfn)]
    walk = handle_gfn_range(kvm, ranges, lambda r: unmap(kvm, r, ZapFilter.ALL, "memslot_" + cause))
    return walk.zapped
