"""vCPU page faults and ``KVM_PRE_FAULT_MEMORY``: ``kvm_mmu_page_fault()`` -> ``kvm_mmu_faultin_pfn()``
-> ``is_page_fault_stale()``, written as the kernel's three steps so the explorer can race them."""

from __future__ import annotations

from dataclasses import dataclass, field

from app.core.errors import EAGAIN, EFAULT, ENOENT, ENOMEM, ENOTTY, EOPNOTSUPP, KvmError
from app.core.kvm import GuestMemfdFile, Kvm, Memslot, check_gpa_range
from app.core.mmu import UNMAPPED, spte, spte_private, spte_writable
from app.core.steps import Step, Steps
from app.models import state
from app.models.kvm import (
    KVM_EXIT_MEMORY_FAULT,
    KVM_MEM_READONLY,
    KVM_MEMORY_EXIT_FLAG_PRIVATE,
    PAGE_SHIFT,
    PAGE_SIZE,
    V9_KVM_EXIT_MEMORY_FAULT,
    V9_KVM_MEMORY_EXIT_FLAG_PRIVATE,
    VmType,
)


class Fault:
    """One EPT/NPT violation on ``(as_id, gfn)``.

    ``private`` None: the access is as private as the gfn's attribute (software-protected VMs);
    ``mmu_seq`` None: the vCPU snapshots the seq itself, in the first step.
    """

    def __init__(
        self, kvm: Kvm, as_id: int, gpa: int, *, write: bool, private: bool | None, mmu_seq: int | None
    ) -> None:
        kvm.check_as(as_id)
        self.kvm, self.as_id, self.gpa, self.gfn, self.write = kvm, as_id, gpa, gpa >> PAGE_SHIFT, write
        self.access, self.mmu_seq = private, mmu_seq
        self.private = False
        self.outcome: state.FaultOutcome = "retry"
        self.retry_reason: str | None = None
        self.exit: state.MemoryFaultExit | state.MmioExit | None = None

    def steps(self) -> Steps:
        kvm, gfn = self.kvm, self.gfn
        yield Step("snapshot_seq", holds_mmu_lock=False)
        # fault->mmu_seq = kvm->mmu_invalidate_seq; smp_rmb(): before anything is read.
        self.mmu_seq = kvm.inval.seq if self.mmu_seq is None else self.mmu_seq
        yield Step("faultin_pfn", holds_mmu_lock=False)
        # Lockless: the attribute may be half-way through a conversion.
        attr_private = kvm.gfn_is_private(gfn)
        self.private = attr_private if self.access is None else self.access
        slot = kvm.spaces[self.as_id].find(gfn)
        if not (self._linux_faultin(slot, attr_private) if kvm.linux else self._v9_faultin(slot, attr_private)):
            return self._done()
        yield Step("install_spte", holds_mmu_lock=False, takes_mmu_lock=True)
        assert slot is not None
        if self._stale():  # is_page_fault_stale()
            return self._done()
        self._install(slot)
        self.outcome = "mapped"
        self._done()

    def _linux_faultin(self, slot: Memslot | None, attr_private: bool) -> bool:
        """6.18 ``kvm_mmu_faultin_pfn()``, in its order; False when the fault ends here."""
        if self.private != attr_private:
            return self._memory_fault_exit()
        if slot is None:  # kvm_handle_noslot_fault()
            return self._memory_fault_exit() if self.private else self._mmio_exit()
        if self._stale():  # mmu_invalidate_retry_gfn_unsafe(): before the pfn is resolved
            return False
        if slot.faults_from_gmem(self.private):  # kvm_mmu_faultin_pfn_gmem()
            return self._gmem_pfn(slot)
        if self.write and slot.flags & KVM_MEM_READONLY:  # KVM_PFN_ERR_RO_FAULT -> emulate
            return self._mmio_exit()
        return True

    def _gmem_pfn(self, slot: Memslot) -> bool:
        """``kvm_gmem_get_pfn()``: no file (not a guest_memfd slot, or its file was released) is a
        memory-fault exit; else the page comes from the file, allocated if it has none yet."""
        if slot.gmem is None:
            return self._memory_fault_exit()
        pgoff = slot.gmem_pgoff(self.gfn)
        slot.gmem.allocate(pgoff, pgoff + 1)
        return True

    def _v9_faultin(self, slot: Memslot | None, attr_private: bool) -> bool:
        """v9 7/8: the mismatch check only on private-capable slots; retry checked under mmu_lock."""
        if slot is not None and slot.is_gmem and self.private != attr_private:
            return self._memory_fault_exit()
        if self.private and (slot is None or not slot.is_gmem):
            return self._memory_fault_exit()
        if slot is None or (self.write and slot.flags & KVM_MEM_READONLY):
            return self._mmio_exit()
        if self.private:  # restrictedmem_get_page(): the file outlives its fd here
            return self._gmem_pfn(slot)
        return True

    def _stale(self) -> bool:
        """``mmu_invalidate_retry_gfn()``."""
        assert self.mmu_seq is not None
        self.retry_reason = self.kvm.inval.retry_reason(self.gfn, self.mmu_seq)
        if self.retry_reason is not None:
            self.outcome = "retry"
        return self.retry_reason is not None

    def _memory_fault_exit(self) -> bool:
        """``kvm_prepare_memory_fault_exit()``, with the ABI of the VM's semantics."""
        self.outcome = "memory_fault_exit"
        if self.kvm.linux:
            code, flag, errno = KVM_EXIT_MEMORY_FAULT, KVM_MEMORY_EXIT_FLAG_PRIVATE, "EFAULT"
        else:
            code, flag, errno = V9_KVM_EXIT_MEMORY_FAULT, V9_KVM_MEMORY_EXIT_FLAG_PRIVATE, None
        self.exit = state.MemoryFaultExit(
            reason_code=code,
            flags=flag if self.private else 0,
            gpa=self.gfn << PAGE_SHIFT,
            size=PAGE_SIZE,
            errno=errno,
        )
        return False

    def _mmio_exit(self) -> bool:
        self.outcome = "mmio_exit"
        self.exit = state.MmioExit(gpa=self.gpa, is_write=self.write)
        return False

    def _install(self, slot: Memslot) -> None:
        """Install the SPTE (already present: unchanged, except fast_page_fault() making a
        write-protected, dirty-logged mapping writable on a write)."""
        kvm, as_id, gfn = self.kvm, self.as_id, self.gfn
        present = kvm.mmu.lookup(as_id, gfn)
        if present == UNMAPPED:
            map_pages(kvm, as_id, gfn, gfn + 1, spte(self.private, slot.writable(self.write)))
        elif self.write and not spte_writable(present) and slot.writable(True):
            map_pages(kvm, as_id, gfn, gfn + 1, spte(spte_private(present), True))

    def _done(self) -> None:
        stats = self.kvm.stats
        stats.faults += 1
        if self.outcome == "retry":
            stats.fault_retries += 1
        elif self.outcome == "memory_fault_exit":
            stats.memory_fault_exits += 1
        elif self.outcome == "mmio_exit":
            stats.mmio_exits += 1
        self.kvm.events.emit(
            "fault",
            as_id=self.as_id,
            gfn=self.gfn,
            private=self.private,
            write=self.write,
            outcome=self.outcome,
            retry_reason=self.retry_reason,
        )

    def result(self) -> state.FaultResult:
        assert self.mmu_seq is not None
        return state.FaultResult(
            outcome=self.outcome,
            gfn=self.gfn,
            as_id=self.as_id,
            private=self.private,
            mmu_seq=self.mmu_seq,
            retry_reason=self.retry_reason,
            exit=self.exit,
        )


