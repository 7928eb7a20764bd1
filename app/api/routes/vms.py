"""VMs: ``KVM_CREATE_VM`` and ``kvm_destroy_vm()``."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Response

from app.api import examples
from app.api.deps import EngineDep, VmDep
from app.api.problems import error_responses
from app.api.responses import model_response
from app.models.snapshot import VmSnapshot
from app.models.state import Capabilities, Vm, VmList
from app.models.vm import VmCreate

router = APIRouter(prefix="/v1/vms", tags=["vms"])


@router.post(
    "",
    status_code=201,
    summary="Create a VM (KVM_CREATE_VM)",
    description="Creates a VM of a `KVM_X86_*_VM` type that follows one semantics: `rfc-v9` (the Oct-2022 "
    "patch: GPA `KVM_MEMORY_ENCRYPT_{REG,UNREG}_REGION`, memory private by default on private-memory VMs) or "
    "`linux` (6.8+: `KVM_SET_MEMORY_ATTRIBUTES`, shared by default). The body may be omitted.",
    operation_id="create_vm",
    responses=error_responses("ENOMEM"),
    response_model=Vm,
)
async def create_vm(engine: EngineDep, req: Annotated[VmCreate | None, examples.CREATE_VM] = None) -> Response:
    return model_response(engine.create_vm(req or VmCreate()).model(), 201)


@router.post(
    "/import",
    status_code=201,
    summary="Create a VM from a snapshot",
    description="Loads a document from `GET /v1/vms/{vm_id}/snapshot` (its `name` may be changed) as a new VM with "
    "a new id and identical observable state. A malformed, tampered or inconsistent document (an unknown "
    "version, overlapping slots, a binding past its file, runs out of order, counters that disagree) is 422 "
    "`EINVAL` naming what is wrong, and creates nothing. The VM limit and the per-VM run budgets apply. The body "
    "may be up to `max_import_bytes`.",
    operation_id="import_vm",
    responses=error_responses("ENOMEM"),
    response_model=Vm,
)
def import_vm(engine: EngineDep, doc: VmSnapshot) -> Response:
    # Not async: loading a large snapshot runs in a worker thread, so other requests go on.
    return model_response(engine.import_vm(doc).model(), 201)


@router.get(
    "",
    summary="List VMs",
    description="Every VM of the service, each with its MMU invalidation state.",
    operation_id="list_vms",
    response_model=VmList,
)
async def list_vms(engine: EngineDep) -> Response:
    return model_response(VmList(vms=[vm.model() for vm in engine.vms()]))


@router.delete(
    "",
    status_code=204,
    summary="Destroy every VM (a reset for test suites)",
    description="`kvm_destroy_vm()` on every VM the service holds, as a test suite's reset between tests. "
    "Journaled state (`KVM_MEMATTR_STATE_FILE`) is dropped with them.",
    operation_id="delete_all_vms",
)
async def delete_all_vms(engine: EngineDep) -> Response:
    engine.destroy_all()
    return Response(status_code=204)


@router.get(
    "/{vm_id}",
    summary="Get a VM",
    description="The VM with its MMU invalidation state.",
    operation_id="get_vm",
    responses=error_responses("ENOENT"),
    response_model=Vm,
)
async def get_vm(vm: VmDep) -> Response:
    return model_response(vm.model())


@router.delete(
    "/{vm_id}",
    status_code=204,
    summary="Destroy a VM (kvm_destroy_vm)",
    description="Frees attributes, memslots, mappings, guest_memfds and pinned regions.",
    operation_id="delete_vm",
    responses=error_responses("ENOENT"),
)
async def delete_vm(engine: EngineDep, vm: VmDep) -> Response:
    engine.destroy_vm(vm.id)
    return Response(status_code=204)


@router.get(
    "/{vm_id}/snapshot",
    summary="The VM's whole state as one document",
    description="Type, semantics, attributes as runs, memslots of every address space, guest_memfd files and "
    "bindings, mappings, the invalidation counters and range, open notifier invalidations, pinned SEV regions, "
    "fault injection, statistics and the next event id; versioned. `POST /v1/vms/import` loads it again.",
    operation_id="get_vm_snapshot",
    responses=error_responses("ENOENT"),
    response_model=VmSnapshot,
)
async def get_snapshot(vm: VmDep) -> Response:
    return model_response(vm.snapshot())


@router.get(
    "/{vm_id}/capabilities",
    summary="KVM_CHECK_EXTENSION on the VM fd",
    description="`KVM_CAP_MEMORY_ATTRIBUTES` is 8 only on `linux` VMs with private memory; "
    "`KVM_CAP_MULTI_ADDRESS_SPACE` is the VM's number of address spaces.",
    operation_id="get_vm_capabilities",
    responses=error_responses("ENOENT"),
    response_model=Capabilities,
)
async def vm_capabilities(engine: EngineDep, vm: VmDep) -> Response:
    return model_response(Capabilities.model_validate(engine.vm_capabilities(vm.id)))
