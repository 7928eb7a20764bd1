"""Reading state: one gfn, the MMU, mappings as runs, and the event trace."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import APIRouter, Path, Query, Request, Response
from fastapi.responses import StreamingResponse

from app.api.deps import EndGfnQuery, EngineDep, GfnValue, LimitQuery, StartGfnQuery, VmDep, gfn_window
from app.api.problems import error_responses
from app.api.responses import model_response
from app.core.errors import EAGAIN, KvmError
from app.models.state import EventPage, GfnInfo, MappingRuns, MemoryMap, Mmu, TraceEvent

router = APIRouter(prefix="/v1/vms/{vm_id}", tags=["state"])


@router.get(
    "/gfns/{gfn}",
    summary="Everything about one gfn",
    description="Its attributes, the memslots that contain it (per address space; for a slot bound to a "
    "guest_memfd, the file's fd, the page of the file behind the gfn and whether it is allocated) and its mappings "
    "(SPTEs).",
    operation_id="get_gfn",
    responses=error_responses("ENOENT"),
    response_model=GfnInfo,
)
async def get_gfn(
    vm: VmDep, gfn: Annotated[GfnValue, Path(description="gfn below 2^52 (decimal or 0x hex)")]
) -> Response:
    return model_response(vm.gfn_info(gfn))


@router.get(
    "/mmu",
    summary="MMU invalidation state",
    description="`mmu_invalidate_seq`, `mmu_invalidate_in_progress`, `mmu_invalidate_range_start/_end` "
    "(null = `INVALID_GPA`), mapped pages, open notifier invalidations and statistics.",
    operation_id="get_mmu",
    responses=error_responses("ENOENT"),
    response_model=Mmu,
)
async def get_mmu(vm: VmDep) -> Response:
    return model_response(vm.mmu_model())


@router.get(
    "/mappings",
    summary="Mappings (SPTEs) as runs",
    description="Maximal runs of present mappings of one address space, in gfn order. A mapping is writable unless "
    "its slot is READONLY, or the slot logs dirty pages and the fault was a read.",
    operation_id="get_mappings",
    responses=error_responses("ENOENT"),
    response_model=MappingRuns,
)
async def get_mappings(
    vm: VmDep,
    as_id: Annotated[int, Query(ge=0, le=1, description="address space (1 = SMM)")] = 0,
    start_gfn: StartGfnQuery = None,
    end_gfn: EndGfnQuery = None,
    limit: LimitQuery = 1000,
) -> Response:
    start, end = gfn_window(vm, start_gfn, end_gfn)
    runs, next_gfn = vm.mapping_runs(as_id, start, end, limit)
    return model_response(MappingRuns(runs=runs, next_gfn=next_gfn))


@router.get(
    "/memory-map",
    summary="Memory map: per-bucket counts for drawing",
    description="Splits `[start_gfn, end_gfn)` (defaults and bounds as for the attribute runs) into `buckets` "
    "near-equal parts (1..4096, default 1024; never narrower than one gfn) and counts, per bucket, private "
    "pages, pages inside a memslot, present mappings per address space, and per address space the pages whose "
    "guest_memfd page (through the slot bound to a file) is allocated; plus the memslots overlapping the window "
    "(with `gmem_only` and their binding) and the open invalidation range. Computed from prefix sums over the "
    "runs: the cost does not grow with the number of pages or runs in the window.",
    operation_id="get_memory_map",
    responses=error_responses("ENOENT"),
    response_model=MemoryMap,
)
async def get_memory_map(
    vm: VmDep,
    start_gfn: StartGfnQuery = None,
    end_gfn: EndGfnQuery = None,
    buckets: Annotated[int, Query(ge=1, le=4096, description="number of buckets, 1..4096")] = 1024,
) -> Response:
    start, end = gfn_window(vm, start_gfn, end_gfn)
    return model_response(vm.memory_map(start, end, buckets))


@router.get("/events/stream", include_in_schema=False)
async def stream_events(
    request: Request,
    engine: EngineDep,
    vm: VmDep,
    after: Annotated[int, Query(ge=0, le=2**63 - 1)] = 0,
    seconds: Annotated[float, Query(gt=0, le=3600)] = 300,
) -> StreamingResponse:
    """The event trace as Server-Sent Events (the memory-map page's live trace), for ``seconds``,
    until the VM is destroyed; the page falls back to polling ``events?after=`` where EventSource
    cannot send a token. At most ``max_event_streams`` are open at once (EAGAIN past it)."""
    state = request.app.state
    if state.open_streams >= state.settings.max_event_streams:
        raise EAGAIN(f"{state.open_streams} event streams are open (KVM_MEMATTR_MAX_EVENT_STREAMS); poll events?after=")

    async def events() -> AsyncIterator[str]:
        state.open_streams += 1
        try:
            cursor, deadline, quiet = after, time.monotonic() + seconds, 0.0
            yield "retry: 1000\n\n"
            while time.monotonic() < deadline and engine.find(vm.id) is vm and not await request.is_disconnected():
                try:
                    page, _ = vm.events_page(cursor, 500)
                except KvmError:
                    return
                for event in page:
                    yield f"id: {event['id']}\nevent: trace\ndata: {json.dumps(event)}\n\n"
                    cursor = event["id"]
                if not page:
                    await asyncio.sleep(0.2)
                    quiet += 0.2
                    if quiet >= 15:  # a comment keeps proxies from closing an idle stream
                        quiet = 0.0
                        yield ": keep-alive\n\n"
        finally:
            state.open_streams -= 1

    headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    return StreamingResponse(events(), media_type="text/event-stream", headers=headers)


@router.get(
    "/events",
    summary="Event trace",
    description="A bounded, oldest-first trace of what the engine did: memslot changes, invalidate "
    "begin/range_add/end, unmap, TLB flush, attribute stores, faults, notifier calls. Page with `after`.",
    operation_id="get_events",
    responses=error_responses("ENOENT"),
    response_model=EventPage,
)
async def get_events(
    vm: VmDep,
    after: Annotated[int, Query(ge=0, le=2**63 - 1, description="return events with a larger id")] = 0,
    limit: LimitQuery = 1000,
) -> Response:
    events, cursor = vm.events_page(after, limit)
    return model_response(EventPage(events=[TraceEvent.model_validate(e) for e in events], next_after=cursor))