def map_pages(kvm: Kvm, as_id: int, start: int, end: int, value: int) -> None:
    """Install SPTEs, failing with ENOMEM past the mapping-run budget."""
    space = kvm.mmu.spaces[as_id]
    others = kvm.mmu.runs() - len(space)
    if space.exceeds_after_assign(start, end, value, kvm.limits.max_mapping_runs - others):
        raise ENOMEM(f"mapping runs would exceed the per-VM budget ({kvm.limits.max_mapping_runs})")
    if not kvm.budget.room(2):
        raise ENOMEM(f"the service-wide budget ({kvm.budget.limit} items) is used up")
    kvm.mmu.set(as_id, start, end, value)


@dataclass
class _Walk:
    plan: list[tuple[int, int, int]]
    already: int
    folios: list[tuple[GuestMemfdFile, int, int]] = field(default_factory=list)
    """File pages the faults take from guest_memfd (``kvm_gmem_get_pfn()`` allocates them)."""
    stop_gfn: int | None = None
    stop: type[KvmError] | None = None


def prefault(kvm: Kvm, gpa: int, size: int, as_id: int) -> state.PrefaultResult:
    """``kvm_vcpu_pre_fault_memory()`` / x86 ``kvm_arch_vcpu_pre_fault_memory()``."""
    if not kvm.linux:
        raise ENOTTY("KVM_PRE_FAULT_MEMORY does not exist under rfc-v9")
    start, end = check_gpa_range(gpa, size)
    kvm.check_as(as_id)
    if not kvm.host.caps.KVM_CAP_PRE_FAULT_MEMORY:
        raise EOPNOTSUPP(f"host profile {kvm.host.name} has no two-dimensional paging (KVM_CAP_PRE_FAULT_MEMORY 0)")
    if kvm.type in (VmType.snp, VmType.tdx):
        raise EOPNOTSUPP(f"prefault on {kvm.type.value} VMs needs a finalized launch (not simulated)")
    walk = _prefault_walk(kvm, as_id, start, end)
    if walk.stop is not None and walk.stop_gfn == start:
        raise walk.stop(f"gfn {start:#x}: {_STOP_REASON[walk.stop]}")
    before = list(kvm.mmu.spaces[as_id].runs(start, end))
    for s, e, v in walk.plan:
        kvm.mmu.set(as_id, s, e, v)
    if kvm.mmu.runs() > kvm.limits.max_mapping_runs or not kvm.budget.room(0):
        for s, e, v in before:  # through Mmu.set, so mapped_pages is restored too
            kvm.mmu.set(as_id, s, e, v)
        raise ENOMEM(f"mapping runs would exceed the per-VM or the service-wide budget ({kvm.limits.max_mapping_runs})")
    for gmem, s, e in walk.folios:
        gmem.allocate(s, e)
    newly = sum(e - s for s, e, _ in walk.plan)
    stop_gfn = end if walk.stop_gfn is None else walk.stop_gfn
    stopped = None if walk.stop is None else walk.stop.errno
    kvm.events.emit(
        "prefault", as_id=as_id, start_gfn=start, end_gfn=end, mapped=newly, already=walk.already, stopped=stopped
    )
    return state.PrefaultResult(
        mapped_pages=newly,
        already_mapped_pages=walk.already,
        remaining=state.GpaRange(gpa=stop_gfn << PAGE_SHIFT, size=(end - stop_gfn) << PAGE_SHIFT),
        stopped=stopped,
    )


