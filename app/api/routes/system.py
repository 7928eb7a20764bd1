"""Service endpoints and system-scope capabilities."""

from __future__ import annotations

import os
import time
from typing import Annotated

from fastapi import APIRouter, Path, Request, Response

from app.api.deps import EngineDep
from app.api.problems import error_responses
from app.api.responses import model_response
from app.core.errors import ENOENT
from app.models.host import HostProfile
from app.models.state import Capabilities, Health, HostProfileList

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
    description="System-scope answers of the service's default host profile (`KVM_MEMATTR_PROFILE`, "
    "`linux-6.18` unless set): API version, page size, `max_gfn`, the profile itself, the VM types it accepts "
    "(`KVM_CAP_VM_TYPES`; 0x3f, all six, on `linux-6.18`), both semantics and every capability it records.",
    operation_id="get_capabilities",
    response_model=Capabilities,
)
async def capabilities(engine: EngineDep) -> Response:
    return model_response(Capabilities.model_validate(engine.capabilities()))


@router.get(
    "/v1/host-profiles",
    tags=["capabilities"],
    summary="List host profiles",
    description="The hosts a VM can behave as (`profile` of `POST /v1/vms`): what each reports to "
    "`KVM_CHECK_EXTENSION`, its `max_gfn` and the kernel version a `linux` VM follows. `default` is the profile "
    "of a VM created without one. A VM can also be created from a whole profile document, such as "
    "`kvm-memattr host-profile --json` records of a real host.",
    operation_id="list_host_profiles",
    response_model=HostProfileList,
)
async def list_host_profiles(engine: EngineDep) -> Response:
    return model_response(HostProfileList(default=engine.host.name, profiles=engine.profiles()))


@router.get(
    "/v1/host-profiles/{name}",
    tags=["capabilities"],
    summary="Get a host profile",
    description="One profile of `GET /v1/host-profiles` by name; 404 `ENOENT` for any other name.",
    operation_id="get_host_profile",
    responses=error_responses("ENOENT"),
    response_model=HostProfile,
)
async def get_host_profile(
    engine: EngineDep, name: Annotated[str, Path(max_length=64, examples=["pvm-6.18"])]
) -> Response:
    for p in engine.profiles():
        if p.name == name:
            return model_response(p)
    raise ENOENT(f"no host profile {name!r}")
