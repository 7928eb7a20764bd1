"""The interleaving explorer: one vCPU fault raced against one conversion, every schedule."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Response

from app.api import examples
from app.api.problems import error_responses
from app.api.responses import model_response
from app.core import explorer
from app.models.explorer import ExplorerRun, ExplorerRunRequest, ExplorerVariants

router = APIRouter(prefix="/v1/explorer", tags=["explorer"])


@router.get(
    "/variants",
    summary="Conversion variants the explorer can race",
    description="`rfc-v9` and `linux` are the engine's own conversions; `v9-as-posted`, `v9-naive-unwind` and "
    "`reviewer-reorder` are the orderings and unwinds argued over in the v9 review (`historical`).",
    operation_id="list_explorer_variants",
    response_model=ExplorerVariants,
)
async def list_variants() -> Response:
    return model_response(explorer.variants())


@router.post(
    "/runs",
    summary="Race a vCPU fault against a conversion, every interleaving",
    description="On a scratch VM (one guest_memfd slot covering the range) a fault on `start_gfn + "
    "fault_gfn_offset` (snapshot seq; lockless attribute read + pfn; take mmu_lock, retry check, install) races "
    "one conversion of `[start_gfn, start_gfn + npages)`, each per-gfn store a step of its own. Locks as in the "
    "kernel: the rfc-v9 family holds mmu_lock from begin to end, linux only in pre_set_range and post_set_range. "
    "Every schedule is run and checked: no present mapping disagrees with its gfn's attribute "
    "(`stale_mapping`), a failed conversion leaves every attribute as it was (`rollback_not_exact`), the "
    "conversion ends (`no_termination`, cut where the naive unwind wraps). The answer counts outcomes and gives "
    "the shortest violating schedule with its trace; pass its `schedule` back to replay exactly that one. At "
    "most 100,000 schedules.",
    operation_id="run_explorer",
    responses=error_responses(),
    response_model=ExplorerRun,
)
def run(
    req: Annotated[ExplorerRunRequest, examples.EXPLORER],
) -> Response:  # sync: CPU-bound, so FastAPI runs it off the event loop
    return model_response(explorer.explore(req, req.schedule))  # the request is a Scenario
