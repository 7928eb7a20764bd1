"""VM and MMU state as the engine reports it (and the API returns it)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from .host import HostProfile
from .kvm import U64_MAX, Semantics, VmType


class MmuStats(BaseModel):
    """The VM's statistics (``struct kvm_vm_stat``): one shape for the engine's counters, the API's
    answers and a snapshot's copy. Each a ``__u64``."""

    model_config = ConfigDict(extra="forbid")  # a snapshot's copy names no other counter

    attribute_updates: int = Field(0, ge=0, le=U64_MAX, description="successful attribute updates (no-ops included)")
    tlb_flushes: int = Field(0, ge=0, le=U64_MAX, description="kvm_flush_remote_tlbs() calls")
    pages_zapped: int = Field(
        0, ge=0, le=U64_MAX, description="SPTEs zapped by conversions, notifiers and memslot delete/move"
    )
    faults: int = Field(0, ge=0, le=U64_MAX, description="vCPU page faults handled (prefault excluded)")
    fault_retries: int = Field(0, ge=0, le=U64_MAX, description="faults that returned RET_PF_RETRY")
    memory_fault_exits: int = Field(0, ge=0, le=U64_MAX, description="KVM_EXIT_MEMORY_FAULT exits")
    mmio_exits: int = Field(0, ge=0, le=U64_MAX, description="KVM_EXIT_MMIO exits")


class Mmu(BaseModel):
    """The MMU invalidation state of ``struct kvm`` plus statistics."""

    mmu_invalidate_seq: int
    mmu_invalidate_in_progress: int
    mmu_invalidate_range_start: int | None = Field(description="null = INVALID_GPA")
    mmu_invalidate_range_end: int | None = Field(description="null = INVALID_GPA")
    mapped_pages: int
    open_notifier_invalidations: int
    stats: MmuStats


class Vm(BaseModel):
    id: str
    name: str | None
    type: VmType
    type_value: int
    semantics: Semantics
    profile: str = Field(
        description="the host profile the VM behaves as (GET /v1/vms/{vm_id}/capabilities has it whole)"
    )
    kernel: str = Field(description="the kernel version whose behaviour a linux VM follows (from its profile)")
    has_private_mem: bool
    address_spaces: int
    memslot_count: int
    mmu: Mmu


class Memslot(BaseModel):
    slot: int = Field(description="raw slot: as_id << 16 | id")
    as_id: int
    id: int
    flags: int
    guest_phys_addr: int
    memory_size: int
    userspace_addr: int
    base_gfn: int
    npages: int
    guest_memfd: int | None
    guest_memfd_offset: int
    gmem_only: bool = Field(
        False, description="KVM_MEMSLOT_GMEM_ONLY: bound to an mmap-able guest_memfd, so shared faults use it too"
    )


MemslotChange = Literal["create", "move", "flags_only", "none", "delete"]


class MemslotUpdate(BaseModel):
    change: MemslotChange
    memslot: Memslot | None
    pages_zapped: int


class GmemBinding(BaseModel):
    slot: int
    offset: int
    size: int


class GuestMemfd(BaseModel):
    fd: int
    size: int
    flags: int
    bindings: list[GmemBinding]
    allocated_pages: int = Field(0, description="pages with a folio in the file's page cache")
    mappings: list[int] = Field([], description="ids of the host mappings of the file")


class FileRun(BaseModel):
    start: int = Field(description="byte offset in the file")
    end: int
    allocated: bool
    private: bool = Field(
        description="the host may not touch these pages: in place (7.4) their attribute, else the whole file's "
        "(private unless GUEST_MEMFD_FLAG_INIT_SHARED)"
    )


class GmemAttributeUpdate(BaseModel):
    """What one ``KVM_SET_MEMORY_ATTRIBUTES2`` on a guest_memfd did."""

    fd: int
    offset: int
    size: int
    attributes: int
    noop: bool = Field(description="the range already had the attributes: nothing was invalidated")
    invalidated: bool = Field(description="a binding intersected the range: the seq was bumped")
    pages_zapped: int
    tlb_flushed: bool
    mmu: Mmu


