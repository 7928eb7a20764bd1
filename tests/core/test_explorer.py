"""semantics.md section 9: the interleaving explorer runs the engine's own steps against a fault."""

from __future__ import annotations

import itertools

import pytest

from app.core import attributes
from app.core.errors import EINVAL
from app.core.explorer import VARIANTS, explore
from app.models.scenario import FaultAccess, Scenario


def _fail_points(npages: int) -> list[int | None]:
    return sorted({None, 1, (npages + 1) // 2, npages}, key=lambda x: -1 if x is None else x)


SCENARIOS = [
    Scenario(
        variant,
        start_gfn=start,
        npages=n,
        to=to,
        fail_nth=fail,
        initial_private=init,
        fault_gfn_offset=off,
        fault_access=access,
    )
    for variant in ("rfc-v9", "linux")
    for n in (1, 2, 3, 4)
    for to in ("private", "shared")
    for fail in _fail_points(n)
    for init in (None, list(range(0, n, 2)))  # default, and mixed: every other gfn private
    for off in sorted({0, n - 1})
    for access in ("attribute", "private", "shared")
    for start in (0,)
]


@pytest.mark.parametrize("variant", ["rfc-v9", "linux"])
def test_the_engine_has_no_violation_in_any_schedule(variant: str) -> None:
    """npages 1..4, both directions, fail_nth none/1/middle/last, mixed initial attributes,
    both ends of the range, each fault access kind: every schedule keeps every invariant."""
    total = 0
    for sc in (s for s in SCENARIOS if s.variant == variant):
        run = explore(sc)
        assert run.violations == 0, (sc, run.counterexample)
        assert run.counterexample is None
        finished = sum(run.outcomes.model_dump().values())
        assert finished == run.schedules, "every fault ends: the engine never leaves mmu_lock held"
        total += run.schedules
    assert total > 3_000


def test_faults_do_race_the_conversion() -> None:
    """The exploration is not vacuous: racing faults both map and retry, and a private access to a
    shared gfn exits."""
    run = explore(Scenario("rfc-v9", npages=2))
    assert run.outcomes.mapped > 0 and run.outcomes.retry > 0
    run = explore(Scenario("linux", npages=2, to="private", fault_access="private"))
    assert run.outcomes.memory_fault_exit > 0 and run.outcomes.retry > 0


def test_reviewer_reorder_with_a_failure_leaves_a_stale_mapping() -> None:
    run = explore(Scenario("reviewer-reorder", npages=2, fail_nth=2))
    ce = run.counterexample
    assert ce is not None and ce.violated == "stale_mapping"
    # The vCPU read the store that the unwind then undid, and nothing bumped the seq.
    assert ce.schedule == [
        "snapshot_seq",
        "validate",
        "store 0x0",
        "faultin_pfn",
        "store 0x1 fails",
        "restore 0x0",
        "install_spte",
    ]
    last = ce.trace[-1]
    assert (last.seq, last.in_progress, last.attributes, last.mapping and last.mapping.private) == (
        0,
        0,
        [False, False],
        True,
    )
    assert explore(Scenario("reviewer-reorder", npages=2)).violations == 0, "only the error path is unsafe"


def test_v9_as_posted_rollback_is_not_exact() -> None:
    # start 0x10, gfn 0x12 private before (so the unwind's erase of it is not the point), 0x13 shared.
    sc = Scenario("v9-as-posted", start_gfn=0x10, npages=4, to="shared", fail_nth=4, initial_private=[0, 1, 2])
    run = explore(sc)
    ce = run.counterexample
    assert ce is not None and ce.violated == "rollback_not_exact"
    assert run.violations == run.schedules
    # start stays converted (shared) and the failing index 0x13, shared before, was erased to private.
    assert "gfn 0x10 was private, is shared" in ce.detail
    assert "gfn 0x13 was shared, is private" in ce.detail
    assert "gfn 0x12" not in ce.detail
    assert ce.trace[-1].attributes == [False, True, True, True]


def test_v9_naive_unwind_never_ends_at_gfn_0() -> None:
    run = explore(Scenario("v9-naive-unwind", start_gfn=0, npages=2, fail_nth=2))
    ce = run.counterexample
    assert ce is not None and ce.violated == "no_termination"
    assert ce.schedule[-1] == "i-- wraps to 2^64-1"
    assert run.violations == run.schedules
    # Elsewhere the same loop ends (and is exact when it converts to shared).
    assert explore(Scenario("v9-naive-unwind", start_gfn=4, npages=2, fail_nth=2, to="shared")).violations == 0


def test_replaying_a_counterexample_reproduces_it() -> None:
    sc = Scenario("reviewer-reorder", npages=3, fail_nth=3, fault_gfn_offset=1)
    first = explore(sc)
    assert first.counterexample is not None
    again = explore(sc, schedule=first.counterexample.schedule)
    assert (again.schedules, again.violations) == (1, 1)
    assert again.counterexample == first.counterexample
    assert again.trace == first.counterexample.trace


def test_replaying_a_safe_schedule_returns_its_trace() -> None:
    sc = Scenario("rfc-v9", npages=1)
    schedule = [
        "validate",
        "invalidate_begin",
        "snapshot_seq",
        "faultin_pfn",
        "store 0x0",
        "unmap",
        "invalidate_end",
        "install_spte",
    ]
    run = explore(sc, schedule=schedule)
    assert (run.schedules, run.violations, run.outcomes.retry) == (1, 0, 1)
    assert run.trace is not None and [t.step for t in run.trace] == schedule
    assert [t.actor for t in run.trace][:3] == ["conversion", "conversion", "vcpu"]


@pytest.mark.parametrize(
    "schedule",
    [
        ["install_spte"],  # not the vCPU's next step
        ["validate", "invalidate_begin", "snapshot_seq", "faultin_pfn", "install_spte"],  # mmu_lock is held
        ["validate"],  # stops before both actors are done
        ["bogus"],
    ],
)
def test_invalid_schedules_are_einval(schedule: list[str]) -> None:
    with pytest.raises(EINVAL):
        explore(Scenario("rfc-v9", npages=1), schedule=schedule)


@pytest.mark.parametrize(
    "sc",
    [
        Scenario("rfc-v9", npages=0),
        Scenario("rfc-v9", npages=9),
        Scenario("rfc-v9", npages=2, fault_gfn_offset=2),
        Scenario("rfc-v9", npages=2, initial_private=[5]),
        Scenario("rfc-v9", start_gfn=(1 << 52) - 2, npages=2),
        Scenario("nope", npages=2),  # type: ignore[arg-type]
    ],
)
def test_bad_scenarios_are_einval(sc: Scenario) -> None:
    with pytest.raises(EINVAL):
        explore(sc)


def test_the_explorer_checks_the_real_engine(monkeypatch: pytest.MonkeyPatch) -> None:
    """Plant the bug the review was about in the engine itself: the rfc-v9 error path ends the
    invalidation without bumping the seq. The explorer must now find a stale mapping."""

    def end_without_seq_bump(self: attributes.Conversion) -> None:
        self.kvm.inval.in_progress -= 1

    sc = Scenario("rfc-v9", npages=2, fail_nth=2)
    assert explore(sc).violations == 0
    monkeypatch.setattr(attributes.Conversion, "_end_after_failure", end_without_seq_bump)
    run = explore(sc)
    assert run.counterexample is not None and run.counterexample.violated == "stale_mapping"


@pytest.mark.parametrize(
    ("variant", "access"),
    list(
        itertools.product(
            [v for v in VARIANTS if VARIANTS[v].punch is None and VARIANTS[v].in_place is None],
            ["attribute", "private", "shared"],
        )
    ),
)
def test_every_variant_is_safe_without_a_failure(variant: str, access: FaultAccess) -> None:
    """The historical conversion variants differ only on the error path (the in-place wrong orders
    are tested in test_explorer_in_place.py)."""
    assert explore(Scenario(variant, npages=3, fault_access=access)).violations == 0  # type: ignore[arg-type]
