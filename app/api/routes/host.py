"""The host process's side of a guest_memfd: ``fallocate()``, ``mmap()``, host accesses, ``munmap()``
and which pages of the file are allocated (``virt/kvm/guest_memfd.c``)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, Query, Response

from app.api import examples
from app.api.deps import FdPath, LimitQuery, VmDep
from app.api.problems import error_responses
from app.api.responses import model_response
from app.models.kvm import FallocateRequest, MmapRequest, TouchRequest
from app.models.state import (
    FallocateResult,
    FileRuns,
    GuestMemfdClose,
    HostMapping,
    HostMappingList,
    HostTouch,
)
from app.models.types import U64

router = APIRouter(prefix="/v1/vms/{vm_id}", tags=["guest-memfds"])

MappingPath = Annotated[int, Path(ge=1, le=2**63 - 1, description="host mapping id (what mmap returned)")]


@router.post(
    "/guest-memfds/{fd}/fallocate",
    summary="fallocate() on a guest_memfd (kvm_gmem_fallocate)",
    description="`mode` 1 (`FALLOC_FL_KEEP_SIZE`) allocates the pages of `[offset, offset + len)` that have none "
    "(`kvm_gmem_allocate()`: `EINVAL` past the file's size; an armed fail-nth fails the nth new page with "
    "`ENOMEM` and the pages before it stay). `mode` 3 (`KEEP_SIZE | PUNCH_HOLE`) frees them "
    "(`kvm_gmem_punch_hole()`): invalidate begin over every slot bound to that part of the file (range_add and "
    "unmap per binding, with the file's filter: shared mappings for an INIT_SHARED file, private otherwise; "
    "outside TDX every mapping), one TLB flush if anything was unmapped, the pages freed, invalidate end (seq "
    "bumped). A hole never fails, even past the end. Errno order: `EINVAL` (offset < 0 or len <= 0 as "
    "`loff_t`), `EOPNOTSUPP` (unknown or combined mode bits, punch-hole without KEEP_SIZE), `EFBIG` (offset + "
    "len past 2^63 - 1), `EOPNOTSUPP` (guest_memfd: only KEEP_SIZE [| PUNCH_HOLE]), `EINVAL` (unaligned).",
    operation_id="fallocate_guest_memfd",
    responses=error_responses("ENOENT", "EBADF", "EOPNOTSUPP", "EFBIG", "ENOMEM"),
    response_model=FallocateResult,
)
async def fallocate(
    vm: VmDep,
    fd: FdPath,
    req: Annotated[FallocateRequest, examples.FALLOCATE],
) -> Response:
    return model_response(vm.fallocate(fd, req))


@router.get(
    "/guest-memfds/{fd}/pages",
    summary="Allocated pages of a guest_memfd, as runs",
    description="Maximal runs of allocated and unallocated pages of the file in `[start, end)` (byte offsets, "
    "default the whole file): a page is allocated once a guest fault, a host access or fallocate made its folio, "
    "and until a punch-hole frees it.",
    operation_id="get_guest_memfd_pages",
    responses=error_responses("ENOENT"),
    response_model=FileRuns,
)
async def file_pages(
    vm: VmDep,
    fd: FdPath,
    start: Annotated[U64, Query(description="first byte offset (rounded down to a page)")] = 0,
    end: Annotated[U64 | None, Query(description="end byte offset (default: the file's size)")] = None,
    limit: LimitQuery = 1000,
) -> Response:
    runs, next_offset = vm.file_runs(fd, start, (1 << 64) - 1 if end is None else end, limit)
    return model_response(FileRuns(runs=runs, next_offset=next_offset))


@router.post(
    "/guest-memfds/{fd}/mmap",
    status_code=201,
    summary="mmap() a guest_memfd into the host process (kvm_gmem_mmap)",
    description="`EINVAL` for length 0 or an unaligned offset (`do_mmap()`), `EOVERFLOW` when the page offset + "
    "length wraps, `ENODEV` for a file created without `GUEST_MEMFD_FLAG_MMAP`, `EINVAL` for `MAP_PRIVATE` "
    "(`shared` false). The length is rounded up to pages; mapping past the file's end is allowed (touching there "
    "is `SIGBUS`). The mapping holds the file: closing its fd does not release it until the last `munmap`.",
    operation_id="mmap_guest_memfd",
    responses=error_responses("ENOENT", "EBADF", "ENODEV", "EOVERFLOW"),
    response_model=HostMapping,
)
async def mmap(
    vm: VmDep,
    fd: FdPath,
    req: Annotated[MmapRequest, examples.MMAP],
) -> Response:
    return model_response(vm.mmap(fd, req), 201)


@router.get(
    "/host-mappings",
    summary="List the host's guest_memfd mappings",
    description="Every mapping `mmap` returned and `munmap` has not removed; `fd` is null once the file's fd was "
    "closed (the mapping still holds the file).",
    operation_id="list_host_mappings",
    responses=error_responses("ENOENT"),
    response_model=HostMappingList,
)
async def list_host_mappings(vm: VmDep) -> Response:
    return model_response(HostMappingList(mappings=vm.host_mappings()))


@router.get(
    "/host-mappings/{mapping}",
    summary="Get a host mapping",
    description="One mapping: its file's fd (null once closed), offset and length in bytes.",
    operation_id="get_host_mapping",
    responses=error_responses("ENOENT"),
    response_model=HostMapping,
)
async def get_host_mapping(vm: VmDep, mapping: MappingPath) -> Response:
    return model_response(vm.host_mapping(mapping))


@router.post(
    "/host-mappings/{mapping}/touch",
    summary="Host access through a mapping (kvm_gmem_fault_user_mapping)",
    description="Reads or writes `[offset, offset + size)` of the mapping. Each page comes from the file, allocated "
    "if it has none. A page past the file's end, or any page of a file created without "
    "`GUEST_MEMFD_FLAG_INIT_SHARED`, is `SIGBUS`; past the mapping, `SIGSEGV`: `EFAULT` with `signal` and "
    "`fault_offset` (the first such page) in the problem. The whole range is checked first, so an access that "
    "takes a signal allocates nothing.",
    operation_id="touch_host_mapping",
    responses=error_responses("ENOENT", "EFAULT", "ENOMEM"),
    response_model=HostTouch,
)
async def touch(
    vm: VmDep,
    mapping: MappingPath,
    req: Annotated[TouchRequest, examples.TOUCH],
) -> Response:
    return model_response(vm.touch(mapping, req))


@router.delete(
    "/host-mappings/{mapping}",
    summary="munmap() a host mapping",
    description="Drops the mapping's reference to its file. If the file's fd is already closed and no other mapping "
    "holds it, this is the last reference: `kvm_gmem_release()` runs as for a close (`released` true).",
    operation_id="munmap_host_mapping",
    responses=error_responses("ENOENT"),
    response_model=GuestMemfdClose,
)
async def munmap(vm: VmDep, mapping: MappingPath) -> Response:
    return model_response(vm.munmap(mapping))
