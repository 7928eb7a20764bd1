"""guest_memfd files, their bindings and the host's side of them (``virt/kvm/guest_memfd.c``):
``kvm_gmem_create()``, ``kvm_gmem_bind()``/``unbind()``, ``kvm_gmem_release()``,
``kvm_gmem_mmap()`` and ``kvm_gmem_fault_user_mapping()``, ``kvm_gmem_fallocate()``."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from app.core.errors import (
    EBADF,
    EEXIST,
    EFAULT,
    EFBIG,
    EINVAL,
    ENODEV,
    ENOENT,
    ENOMEM,
    ENOTTY,
    EOPNOTSUPP,
    EOVERFLOW,
    KvmError,
)
from app.core.gfn_range import (
    GfnRange,
    gmem_ranges,
    handle_gfn_range,
    invalidate_and_unmap,
    invalidate_begin,
    invalidate_end,
)
from app.core.kvm import GuestMemfdFile, HostMapping, Kvm, Memslot
from app.core.mmu import ZapFilter
from app.core.steps import Step, Steps
from app.models.kvm import (
    FALLOC_FL_COLLAPSE_RANGE,
    FALLOC_FL_INSERT_RANGE,
    FALLOC_FL_KEEP_SIZE,
    FALLOC_FL_MODE_MASK,
    FALLOC_FL_PUNCH_HOLE,
    FALLOC_FL_UNSHARE_RANGE,
    FALLOC_FL_WRITE_ZEROES,
    FALLOC_FL_ZERO_RANGE,
    GUEST_MEMFD_FLAG_INIT_SHARED,
    GUEST_MEMFD_FLAG_MMAP,
    LOFF_MAX,
    PAGE_SHIFT,
    PAGE_SIZE,
    U64_MAX,
)

FIRST_FD = 3
"""The first fd a VM hands out: 0 to 2 are the host process's stdio, open but not guest_memfds."""


def supported_flags(kvm: Kvm) -> int:
    """``kvm_gmem_get_supported_flags()``: MMAP always; INIT_SHARED only without private memory,
    or in place, where a file's pages can become private later; neither on a host whose
    guest_memfd predates them (its ``KVM_CAP_GUEST_MEMFD_FLAGS``)."""
    if not kvm.linux:
        return 0
    init_shared = not kvm.has_private_mem or kvm.in_place
    flags = GUEST_MEMFD_FLAG_MMAP | (GUEST_MEMFD_FLAG_INIT_SHARED if init_shared else 0)
    return flags & kvm.host.caps.KVM_CAP_GUEST_MEMFD_FLAGS


def check_create(kvm: Kvm, size: int, flags: int) -> None:
    """``kvm_gmem_create()``'s checks (the snapshot loader's too)."""
    if not kvm.has_guest_memfd:
        raise ENOTTY("KVM_CREATE_GUEST_MEMFD: this host is built without guest_memfd (KVM_CAP_GUEST_MEMFD 0)")
    supported = supported_flags(kvm)
    if flags & ~supported:
        raise EINVAL(f"guest_memfd flags {flags:#x} outside {supported:#x}")
    # The kernel's size is a signed loff_t: 2^63 and above read as negative.
    if size == 0 or size % PAGE_SIZE or size >= 1 << 63:
        raise EINVAL("guest_memfd size must be a non-zero multiple of 4 KiB below 2^63")


def create(kvm: Kvm, size: int, flags: int) -> GuestMemfdFile:
    """``KVM_CREATE_GUEST_MEMFD``."""
    check_create(kvm, size, flags)
    kvm.take("a guest_memfd")
    gmem = GuestMemfdFile(kvm.next_fd, size, flags, kvm.budget, in_place=kvm.in_place)
    kvm.next_fd += 1
    kvm.gmem_files[gmem.fd] = gmem
    kvm.events.emit("guest_memfd_create", fd=gmem.fd, size=size, flags=flags)
    return gmem


