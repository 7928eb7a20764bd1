"""Memory attributes: the RFC API (``KVM_MEMORY_ENCRYPT_{REG,UNREG}_REGION``) and the merged one
(``KVM_SET_MEMORY_ATTRIBUTES``), plus the run-length read."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Response

from app.api import examples
from app.api.deps import EndGfnQuery, LimitQuery, StartGfnQuery, VmDep, gfn_window
from app.api.problems import error_responses
from app.api.responses import model_response
from app.models.kvm import KvmEncRegion, KvmMemoryAttributes
from app.models.state import AttributeRuns, AttributeUpdate, EncRegionList, SevRegionUpdate

router = APIRouter(prefix="/v1/vms/{vm_id}", tags=["memory-attributes"])

_ENC_DESCRIPTION = (
    "Body is `struct kvm_enc_region`. On an `rfc-v9` VM with private memory `addr`/`size` are a **GPA** range "
    "and the call makes it {kind} (the v9 patch): invalidate begin, store every gfn, unmap every mapping in the "
    "range in every memslot of both address spaces, flush TLBs if anything was unmapped, invalidate end. A failed "
    "store (see fault-injection) restores the exact previous attributes and still bumps `mmu_invalidate_seq`. "
    "On SEV-family VMs (`sev`, `sev_es`, and `snp` under `linux`) `addr`/`size` are an **HVA** range that is "
    "{sev}. Anything else: `ENOTTY`."
)


@router.post(
    "/memory-encrypt/reg-region",
    summary="Make a GPA range private / pin an SEV HVA range (KVM_MEMORY_ENCRYPT_REG_REGION)",
    description=_ENC_DESCRIPTION.format(kind="private", sev="pinned (duplicates and overlaps allowed)"),
    operation_id="memory_encrypt_reg_region",
    responses=error_responses("ENOENT", "ENOTTY", "ENOMEM"),
    response_model=AttributeUpdate | SevRegionUpdate,
)
async def reg_region(vm: VmDep, region: Annotated[KvmEncRegion, examples.ENC_REGION]) -> Response:
    return model_response(vm.memory_encrypt_reg_region(region))


@router.post(
    "/memory-encrypt/unreg-region",
    summary="Make a GPA range shared / unpin an SEV HVA range (KVM_MEMORY_ENCRYPT_UNREG_REGION)",
    description=_ENC_DESCRIPTION.format(kind="shared", sev="unpinned (needs an exact addr and size match)"),
    operation_id="memory_encrypt_unreg_region",
    responses=error_responses("ENOENT", "ENOTTY", "ENOMEM"),
    response_model=AttributeUpdate | SevRegionUpdate,
)
async def unreg_region(vm: VmDep, region: Annotated[KvmEncRegion, examples.ENC_REGION]) -> Response:
    return model_response(vm.memory_encrypt_unreg_region(region))


@router.get(
    "/memory-encrypt/regions",
    summary="Pinned SEV HVA regions",
    description="In registration order. GPA conversions are attribute changes, not registrations, and are not listed.",
    operation_id="list_enc_regions",
    responses=error_responses("ENOENT"),
    response_model=EncRegionList,
)
async def regions(vm: VmDep) -> Response:
    return model_response(EncRegionList(regions=vm.pinned_regions()))


@router.put(
    "/memory-attributes",
    summary="Set memory attributes (KVM_SET_MEMORY_ATTRIBUTES)",
    description="`linux` VMs only (`rfc-v9`: `ENOTTY`). Body is `struct kvm_memory_attributes`; `attributes` 8 "
    "(`KVM_MEMORY_ATTRIBUTE_PRIVATE`) makes the range private, 0 shared. An already-matching range is a **no-op** "
    "(no seq bump). Otherwise one entry per gfn is reserved (an injected failure here changes nothing), then for "
    "each memslot intersection: invalidate begin (first only), range_add, hugepage widening of the recorded range "
    "(2 MiB and 1 GiB head/tail pages inside the slot with uniform attributes), unmap (`tdx`: the opposite kind "
    "only; other types: every mapping); flush if anything was unmapped; store; invalidate end. No memslot "
    "intersection: no begin/end at all.",
    operation_id="set_memory_attributes",
    responses=error_responses("ENOENT", "ENOTTY", "ENOMEM"),
    response_model=AttributeUpdate,
)
async def set_memory_attributes(vm: VmDep, req: Annotated[KvmMemoryAttributes, examples.ATTRIBUTES]) -> Response:
    return model_response(vm.set_memory_attributes(req))


@router.get(
    "/memory-attributes",
    summary="Read attributes as runs",
    description="Maximal half-open runs that cover `[start_gfn, end_gfn)` exactly. Attributes exist for every gfn "
    "below 2^52, so `end_gfn` may go up to 2^52. `next_gfn` is set only when `limit` cut the answer.",
    operation_id="get_memory_attributes",
    responses=error_responses("ENOENT"),
    response_model=AttributeRuns,
)
async def get_memory_attributes(
    vm: VmDep, start_gfn: StartGfnQuery = None, end_gfn: EndGfnQuery = None, limit: LimitQuery = 1000
) -> Response:
    start, end = gfn_window(vm, start_gfn, end_gfn)
    runs, next_gfn = vm.attribute_runs(start, end, limit)
    return model_response(AttributeRuns(runs=runs, next_gfn=next_gfn))
