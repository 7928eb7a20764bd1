"""The interleaving explorer's request and answer (``/v1/explorer``)."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

from .kvm import Struct
from .names import VariantName as VariantName
from .scenario import FaultAccess as FaultAccess
from .scenario import Scenario
from .types import U64

Invariant = Literal["stale_mapping", "rollback_not_exact", "no_termination", "freed_page_mapped", "pinned_page_private"]


class ExplorerRunRequest(Struct, Scenario):
    """One vCPU fault on ``start_gfn + fault_gfn_offset`` races one conversion of the range."""

    # The fields, their order and defaults are Scenario's; here only their wire types and
    # descriptions (a redeclared field keeps its place and, without a value, its default).
    # Literals arrive as JSON strings; strict mode is fine for them.
    start_gfn: U64
    npages: Annotated[int, Field(description="1..8 gfns in the converted range")]
    fail_nth: Annotated[int | None, Field(description="the nth per-gfn store (or reservation, linux) fails")]
    initial_private: Annotated[
        list[int] | None,
        Field(
            max_length=8,
            description="offsets private before the conversion (default: the opposite of `to` everywhere)",
        ),
    ]
    fault_access: Annotated[FaultAccess, Field(description="attribute: as private as the gfn reads")]
    pinned: Annotated[
        list[int] | None,
        Field(max_length=8, description="in-place variants: offsets the host holds pinned (GUP, IOMMU) before"),
    ]
    schedule: list[str] | None = Field(
        None, max_length=128, description="replay exactly this interleaving (step labels of an earlier answer)"
    )

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {"variant": "reviewer-reorder", "npages": 2, "to": "private", "fail_nth": 2},
                {"variant": "rfc-v9", "npages": 2, "fail_nth": 2},
                {"variant": "in-place-no-pin-check", "npages": 2, "pinned": [1]},
            ]
        }
    )


class ExplorerVariant(BaseModel):
    name: VariantName
    description: str
    historical: bool


class ExplorerVariants(BaseModel):
    variants: list[ExplorerVariant]


class SpteView(BaseModel):
    private: bool


class ExplorerTraceEntry(BaseModel):
    """The state right after one step."""

    step: str
    actor: Literal["vcpu", "conversion", "punch_hole"]
    seq: int = Field(description="mmu_invalidate_seq")
    in_progress: int = Field(description="mmu_invalidate_in_progress")
    attributes: list[bool] = Field(description="private, per gfn of the range")
    mapping: SpteView | None = Field(description="the fault gfn's SPTE, null when not present")
    allocated: list[bool] | None = Field(
        None, description="punch-hole variants: whether each page of the range's file has a folio"
    )


class Counterexample(BaseModel):
    schedule: list[str]
    violated: Invariant
    detail: str
    trace: list[ExplorerTraceEntry]


class FaultOutcomes(BaseModel):
    mapped: int
    retry: int
    memory_fault_exit: int


class ExplorerRun(BaseModel):
    variant: VariantName
    schedules: int
    violations: int = Field(description="schedules that broke an invariant")
    outcomes: FaultOutcomes = Field(description="how the fault ended, over all schedules")
    counterexample: Counterexample | None = Field(description="the shortest violating schedule")
    trace: list[ExplorerTraceEntry] | None = Field(
        None, description="when a `schedule` was given: the trace of that one interleaving"
    )
