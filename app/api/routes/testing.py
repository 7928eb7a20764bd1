"""Test support: fault injection, like ``/proc/self/fail-nth``."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Response

from app.api import examples
from app.api.deps import VmDep
from app.api.problems import error_responses
from app.api.responses import model_response
from app.models.kvm import FaultInjection
from app.models.state import FaultInjectionState

router = APIRouter(prefix="/v1/vms/{vm_id}/fault-injection", tags=["test support"])


@router.put(
    "",
    summary="Arm or disarm fault injection",
    description="The nth per-gfn allocation of the next gfn attribute update fails with ENOMEM (`rfc-v9`: the "
    "nth store, then an exact rollback that still bumps the seq; `linux`: the nth reservation, nothing changes). "
    "Consumed by the next update that passes validation and is not a `linux` no-op; null disarms.",
    operation_id="set_fault_injection",
    responses=error_responses("ENOENT"),
    response_model=FaultInjectionState,
)
async def set_fault_injection(vm: VmDep, req: Annotated[FaultInjection, examples.FAULT_INJECTION]) -> Response:
    return model_response(vm.set_fault_injection(req.fail_nth))


@router.get(
    "",
    summary="Fault injection state",
    description="The armed `fail_nth` (null when disarmed); it is consumed by the next gfn attribute update.",
    operation_id="get_fault_injection",
    responses=error_responses("ENOENT"),
    response_model=FaultInjectionState,
)
async def get_fault_injection(vm: VmDep) -> Response:
    return model_response(vm.fault_injection())
