"""Service endpoints and system-scope capabilities."""

from __future__ import annotations

import os
import time

from fastapi import APIRouter, Request, Response

from app.api.deps import EngineDep
from app.api.responses import model_response
from app.models.state import Capabilities, Health

router = APIRouter()


@router.get(
    "/healthz",
    tags=["service"],
    summary="Liveness",
    description="Always 200 while the process serves requests; never needs a token.",
    operation_id="healthz",
    response_model=Health,
)
async def healthz(request: Request, engine: EngineDep) -> Response:
    return model_response(
        Health(
            status="ok",
            pid=os.getpid(),
            uptime_s=round(time.monotonic() - request.app.state.started, 3),
            vms=len(engine),
            version=request.app.version,
        )
    )


@router.get(
    "/v1/capabilities",
    tags=["capabilities"],
    summary="KVM_CHECK_EXTENSION on /dev/kvm",
    description="System-scope answers: API version, page size, `max_gfn`, the VM types "
    "(`KVM_CAP_VM_TYPES` = 0x3f: all six) and both semantics.",
    operation_id="get_capabilities",
    response_model=Capabilities,
)
async def capabilities(engine: EngineDep) -> Response:
    return model_response(Capabilities.model_validate(engine.capabilities()))
