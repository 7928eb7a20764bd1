"""The host process's side of a guest_memfd: ``fallocate()``, ``mmap()``, host accesses, ``munmap()``
and which pages of the file are allocated (``virt/kvm/guest_memfd.c``)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, Query, Response

from app.api import examples
from app.api.deps import FdPath, LimitQuery, VmDep
from app.api.problems import error_responses
from app.api.responses import model_response
from app.models.kvm import FallocateRequest, KvmMemoryAttributes2, MmapRequest, TouchRequest
from app.models.state import (
    FallocateResult,
    FileRuns,
    GmemAttributeUpdate,
    GuestMemfdClose,
    HostMapping,
    HostMappingList,
    HostPin,
    HostPinList,
    HostTouch,
)
from app.models.types import U64

router = APIRouter(prefix="/v1/vms/{vm_id}", tags=["guest-memfds"])

MappingPath = Annotated[int, Path(ge=1, le=2**63 - 1, description="host mapping id (what mmap returned)")]
PinPath = Annotated[int, Path(ge=1, le=2**63 - 1, description="pin id (what pin returned)")]


@router.post(
    "/guest-memfds/{fd}/memory-attributes",
    summary="KVM_SET_MEMORY_ATTRIBUTES2 on a guest_memfd: in-place conversion (7.4)",
    description="Only where the VM's host converts in place (profile `linux-7.4-in-place`: "
    "`gmem_in_place_conversion`): private/shared lives in the file, shared by every slot bound to it. Errno "
    "order (`kvm_gmem_ioctl()`, `kvm_gmem_set_attributes()`): `ENOTTY` on any other host (checked first), then "
    "`EINVAL` for flags, reserved, a VM without private memory, attributes other than 0 or 8, size 0 or a wrap, "
    "unaligned offset or size, a range past the file's size. A range that already has the attributes returns at "
    "once (`noop`, nothing invalidated). Preallocation: `ENOMEM` (fail-nth 1) with `error_offset` = offset. To "
    "private: the host's page tables lose the range (later host accesses `SIGBUS`), then a page in use (pinned, "
    "see `.../host-mappings/{mapping}/pin`) refuses with `EAGAIN` and `error_offset` = its offset: unpin and retry. "
    "Past that nothing fails: invalidate start over every binding (to private: shared mappings unmapped, and the "
    "reverse; outside TDX every mapping), store, invalidate end (seq bumped).",
    operation_id="set_guest_memfd_memory_attributes",
    responses=error_responses("ENOENT", "EBADF", "ENOTTY", "EAGAIN", "ENOMEM"),
    response_model=GmemAttributeUpdate,
)
async def set_gmem_attributes(
    vm: VmDep,
    fd: FdPath,
    req: Annotated[KvmMemoryAttributes2, examples.GMEM_ATTRIBUTES],
) -> Response:
    return model_response(vm.set_gmem_attributes(fd, req))


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
    "if it has none. A page past the file's end, or a private page (any page of a file created without "
    "`GUEST_MEMFD_FLAG_INIT_SHARED`; in place, a page whose attribute is private), is `SIGBUS`; past the mapping, `SIGSEGV`: `EFAULT` with `signal` and "
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


@router.post(
    "/host-mappings/{mapping}/pin",
    status_code=201,
    summary="Pin pages through a host mapping (pin_user_pages)",
    description="What GUP or a VFIO/IOMMU DMA mapping of the host's memory holds: the pages of `[offset, offset + "
    "size)` of the mapping are faulted in as for a touch (`EFAULT` with `signal` where a touch would take one: a "
    "private page, past the file or the mapping) and held until unpinned. A to-private "
    "`KVM_SET_MEMORY_ATTRIBUTES2` over a pinned page in the file's page cache is `EAGAIN`. The pin keeps the file "
    "(a simplification: the kernel's pin holds the pages, not the file).",
    operation_id="pin_host_mapping",
    responses=error_responses("ENOENT", "EFAULT", "ENOMEM"),
    response_model=HostPin,
)
async def pin(
    vm: VmDep,
    mapping: MappingPath,
    req: Annotated[TouchRequest, examples.PIN],
) -> Response:
    return model_response(vm.pin(mapping, req), 201)


@router.get(
    "/host-pins",
    summary="List the host's pins of guest_memfd pages",
    description="Every pin not yet unpinned: its file's fd (null once closed), first byte offset and size.",
    operation_id="list_host_pins",
    responses=error_responses("ENOENT"),
    response_model=HostPinList,
)
async def list_host_pins(vm: VmDep) -> Response:
    return model_response(HostPinList(pins=vm.host_pins()))


@router.get(
    "/host-pins/{pin}",
    summary="Get a pin",
    description="One pin: its file's fd (null once closed), first byte offset and size.",
    operation_id="get_host_pin",
    responses=error_responses("ENOENT"),
    response_model=HostPin,
)
async def get_host_pin(vm: VmDep, pin: PinPath) -> Response:
    return model_response(vm.host_pin(pin))


@router.delete(
    "/host-pins/{pin}",
    summary="Unpin (unpin_user_pages)",
    description="Drops the pin. If it was the last reference to a closed, unmapped file, `kvm_gmem_release()` "
    "runs as for a close (`released` true).",
    operation_id="unpin_host_pin",
    responses=error_responses("ENOENT"),
    response_model=GuestMemfdClose,
)
async def unpin(vm: VmDep, pin: PinPath) -> Response:
    return model_response(vm.unpin(pin))


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