def fdget(fds: Mapping[int, GuestMemfdFile], fd: int, stdio: type[KvmError] = EBADF) -> GuestMemfdFile:
    """The open guest_memfd ``fd`` names in ``fds``: EBADF for any other fd, except an open stdio
    one (0 to 2), which is a file but not a guest_memfd: ``stdio`` says what the call answers then."""
    gmem = fds.get(fd)
    if gmem is None:
        if 0 <= fd < FIRST_FD:
            raise stdio(f"fd {fd} is open (stdio) but not a guest_memfd")
        raise EBADF(f"fd {fd} is not an open guest_memfd of this VM")
    return gmem


def check_bind(kvm: Kvm, fds: Mapping[int, GuestMemfdFile], fd: int | None, offset: int, size: int) -> GuestMemfdFile:
    """``kvm_gmem_bind()``'s checks: the file ``fd`` names in ``fds``, and a range of it that is
    inside the file and bound to no other slot. Changes nothing."""
    if fd is None:
        raise EBADF("KVM_MEM_GUEST_MEMFD needs a guest_memfd fd (none given)")
    gmem = fdget(fds, fd, stdio=EINVAL)  # fget() finds stdio, but its f_op is not kvm_gmem_fops
    # 6.18 compares in loff_t: an offset of 2^63 or more is negative, and an offset + size that
    # passes 2^63 overflows to a negative value that passes the check (a real 6.18 host accepts
    # such a binding; verify-host found it). 6.12.118's kvm_gmem_prepare_memory_region(): u64.
    split = kvm.linux and kvm.host.gmem_bind_split
    start, end = (offset, offset + size) if split else (_loff(offset), _loff(offset + size))
    if start < 0 or end > gmem.size:
        raise EINVAL(f"guest_memfd_offset + memory_size beyond the file ({gmem.size:#x} bytes)")
    if not split:  # else last of all (memslots.plan_set_memory_region())
        check_bind_overlap(kvm, gmem, offset, size)
    return gmem


def check_bind_overlap(kvm: Kvm, gmem: GuestMemfdFile, offset: int, size: int) -> None:
    """No other binding of the file overlaps ``[offset, offset + size)``. 6.12.118 checks it in
    ``kvm_gmem_commit_memory_region()``, after ``kvm_arch_prepare_memory_region()``."""
    if gmem.bind_conflict(offset, size):
        errno = EEXIST if kvm.linux and kvm.host.gmem_binding_overlap_eexist else EINVAL
        raise errno("range of the guest_memfd already bound to another slot")


def _loff(value: int) -> int:
    """A u64 as the kernel's signed ``loff_t``."""
    return value - (1 << 64) if value >= 1 << 63 else value


def bind(gmem: GuestMemfdFile, slot: Memslot) -> None:
    """``kvm_gmem_bind()``'s store, once ``check_bind()`` passed: an mmap-able file makes the
    slot gmem-only, and so does any file in place, where every fault comes from guest_memfd."""
    gmem.bindings[slot.slot] = (slot.gmem_offset, slot.npages << PAGE_SHIFT)
    slot.gmem = gmem
    slot.gmem_only = gmem.mmap_able or gmem.in_place


def unbind(kvm: Kvm, slot: Memslot) -> None:
    """``kvm_gmem_unbind()``: a deleted slot lets go of its range of the file (if it still has one);
    an rfc-v9 file nothing else holds goes with its last binding."""
    gmem = slot.gmem
    if gmem is None:
        return
    del gmem.bindings[slot.slot]
    slot.gmem = None
    if not gmem.bindings and not referenced(kvm, gmem):
        gmem.release()


def referenced(kvm: Kvm, gmem: GuestMemfdFile) -> bool:
    """Whether an fd, a host mapping or a pin still holds the file (a reference ``fput()`` would
    drop; a pin holds pages, not the file, but here it keeps them with their file)."""
    return kvm.is_open(gmem) or bool(gmem.mmaps) or bool(gmem.pins)


def invalidate_filter(gmem: GuestMemfdFile) -> ZapFilter:
    """``kvm_gmem_get_invalidate_filter()``: an INIT_SHARED file's mappings are shared ones, any
    other's private; in place, a file has both."""
    if gmem.in_place:
        return ZapFilter.ALL
    return ZapFilter.SHARED if gmem.init_shared else ZapFilter.PRIVATE


