"""Simulated guest and host activity: vCPU faults, prefault, host MMU-notifier invalidations."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, Response

from app.api import examples
from app.api.deps import VmDep
from app.api.problems import error_responses
from app.api.responses import model_response
from app.models.kvm import FaultRequest, NotifierRequest, PrefaultRequest
from app.models.state import FaultResult, NotifierEnd, NotifierList, NotifierStart, PrefaultResult

router = APIRouter(prefix="/v1/vms/{vm_id}", tags=["guest and host activity"])


@router.post(
    "/faults",
    summary="A vCPU page fault (KVM_RUN hitting an EPT/NPT violation)",
    description="`linux` (6.18 `kvm_mmu_faultin_pfn()`), in order: private/shared mismatch -> memory-fault exit; "
    "no slot -> memory-fault exit if private, else `KVM_EXIT_MMIO`; `mmu_invalidate_retry_gfn()` -> retry; "
    "private access without an open guest_memfd -> memory-fault exit; shared write to a READONLY slot -> "
    "`KVM_EXIT_MMIO`; else map. The exit is `KVM_EXIT_MEMORY_FAULT` (39, flags 8 when private, `KVM_RUN` "
    "fails with EFAULT). `rfc-v9` (v9 7/8): mismatch (only on guest_memfd slots) -> exit; private access without "
    "a guest_memfd slot -> exit; no slot or a READONLY write -> `KVM_EXIT_MMIO`; retry check; map; its exit has "
    "v9's ABI (reason 38, flags 1 when private, `errno` null). `private` null = as private as the gfn's "
    "attribute; `mmu_seq` = the seq the vCPU snapshotted (null = now): pass an old one to see a racing fault "
    "retry.",
    operation_id="fault",
    responses=error_responses("ENOENT", "ENOMEM"),
    response_model=FaultResult,
)
async def fault(vm: VmDep, req: Annotated[FaultRequest, examples.FAULT]) -> Response:
    return model_response(vm.fault(req))


@router.post(
    "/prefault",
    summary="Map a range ahead of the guest (KVM_PRE_FAULT_MEMORY)",
    description="`linux` only (`rfc-v9`: `ENOTTY`; `snp`/`tdx`: `EOPNOTSUPP`, their launch is not simulated). "
    "Page by page from `gpa`, a fault with the gfn's current attribute, not counted in `stats.faults`. The walk "
    "stops at the first page a fault would not map: no slot (`ENOENT`), a memory-fault exit (`EFAULT`), inside "
    "an open invalidation (`EAGAIN`). Stopped on the first page: that errno; otherwise 200 with what remains "
    "(`remaining`, size 0 when done) and `stopped`.",
    operation_id="prefault",
    responses=error_responses("ENOENT", "ENOTTY", "EOPNOTSUPP", "EAGAIN", "EFAULT", "ENOMEM"),
    response_model=PrefaultResult,
)
async def prefault(vm: VmDep, req: Annotated[PrefaultRequest, examples.PREFAULT]) -> Response:
    return model_response(vm.prefault(req))


@router.post(
    "/mmu-notifier/invalidations",
    status_code=201,
    summary="Host starts invalidating a userspace range (invalidate_range_start)",
    description="`[hva_start, hva_end)` becomes gfn ranges through every memslot whose userspace range overlaps "
    "it, in every address space. If any slot matched: invalidate begin, range_add each, unmap there (`tdx`: the "
    "**shared** mappings only; every other type: all mappings), flush if anything was unmapped. Memslot changes "
    "are `EBUSY` until it ends.",
    operation_id="start_notifier_invalidation",
    responses=error_responses("ENOENT"),
    response_model=NotifierStart,
)
async def start_invalidation(vm: VmDep, req: Annotated[NotifierRequest, examples.NOTIFIER]) -> Response:
    return model_response(vm.notifier_start(req), 201)


@router.delete(
    "/mmu-notifier/invalidations/{inv_id}",
    summary="Host ends an invalidation (invalidate_range_end)",
    description="Runs invalidate end (seq++, in_progress--) if the start matched a slot.",
    operation_id="end_notifier_invalidation",
    responses=error_responses("ENOENT"),
    response_model=NotifierEnd,
)
async def end_invalidation(vm: VmDep, inv_id: Annotated[int, Path(ge=0, le=2**63 - 1)]) -> Response:
    return model_response(vm.notifier_end(inv_id))


@router.get(
    "/mmu-notifier/invalidations",
    summary="Open notifier invalidations",
    description="The invalidations started and not yet ended, with the gfn ranges each matched. While any is "
    "open, memslot changes are `EBUSY`.",
    operation_id="list_notifier_invalidations",
    responses=error_responses("ENOENT"),
    response_model=NotifierList,
)
async def list_invalidations(vm: VmDep) -> Response:
    return model_response(NotifierList(invalidations=vm.open_notifiers()))