class HostPin(BaseModel):
    """Pages of a guest_memfd the host holds pinned (``pin_user_pages()``: GUP, an IOMMU mapping)."""

    id: int
    fd: int | None = Field(description="the file's fd, null once it is closed (the pin keeps the file)")
    offset: int = Field(description="byte offset of the first pinned page in the file")
    size: int


class HostPinList(BaseModel):
    pins: list[HostPin]


class HostMapping(BaseModel):
    """One ``mmap(MAP_SHARED)`` of a guest_memfd by the host process."""

    id: int
    fd: int | None = Field(description="the file's fd; null once closed (the mapping still holds the file)")
    offset: int
    length: int


class HostTouch(BaseModel):
    pages: int = Field(description="pages the access covered")
    allocated_pages: int = Field(description="of them, pages it faulted into the file (kvm_gmem_get_folio)")


class FallocateResult(BaseModel):
    punch_hole: bool
    pages_allocated: int = Field(description="allocate: pages that had no folio before")
    pages_freed: int = Field(description="punch-hole: pages truncate_inode_pages_range() freed")
    invalidated: bool = Field(description="punch-hole: a binding intersects, so an invalidate begin/end pair ran")
    pages_zapped: int
    mmu: Mmu


class AttributeUpdate(BaseModel):
    start_gfn: int
    end_gfn: int
    attributes: int
    noop: bool = Field(description="linux: the range already had these attributes")
    invalidated: bool = Field(description="an invalidate begin/end pair ran")
    pages_zapped: int
    tlb_flushed: bool
    mmu: Mmu


class EncRegion(BaseModel):
    addr: int
    size: int


class SevRegionUpdate(BaseModel):
    region: EncRegion
    pinned_regions: int


class AttributeRun(BaseModel):
    start_gfn: int
    end_gfn: int
    attributes: int
    private: bool


class MappingRun(BaseModel):
    as_id: int
    start_gfn: int
    end_gfn: int
    private: bool
    writable: bool


class GfnMemslotRef(BaseModel):
    as_id: int
    slot: int
    id: int
    gmem_only: bool = Field(False, description="KVM_MEMSLOT_GMEM_ONLY (see the memslot)")
    guest_memfd: int | None = Field(None, description="the fd of the guest_memfd bound to the slot, if any")
    gmem_pgoff: int | None = Field(None, description="the page of that file behind this gfn (kvm_gmem_get_index())")
    gmem_allocated: bool | None = Field(None, description="whether that page is allocated")


class GfnMapping(BaseModel):
    as_id: int
    private: bool
    writable: bool


class GfnInfo(BaseModel):
    gfn: int
    gpa: int
    attributes: int
    private: bool
    memslots: list[GfnMemslotRef]
    mappings: list[GfnMapping]


class MemoryFaultExit(BaseModel):
    """``kvm_run.memory_fault``. ``linux``: reason 39, flag bit 3, ``KVM_RUN`` fails with EFAULT.
    ``rfc-v9`` (v9's ABI): reason 38, flag bit 0, ``KVM_RUN`` returns 0 (``errno`` null)."""

    reason: Literal["KVM_EXIT_MEMORY_FAULT"] = "KVM_EXIT_MEMORY_FAULT"
    reason_code: Literal[38, 39] = Field(description="39 (linux) or 38 (v9's numbering)")
    flags: int = Field(description="KVM_MEMORY_EXIT_FLAG_PRIVATE when the access was private: 8 (linux) or 1 (rfc-v9)")
    gpa: int
    size: int
    errno: Literal["EFAULT"] | None = Field(description="EFAULT (linux); null under rfc-v9, where KVM_RUN returned 0")


class MmioExit(BaseModel):
    """``kvm_run.mmio``: no memslot, or a write to a READONLY slot."""

    reason: Literal["KVM_EXIT_MMIO"] = "KVM_EXIT_MMIO"
    reason_code: Literal[6] = 6
    gpa: int = Field(description="the faulting gpa as given")
    is_write: bool


FaultOutcome = Literal["mapped", "retry", "memory_fault_exit", "mmio_exit"]


class FaultResult(BaseModel):
    outcome: FaultOutcome
    gfn: int
    as_id: int
    private: bool
    mmu_seq: int
    retry_reason: str | None
    exit: MemoryFaultExit | MmioExit | None


