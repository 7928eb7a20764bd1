"""Kernel constants and the uapi structs kvm-memattr mirrors.

Values are those of ``include/uapi/linux/kvm.h`` and
``arch/x86/include/uapi/asm/kvm.h``.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from .names import Semantics as Semantics
from .names import VmType as VmType
from .types import U32, U64

PAGE_SHIFT = 12
PAGE_SIZE = 1 << PAGE_SHIFT
U64_MAX = (1 << 64) - 1
GFN_LIMIT = 1 << 52
"""Attributes exist for every gfn below this (any u64 address >> 12)."""

KVM_API_VERSION = 12
KVM_MEMORY_ATTRIBUTE_PRIVATE = 1 << 3
KVM_MEMORY_EXIT_FLAG_PRIVATE = 1 << 3
KVM_EXIT_MMIO = 6
KVM_EXIT_MEMORY_FAULT = 39
V9_KVM_EXIT_MEMORY_FAULT = 38
"""v9 3/8's uapi numbering; 6.8 renumbered the exit to 39 and the flag to bit 3."""
V9_KVM_MEMORY_EXIT_FLAG_PRIVATE = 1 << 0

KVM_MEM_LOG_DIRTY_PAGES = 1 << 0
KVM_MEM_READONLY = 1 << 1
KVM_MEM_GUEST_MEMFD = 1 << 2

KVM_USER_MEM_SLOTS = 32764
KVM_MEM_MAX_NR_PAGES = (1 << 31) - 1
KVM_MAX_NR_ADDRESS_SPACES = 2
USER_HVA_LIMIT = 0x7FFFFFFFF000
"""``TASK_SIZE_MAX`` on x86-64: ``access_ok()`` fails above it."""

GUEST_MEMFD_FLAG_MMAP = 1 << 0
GUEST_MEMFD_FLAG_INIT_SHARED = 1 << 1

# include/uapi/linux/falloc.h
FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_COLLAPSE_RANGE = 0x08
FALLOC_FL_ZERO_RANGE = 0x10
FALLOC_FL_INSERT_RANGE = 0x20
FALLOC_FL_UNSHARE_RANGE = 0x40
FALLOC_FL_WRITE_ZEROES = 0x80
FALLOC_FL_MODE_MASK = (
    FALLOC_FL_PUNCH_HOLE
    | FALLOC_FL_COLLAPSE_RANGE
    | FALLOC_FL_ZERO_RANGE
    | FALLOC_FL_INSERT_RANGE
    | FALLOC_FL_UNSHARE_RANGE
    | FALLOC_FL_WRITE_ZEROES
)
LOFF_MAX = (1 << 63) - 1
"""``MAX_LFS_FILESIZE`` on 64-bit: a guest_memfd's ``s_maxbytes``."""

DEFAULT_MAX_GFN = (1 << 40) - 1
"""``kvm_mmu_max_gfn()`` for a 52-bit host physical address width."""


class Struct(BaseModel):
    # A typo such as "adress" must not silently become address 0, nor "yes" a bool.
    # Subclasses' model_config is merged into this one.
    model_config = ConfigDict(extra="forbid", strict=True)


class KvmEncRegion(Struct):
    """``struct kvm_enc_region`` (``KVM_MEMORY_ENCRYPT_{REG,UNREG}_REGION``)."""

    addr: U64
    size: U64

    model_config = ConfigDict(
        json_schema_extra={"examples": [{"addr": "0x100000000", "size": "0x200000"}]},
    )


class KvmMemoryAttributes(Struct):
    """``struct kvm_memory_attributes`` (``KVM_SET_MEMORY_ATTRIBUTES``)."""

    address: U64
    size: U64
    attributes: U64 = Field(description="8 = KVM_MEMORY_ATTRIBUTE_PRIVATE, 0 = shared")
    flags: U64 = 0

    model_config = ConfigDict(
        json_schema_extra={"examples": [{"address": "0x100000000", "size": "0x200000", "attributes": 8, "flags": 0}]},
    )


class KvmMemoryAttributes2(Struct):
    """``struct kvm_memory_attributes2`` (``KVM_SET_MEMORY_ATTRIBUTES2`` on a guest_memfd, 7.4). The
    kernel writes ``error_offset`` back only on ``ENOMEM`` and ``EAGAIN``: the problem document
    carries it then."""

    offset: U64 = Field(description="byte offset in the file")
    size: U64
    attributes: U64 = Field(description="8 = KVM_MEMORY_ATTRIBUTE_PRIVATE, 0 = shared")
    flags: U64 = 0
    error_offset: U64 = Field(0, description="out: ignored on input, as the kernel ignores it")
    reserved: list[U64] = Field(default_factory=lambda: [0] * 11, min_length=11, max_length=11)

    model_config = ConfigDict(
        json_schema_extra={"examples": [{"offset": "0x0", "size": "0x200000", "attributes": 8}]},
    )


