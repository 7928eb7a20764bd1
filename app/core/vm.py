"""``VirtualMachine``: the VM fd. One small locked method per simulated ioctl or event; the
behaviour lives in the concept modules (``attributes``, ``faults``, ``memslots``, ...)."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

from app.core import guest_memfd, in_place, mmu_notifier, sev, snapshot, steps, views
from app.core.attributes import Conversion
from app.core.budget import ServiceBudget
from app.core.errors import EINVAL, ENOENT, ENOTTY
from app.core.faults import Fault, prefault
from app.core.guest_memfd import Release
from app.core.ioctl import JOURNALED, locked, mutation
from app.core.journal import Journal
from app.core.kvm import PRIVATE, GuestMemfdFile, Kvm, Memslot, check_gpa_range
from app.core.limits import EngineLimits
from app.core.memslots import set_memory_region
from app.models import state
from app.models.host import HostProfile
from app.models.kvm import (
    FALLOC_FL_PUNCH_HOLE,
    FallocateRequest,
    FaultRequest,
    KvmCreateGuestMemfd,
    KvmEncRegion,
    KvmMemoryAttributes,
    KvmMemoryAttributes2,
    KvmUserspaceMemoryRegion2,
    MmapRequest,
    NotifierRequest,
    PrefaultRequest,
    Semantics,
    TouchRequest,
    VmType,
)
from app.models.snapshot import VmSnapshot


class VirtualMachine:
    """A VM fd: what ``KVM_CREATE_VM`` returned."""

    def __init__(self, kvm: Kvm) -> None:
        self.kvm = kvm
        self.id = kvm.id
        self.lock = threading.RLock()
        self.journal: Journal | None = None

    @classmethod
    def create(
        cls,
        vm_id: str,
        name: str | None,
        vm_type: VmType,
        semantics: Semantics,
        limits: EngineLimits,
        host: HostProfile,
        budget: ServiceBudget,
    ) -> VirtualMachine:
        """``KVM_CREATE_VM``: a fresh ``struct kvm``."""
        vm = cls(Kvm(vm_id, name, vm_type, semantics, limits, host, budget))
        vm.kvm.events.emit("vm_create", vm_type=vm_type.value, semantics=semantics.value, profile=host.name)
        return vm

    @locked
    def snapshot(self) -> VmSnapshot:
        """The VM's whole state as one versioned document."""
        return snapshot.dump(self.kvm)

    @property
    def nr_as(self) -> int:
        return self.kvm.nr_as

    # ------------------------------------------------------------------ state

    @locked
    def model(self) -> state.Vm:
        return views.vm(self.kvm)

    @locked
    def mmu_model(self) -> state.Mmu:
        return views.mmu(self.kvm)

    @locked
    def usage(self) -> dict[str, int]:
        """What /metrics sums over VMs."""
        return views.usage(self.kvm)

    def capabilities(self) -> dict[str, int]:
        """The ``KVM_CHECK_EXTENSION`` answers that differ on this VM's fd from /dev/kvm's."""
        kvm = self.kvm
        caps = kvm.host.caps
        return {
            "KVM_CAP_MULTI_ADDRESS_SPACE": kvm.nr_as if caps.KVM_CAP_MULTI_ADDRESS_SPACE else 0,
            # kvm_supported_vm_mem_attributes(); rfc-v9 has no such ioctl.
            "KVM_CAP_MEMORY_ATTRIBUTES": kvm.supported_attributes if kvm.linux and kvm.has_memory_attributes else 0,
            # kvm_supported_gmem_attributes(): in place, on VMs with private memory.
            "KVM_CAP_GUEST_MEMFD_MEMORY_ATTRIBUTES": PRIVATE if kvm.in_place and kvm.has_private_mem else 0,
            "KVM_CAP_GUEST_MEMFD": int(kvm.gmem_slots),
            "KVM_CAP_GUEST_MEMFD_FLAGS": guest_memfd.supported_flags(kvm),
            "KVM_CAP_READONLY_MEM": int(kvm.has_readonly_mem),
            "KVM_CAP_PRE_FAULT_MEMORY": caps.KVM_CAP_PRE_FAULT_MEMORY if kvm.linux else 0,
        }

    @locked
    def events_page(self, after: int, limit: int) -> tuple[list[dict[str, Any]], int | None]:
        """Events with id > ``after``, oldest first; the cursor is set when more remain."""
        return self.kvm.events.page(after, limit)

    # --------------------------------------------------------------- memslots

    @mutation
    def set_user_memory_region(self, raw_slot: int, req: KvmUserspaceMemoryRegion2) -> state.MemslotUpdate:
        """``KVM_SET_USER_MEMORY_REGION2``: create, move, flags-only, no-op or delete."""
        return set_memory_region(self.kvm, raw_slot, req)

    @mutation
    def delete_memslot(self, raw_slot: int) -> state.MemslotUpdate:
        """Delete an existing slot (``memory_size`` 0); ENOENT when absent."""
        slot = self._slot(raw_slot)
        req = KvmUserspaceMemoryRegion2(guest_phys_addr=0, memory_size=0, userspace_addr=slot.userspace_addr)
        return set_memory_region(self.kvm, raw_slot, req)

    @locked
    def memslot(self, raw_slot: int) -> state.Memslot:
        return views.memslot(self._slot(raw_slot))

    @locked
    def memslots(self) -> list[state.Memslot]:
        return [views.memslot(slot) for space in self.kvm.spaces for slot in space.by_gfn.values()]

    def _slot(self, raw_slot: int) -> Memslot:
        as_id, sid = raw_slot >> 16, raw_slot & 0xFFFF
        slot = self.kvm.spaces[as_id].by_id.get(sid) if as_id < self.kvm.nr_as else None
        if slot is None:
            raise ENOENT(f"no memslot {raw_slot:#x} (as_id {as_id}, id {sid})")
        return slot

    # ------------------------------------------------------------ guest_memfd

    @mutation
    def create_guest_memfd(self, req: KvmCreateGuestMemfd) -> state.GuestMemfd:
        """``KVM_CREATE_GUEST_MEMFD``."""
        return views.guest_memfd(guest_memfd.create(self.kvm, req.size, req.flags))

    @locked
    def guest_memfd(self, fd: int) -> state.GuestMemfd:
        return views.guest_memfd(self._gmem(fd))

    @locked
    def guest_memfds(self) -> list[state.GuestMemfd]:
        return [views.guest_memfd(g) for g in self.kvm.gmem_files.values()]

    @mutation
    def close_guest_memfd(self, fd: int) -> state.GuestMemfdClose:
        """``close(fd)`` on a guest_memfd: ``kvm_gmem_release()`` unless host mappings hold it."""
        return self._release(guest_memfd.close(self.kvm, fd))

    def _release(self, out: Release) -> state.GuestMemfdClose:
        return state.GuestMemfdClose(
            released=out.released, pages_zapped=out.pages_zapped, invalidated=out.invalidated, mmu=self.mmu_model()
        )

    @mutation
    def fallocate(self, fd: int, req: FallocateRequest) -> state.FallocateResult:
        """``fallocate()`` on a guest_memfd: ``kvm_gmem_allocate()`` or ``kvm_gmem_punch_hole()``."""
        kvm = self.kvm
        gmem = guest_memfd.check_fallocate(kvm, fd, req.mode, req.offset, req.len)
        if not req.mode & FALLOC_FL_PUNCH_HOLE:
            done = guest_memfd.allocate(kvm, gmem, req.offset, req.len)
            return state.FallocateResult(
                punch_hole=False,
                pages_allocated=done,
                pages_freed=0,
                invalidated=False,
                pages_zapped=0,
                mmu=self.mmu_model(),
            )
        punch = guest_memfd.PunchHole(kvm, gmem, req.offset, req.len)
        steps.run(punch.steps())
        return state.FallocateResult(
            punch_hole=True,
            pages_allocated=0,
            pages_freed=punch.freed,
            invalidated=punch.invalidated,
            pages_zapped=punch.zapped,
            mmu=self.mmu_model(),
        )

    @mutation
    def set_gmem_attributes(self, fd: int, req: KvmMemoryAttributes2) -> state.GmemAttributeUpdate:
        """``KVM_SET_MEMORY_ATTRIBUTES2`` on a guest_memfd (in place, 7.4)."""
        gmem = in_place.check(self.kvm, fd, req)
        conv = in_place.GmemConversion(self.kvm, gmem, req.offset, req.size, req.attributes)
        steps.run(conv.steps())
        return state.GmemAttributeUpdate(
            fd=fd,
            offset=req.offset,
            size=req.size,
            attributes=req.attributes,
            noop=conv.noop,
            invalidated=conv.invalidated,
            pages_zapped=conv.zapped,
            tlb_flushed=conv.flushed,
            mmu=self.mmu_model(),
        )

    @locked
    def file_runs(self, fd: int, start: int, end: int, limit: int) -> tuple[list[state.FileRun], int | None]:
        """Which pages of a guest_memfd have a folio, as runs."""
        return views.file_runs(self._gmem(fd), start, end, limit)

    def _gmem(self, fd: int) -> GuestMemfdFile:
        gmem = self.kvm.gmem_files.get(fd)
        if gmem is None:
            raise ENOENT(f"no open guest_memfd {fd}")
        return gmem

    # ------------------------------------------------------------ the host process

    @mutation
    def mmap(self, fd: int, req: MmapRequest) -> state.HostMapping:
        """``mmap()`` of a guest_memfd by the host process (``kvm_gmem_mmap()``)."""
        m = guest_memfd.mmap(self.kvm, fd, req.offset, req.length, req.shared)
        return views.host_mapping(self.kvm, m)

    @mutation
    def munmap(self, mapping_id: int) -> state.GuestMemfdClose:
        """``munmap()``: the last reference to a closed file releases it."""
        return self._release(guest_memfd.munmap(self.kvm, mapping_id))

    @mutation
    def touch(self, mapping_id: int, req: TouchRequest) -> state.HostTouch:
        """The host reads or writes through a mapping (``kvm_gmem_fault_user_mapping()``)."""
        t = guest_memfd.touch(self.kvm, mapping_id, req.offset, req.size, req.write)
        return state.HostTouch(pages=t.pages, allocated_pages=t.allocated)

    @mutation
    def pin(self, mapping_id: int, req: TouchRequest) -> state.HostPin:
        """``pin_user_pages()`` through a mapping: the pages stay held until unpinned."""
        pin_id = guest_memfd.pin(self.kvm, mapping_id, req.offset, req.size)
        return views.host_pin(self.kvm, pin_id)

    @mutation
    def unpin(self, pin_id: int) -> state.GuestMemfdClose:
        """``unpin_user_pages()``: the last reference to a closed, unmapped file releases it."""
        return self._release(guest_memfd.unpin(self.kvm, pin_id))

    @locked
    def host_pins(self) -> list[state.HostPin]:
        return [views.host_pin(self.kvm, p) for p in self.kvm.host_pins]

    @locked
    def host_pin(self, pin_id: int) -> state.HostPin:
        if pin_id not in self.kvm.host_pins:
            raise ENOENT(f"no pin {pin_id}")
        return views.host_pin(self.kvm, pin_id)

    @locked
    def host_mappings(self) -> list[state.HostMapping]:
        return [views.host_mapping(self.kvm, m) for m in self.kvm.host_mappings.values()]

    @locked
    def host_mapping(self, mapping_id: int) -> state.HostMapping:
        m = self.kvm.host_mappings.get(mapping_id)
        if m is None:
            raise ENOENT(f"no host mapping {mapping_id}")
        return views.host_mapping(self.kvm, m)

    # ------------------------------------------------------------- attributes

    @mutation
    def memory_encrypt_reg_region(self, region: KvmEncRegion) -> state.AttributeUpdate | state.SevRegionUpdate:
        """``KVM_MEMORY_ENCRYPT_REG_REGION``: rfc-v9 GPA "make private", or SEV HVA pinning."""
        return self._enc_region(region, register=True)

    @mutation
    def memory_encrypt_unreg_region(self, region: KvmEncRegion) -> state.AttributeUpdate | state.SevRegionUpdate:
        """``KVM_MEMORY_ENCRYPT_UNREG_REGION``: rfc-v9 GPA "make shared", or SEV HVA unpinning."""
        return self._enc_region(region, register=False)

    def _enc_region(self, region: KvmEncRegion, register: bool) -> state.AttributeUpdate | state.SevRegionUpdate:
        kvm = self.kvm
        if kvm.sev_guest:
            (sev.register_region if register else sev.unregister_region)(kvm, region.addr, region.size)
            return state.SevRegionUpdate(
                region=state.EncRegion(addr=region.addr, size=region.size), pinned_regions=len(kvm.pinned)
            )
        if kvm.linux or not kvm.has_private_mem:
            hint = f"; this VM converts with {kvm.converts_with}" if kvm.linux and kvm.has_private_mem else ""
            raise ENOTTY(f"KVM_MEMORY_ENCRYPT_{'REG' if register else 'UNREG'}_REGION: not an SEV VM{hint}")
        start, end = check_gpa_range(region.addr, region.size)
        conv = Conversion(kvm, start, end, PRIVATE if register else 0)
        steps.run(conv.rfc_v9())
        return self._update(conv)

    @locked
    def pinned_regions(self) -> list[state.EncRegion]:
        return [state.EncRegion(addr=a, size=s) for a, s in self.kvm.pinned]

    @mutation
    def set_memory_attributes(self, req: KvmMemoryAttributes) -> state.AttributeUpdate:
        """``KVM_SET_MEMORY_ATTRIBUTES``: ``kvm_vm_ioctl_set_mem_attributes()`` (linux only)."""
        kvm = self.kvm
        if not kvm.linux:
            raise ENOTTY(
                f"KVM_SET_MEMORY_ATTRIBUTES does not exist under rfc-v9: this VM converts with {kvm.converts_with}, "
                "or create it with semantics linux"
            )
        if not kvm.has_memory_attributes:
            raise ENOTTY(f"KVM_SET_MEMORY_ATTRIBUTES: host profile {kvm.host.name} has no KVM_CAP_MEMORY_ATTRIBUTES")
        if req.flags != 0:
            raise EINVAL("flags must be 0")
        supported = kvm.supported_attributes
        if req.attributes & ~supported:
            in_place = kvm.in_place and kvm.has_private_mem
            hint = f"; host profile {kvm.host.name} converts in place, with {kvm.converts_with}" if in_place else ""
            raise EINVAL(f"attributes {req.attributes:#x} not supported by this VM (supported: {supported:#x}){hint}")
        start, end = check_gpa_range(req.address, req.size)
        conv = Conversion(kvm, start, end, req.attributes)
        steps.run(conv.linux())
        return self._update(conv)

    def _update(self, conv: Conversion) -> state.AttributeUpdate:
        return state.AttributeUpdate(
            start_gfn=conv.start,
            end_gfn=conv.end,
            attributes=conv.value,
            noop=conv.noop,
            invalidated=conv.invalidated,
            pages_zapped=conv.zapped,
            tlb_flushed=conv.flushed,
            mmu=self.mmu_model(),
        )

    @locked
    def attribute_runs(self, start: int, end: int, limit: int) -> tuple[list[state.AttributeRun], int | None]:
        """Maximal attribute runs covering ``[start, end)``."""
        return views.attribute_runs(self.kvm, start, end, limit)

    @locked
    def mapping_runs(self, as_id: int, start: int, end: int, limit: int) -> tuple[list[state.MappingRun], int | None]:
        """Maximal runs of present SPTEs of one address space in ``[start, end)``."""
        return views.mapping_runs(self.kvm, as_id, start, end, limit)

    @locked
    def memory_map(self, start: int, end: int, buckets: int) -> state.MemoryMap:
        """Per-bucket counts of private, memslot-backed, mapped and allocated guest_memfd pages over
        ``[start, end)``."""
        return views.memory_map(self.kvm, start, end, buckets)

    @locked
    def gfn_info(self, gfn: int) -> state.GfnInfo:
        """Attributes, memslots and mappings of one gfn."""
        return views.gfn_info(self.kvm, gfn)

    # ------------------------------------------------------ guest and host activity

    @mutation
    def fault(self, req: FaultRequest) -> state.FaultResult:
        """One EPT/NPT violation, its three steps back to back."""
        f = Fault(self.kvm, req.as_id, req.gpa, write=req.write, private=req.private, mmu_seq=req.mmu_seq)
        steps.run(f.steps())
        return f.result()

    @mutation
    def prefault(self, req: PrefaultRequest) -> state.PrefaultResult:
        """``KVM_PRE_FAULT_MEMORY``."""
        return prefault(self.kvm, req.gpa, req.size, req.as_id)

    @mutation
    def notifier_start(self, req: NotifierRequest) -> state.NotifierStart:
        """``kvm_mmu_notifier_invalidate_range_start()``."""
        inv, zapped = mmu_notifier.invalidate_range_start(self.kvm, req.hva_start, req.hva_end)
        return state.NotifierStart(
            id=inv.id, gfn_ranges=views.notifier(inv).gfn_ranges, pages_zapped=zapped, mmu=self.mmu_model()
        )

    @mutation
    def notifier_end(self, inv_id: int) -> state.NotifierEnd:
        """``kvm_mmu_notifier_invalidate_range_end()``."""
        mmu_notifier.invalidate_range_end(self.kvm, inv_id)
        return state.NotifierEnd(mmu=self.mmu_model())

    @locked
    def open_notifiers(self) -> list[state.NotifierInvalidation]:
        return [views.notifier(inv) for inv in self.kvm.notifiers.values()]

    # -------------------------------------------------------- fault injection

    @mutation
    def set_fault_injection(self, fail_nth: int | None) -> state.FaultInjectionState:
        if fail_nth is not None and fail_nth < 1:
            raise EINVAL("fail_nth must be >= 1 (or null to disarm)")
        self.kvm.fail_nth = fail_nth
        return state.FaultInjectionState(fail_nth=fail_nth)

    @locked
    def fault_injection(self) -> state.FaultInjectionState:
        return state.FaultInjectionState(fail_nth=self.kvm.fail_nth)


OPERATIONS: dict[str, Callable[..., object]] = {name: getattr(VirtualMachine, name) for name in JOURNALED}
"""The journaled ioctls by name: what a journal row may replay."""