class GpaRange(BaseModel):
    gpa: int
    size: int


class PrefaultResult(BaseModel):
    mapped_pages: int = Field(description="pages newly mapped")
    already_mapped_pages: int
    remaining: GpaRange = Field(description="what was not processed (size 0 when the walk finished)")
    stopped: str | None = Field(description="errno of the page the walk stopped at, null when it finished")


class GuestMemfdClose(BaseModel):
    """What dropping a reference to a guest_memfd did: ``close()`` of its fd or ``munmap()``."""

    released: bool = Field(True, description="false while host mappings still hold the file")
    pages_zapped: int
    invalidated: bool = Field(description="an invalidate begin/end pair ran (linux, at least one bound slot)")
    mmu: Mmu


class GfnRange(BaseModel):
    as_id: int
    start_gfn: int
    end_gfn: int


class NotifierInvalidation(BaseModel):
    id: int
    hva_start: int
    hva_end: int
    gfn_ranges: list[GfnRange]


class NotifierStart(BaseModel):
    id: int
    gfn_ranges: list[GfnRange]
    pages_zapped: int
    mmu: Mmu


class NotifierEnd(BaseModel):
    mmu: Mmu


class FaultInjectionState(BaseModel):
    fail_nth: int | None
    errno: Literal["ENOMEM"] = "ENOMEM"


class VmTypeInfo(BaseModel):
    name: VmType
    value: int
    has_private_mem: bool


class Capabilities(BaseModel):
    """``KVM_CHECK_EXTENSION`` answers, system or VM scope."""

    api_version: int
    page_size: int
    max_gfn: int
    profile: HostProfile = Field(description="the host these answers are of: the service default, or the VM's")
    vm_types: list[VmTypeInfo] = Field(description="the VM types the host accepts (KVM_CAP_VM_TYPES)")
    semantics: list[Semantics]
    caps: dict[str, int]


class HostProfileList(BaseModel):
    default: str = Field(description="the profile of a VM created without one (KVM_MEMATTR_PROFILE)")
    profiles: list[HostProfile]


class VmList(BaseModel):
    vms: list[Vm]


class MemslotList(BaseModel):
    memslots: list[Memslot]


class GuestMemfdList(BaseModel):
    guest_memfds: list[GuestMemfd]


class FileRuns(BaseModel):
    runs: list[FileRun]
    next_offset: int | None = Field(description="where the next page starts when more remain, else null")


class HostMappingList(BaseModel):
    mappings: list[HostMapping]


class EncRegionList(BaseModel):
    regions: list[EncRegion]


class AttributeRuns(BaseModel):
    runs: list[AttributeRun]
    next_gfn: int | None = Field(description="set exactly when limit cut the answer: resume from here")


class MappingRuns(BaseModel):
    runs: list[MappingRun]
    next_gfn: int | None


class MemoryMapBucket(BaseModel):
    start_gfn: int
    end_gfn: int
    private_pages: int
    memslot_pages: int = Field(description="pages inside a memslot of any address space")
    mapped_pages: list[int] = Field(description="present SPTEs, per address space")
    gmem_allocated_pages: list[int] = Field(
        description="per address space, pages whose guest_memfd page (through their memslot's file) is allocated"
    )


class GfnWindow(BaseModel):
    start_gfn: int
    end_gfn: int


class MemoryMap(BaseModel):
    """A summary for drawing: counts per bucket, never one entry per run."""

    start_gfn: int
    end_gfn: int
    buckets: list[MemoryMapBucket]
    memslots: list[Memslot] = Field(description="memslots overlapping the window, all address spaces")
    invalidation: GfnWindow | None = Field(description="the open invalidation range, if it overlaps the window")


class TraceEvent(BaseModel):
    """One protocol step; fields beyond id/time/type depend on the type."""

    model_config = ConfigDict(extra="allow")

    id: int
    time: float
    type: str


class EventPage(BaseModel):
    events: list[TraceEvent]
    next_after: int | None


class NotifierList(BaseModel):
    invalidations: list[NotifierInvalidation]


class Health(BaseModel):
    status: Literal["ok"]
    pid: int
    uptime_s: float
    vms: int
    version: str
