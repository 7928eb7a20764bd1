"""Per-operation request examples for Swagger UI: each names the case it shows."""

from __future__ import annotations

from typing import Any

from fastapi import Body

GPA = "0x100000000"  # 4 GiB, as the kernel selftests use
HVA = "0x7f0000000000"


def _ex(**cases: tuple[str, dict[str, Any]]) -> Any:
    """``Body`` with named examples: ``name=(summary, value)``."""
    return Body(
        openapi_examples={name: {"summary": summary, "value": value} for name, (summary, value) in cases.items()}
    )


CREATE_VM = _ex(  # the defaults first: what an empty body creates, on every surface
    v9=(
        "the defaults: an rfc-v9 software-protected VM (memory private by default)",
        {"type": "sw_protected", "semantics": "rfc-v9"},
    ),
    linux=("a linux software-protected VM", {"type": "sw_protected", "semantics": "linux", "name": "demo"}),
    sev=("an SEV VM (REG/UNREG pin host memory)", {"type": "sev", "semantics": "linux"}),
    host=(
        "a default VM on a 6.18 host built without guest_memfd",
        {"type": "default", "semantics": "linux", "profile": "pvm-6.18"},
    ),
    tdx=("a TDX VM on a TDX host", {"type": "tdx", "semantics": "linux", "profile": "tdx-6.18"}),
)
MEMSLOT = _ex(
    gmem=(
        "4 MiB at 4 GiB backed by guest_memfd 3",
        {
            "flags": 4,
            "guest_phys_addr": GPA,
            "memory_size": "0x400000",
            "userspace_addr": HVA,
            "guest_memfd": 3,
            "guest_memfd_offset": 0,
        },
    ),
    plain=(
        "a plain slot, dirty logging on",
        {"flags": 1, "guest_phys_addr": "0x0", "memory_size": "0xa0000", "userspace_addr": "0x7f1000000000"},
    ),
    delete=("delete it (memory_size 0)", {"guest_phys_addr": GPA, "memory_size": 0, "userspace_addr": HVA}),
)
GUEST_MEMFD = _ex(
    plain=("4 MiB", {"size": "0x400000", "flags": 0}),
    mmap=("4 MiB, mmap-able (linux)", {"size": "0x400000", "flags": 1}),
)
ATTRIBUTES = _ex(
    private=("2 MiB at 4 GiB to private", {"address": GPA, "size": "0x200000", "attributes": 8, "flags": 0}),
    shared=("the same back to shared", {"address": GPA, "size": "0x200000", "attributes": 0, "flags": 0}),
    unaligned=("refused: not 4 KiB aligned (EINVAL)", {"address": "0x100000800", "size": "0x1000", "attributes": 8}),
)
GMEM_ATTRIBUTES = _ex(
    private=("the first 2 MiB of the file to private", {"offset": "0x0", "size": "0x200000", "attributes": 8}),
    shared=("one page back to shared", {"offset": "0x1000", "size": "0x1000", "attributes": 0}),
    flags=("refused: flags must be 0 (EINVAL)", {"offset": "0x0", "size": "0x1000", "attributes": 8, "flags": 1}),
)
PIN = _ex(page=("the mapping's first page, as GUP or a VFIO DMA map would", {"offset": "0x0", "size": "0x1000"}))
ENC_REGION = _ex(
    gpa=("2 MiB at 4 GiB (rfc-v9 GPA)", {"addr": GPA, "size": "0x200000"}),
    hva=("4 KiB of host memory (SEV)", {"addr": HVA, "size": "0x1000"}),
)
FAULT = _ex(
    read=("a read of 4 GiB, as private as its attribute", {"gpa": GPA}),
    stale=("a vCPU that snapshotted seq 0 (retries once the seq moved)", {"gpa": GPA, "mmu_seq": 0}),
    private=("a private write", {"gpa": GPA, "write": True, "private": True}),
)
PREFAULT = _ex(whole=("the first 2 MiB of the slot", {"gpa": GPA, "size": "0x200000"}))
NOTIFIER = _ex(page=("the first page of the slot's host memory", {"hva_start": HVA, "hva_end": "0x7f0000001000"}))
FAULT_INJECTION = _ex(
    third=("fail the 3rd per-gfn allocation of the next update", {"fail_nth": 3, "errno": "ENOMEM"}),
    off=("disarm", {"fail_nth": None}),
)
EXPLORER = _ex(
    reorder=(
        "the review's reordering, 2nd store fails: a stale mapping",
        {"variant": "reviewer-reorder", "npages": 2, "fail_nth": 2},
    ),
    v9=("the engine's rfc-v9, same scenario: no violation", {"variant": "rfc-v9", "npages": 2, "fail_nth": 2}),
    naive=("the naive unwind at gfn 0: never ends", {"variant": "v9-naive-unwind", "start_gfn": 0, "fail_nth": 2}),
)
FALLOCATE = _ex(
    punch=("punch a 2 MiB hole (mode 3)", {"mode": 3, "offset": 0, "len": "0x200000"}),
    allocate=("allocate 2 MiB (mode 1)", {"mode": 1, "offset": 0, "len": "0x200000"}),
)
MMAP = _ex(shared=("map 2 MiB shared", {"offset": 0, "length": "0x200000"}))
TOUCH = _ex(write=("write two pages", {"offset": 0, "size": "0x2000", "write": True}))
