"""``struct kvm`` and its parts (the kernel's ``kvm_host.h``): the state of one VM, its memslots and
guest_memfd files, and the few facts every concept module asks of it.

The behaviour lives beside it, one module per kernel concept (``attributes``, ``faults``,
``mmu_notifier``, ``guest_memfd``, ``memslots``, ``sev``), each taking a ``Kvm`` the way the
kernel's functions take a ``struct kvm *``. ``vm.VirtualMachine`` is the locked front.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

from sortedcontainers import SortedDict

from app.core.budget import UNBOUNDED, ServiceBudget
from app.core.errors import EINVAL, ENOMEM
from app.core.events import EventLog
from app.core.invalidation import MmuInvalidation
from app.core.limits import EngineLimits
from app.core.mmu import Mmu, ZapFilter
from app.core.runs import RunMap
from app.models.host import PROFILES, HostProfile
from app.models.kvm import (
    GFN_LIMIT,
    GUEST_MEMFD_FLAG_INIT_SHARED,
    GUEST_MEMFD_FLAG_MMAP,
    KVM_MEM_GUEST_MEMFD,
    KVM_MEM_LOG_DIRTY_PAGES,
    KVM_MEM_READONLY,
    KVM_MEMORY_ATTRIBUTE_PRIVATE,
    PAGE_SHIFT,
    PAGE_SIZE,
    U64_MAX,
    Semantics,
    VmType,
)
from app.models.state import MmuStats

PRIVATE = KVM_MEMORY_ATTRIBUTE_PRIVATE
PGOFF_LIMIT = 1 << (64 - PAGE_SHIFT)
"""Page indexes of a file: what a u64 byte offset can name."""


@dataclass(eq=False)
class GuestMemfdFile:
    """A ``[kvm-gmem]`` file: its size and flags, the slots bound to it, which of its pages are
    allocated (``filemap`` folios, one run per range) and the host mappings holding it open.

    The file lives while its fd is open or a host mapping holds it (the VMA's reference: only
    the last ``fput()`` runs ``kvm_gmem_release()``); under rfc-v9 its bindings hold it too."""

    fd: int
    size: int
    flags: int
    budget: ServiceBudget = UNBOUNDED
    # raw slot -> (offset, size)
    bindings: dict[int, tuple[int, int]] = field(default_factory=dict)
    allocated: RunMap = field(init=False)
    """Page index -> 1 where a folio is in the page cache (``kvm_gmem_get_folio()`` made it)."""
    mmaps: set[int] = field(default_factory=set)
    """Ids of the host mappings of this file (``Kvm.host_mappings``)."""
    in_place: bool = False
    """Created on a host with ``gmem_in_place_conversion``: the file keeps its pages' attributes."""
    attributes: RunMap | None = field(init=False)
    """In place (7.4): page index -> ``KVM_MEMORY_ATTRIBUTE_PRIVATE`` or 0, the inode's attributes
    every binding shares; private unless created INIT_SHARED. Otherwise None: the whole file is
    private, or shared if INIT_SHARED, for good."""
    pins: dict[int, tuple[int, int]] = field(default_factory=dict)
    """Pages the host holds pinned (GUP, IOMMU): pin id -> ``(first page, pages)``."""
    detached: dict[int, list[tuple[int, int]]] = field(default_factory=dict)
    """Pin id -> page ranges a punch-hole took out of the file since: the pin holds the old folios,
    no longer the file's (a page faulted in there later is a new one, not pinned)."""

    def __post_init__(self) -> None:
        # Every page index a u64 offset reaches, not only those below i_size: a binding that
        # passes 2^63 (kvm_gmem_bind()'s loff_t overflow) faults in pages past the end.
        self.allocated = RunMap(PGOFF_LIMIT, 0, self.budget)
        default = 0 if self.init_shared else PRIVATE
        self.attributes = RunMap(PGOFF_LIMIT, default, self.budget) if self.in_place else None

    @property
    def npages(self) -> int:
        return self.size >> PAGE_SHIFT

    @property
    def mmap_able(self) -> bool:
        return bool(self.flags & GUEST_MEMFD_FLAG_MMAP)

    @property
    def init_shared(self) -> bool:
        return bool(self.flags & GUEST_MEMFD_FLAG_INIT_SHARED)

    def bind_conflict(self, offset: int, size: int) -> bool:
        return any(offset < o + s and o < offset + size for o, s in self.bindings.values())

    def allocate(self, start: int, end: int) -> None:
        """``kvm_gmem_get_folio()`` for every page of ``[start, end)`` (already there: kept)."""
        if start < end and not self.allocated.is_uniform(start, end, 1):
            self.allocated.assign(start, end, 1)

    def allocated_pages(self, start: int = 0, end: int = PGOFF_LIMIT) -> int:
        """Pages of ``[start, end)`` that have a folio: O(runs in the range)."""
        return sum(e - s for s, e, v in self.allocated.runs(start, end) if v)

    def release(self) -> None:
        """Give the file's runs back to the service budget (the inode is evicted)."""
        self.allocated.release()
        if self.attributes is not None:
            self.attributes.release()

    def private_runs(self, start: int, end: int) -> Iterator[tuple[int, int, bool]]:
        """``(first, end, private)`` runs of ``[start, end)``'s pages (``kvm_gmem_is_private()``)."""
        if self.attributes is None:
            if start < end:
                yield start, end, not self.init_shared
            return
        for s, e, v in self.attributes.runs(start, end):
            yield s, e, bool(v & PRIVATE)

    def first_private(self, start: int, end: int) -> int | None:
        """The first private page of ``[start, end)``, one the host may not fault in."""
        return next((s for s, _, private in self.private_runs(start, end) if private), None)

    def first_pinned(self, start: int, end: int) -> int | None:
        """The first page of ``[start, end)`` whose folio in the page cache a pin holds: O(pins
        + their runs and holes)."""
        hits = []
        for pin, (s, n) in self.pins.items():
            at = max(s, start)
            for lo, hi in sorted([*self.detached.get(pin, []), (min(s + n, end), PGOFF_LIMIT)]):
                if at < lo:
                    hits += [a for a, _, v in self.allocated.runs(at, lo) if v][:1]
                at = max(at, hi)
        return min(hits, default=None)

    def truncate(self, start: int, end: int) -> int:
        """``truncate_inode_pages_range()``: pages ``[start, end)`` leave the page cache (a pinned
        folio lives on, detached from the file). Returns how many were allocated."""
        freed = self.allocated_pages(start, end)
        if freed:
            self.allocated.assign(start, end, 0)
        for pin, (s, n) in self.pins.items():
            lo, hi = max(s, start), min(s + n, end)
            if lo < hi:
                self.detached[pin] = _merged([*self.detached.get(pin, []), (lo, hi)])
        return freed