class KvmUserspaceMemoryRegion2(Struct):
    """``struct kvm_userspace_memory_region2`` without ``slot`` (it is in the path)."""

    flags: U32 = 0
    guest_phys_addr: U64
    memory_size: U64 = Field(description="0 deletes the slot")
    userspace_addr: U64
    guest_memfd: U32 | None = Field(default=None, description="fd from POST .../guest-memfds")
    guest_memfd_offset: U64 = 0

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "flags": 0,
                    "guest_phys_addr": "0x100000000",
                    "memory_size": "0x400000",
                    "userspace_addr": "0x7f0000000000",
                },
                {
                    "flags": 4,
                    "guest_phys_addr": "0x100000000",
                    "memory_size": "0x400000",
                    "userspace_addr": "0x7f0000000000",
                    "guest_memfd": 3,
                    "guest_memfd_offset": 0,
                },
            ]
        },
    )


class KvmCreateGuestMemfd(Struct):
    """``struct kvm_create_guest_memfd`` (``KVM_CREATE_GUEST_MEMFD``)."""

    size: U64
    flags: U64 = 0

    model_config = ConfigDict(json_schema_extra={"examples": [{"size": "0x400000", "flags": 0}]})


class FallocateRequest(Struct):
    """``fallocate(fd, mode, offset, len)`` on a guest_memfd (``kvm_gmem_fallocate()``)."""

    mode: U32 = Field(
        FALLOC_FL_KEEP_SIZE,
        description="FALLOC_FL_KEEP_SIZE (1) allocates; FALLOC_FL_KEEP_SIZE | FALLOC_FL_PUNCH_HOLE (3) punches a hole",
    )
    offset: U64 = Field(description="loff_t: 2^63 and above read as negative")
    len: U64

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [{"mode": 3, "offset": "0x0", "len": "0x200000"}, {"mode": 1, "offset": 0, "len": "0x1000"}]
        }
    )


class MmapRequest(Struct):
    """``mmap(NULL, length, PROT_READ | PROT_WRITE, shared ? MAP_SHARED : MAP_PRIVATE, fd, offset)``
    by the host process (``kvm_gmem_mmap()``)."""

    offset: U64 = 0
    length: U64
    shared: bool = Field(True, description="MAP_SHARED; false is MAP_PRIVATE, which guest_memfd refuses")

    model_config = ConfigDict(json_schema_extra={"examples": [{"offset": 0, "length": "0x200000"}]})


class TouchRequest(Struct):
    """The host process reads or writes ``[offset, offset + size)`` of one of its mappings."""

    offset: U64 = Field(0, description="bytes from the start of the mapping")
    size: U64 = PAGE_SIZE
    write: bool = False

    model_config = ConfigDict(json_schema_extra={"examples": [{"offset": 0, "size": "0x2000", "write": True}]})


class FaultRequest(Struct):
    """One vCPU page fault (``KVM_RUN`` hitting an EPT/NPT violation)."""

    gpa: U64
    as_id: int = Field(default=0, ge=0, le=KVM_MAX_NR_ADDRESS_SPACES - 1)
    write: bool = False
    private: bool | None = Field(default=None, description="null: as private as the gfn's attribute")
    mmu_seq: U64 | None = Field(default=None, description="seq the vCPU snapshotted; null: now")

    model_config = ConfigDict(json_schema_extra={"examples": [{"gpa": "0x100000000", "write": True}]})


class PrefaultRequest(Struct):
    """``KVM_PRE_FAULT_MEMORY``: map a range ahead of the guest."""

    gpa: U64
    size: U64
    as_id: int = Field(default=0, ge=0, le=KVM_MAX_NR_ADDRESS_SPACES - 1)

    model_config = ConfigDict(json_schema_extra={"examples": [{"gpa": "0x100000000", "size": "0x200000"}]})


class NotifierRequest(Struct):
    """``mmu_notifier_invalidate_range_start`` on ``[hva_start, hva_end)``."""

    hva_start: U64
    hva_end: U64

    model_config = ConfigDict(
        json_schema_extra={"examples": [{"hva_start": "0x7f0000000000", "hva_end": "0x7f0000001000"}]},
    )


class FaultInjection(Struct):
    """Like ``/proc/self/fail-nth``: the nth per-gfn allocation of the next update fails."""

    fail_nth: int | None = Field(default=None, ge=1, description="null disarms")
    errno: Literal["ENOMEM"] = "ENOMEM"

    model_config = ConfigDict(json_schema_extra={"examples": [{"fail_nth": 3, "errno": "ENOMEM"}]})
