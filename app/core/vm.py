"""One virtual machine: ``struct kvm`` with its memslots, attributes, SPTEs and
MMU invalidation state, and one typed method per simulated ioctl or event."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from functools import wraps
from itertools import islice
from typing import Any, Concatenate, ParamSpec, TypeVar

from app.core.errors import EBUSY, EINVAL, ENOENT, ENOMEM, ENOTTY
from app.core.events import EventLog
from app.core.invalidation import MmuInvalidation
from app.core.journal import Journal
from app.core.memslots import AddressSpace, GuestMemfdFile, Memslot, plan_set_memory_region
from app.core.mmu import UNMAPPED, Mmu, ZapFilter, spte, spte_private, spte_writable
from app.core.runs import RunMap
from app.models import state
from app.models.kvm import (
    GFN_LIMIT,
    GUEST_MEMFD_FLAG_INIT_SHARED,
    GUEST_MEMFD_FLAG_MMAP,
    KVM_MEMORY_ATTRIBUTE_PRIVATE,
    KVM_MEMORY_EXIT_FLAG_PRIVATE,
    PAGE_SHIFT,
    PAGE_SIZE,
    U64_MAX,
    FaultRequest,
    KvmCreateGuestMemfd,
    KvmEncRegion,
    KvmMemoryAttributes,
    KvmUserspaceMemoryRegion2,
    NotifierRequest,
    PrefaultRequest,
    Semantics,
    VmType,
)

PRIVATE = KVM_MEMORY_ATTRIBUTE_PRIVATE


@dataclass
class VmLimits:
    """Per-VM bounds; exceeding a budget fails like an accounted allocation (ENOMEM)."""

    max_gfn: int
    max_attribute_runs: int
    max_mapping_runs: int
    max_events: int


@dataclass
class Stats:
    attribute_updates: int = 0
    tlb_flushes: int = 0
    pages_zapped: int = 0
    faults: int = 0
    fault_retries: int = 0
    memory_fault_exits: int = 0
    mmio_exits: int = 0


@dataclass
class NotifierInvalidation:
    id: int
    hva_start: int
    hva_end: int
    gfn_ranges: list[tuple[int, int, int]]

    def model(self) -> state.NotifierInvalidation:
        return state.NotifierInvalidation(
            id=self.id, hva_start=self.hva_start, hva_end=self.hva_end, gfn_ranges=_gfn_ranges(self.gfn_ranges)
        )


def _gfn_ranges(ranges: Iterable[tuple[int, int, int]]) -> list[state.GfnRange]:
    return [state.GfnRange(as_id=a, start_gfn=s, end_gfn=e) for a, s, e in ranges]


def check_gpa_range(addr: int, size: int) -> tuple[int, int]:
    """The common range checks: non-empty, no u64 wrap, 4 KiB aligned -> ``[start, end)`` gfns."""
    if size == 0:
        raise EINVAL("size must not be 0")
    if addr + size > U64_MAX:
        raise EINVAL("address + size wraps past 2^64")
    if addr % PAGE_SIZE or size % PAGE_SIZE:
        raise EINVAL("address and size must be 4 KiB aligned")
    return addr >> PAGE_SHIFT, (addr + size) >> PAGE_SHIFT


def page_of_runs(runs: Iterator[Any], limit: int, end_of: Callable[[Any], int]) -> tuple[list[Any], int | None]:
    """Take ``limit`` items; the cursor is the end of the last one exactly when more remain."""
    out = list(islice(runs, limit + 1))
    if len(out) > limit:
        out = out[:limit]
        return out, end_of(out[-1])
    return out, None


P = ParamSpec("P")
R = TypeVar("R")


def locked(method: Callable[Concatenate[VirtualMachine, P], R]) -> Callable[Concatenate[VirtualMachine, P], R]:
    """Every operation is atomic: slots_lock and mmu_lock rolled into one per-VM lock."""

    @wraps(method)
    def wrapper(self: VirtualMachine, /, *args: P.args, **kwargs: P.kwargs) -> R:
        with self.lock:
            return method(self, *args, **kwargs)

    return wrapper


def mutation(method: Callable[Concatenate[VirtualMachine, P], R]) -> Callable[Concatenate[VirtualMachine, P], R]:
    """A state-changing ioctl: atomic, and written ahead to the journal (if any) in call order.

    Failed calls are journaled too: some failures change state the kernel way (the rfc-v9
    rollback bumps the seq, faults count), and replay reproduces the same failure.
    """
    name = method.__name__

    @wraps(method)
    def wrapper(self: VirtualMachine, /, *args: P.args, **kwargs: P.kwargs) -> R:
        if kwargs:
            raise TypeError(f"{name}() takes positional arguments only, so the journal can replay it")
        with self.lock:
            if self.journal is not None:
                self.journal.record(self.id, name, args)
            return method(self, *args, **kwargs)  # kwargs is empty: checked above

    return wrapper


class VirtualMachine:
    """``struct kvm``: what one VM fd controls."""

    def __init__(self, vm_id: str, name: str | None, vm_type: VmType, semantics: Semantics, limits: VmLimits) -> None:
        self.id, self.name, self.type, self.semantics, self.limits = vm_id, name, vm_type, semantics, limits
        self.lock = threading.RLock()
        self.linux = semantics is Semantics.linux
        self.has_private_mem = vm_type.has_private_mem
        # kvm_arch_nr_memslot_as_ids(): since 6.8 private-memory VMs have no SMM space.
        self.nr_as = 1 if self.linux and self.has_private_mem else 2
        # sev_guest(): under rfc-v9 an SNP VM has private memory and takes the GPA path.
        self.sev_guest = vm_type in (VmType.sev, VmType.sev_es) or (self.linux and vm_type is VmType.snp)
        # rfc-v9 stored only shared gfns: private by default on private-memory VMs.
        default = PRIVATE if not self.linux and self.has_private_mem else 0
        self.attributes = RunMap(GFN_LIMIT, default)
        self.spaces = [AddressSpace() for _ in range(self.nr_as)]
        self.mmu = Mmu(self.nr_as)
        self.inval = MmuInvalidation()
        self.stats = Stats()
        self.events = EventLog(limits.max_events)
        self.gmem_files: dict[int, GuestMemfdFile] = {}
        self.next_fd = 3
        self.pinned: list[tuple[int, int]] = []
        self.notifiers: dict[int, NotifierInvalidation] = {}
        self.next_notifier_id = 1
        self.fail_nth: int | None = None
        self.journal: Journal | None = None
        self.events.emit("vm_create", vm_type=vm_type.value, semantics=semantics.value)

    # ------------------------------------------------------------------ state

    @locked
    def model(self) -> state.Vm:
        return state.Vm(
            id=self.id,
            name=self.name,
            type=self.type,
            type_value=self.type.value_code,
            semantics=self.semantics,
            has_private_mem=self.has_private_mem,
            address_spaces=self.nr_as,
            memslot_count=sum(len(s) for s in self.spaces),
            mmu=self.mmu_model(),
        )

    @locked
    def mmu_model(self) -> state.Mmu:
        inv = self.inval
        return state.Mmu(
            mmu_invalidate_seq=inv.seq,
            mmu_invalidate_in_progress=inv.in_progress,
            mmu_invalidate_range_start=inv.range_start,
            mmu_invalidate_range_end=inv.range_end,
            mapped_pages=self.mmu.mapped_pages,
            open_notifier_invalidations=len(self.notifiers),
            stats=vars(self.stats),  # a dict validates in Rust, cheaper than building a model
        )

    def capabilities(self) -> dict[str, int]:
        """The ``KVM_CHECK_EXTENSION`` answers that differ on this VM's fd from /dev/kvm's."""
        return {
            "KVM_CAP_MULTI_ADDRESS_SPACE": self.nr_as,
            # kvm_supported_mem_attributes(); rfc-v9 has no such ioctl.
            "KVM_CAP_MEMORY_ATTRIBUTES": PRIVATE if self.linux and self.has_private_mem else 0,
            "KVM_CAP_GUEST_MEMFD": 1 if self.linux or self.has_private_mem else 0,
        }

    # --------------------------------------------------------------- memslots

    @mutation
    def set_user_memory_region(self, raw_slot: int, req: KvmUserspaceMemoryRegion2) -> state.MemslotUpdate:
        """``KVM_SET_USER_MEMORY_REGION2``: create, move, flags-only, no-op or delete."""
        return self._set_user_memory_region(raw_slot, req)

    def _set_user_memory_region(self, raw_slot: int, req: KvmUserspaceMemoryRegion2) -> state.MemslotUpdate:
        plan = plan_set_memory_region(
            raw_slot=raw_slot,
            req=req,
            spaces=self.spaces,
            gmem_files=self.gmem_files,
            gmem_allowed=self.linux or self.has_private_mem,
            max_gfn=self.limits.max_gfn,
        )
        if plan.change == "none":
            return state.MemslotUpdate(change="none", memslot=plan.old.model() if plan.old else None, pages_zapped=0)
        if self.notifiers:
            # kvm_swap_active_memslots() would sleep until mn_active_invalidate_count is 0.
            raise EBUSY(f"{len(self.notifiers)} MMU-notifier invalidation(s) open; end them first")
        old, new = plan.old, plan.new
        space = self.spaces[raw_slot >> 16]
        zapped = 0
        if old is not None and plan.change in ("delete", "move"):
            # kvm_arch_flush_shadow_memslot(): zap everything the old slot mapped.
            zapped = self._zap(old.as_id, old.base_gfn, old.end_gfn, ZapFilter.ALL, "memslot_" + plan.change)
            self._flush_if(zapped)
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
        self.events.emit(
            "memslot",
            change=plan.change,
            slot=target.slot,
            base_gfn=target.base_gfn,
            npages=target.npages,
            flags=target.flags,
            pages_zapped=zapped,
        )
        return state.MemslotUpdate(change=plan.change, memslot=new.model() if new else None, pages_zapped=zapped)

    @mutation
    def delete_memslot(self, raw_slot: int) -> state.MemslotUpdate:
        """Delete an existing slot (``memory_size`` 0); ENOENT when absent."""
        slot = self._slot(raw_slot)
        req = KvmUserspaceMemoryRegion2(guest_phys_addr=0, memory_size=0, userspace_addr=slot.userspace_addr)
        return self._set_user_memory_region(raw_slot, req)

    @locked
    def memslot(self, raw_slot: int) -> state.Memslot:
        return self._slot(raw_slot).model()

    @locked
    def memslots(self) -> list[state.Memslot]:
        return [slot.model() for space in self.spaces for slot in space.by_gfn.values()]

    def _slot(self, raw_slot: int) -> Memslot:
        as_id, sid = raw_slot >> 16, raw_slot & 0xFFFF
        slot = self.spaces[as_id].by_id.get(sid) if as_id < self.nr_as else None
        if slot is None:
            raise ENOENT(f"no memslot {raw_slot:#x} (as_id {as_id}, id {sid})")
        return slot

    # ------------------------------------------------------------ guest_memfd

    @mutation
    def create_guest_memfd(self, req: KvmCreateGuestMemfd) -> state.GuestMemfd:
        """``KVM_CREATE_GUEST_MEMFD``."""
        supported = GUEST_MEMFD_FLAG_MMAP | GUEST_MEMFD_FLAG_INIT_SHARED if self.linux else 0
        if req.flags & ~supported:
            raise EINVAL(f"guest_memfd flags {req.flags:#x} outside {supported:#x}")
        if req.size == 0 or req.size % PAGE_SIZE:
            raise EINVAL("guest_memfd size must be a non-zero multiple of 4 KiB")
        gmem = GuestMemfdFile(self.next_fd, req.size, req.flags)
        self.next_fd += 1
        self.gmem_files[gmem.fd] = gmem
        self.events.emit("guest_memfd_create", fd=gmem.fd, size=gmem.size, flags=gmem.flags)
        return gmem.model()

    @locked
    def guest_memfd(self, fd: int) -> state.GuestMemfd:
        return self._gmem(fd).model()

    @locked
    def guest_memfds(self) -> list[state.GuestMemfd]:
        return [g.model() for g in self.gmem_files.values()]

    @mutation
    def close_guest_memfd(self, fd: int) -> None:
        """``close(fd)``: bound slots keep the file alive, but the fd can no longer be named."""
        self._gmem(fd)
        del self.gmem_files[fd]
        self.events.emit("guest_memfd_close", fd=fd)

    def _gmem(self, fd: int) -> GuestMemfdFile:
        gmem = self.gmem_files.get(fd)
        if gmem is None:
            raise ENOENT(f"no open guest_memfd {fd}")
        return gmem

    # ------------------------------------------------------------- attributes

    @mutation
    def memory_encrypt_reg_region(self, region: KvmEncRegion) -> state.AttributeUpdate | state.SevRegionUpdate:
        """``KVM_MEMORY_ENCRYPT_REG_REGION``: rfc-v9 GPA "make private", or SEV HVA pinning."""
        return self._enc_region(region, register=True)

    @mutation
    def memory_encrypt_unreg_region(self, region: KvmEncRegion) -> state.AttributeUpdate | state.SevRegionUpdate:
        """``KVM_MEMORY_ENCRYPT_UNREG_REGION``: rfc-v9 GPA "make shared", or SEV HVA unpinning."""
        return self._enc_region(region, register=False)

    @locked
    def pinned_regions(self) -> list[state.EncRegion]:
        return [state.EncRegion(addr=a, size=s) for a, s in self.pinned]

    @mutation
    def set_memory_attributes(self, req: KvmMemoryAttributes) -> state.AttributeUpdate:
        """``KVM_SET_MEMORY_ATTRIBUTES``: ``kvm_vm_ioctl_set_mem_attributes()`` (linux only)."""
        if not self.linux:
            raise ENOTTY("KVM_SET_MEMORY_ATTRIBUTES does not exist under rfc-v9")
        if req.flags != 0:
            raise EINVAL("flags must be 0")
        supported = PRIVATE if self.has_private_mem else 0
        if req.attributes & ~supported:
            raise EINVAL(f"attributes {req.attributes:#x} not supported by this VM (supported: {supported:#x})")
        start, end = check_gpa_range(req.address, req.size)
        return self._linux_set_attributes(start, end, req.attributes)

    def _enc_region(self, region: KvmEncRegion, register: bool) -> state.AttributeUpdate | state.SevRegionUpdate:
        if self.sev_guest:
            return self._sev_region(region, register)
        if self.linux or not self.has_private_mem:
            raise ENOTTY(f"KVM_MEMORY_ENCRYPT_{'REG' if register else 'UNREG'}_REGION: not an SEV VM")
        start, end = check_gpa_range(region.addr, region.size)
        return self._rfc_v9_set_attributes(start, end, PRIVATE if register else 0)

    def _sev_region(self, region: KvmEncRegion, register: bool) -> state.SevRegionUpdate:
        """``sev_mem_enc_{register,unregister}_region()``: pin or unpin an HVA range."""
        key = (region.addr, region.size)
        if register:
            if region.size == 0 or region.addr + region.size > U64_MAX:
                raise EINVAL("size 0 or addr + size wraps")
            self.pinned.append(key)
        else:
            if key not in self.pinned:
                raise EINVAL("no pinned region with exactly this addr and size")
            self.pinned.remove(key)
        self.events.emit("sev_region", op="reg" if register else "unreg", addr=region.addr, size=region.size)
        return state.SevRegionUpdate(
            region=state.EncRegion(addr=region.addr, size=region.size), pinned_regions=len(self.pinned)
        )

    def _take_allocation_failure(self, npages: int, value: int, start: int, end: int) -> int | None:
        """Consume an armed fail-nth and apply the run budget: the failing allocation's index, or None."""
        nth, self.fail_nth = self.fail_nth, None
        if nth is not None and nth <= npages:
            return nth
        if self.attributes.exceeds_after_assign(start, end, value, self.limits.max_attribute_runs):
            # The budget runs out part way; which entry fails does not change the outcome.
            return npages
        return None

    def _rfc_v9_set_attributes(self, start: int, end: int, value: int) -> state.AttributeUpdate:
        """v9 ``kvm_vm_ioctl_set_encrypted_region()``, with its review's rollback fixes."""
        inv = self.inval
        inv.begin()
        inv.range_add(start, end)
        self.events.emit("invalidate_begin", in_progress=inv.in_progress, start_gfn=start, end_gfn=end)
        failed = self._take_allocation_failure(end - start, value, start, end)
        if failed is not None:
            # Stores of [start, start + failed - 1) happened; put back exactly what they replaced.
            self.events.emit("attributes_store_failed", start_gfn=start, end_gfn=end, failed_gfn=start + failed - 1)
            self.events.emit("attributes_rollback", start_gfn=start, end_gfn=start + failed - 1)
            self._invalidate_end()  # racing faults must still retry
            raise ENOMEM(f"attribute store {failed} of {end - start} failed; restored the previous attributes")
        self.attributes.assign(start, end, value)
        self.events.emit("attributes_store", start_gfn=start, end_gfn=end, attributes=value)
        zapped = sum(
            self._zap(as_id, s, e, ZapFilter.ALL, "attributes") for as_id, _, s, e in self._intersections(start, end)
        )
        flushed = self._flush_if(zapped)
        self._invalidate_end()
        self.stats.attribute_updates += 1
        return self._update(start, end, value, noop=False, invalidated=True, zapped=zapped, flushed=flushed)

    def _linux_set_attributes(self, start: int, end: int, value: int) -> state.AttributeUpdate:
        """``kvm_vm_set_mem_attributes()``."""
        if self.attributes.is_uniform(start, end, value):
            self.stats.attribute_updates += 1
            self.events.emit("attributes_noop", start_gfn=start, end_gfn=end, attributes=value)
            return self._update(start, end, value, noop=True, invalidated=False, zapped=0, flushed=False)
        failed = self._take_allocation_failure(end - start, value, start, end)
        if failed is not None:
            self.events.emit("attributes_reserve_failed", start_gfn=start, end_gfn=end, failed_gfn=start + failed - 1)
            raise ENOMEM(f"xa_reserve {failed} of {end - start} failed; nothing changed")
        inv = self.inval
        hits = list(self._intersections(start, end))
        # kvm_pre_set_memory_attributes(): unmap only the opposite kind of mapping.
        opposite = ZapFilter.SHARED if value & PRIVATE else ZapFilter.PRIVATE
        zapped = 0
        for i, (as_id, _, s, e) in enumerate(hits):
            if i == 0:
                inv.begin()
                self.events.emit("invalidate_begin", in_progress=inv.in_progress)
            inv.range_add(s, e)
            self.events.emit("invalidate_range_add", as_id=as_id, start_gfn=s, end_gfn=e)
            zapped += self._zap(as_id, s, e, opposite, "attributes")
        flushed = self._flush_if(zapped)
        self.attributes.assign(start, end, value)
        self.events.emit("attributes_store", start_gfn=start, end_gfn=end, attributes=value)
        if hits:
            self._invalidate_end()
        self.stats.attribute_updates += 1
        return self._update(start, end, value, noop=False, invalidated=bool(hits), zapped=zapped, flushed=flushed)

    def _update(
        self, start: int, end: int, value: int, *, noop: bool, invalidated: bool, zapped: int, flushed: bool
    ) -> state.AttributeUpdate:
        return state.AttributeUpdate(
            start_gfn=start,
            end_gfn=end,
            attributes=value,
            noop=noop,
            invalidated=invalidated,
            pages_zapped=zapped,
            tlb_flushed=flushed,
            mmu=self.mmu_model(),
        )

    @locked
    def attribute_runs(self, start: int, end: int, limit: int) -> tuple[list[state.AttributeRun], int | None]:
        """Maximal attribute runs covering ``[start, end)``."""
        runs = (
            state.AttributeRun(start_gfn=s, end_gfn=e, attributes=v, private=bool(v & PRIVATE))
            for s, e, v in self.attributes.runs(start, end)
        )
        return page_of_runs(runs, limit, lambda r: r.end_gfn)

    @locked
    def mapping_runs(self, as_id: int, start: int, end: int, limit: int) -> tuple[list[state.MappingRun], int | None]:
        """Maximal runs of present SPTEs of one address space in ``[start, end)``."""
        self._check_as(as_id)
        runs = (
            state.MappingRun(as_id=as_id, start_gfn=s, end_gfn=e, private=spte_private(v), writable=spte_writable(v))
            for s, e, v in self.mmu.mapped_runs(as_id, start, end)
        )
        return page_of_runs(runs, limit, lambda r: r.end_gfn)

    @locked
    def gfn_info(self, gfn: int) -> state.GfnInfo:
        attrs = self.attributes.value_at(gfn)
        slots, maps = [], []
        for as_id, space in enumerate(self.spaces):
            slot = space.find(gfn)
            if slot is not None:
                slots.append(state.GfnMemslotRef(as_id=as_id, slot=slot.slot, id=slot.id))
            v = self.mmu.lookup(as_id, gfn)
            if v != UNMAPPED:
                maps.append(state.GfnMapping(as_id=as_id, private=spte_private(v), writable=spte_writable(v)))
        return state.GfnInfo(
            gfn=gfn,
            gpa=gfn << PAGE_SHIFT,
            attributes=attrs,
            private=bool(attrs & PRIVATE),
            memslots=slots,
            mappings=maps,
        )

    # ------------------------------------------------------------ fault path

    @mutation
    def fault(self, req: FaultRequest) -> state.FaultResult:
        """One EPT/NPT violation: ``kvm_mmu_page_fault()`` -> ``kvm_mmu_faultin_pfn()`` -> ``is_page_fault_stale()``."""
        self._check_as(req.as_id)
        gfn = req.gpa >> PAGE_SHIFT
        attr_private = bool(self.attributes.value_at(gfn) & PRIVATE)
        private = attr_private if req.private is None else req.private
        snapshot = self.inval.seq if req.mmu_seq is None else req.mmu_seq
        slot = self.spaces[req.as_id].find(gfn)
        exit_: state.MemoryFaultExit | state.MmioExit | None = None
        reason: str | None = None
        if private != attr_private or (private and (slot is None or not slot.is_gmem)):
            outcome: state.FaultOutcome = "memory_fault_exit"
            exit_ = state.MemoryFaultExit(
                flags=KVM_MEMORY_EXIT_FLAG_PRIVATE if private else 0,
                gpa=gfn << PAGE_SHIFT,
                size=PAGE_SIZE,
            )
        elif slot is None or (req.write and not slot.writable(True)):
            outcome = "mmio_exit"
            exit_ = state.MmioExit(gpa=req.gpa, is_write=req.write)
        else:
            reason = self.inval.retry_reason(gfn, snapshot)
            outcome = "retry" if reason else "mapped"
        if outcome == "mapped":
            assert slot is not None
            present = self.mmu.lookup(req.as_id, gfn)
            if present == UNMAPPED:
                self._map(req.as_id, gfn, gfn + 1, spte(private, slot.writable(req.write)))
            elif req.write and not spte_writable(present) and slot.writable(True):
                # fast_page_fault(): a write to a write-protected SPTE (dirty logging) makes it writable.
                self._map(req.as_id, gfn, gfn + 1, spte(spte_private(present), True))
        self.stats.faults += 1
        if outcome == "retry":
            self.stats.fault_retries += 1
        elif outcome == "memory_fault_exit":
            self.stats.memory_fault_exits += 1
        elif outcome == "mmio_exit":
            self.stats.mmio_exits += 1
        self.events.emit(
            "fault", as_id=req.as_id, gfn=gfn, private=private, write=req.write, outcome=outcome, retry_reason=reason
        )
        return state.FaultResult(
            outcome=outcome,
            gfn=gfn,
            as_id=req.as_id,
            private=private,
            mmu_seq=snapshot,
            retry_reason=reason,
            exit=exit_,
        )

    @mutation
    def prefault(self, req: PrefaultRequest) -> state.PrefaultResult:
        """``KVM_PRE_FAULT_MEMORY``: map every page a fault would map now; not counted as faults."""
        start, end = check_gpa_range(req.gpa, req.size)
        self._check_as(req.as_id)
        plan: list[tuple[int, int, int]] = []
        already = 0
        for _, slot, s, e in self._intersections(start, end, as_ids=(req.as_id,)):
            for rs, re, attrs in self.attributes.runs(s, e):
                private = bool(attrs & PRIVATE)
                if private and not slot.is_gmem:
                    continue
                for a, b in self._outside_invalidation(rs, re):
                    for ms, me, v in self.mmu.spaces[req.as_id].runs(a, b):
                        if v == UNMAPPED:
                            plan.append((ms, me, spte(private, slot.writable(False))))
                        else:
                            already += me - ms
        newly = sum(e - s for s, e, _ in plan)
        before = list(self.mmu.spaces[req.as_id].runs(start, end))
        for s, e, v in plan:
            self.mmu.set(req.as_id, s, e, v)
        if self.mmu.runs() > self.limits.max_mapping_runs:
            for s, e, v in before:  # through Mmu.set, so mapped_pages is restored too
                self.mmu.set(req.as_id, s, e, v)
            raise ENOMEM(f"mapping runs would exceed the per-VM budget ({self.limits.max_mapping_runs})")
        self.events.emit("prefault", as_id=req.as_id, start_gfn=start, end_gfn=end, mapped=newly, already=already)
        return state.PrefaultResult(
            mapped_pages=newly, already_mapped_pages=already, skipped_pages=end - start - newly - already
        )

    def _outside_invalidation(self, start: int, end: int) -> list[tuple[int, int]]:
        """Parts of ``[start, end)`` a fault would not retry on right now."""
        inv = self.inval
        if inv.in_progress == 0 or inv.range_start is None or inv.range_end is None:
            return [(start, end)]
        parts = [(start, min(end, inv.range_start)), (max(start, inv.range_end), end)]
        return [(a, b) for a, b in parts if a < b]

    def _map(self, as_id: int, start: int, end: int, value: int) -> None:
        """Install one fault's SPTE(s), failing with ENOMEM past the mapping-run budget."""
        space = self.mmu.spaces[as_id]
        others = self.mmu.runs() - len(space)
        if space.exceeds_after_assign(start, end, value, self.limits.max_mapping_runs - others):
            raise ENOMEM(f"mapping runs would exceed the per-VM budget ({self.limits.max_mapping_runs})")
        self.mmu.set(as_id, start, end, value)

    # ------------------------------------------------------- host MMU notifier

    @mutation
    def notifier_start(self, req: NotifierRequest) -> state.NotifierStart:
        """``kvm_mmu_notifier_invalidate_range_start()``."""
        hs, he = req.hva_start, req.hva_end
        if hs >= he:
            raise EINVAL("hva_start must be below hva_end")
        ranges: list[tuple[int, int, int]] = []
        for as_id, space in enumerate(self.spaces):
            for slot in space.by_gfn.values():
                if slot.userspace_addr < he and hs < slot.hva_end:
                    # __kvm_handle_hva_range(): clip, then hva_to_gfn(end + PAGE_SIZE - 1).
                    a, b = max(hs, slot.userspace_addr), min(he, slot.hva_end)
                    gs = slot.base_gfn + ((a - slot.userspace_addr) >> PAGE_SHIFT)
                    ge = slot.base_gfn + ((b + PAGE_SIZE - 1 - slot.userspace_addr) >> PAGE_SHIFT)
                    ranges.append((as_id, gs, ge))
        zapped = 0
        if ranges:
            self.inval.begin()
            self.events.emit("invalidate_begin", in_progress=self.inval.in_progress, source="mmu_notifier")
            for as_id, s, e in ranges:
                self.inval.range_add(s, e)
                self.events.emit("invalidate_range_add", as_id=as_id, start_gfn=s, end_gfn=e)
                # Private memory has no userspace mapping: KVM_FILTER_SHARED.
                zapped += self._zap(as_id, s, e, ZapFilter.SHARED, "mmu_notifier")
            self._flush_if(zapped)
        inv = NotifierInvalidation(self.next_notifier_id, hs, he, ranges)
        self.next_notifier_id += 1
        self.notifiers[inv.id] = inv
        self.events.emit("notifier_start", id=inv.id, hva_start=hs, hva_end=he, matched=bool(ranges))
        return state.NotifierStart(id=inv.id, gfn_ranges=_gfn_ranges(ranges), pages_zapped=zapped, mmu=self.mmu_model())

    @mutation
    def notifier_end(self, inv_id: int) -> state.NotifierEnd:
        """``kvm_mmu_notifier_invalidate_range_end()``: end only if start matched a slot."""
        inv = self.notifiers.pop(inv_id, None)
        if inv is None:
            raise ENOENT(f"no open MMU-notifier invalidation {inv_id}")
        if inv.gfn_ranges:
            self._invalidate_end()
        self.events.emit("notifier_end", id=inv_id)
        return state.NotifierEnd(mmu=self.mmu_model())

    @locked
    def open_notifiers(self) -> list[state.NotifierInvalidation]:
        return [inv.model() for inv in self.notifiers.values()]

    # ------------------------------------------------------- fault injection

    @mutation
    def set_fault_injection(self, fail_nth: int | None) -> state.FaultInjectionState:
        if fail_nth is not None and fail_nth < 1:
            raise EINVAL("fail_nth must be >= 1 (or null to disarm)")
        self.fail_nth = fail_nth
        return state.FaultInjectionState(fail_nth=fail_nth)

    @locked
    def fault_injection(self) -> state.FaultInjectionState:
        return state.FaultInjectionState(fail_nth=self.fail_nth)

    # --------------------------------------------------------------- helpers

    def _check_as(self, as_id: int) -> None:
        if not 0 <= as_id < self.nr_as:
            raise EINVAL(f"as_id {as_id} >= {self.nr_as} address spaces of this VM")

    def _intersections(
        self, start: int, end: int, as_ids: Iterable[int] | None = None
    ) -> Iterator[tuple[int, Memslot, int, int]]:
        """``kvm_handle_gfn_range()``'s walk: every memslot intersection, all address spaces."""
        for as_id in range(self.nr_as) if as_ids is None else as_ids:
            for slot in self.spaces[as_id].overlapping(start, end):
                yield as_id, slot, max(start, slot.base_gfn), min(end, slot.end_gfn)

    def _zap(self, as_id: int, start: int, end: int, what: ZapFilter, cause: str) -> int:
        zapped = self.mmu.zap(as_id, start, end, what)
        if zapped:
            self.stats.pages_zapped += zapped
            self.events.emit(
                "unmap", as_id=as_id, start_gfn=start, end_gfn=end, filter=what.value, pages=zapped, cause=cause
            )
        return zapped

    def _flush_if(self, zapped: int) -> bool:
        """``kvm_flush_remote_tlbs()`` once, only if something was unmapped."""
        if zapped:
            self.stats.tlb_flushes += 1
            self.events.emit("tlb_flush")
        return bool(zapped)

    def _invalidate_end(self) -> None:
        self.inval.end()
        self.events.emit("invalidate_end", seq=self.inval.seq, in_progress=self.inval.in_progress)