def binding_ranges(kvm: Kvm, gmem: GuestMemfdFile, start: int, end: int) -> list[GfnRange]:
    """``kvm_gmem_invalidate_begin()``'s walk: each binding's part of pages ``[start, end)``, as gfns."""
    out = []
    for r in gmem_ranges(kvm, gmem):
        slot = r.slot
        assert slot is not None
        pgoff = slot.gmem_offset >> PAGE_SHIFT
        lo, hi = max(pgoff, start), min(pgoff + slot.npages, end)
        if lo < hi:
            out.append(GfnRange(r.as_id, slot, slot.base_gfn + lo - pgoff, slot.base_gfn + hi - pgoff))
    return out


# ------------------------------------------------------------------ close


@dataclass(frozen=True)
class Release:
    released: bool  # the last reference went: kvm_gmem_release() ran
    pages_zapped: int
    invalidated: bool


def close(kvm: Kvm, fd: int) -> Release:
    """``close(fd)``: the file is released only with its last reference, so not while the host
    still maps it (each VMA holds one)."""
    gmem = kvm.gmem_files.pop(fd, None)
    if gmem is None:
        raise ENOENT(f"no open guest_memfd {fd}")
    kvm.budget.add(-1)
    out = _put(kvm, gmem)
    kvm.events.emit(
        "guest_memfd_close", fd=fd, released=out.released, pages_zapped=out.pages_zapped, invalidated=out.invalidated
    )
    return out


def _put(kvm: Kvm, gmem: GuestMemfdFile) -> Release:
    """``fput()`` of a dropped reference (an fd or a mapping): ``kvm_gmem_release()`` once none is left."""
    return Release(False, 0, False) if referenced(kvm, gmem) else _release(kvm, gmem)


def _release(kvm: Kvm, gmem: GuestMemfdFile) -> Release:
    """``kvm_gmem_release()``. linux: the slots hold no reference, so every bound slot loses its
    file (it keeps KVM_MEM_GUEST_MEMFD and, if gmem-only, KVM_MEMSLOT_GMEM_ONLY) and its mappings
    are invalidated with the file's filter. rfc-v9 (restrictedmem): the slots keep the file."""
    if not gmem.bindings:  # nothing holds it any more (else unbind() frees it with its last binding)
        gmem.release()
    if not kvm.linux:
        return Release(True, 0, False)
    ranges = gmem_ranges(kvm, gmem)
    for r in ranges:
        assert r.slot is not None
        unbind(kvm, r.slot)  # __kvm_gmem_release() clears each slot's file
        r.slot.gmem_fd = None
    walk = handle_gfn_range(
        kvm,
        ranges,
        invalidate_and_unmap(kvm, invalidate_filter(gmem), "guest_memfd_close"),
        on_lock=lambda: invalidate_begin(kvm, source="guest_memfd"),
    )
    if walk.found:
        invalidate_end(kvm)
    return Release(True, walk.zapped, walk.found)


# ------------------------------------------------------------- host mappings


def mmap(kvm: Kvm, fd: int, offset: int, length: int, shared: bool) -> HostMapping:
    """``mmap()`` of the file by the host process."""
    gmem = fdget(kvm.gmem_files, fd)
    npages = check_mmap(gmem, offset, length, shared)
    kvm.take("a host mapping")
    m = HostMapping(kvm.next_mapping_id, gmem, offset >> PAGE_SHIFT, npages)
    kvm.next_mapping_id += 1
    kvm.host_mappings[m.id] = m
    gmem.mmaps.add(m.id)
    kvm.events.emit("mmap", mapping=m.id, fd=fd, offset=offset, length=npages << PAGE_SHIFT)
    return m


