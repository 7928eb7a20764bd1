"""Memslots (``KVM_SET_USER_MEMORY_REGION2``) and guest_memfd files (``KVM_CREATE_GUEST_MEMFD``)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, Response

from app.api import examples
from app.api.deps import FdPath, VmDep
from app.api.problems import error_responses
from app.api.responses import model_response
from app.models.kvm import KvmCreateGuestMemfd, KvmUserspaceMemoryRegion2
from app.models.state import GuestMemfd, GuestMemfdClose, GuestMemfdList, Memslot, MemslotList, MemslotUpdate
from app.models.types import U32

router = APIRouter(prefix="/v1/vms/{vm_id}", tags=["memslots"])
gmem_router = APIRouter(prefix="/v1/vms/{vm_id}", tags=["guest-memfds"])

SlotPath = Annotated[
    U32, Path(description="raw `slot`: as_id << 16 | id (decimal or 0x hex)", examples=["10", "0x10000"])
]


@router.put(
    "/memslots/{slot}",
    summary="Set a memslot (KVM_SET_USER_MEMORY_REGION2)",
    description="Does exactly what the ioctl does: **create**, **move** (new `guest_phys_addr`), **flags_only**, "
    "identical re-set (**none**) or **delete** (`memory_size` 0). Checks run in the kernel's order "
    "(docs/semantics.md, Memslots). Delete and move unmap (`kvm_arch_flush_shadow_memslot()`): every mapping of "
    "the VM on `linux` `default` VMs and on all `rfc-v9` VMs, the old slot's mappings otherwise. READONLY is "
    "refused on `sev_es`, `snp` and `tdx` under `linux`. While an MMU-notifier invalidation is open, any change "
    "is `EBUSY`.",
    operation_id="set_memslot",
    responses=error_responses("ENOENT", "EEXIST", "EBUSY", "EBADF"),
    response_model=MemslotUpdate,
)
async def set_memslot(
    vm: VmDep, slot: SlotPath, req: Annotated[KvmUserspaceMemoryRegion2, examples.MEMSLOT]
) -> Response:
    return model_response(vm.set_user_memory_region(slot, req))


@router.get(
    "/memslots",
    summary="List memslots",
    description="All address spaces, sorted by as_id then base_gfn.",
    operation_id="list_memslots",
    responses=error_responses("ENOENT"),
    response_model=MemslotList,
)
async def list_memslots(vm: VmDep) -> Response:
    return model_response(MemslotList(memslots=vm.memslots()))


@router.get(
    "/memslots/{slot}",
    summary="Get a memslot",
    description="`struct kvm_memory_slot` of the raw `slot` (`as_id << 16 | id`); `ENOENT` when there is none.",
    operation_id="get_memslot",
    responses=error_responses("ENOENT"),
    response_model=Memslot,
)
async def get_memslot(vm: VmDep, slot: SlotPath) -> Response:
    return model_response(vm.memslot(slot))


@router.delete(
    "/memslots/{slot}",
    status_code=204,
    summary="Delete a memslot",
    description="Like a `memory_size` 0 set, but a missing slot is `ENOENT` (404) instead of the ioctl's `EINVAL`.",
    operation_id="delete_memslot",
    responses=error_responses("ENOENT", "EBUSY"),
)
async def delete_memslot(vm: VmDep, slot: SlotPath) -> Response:
    vm.delete_memslot(slot)
    return Response(status_code=204)


@gmem_router.post(
    "/guest-memfds",
    status_code=201,
    summary="Create a guest_memfd (KVM_CREATE_GUEST_MEMFD)",
    description="Size must be a non-zero multiple of 4 KiB below 2^63 (a signed `loff_t`). Flags: `linux` allows "
    "`GUEST_MEMFD_FLAG_MMAP` (1) on every VM and `GUEST_MEMFD_FLAG_INIT_SHARED` (2) on VMs without private "
    "memory; `rfc-v9` none. fds are per VM and unique while open. `ENOTTY` on a host profile built without "
    "guest_memfd (`KVM_CAP_GUEST_MEMFD` 0).",
    operation_id="create_guest_memfd",
    responses=error_responses("ENOENT", "ENOTTY"),
    response_model=GuestMemfd,
)
async def create_guest_memfd(vm: VmDep, req: Annotated[KvmCreateGuestMemfd, examples.GUEST_MEMFD]) -> Response:
    return model_response(vm.create_guest_memfd(req), 201)


@gmem_router.get(
    "/guest-memfds",
    summary="List open guest_memfds",
    description="Every guest_memfd whose fd is open, with the slots bound to it (raw slot, offset, size).",
    operation_id="list_guest_memfds",
    responses=error_responses("ENOENT"),
    response_model=GuestMemfdList,
)
async def list_guest_memfds(vm: VmDep) -> Response:
    return model_response(GuestMemfdList(guest_memfds=vm.guest_memfds()))


@gmem_router.get(
    "/guest-memfds/{fd}",
    summary="Get a guest_memfd",
    description="One open guest_memfd: size, flags and bindings; `ENOENT` once closed.",
    operation_id="get_guest_memfd",
    responses=error_responses("ENOENT"),
    response_model=GuestMemfd,
)
async def get_guest_memfd(vm: VmDep, fd: FdPath) -> Response:
    return model_response(vm.guest_memfd(fd))


@gmem_router.delete(
    "/guest-memfds/{fd}",
    summary="Close a guest_memfd (kvm_gmem_release)",
    description="The fd can no longer be named afterwards. `linux`: every bound slot loses its file (it keeps "
    "`KVM_MEM_GUEST_MEMFD` until deleted) and, if any slot was bound, its mappings are invalidated: begin, "
    "range_add + unmap per slot (`tdx`: private mappings only; other types: all), one TLB flush if anything was "
    "unmapped, end. Later private faults there are memory-fault exits. `rfc-v9`: the bound slots keep the file "
    "alive; nothing is unmapped. `invalidated` is true exactly when a begin/end pair ran.",
    operation_id="close_guest_memfd",
    responses=error_responses("ENOENT"),
    response_model=GuestMemfdClose,
)
async def close_guest_memfd(vm: VmDep, fd: FdPath) -> Response:
    return model_response(vm.close_guest_memfd(fd))