_STOP_REASON: dict[type[KvmError], str] = {
    ENOENT: "no memslot (a fault would be an MMIO exit)",
    EFAULT: "a fault would be a memory-fault exit",
    EAGAIN: "inside an open invalidation (a fault would retry until it ends)",
}


def _prefault_walk(kvm: Kvm, as_id: int, start: int, end: int) -> _Walk:
    """Page by page as the kernel goes, but a segment at a time: inside a segment (one slot, one
    attribute run, one side of the invalidation range) every page has the same fate."""
    inv, space, mappings = kvm.inval, kvm.spaces[as_id], kvm.mmu.spaces[as_id]
    walk = _Walk([], 0)
    gfn = start
    while gfn < end:
        slot = space.find(gfn)
        _, run_end, private = next(kvm.private_runs(gfn, end))
        stop: type[KvmError] | None = None
        if slot is None:
            stop = EFAULT if private else ENOENT
        elif inv.retry_reason(gfn, inv.seq) is not None:
            stop = EAGAIN
        elif slot.faults_from_gmem(private) and slot.gmem is None:
            stop = EFAULT
        if stop is not None:
            walk.stop_gfn, walk.stop = gfn, stop
            return walk
        assert slot is not None
        seg_end = min(end, slot.end_gfn, run_end)
        if inv.in_progress and inv.range_start is not None and gfn < inv.range_start:
            seg_end = min(seg_end, inv.range_start)
        if slot.faults_from_gmem(private) and slot.gmem is not None:
            walk.folios.append((slot.gmem, slot.gmem_pgoff(gfn), slot.gmem_pgoff(seg_end)))
        for s, e, v in mappings.runs(gfn, seg_end):
            if v == UNMAPPED:
                walk.plan.append((s, e, spte(private, slot.writable(False))))
            else:
                walk.already += e - s
        gfn = seg_end
    return walk
