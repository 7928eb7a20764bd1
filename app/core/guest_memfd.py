"""guest_memfd files and their bindings: ``kvm_gmem_create()``, ``kvm_gmem_bind()``,
``kvm_gmem_unbind()`` and ``kvm_gmem_release()`` (``virt/kvm/guest_memfd.c``)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from app.core.errors import EBADF, EINVAL, ENOENT, ENOTTY
from app.core.gfn_range import gmem_ranges, handle_gfn_range, invalidate_and_unmap, invalidate_begin, invalidate_end
from app.core.kvm import GuestMemfdFile, Kvm, Memslot
from app.core.mmu import ZapFilter
from app.models.kvm import GUEST_MEMFD_FLAG_INIT_SHARED, GUEST_MEMFD_FLAG_MMAP, PAGE_SHIFT, PAGE_SIZE


def supported_flags(kvm: Kvm) -> int:
    """``kvm_gmem_get_supported_flags()``: MMAP always; INIT_SHARED only without private memory;
    neither on a host whose guest_memfd predates them (its ``KVM_CAP_GUEST_MEMFD_FLAGS``)."""
    if not kvm.linux:
        return 0
    flags = GUEST_MEMFD_FLAG_MMAP | (0 if kvm.has_private_mem else GUEST_MEMFD_FLAG_INIT_SHARED)
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
    gmem = GuestMemfdFile(kvm.next_fd, size, flags)
    kvm.next_fd += 1
    kvm.gmem_files[gmem.fd] = gmem
    kvm.events.emit("guest_memfd_create", fd=gmem.fd, size=size, flags=flags)
    return gmem


def check_bind(fds: Mapping[int, GuestMemfdFile], fd: int | None, offset: int, size: int) -> GuestMemfdFile:
    """``kvm_gmem_bind()``'s checks: the file ``fd`` names in ``fds``, and a range of it that is
    inside the file and bound to no other slot. Changes nothing."""
    if fd is None:
        raise EBADF("KVM_MEM_GUEST_MEMFD needs a guest_memfd fd (none given)")
    gmem = fds.get(fd)
    if gmem is None:
        raise EBADF(f"guest_memfd {fd} is not an open guest_memfd of this VM")
    # The kernel compares in loff_t: an offset of 2^63 or more is negative, and an offset + size
    # that passes 2^63 overflows to a negative value that passes the check (a real 6.18 host
    # accepts such a binding; verify-host found it).
    if _loff(offset) < 0 or _loff(offset + size) > gmem.size:
        raise EINVAL(f"guest_memfd_offset + memory_size beyond the file ({gmem.size:#x} bytes)")
    if gmem.bind_conflict(offset, size):
        raise EINVAL("range of the guest_memfd already bound to another slot")
    return gmem


def _loff(value: int) -> int:
    """A u64 as the kernel's signed ``loff_t``."""
    return value - (1 << 64) if value >= 1 << 63 else value


def bind(gmem: GuestMemfdFile, slot: Memslot) -> None:
    """``kvm_gmem_bind()``'s store, once ``check_bind()`` passed."""
    gmem.bindings[slot.slot] = (slot.gmem_offset, slot.npages << PAGE_SHIFT)
    slot.gmem = gmem


def unbind(slot: Memslot) -> None:
    """``kvm_gmem_unbind()``: a deleted slot lets go of its range of the file (if it still has one)."""
    if slot.gmem is not None:
        del slot.gmem.bindings[slot.slot]
        slot.gmem = None


@dataclass(frozen=True)
class Close:
    pages_zapped: int
    invalidated: bool


def close(kvm: Kvm, fd: int) -> Close:
    """``close(fd)``, the last reference. linux (``kvm_gmem_release()``): the slots hold no
    reference, so every bound slot loses its file (it keeps KVM_MEM_GUEST_MEMFD) and its
    mappings are invalidated. rfc-v9 (restrictedmem): the slots keep the file alive."""
    gmem = kvm.gmem_files.pop(fd, None)
    if gmem is None:
        raise ENOENT(f"no open guest_memfd {fd}")
    kvm.budget.add(-1)
    zapped, invalidated = 0, False
    if kvm.linux:
        ranges = gmem_ranges(kvm, gmem)
        for r in ranges:
            assert r.slot is not None
            unbind(r.slot)  # __kvm_gmem_release() clears each slot's file
            r.slot.gmem_fd = None
        # __kvm_gmem_invalidate_begin()/end(): private mappings (all of them outside TDX).
        walk = handle_gfn_range(
            kvm,
            ranges,
            invalidate_and_unmap(kvm, ZapFilter.PRIVATE, "guest_memfd_close"),
            on_lock=lambda: invalidate_begin(kvm, source="guest_memfd"),
        )
        if walk.found:
            invalidate_end(kvm)
        zapped, invalidated = walk.zapped, walk.found
    kvm.events.emit("guest_memfd_close", fd=fd, pages_zapped=zapped, invalidated=invalidated)
    return Close(zapped, invalidated)
