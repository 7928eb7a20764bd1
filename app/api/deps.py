"""Dependencies: the engine (from app state, so tests can inject their own) and path/query types."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Path, Query, Request
from pydantic import AfterValidator

from app.core import Engine
from app.core.errors import EINVAL
from app.core.vm import VirtualMachine
from app.models.kvm import GFN_LIMIT
from app.models.types import U64, uint_json_schema


async def get_engine(request: Request) -> Engine:
    engine: Engine = request.app.state.engine
    return engine


EngineDep = Annotated[Engine, Depends(get_engine)]


async def get_vm(
    engine: EngineDep, vm_id: Annotated[str, Path(description="VM id from POST /v1/vms", max_length=64)]
) -> VirtualMachine:
    # Through get_engine, so an override of it reaches every VM route too.
    return engine.vm(vm_id)


VmDep = Annotated[VirtualMachine, Depends(get_vm)]


def _below_gfn_limit(value: int) -> int:
    if value >= GFN_LIMIT:
        raise ValueError(f"gfn {value:#x} is at or above 2^52")
    return value


def _end_gfn_limit(value: int) -> int:
    if value > GFN_LIMIT:
        raise ValueError(f"end_gfn {value:#x} is above 2^52")
    return value


GfnValue = Annotated[U64, AfterValidator(_below_gfn_limit), uint_json_schema(0, GFN_LIMIT - 1)]
EndGfnValue = Annotated[U64, AfterValidator(_end_gfn_limit), uint_json_schema(1, GFN_LIMIT)]

StartGfnQuery = Annotated[GfnValue | None, Query(description="first gfn (default 0)")]
EndGfnQuery = Annotated[EndGfnValue | None, Query(description="end gfn, exclusive (default max_gfn + 1; up to 2^52)")]
FdPath = Annotated[int, Path(ge=0, le=2**31 - 1, description="guest_memfd fd")]
LimitQuery = Annotated[int, Query(ge=1, le=10_000, description="most items to return")]


def gfn_window(vm: VirtualMachine, start: int | None, end: int | None) -> tuple[int, int]:
    """Defaults (0 and the VM's host ``max_gfn + 1``) and the ``start < end`` rule of the run listings."""
    s = 0 if start is None else start
    e = vm.kvm.host.max_gfn + 1 if end is None else end
    if s >= e:
        raise EINVAL(f"start_gfn {s:#x} must be below end_gfn {e:#x}")
    return s, e