def check_mmap(gmem: GuestMemfdFile, offset: int, length: int, shared: bool) -> int:
    """``do_mmap()``'s checks, then ``kvm_gmem_mmap()``'s (the snapshot loader's too): the
    mapping's pages. Changes nothing."""
    if length == 0:
        raise EINVAL("mmap length must not be 0")
    if offset % PAGE_SIZE:
        raise EINVAL(f"mmap offset {offset:#x} is not page aligned")
    npages = -(-length // PAGE_SIZE)  # PAGE_ALIGN(len)
    if (offset >> PAGE_SHIFT) + npages > U64_MAX >> PAGE_SHIFT:
        raise EOVERFLOW("mmap page offset + length wraps")
    if not gmem.mmap_able:
        raise ENODEV("the guest_memfd was created without GUEST_MEMFD_FLAG_MMAP")
    if not shared:
        raise EINVAL("guest_memfd can only be mapped MAP_SHARED")
    return npages


def munmap(kvm: Kvm, mapping_id: int) -> Release:
    """``munmap()`` of a whole mapping; the last reference to a closed file releases it."""
    m = kvm.host_mappings.pop(mapping_id, None)
    if m is None:
        raise ENOENT(f"no host mapping {mapping_id}")
    kvm.budget.add(-1)
    m.file.mmaps.discard(m.id)
    out = _put(kvm, m.file)
    kvm.events.emit("munmap", mapping=m.id, released=out.released, pages_zapped=out.pages_zapped)
    return out


@dataclass(frozen=True)
class Touch:
    pages: int
    allocated: int  # pages the access faulted in (kvm_gmem_get_folio() made them)


def touch(kvm: Kvm, mapping_id: int, offset: int, size: int, write: bool) -> Touch:
    """The host reads or writes ``[offset, offset + size)`` of a mapping."""
    m, start, end, before = _fault_in(kvm, mapping_id, offset, size)
    kvm.events.emit("host_touch", mapping=m.id, start_pgoff=start, end_pgoff=end, write=write)
    return Touch(end - start, end - start - before)


def pin(kvm: Kvm, mapping_id: int, offset: int, size: int) -> int:
    """``pin_user_pages()`` of ``[offset, offset + size)`` of a mapping (what GUP and an IOMMU
    mapping of the host's memory hold): its pages are faulted in, then held until unpinned.
    Returns the pin's id."""
    m, start, end, _ = _fault_in(kvm, mapping_id, offset, size, pinning=True)
    kvm.take("a pin")
    pin_id = kvm.next_pin_id
    kvm.next_pin_id += 1
    m.file.pins[pin_id] = (start, end - start)
    kvm.host_pins[pin_id] = m.file
    kvm.events.emit("host_pin", pin=pin_id, fd=m.file.fd, start_pgoff=start, end_pgoff=end)
    return pin_id


def unpin(kvm: Kvm, pin_id: int) -> Release:
    """``unpin_user_pages()``: the last reference to a closed, unmapped file releases it."""
    gmem = kvm.host_pins.pop(pin_id, None)
    if gmem is None:
        raise ENOENT(f"no pin {pin_id}")
    del gmem.pins[pin_id]
    gmem.detached.pop(pin_id, None)
    kvm.budget.add(-1)
    out = _put(kvm, gmem)
    kvm.events.emit("host_unpin", pin=pin_id, released=out.released, pages_zapped=out.pages_zapped)
    return out


def _fault_in(
    kvm: Kvm, mapping_id: int, offset: int, size: int, *, pinning: bool = False
) -> tuple[HostMapping, int, int, int]:
    """Each page of the access not yet in the host's page tables goes through
    ``kvm_gmem_fault_user_mapping()``: the mapping, the file's pages ``[start, end)`` and how many
    already had a folio. The whole range is checked first, so an access that takes a signal
    changes nothing (a real memcpy would have faulted in the pages before the failing one)."""
    m = kvm.host_mappings.get(mapping_id)
    if m is None:
        raise ENOENT(f"no host mapping {mapping_id}")
    if size == 0:
        raise EINVAL("size must not be 0")
    first, last = offset >> PAGE_SHIFT, (offset + size - 1) >> PAGE_SHIFT
    gmem, pg = m.file, m.pgoff
    # The first page that takes a signal, in address order: past i_size, or private, SIGBUS
    # (VM_FAULT_SIGBUS); past the VMA, SIGSEGV. GUP answers EFAULT where an access takes a signal.
    inside = min(last, m.npages - 1)
    eof = max(first, gmem.npages - pg)
    private = gmem.first_private(pg + first, pg + min(inside + 1, eof)) if first < eof else None
    sigbus = min(eof, private - pg) if private is not None else eof
    if sigbus <= inside:
        reason = "past the end of the file (i_size)" if sigbus == eof else _private_reason(gmem)
        raise _signal("SIGBUS", sigbus, reason, pinning)
    if last >= m.npages:
        raise _signal("SIGSEGV", max(first, m.npages), "past the end of the mapping", pinning)
    start, end = pg + first, pg + last + 1
    before = gmem.allocated_pages(start, end)
    if before < end - start and not kvm.budget.room(2):
        raise ENOMEM(f"the service-wide budget ({kvm.budget.limit} items) is used up")
    gmem.allocate(start, end)
    return m, start, end, before


def _private_reason(gmem: GuestMemfdFile) -> str:
    if gmem.attributes is None:
        return "the file is not GUEST_MEMFD_FLAG_INIT_SHARED"
    return "the page is private (private unless the file was created INIT_SHARED or converted to shared)"


def _signal(signal: str, page: int, reason: str, pinning: bool) -> EFAULT:
    """A host access that takes ``signal`` at ``page`` of its mapping (EFAULT, as
    ``process_vm_readv()`` of that address, or GUP, would answer)."""
    what = "pin_user_pages()" if pinning else "host access"
    return EFAULT(
        f"{what} at mapping offset {page << PAGE_SHIFT:#x}: {signal}, {reason}",
        signal=signal,
        fault_offset=page << PAGE_SHIFT,
    )


# ---------------------------------------------------------------- fallocate


def check_fallocate(kvm: Kvm, fd: int, mode: int, offset: int, length: int) -> GuestMemfdFile:
    """``vfs_fallocate()`` then ``kvm_gmem_fallocate()``'s checks, in the kernel's order."""
    gmem = fdget(kvm.gmem_files, fd)
    off, ln = _loff(offset), _loff(length)
    if off < 0 or ln <= 0:
        raise EINVAL("fallocate offset must be >= 0 and len > 0 (both loff_t)")
    if mode & ~(FALLOC_FL_MODE_MASK | FALLOC_FL_KEEP_SIZE):
        raise EOPNOTSUPP(f"fallocate mode {mode:#x} has unknown bits")
    kind, keep = mode & FALLOC_FL_MODE_MASK, mode & FALLOC_FL_KEEP_SIZE
    # vfs_fallocate(): the modes are exclusive (allocate is no bit); punch-hole needs KEEP_SIZE,
    # and the modes that change the size refuse it.
    if kind not in _FALLOC_MODES:
        raise EOPNOTSUPP(f"fallocate mode {mode:#x} combines two modes")
    if kind == FALLOC_FL_PUNCH_HOLE and not keep:
        raise EOPNOTSUPP("FALLOC_FL_PUNCH_HOLE needs FALLOC_FL_KEEP_SIZE")
    if kind in _RESIZING_MODES and keep:
        raise EOPNOTSUPP(f"fallocate mode {mode:#x}: this mode changes the size and refuses KEEP_SIZE")
    if off + ln > LOFF_MAX:
        raise EFBIG("offset + len passes the largest file offset (2^63 - 1)")
    # kvm_gmem_fallocate()
    if not mode & FALLOC_FL_KEEP_SIZE:
        raise EOPNOTSUPP("guest_memfd fallocate needs FALLOC_FL_KEEP_SIZE (its size is fixed)")
    if mode & ~(FALLOC_FL_KEEP_SIZE | FALLOC_FL_PUNCH_HOLE):
        raise EOPNOTSUPP(f"guest_memfd fallocate supports only KEEP_SIZE [| PUNCH_HOLE], not mode {mode:#x}")
    if off % PAGE_SIZE or ln % PAGE_SIZE:
        raise EINVAL(f"offset {offset:#x} and len {length:#x} must be page aligned")
    if not mode & FALLOC_FL_PUNCH_HOLE and off + ln > gmem.size:
        raise EINVAL(f"kvm_gmem_allocate(): offset + len past the file's size ({gmem.size:#x})")
    return gmem


_RESIZING_MODES = (FALLOC_FL_COLLAPSE_RANGE, FALLOC_FL_INSERT_RANGE, FALLOC_FL_WRITE_ZEROES)
_FALLOC_MODES = (0, FALLOC_FL_PUNCH_HOLE, FALLOC_FL_ZERO_RANGE, FALLOC_FL_UNSHARE_RANGE, *_RESIZING_MODES)


def allocate(kvm: Kvm, gmem: GuestMemfdFile, offset: int, length: int) -> int:
    """``kvm_gmem_allocate()``: a folio for each page that has none, in order. An armed fail-nth
    fails the nth new folio with ENOMEM, and the ones before it stay (the kernel does not undo
    them). Returns the pages it allocated."""
    start, end = offset >> PAGE_SHIFT, (offset + length) >> PAGE_SHIFT
    holes = [(s, e) for s, e, v in gmem.allocated.runs(start, end) if not v]
    missing = sum(e - s for s, e in holes)
    nth, kvm.fail_nth = kvm.fail_nth, None
    if missing and not kvm.budget.room(2):
        raise ENOMEM(f"the service-wide budget ({kvm.budget.limit} items) is used up")
    stop = end
    if nth is not None and nth <= missing:
        for s, e in holes:  # the page of the nth missing one
            if nth <= e - s:
                stop = s + nth - 1
                break
            nth -= e - s
    done = sum(min(e, stop) - s for s, e in holes if s < stop)
    gmem.allocate(start, stop)
    kvm.events.emit("fallocate", start_pgoff=start, end_pgoff=end, allocated=done, punch_hole=False)
    if stop < end:
        raise ENOMEM(f"folio allocation for page {stop:#x} failed; {done} pages before it stay allocated")
    return done


class PunchHole:
    """``kvm_gmem_punch_hole()`` as its steps: under the file's invalidate lock, invalidate begin
    over every binding (mmu_invalidate_begin on the first one that intersects, range_add and unmap
    per binding, one flush), free the pages (``truncate_inode_pages_range()``), invalidate end.

    ``free_first`` and ``seq_bump=False`` are wrong orders, run only by the explorer."""

    def __init__(self, kvm: Kvm, gmem: GuestMemfdFile, offset: int, length: int) -> None:
        self.kvm, self.gmem = kvm, gmem
        self.start = offset >> PAGE_SHIFT
        self.end = (offset + length) >> PAGE_SHIFT  # not clipped at i_size: pages past it go too
        self.freed = 0
        self.zapped = 0
        self.invalidated = False

    def steps(self, *, free_first: bool = False, seq_bump: bool = True) -> Steps:
        if free_first:
            yield Step("truncate", holds_mmu_lock=False)
            self._truncate()
        yield Step("invalidate_begin", holds_mmu_lock=False, takes_mmu_lock=True)
        self._begin()
        if not free_first:
            yield Step("truncate", holds_mmu_lock=False)
            self._truncate()
        yield Step("invalidate_end", holds_mmu_lock=False, takes_mmu_lock=True)
        if self.invalidated:  # __kvm_gmem_invalidate_end(): only if a binding intersects
            if seq_bump:
                invalidate_end(self.kvm)
            else:
                self.kvm.inval.in_progress -= 1
        self.kvm.events.emit("fallocate", start_pgoff=self.start, end_pgoff=self.end, freed=self.freed, punch_hole=True)

    def _begin(self) -> None:
        kvm = self.kvm
        walk = handle_gfn_range(
            kvm,
            binding_ranges(kvm, self.gmem, self.start, self.end),
            invalidate_and_unmap(kvm, invalidate_filter(self.gmem), "punch_hole"),
            on_lock=lambda: invalidate_begin(kvm, source="guest_memfd"),
        )
        self.invalidated, self.zapped = walk.found, walk.zapped

    def _truncate(self) -> None:
        if self.start < self.end:
            self.freed = self.gmem.truncate(self.start, self.end)