def _merged(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Ranges in order, overlapping or touching ones merged."""
    out: list[tuple[int, int]] = []
    for s, e in sorted(ranges):
        if out and s <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], e))
        else:
            out.append((s, e))
    return out


@dataclass(frozen=True)
class HostMapping:
    """One ``mmap(MAP_SHARED)`` of a guest_memfd by the host process: ``npages`` pages of the file
    from page ``pgoff``. It holds a reference to the file, as a VMA does."""

    id: int
    file: GuestMemfdFile
    pgoff: int
    npages: int


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
    gmem_only: bool = False
    """``KVM_MEMSLOT_GMEM_ONLY``: bound to an mmap-able file, so shared faults come from it too
    (``kvm_memslot_is_gmem_only()``); kept after the file is released, as ``slot->flags`` is."""

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

    def gmem_pgoff(self, gfn: int) -> int:
        """``kvm_gmem_get_index()``: the file page behind ``gfn``."""
        return (self.gmem_offset >> PAGE_SHIFT) + gfn - self.base_gfn

    def faults_from_gmem(self, private: bool) -> bool:
        """Whether a fault takes its page from guest_memfd (``kvm_mmu_faultin_pfn_gmem()``): every
        private one (failing without a file) and, on a gmem-only slot, every shared one too."""
        return private or self.gmem_only

    def writable(self, write: bool) -> bool:
        """Writable SPTE unless READONLY, or dirty logging and a read fault."""
        if self.flags & KVM_MEM_READONLY:
            return False
        return write or not self.flags & KVM_MEM_LOG_DIRTY_PAGES


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
class NotifierInvalidation:
    """One open ``invalidate_range_start()`` and the gfn ranges it matched."""

    id: int
    hva_start: int
    hva_end: int
    gfn_ranges: list[tuple[int, int, int]]  # (as_id, start_gfn, end_gfn)


@dataclass(eq=False)
class Kvm:
    """What one VM fd controls: attributes, memslots, SPTEs, the invalidation counters."""

    id: str
    name: str | None
    type: VmType
    semantics: Semantics
    limits: EngineLimits
    host: HostProfile = PROFILES["linux-6.18"]
    budget: ServiceBudget = UNBOUNDED
    attributes: RunMap = field(init=False)
    spaces: list[AddressSpace] = field(init=False)
    mmu: Mmu = field(init=False)
    inval: MmuInvalidation = field(default_factory=MmuInvalidation)
    stats: MmuStats = field(default_factory=MmuStats)
    events: EventLog = field(init=False)
    gmem_files: dict[int, GuestMemfdFile] = field(default_factory=dict)
    next_fd: int = 3
    pinned: list[tuple[int, int]] = field(default_factory=list)
    notifiers: dict[int, NotifierInvalidation] = field(default_factory=dict)
    next_notifier_id: int = 1
    host_mappings: dict[int, HostMapping] = field(default_factory=dict)
    next_mapping_id: int = 1
    host_pins: dict[int, GuestMemfdFile] = field(default_factory=dict)
    """Pins of file pages by the host: pin id -> the file (its ``pins`` holds the pages)."""
    next_pin_id: int = 1
    fail_nth: int | None = None

    def __post_init__(self) -> None:
        # rfc-v9 stored only shared gfns: private by default on private-memory VMs.
        default = PRIVATE if not self.linux and self.has_private_mem else 0
        self.attributes = RunMap(GFN_LIMIT, default, self.budget)
        self.spaces = [AddressSpace() for _ in range(self.nr_as)]
        self.mmu = Mmu(self.nr_as, self.budget)
        self.events = EventLog(self.limits.max_events, self.budget)

    def items(self) -> int:
        """What this VM holds against the service budget: runs, events, and every stored object."""
        file_runs = sum(len(f.allocated) + (0 if f.attributes is None else len(f.attributes)) for f in self.files())
        return len(self.attributes) + self.mmu.runs() + len(self.events) + file_runs + self.objects()

    def objects(self) -> int:
        """Memslots, open guest_memfds, open notifier invalidations, pinned regions, host
        mappings, pins of file pages: one item each."""
        slots = sum(len(space) for space in self.spaces)
        held = len(self.gmem_files) + len(self.host_mappings) + len(self.host_pins)
        return slots + held + len(self.notifiers) + len(self.pinned)

    def is_open(self, gmem: GuestMemfdFile) -> bool:
        """Whether the file's fd is still open (a closed file may live on in mappings or slots)."""
        return self.gmem_files.get(gmem.fd) is gmem

    def files(self) -> list[GuestMemfdFile]:
        """Every live guest_memfd file, once: open ones by fd, then those only host mappings,
        pins or (rfc-v9) slots still hold, in the order they are listed."""
        found = {id(f): f for f in self.gmem_files.values()}
        for m in self.host_mappings.values():
            found.setdefault(id(m.file), m.file)
        for space in self.spaces:
            for slot in space.by_gfn.values():
                if slot.gmem is not None:
                    found.setdefault(id(slot.gmem), slot.gmem)
        for f in self.host_pins.values():
            found.setdefault(id(f), f)
        return list(found.values())

    def take(self, what: str) -> None:
        """One more stored object, or ENOMEM when the service is full (nothing changed yet)."""
        if not self.budget.room(1):
            raise ENOMEM(f"the service-wide budget ({self.budget.limit} items) is used up: no room for {what}")
        self.budget.add(1)

    def release(self) -> None:
        """Give everything back to the service budget (``kvm_destroy_vm()``)."""
        self.attributes.release()
        for space in self.mmu.spaces:
            space.release()
        self.events.release()
        for f in self.files():
            f.release()
        self.budget.add(-self.objects())

    @property
    def linux(self) -> bool:
        return self.semantics is Semantics.linux

    @property
    def has_private_mem(self) -> bool:
        """``kvm_arch_has_private_mem()``."""
        return self.type.has_private_mem

    @property
    def nr_as(self) -> int:
        """``kvm_arch_nr_memslot_as_ids()``: since 6.8 private-memory VMs have no SMM space (and a
        host without SMM support has one address space)."""
        return 1 if self.linux and self.has_private_mem else self.host.address_spaces

    # What the host was built with. A linux VM reads each feature from its profile; rfc-v9 is a
    # 2022 patch series, not any of these hosts, so it keeps its own feature set and takes only
    # the host's bounds (max_gfn, memslots, address spaces).

    @property
    def has_guest_memfd(self) -> bool:
        """``CONFIG_KVM_GUEST_MEMFD``: without it ``KVM_CREATE_GUEST_MEMFD`` is ENOTTY."""
        return not self.linux or bool(self.host.caps.KVM_CAP_GUEST_MEMFD)

    @property
    def has_memory_attributes(self) -> bool:
        """``CONFIG_KVM_VM_MEMORY_ATTRIBUTES``: without it ``KVM_SET_MEMORY_ATTRIBUTES`` is ENOTTY
        (in place, the ioctl is there but supports no attribute)."""
        return bool(self.host.caps.KVM_CAP_MEMORY_ATTRIBUTES) or self.in_place

    @property
    def in_place(self) -> bool:
        """``gmem_in_place_conversion``: private/shared lives in the guest_memfd files (7.4)."""
        return self.linux and self.host.gmem_in_place_conversion

    @property
    def converts_with(self) -> str:
        """The call that converts this VM's memory, for an error to name (every wrong one does)."""
        if not self.linux:
            return "KVM_MEMORY_ENCRYPT_{REG,UNREG}_REGION (kvm-memattr reg-region / unreg-region)"
        if self.in_place:
            return "KVM_SET_MEMORY_ATTRIBUTES2 on the guest_memfd (kvm-memattr gmem attrs)"
        return "KVM_SET_MEMORY_ATTRIBUTES (kvm-memattr attrs set)"

    @property
    def supported_attributes(self) -> int:
        """``kvm_supported_vm_mem_attributes()``: what ``KVM_SET_MEMORY_ATTRIBUTES`` may set."""
        return PRIVATE if self.has_private_mem and not self.in_place else 0

    @property
    def has_readonly_mem(self) -> bool:
        """``kvm_arch_has_readonly_mem()``: not where the guest state is protected."""
        protected = self.type in (VmType.sev_es, VmType.snp, VmType.tdx)
        return not self.linux or (bool(self.host.caps.KVM_CAP_READONLY_MEM) and not protected)

    @property
    def gmem_slots(self) -> bool:
        """Whether ``KVM_MEM_GUEST_MEMFD`` is a valid memslot flag (rfc-v9: restrictedmem, and 6.12's
        ``check_memory_region_flags()``: private VMs only)."""
        any_vm = self.linux and self.host.at_least("6.18")
        return self.has_guest_memfd and (any_vm or self.has_private_mem)

    @property
    def sev_guest(self) -> bool:
        """``sev_guest()``: under rfc-v9 an SNP VM has private memory and takes the GPA path."""
        return self.type in (VmType.sev, VmType.sev_es) or (self.linux and self.type is VmType.snp)

    @property
    def mirrored_tdp(self) -> bool:
        """``kvm_has_mirrored_tdp()``: only TDX keeps private SPTEs in a separate root, where the
        filter of an unmap matters (``kvm_gfn_range_filter_to_root_types()``)."""
        return self.linux and self.type is VmType.tdx

    def unmap_filter(self, wanted: ZapFilter) -> ZapFilter:
        """The mappings an unmap asking for ``wanted`` really zaps: all of them without mirrored TDP."""
        return wanted if self.mirrored_tdp else ZapFilter.ALL

    def check_as(self, as_id: int) -> None:
        if not 0 <= as_id < self.nr_as:
            raise EINVAL(f"as_id {as_id} >= {self.nr_as} address spaces of this VM")

    def gfn_is_private(self, gfn: int) -> bool:
        """``kvm_mem_is_private()``: a lockless read of ``mem_attr_array``, or in place of the
        attributes of the file behind the gfn (``kvm_gmem_is_private()``)."""
        if not self.in_place:
            return bool(self.attributes.value_at(gfn) & PRIVATE)
        return next(self.private_runs(gfn, gfn + 1))[2]

    def private_runs(self, start: int, end: int) -> Iterator[tuple[int, int, bool]]:
        """``(start_gfn, end_gfn, private)`` runs covering ``[start, end)`` as ``gfn_is_private()``
        reads them: O(runs), in place O(slots + the files' runs)."""
        if not self.in_place:
            for s, e, v in self.attributes.runs(start, end):
                yield s, e, bool(v & PRIVATE)
            return
        at = start
        for slot in self.spaces[0].overlapping(start, end):
            lo, hi = max(start, slot.base_gfn), min(end, slot.end_gfn)
            if at < lo:
                yield at, lo, False
            if slot.gmem is None or not self.has_private_mem:
                yield lo, hi, False
            else:
                delta = slot.base_gfn - slot.gmem_pgoff(slot.base_gfn)
                for s, e, private in slot.gmem.private_runs(slot.gmem_pgoff(lo), slot.gmem_pgoff(hi)):
                    yield s + delta, e + delta, private
            at = hi
        if at < end:
            yield at, end, False


def check_gpa_range(addr: int, size: int) -> tuple[int, int]:
    """The common range checks: non-empty, no u64 wrap, 4 KiB aligned -> ``[start, end)`` gfns."""
    if size == 0:
        raise EINVAL("size must not be 0")
    if addr + size > U64_MAX:
        raise EINVAL("address + size wraps past 2^64")
    if addr % PAGE_SIZE or size % PAGE_SIZE:
        raise EINVAL(f"address and size must be 4 KiB aligned (address {addr:#x}, size {size:#x})")
    return addr >> PAGE_SHIFT, (addr + size) >> PAGE_SHIFT
