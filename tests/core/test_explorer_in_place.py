"""The explorer races a vCPU fault against an in-place conversion (``KVM_SET_MEMORY_ATTRIBUTES2`` on
the range's file, 7.4): the engine's order is safe in every schedule; each planted wrong order is
found, with its shortest schedule."""

from __future__ import annotations

import itertools

import pytest

from app.core.errors import EINVAL
from app.core.explorer import explore
from app.models.scenario import FaultAccess, Scenario, Target

_ACCESS: list[FaultAccess] = ["attribute", "private", "shared"]
_TO: list[Target] = ["private", "shared"]


@pytest.mark.parametrize(("to", "access", "npages"), list(itertools.product(_TO, _ACCESS, [1, 3])))
def test_the_engines_in_place_conversion_is_safe_in_every_schedule(
    to: Target, access: FaultAccess, npages: int
) -> None:
    run = explore(Scenario("in-place", npages=npages, to=to, fault_access=access))
    assert run.violations == 0 and run.counterexample is None
    assert run.schedules == sum(run.outcomes.model_dump().values())


def test_the_race_is_really_explored() -> None:
    """To shared, a fault as private as the attribute: some schedules map, some retry."""
    run = explore(Scenario("in-place", npages=2, to="shared"))
    assert run.outcomes.mapped > 0 and run.outcomes.retry > 0


def test_storing_before_invalidate_start_leaves_a_mapping_of_the_old_kind() -> None:
    run = explore(Scenario("in-place-store-first", npages=1, to="shared"))
    ce = run.counterexample
    assert ce is not None and ce.violated == "stale_mapping"
    # The fault maps the page private, the store makes it shared while that mapping still stands.
    assert ce.schedule[:5] == ["snapshot_seq", "faultin_pfn", "install_spte", "validate", "store 0x0"]
    at_store = ce.trace[ce.schedule.index("store 0x0")]
    assert at_store.attributes == [False] and at_store.mapping is not None and at_store.mapping.private
    # The engine's order on the same schedule's first steps unmaps before it stores: no violation.
    assert explore(Scenario("in-place", npages=1, to="shared")).violations == 0


def test_no_seq_bump_lets_a_stale_fault_install_after_the_conversion() -> None:
    run = explore(Scenario("in-place-no-seq-bump", npages=1, to="private", fault_access="attribute"))
    ce = run.counterexample
    assert ce is not None and ce.violated == "stale_mapping"
    assert ce.schedule == [
        "snapshot_seq",
        "faultin_pfn",
        "validate",
        "unmap_mapping_pages",
        "check_refcounts",
        "invalidate_start",
        "store 0x0",
        "invalidate_end",
        "install_spte",
    ]
    # Wherever the fault's first steps fall among the conversion's checks, it installs last.
    assert run.violations > 0
    safe = explore(Scenario("in-place", npages=1, to="private"), schedule=ce.schedule)
    assert safe.counterexample is None and safe.outcomes.retry == 1


def test_no_pin_check_makes_a_pinned_page_private() -> None:
    sc = Scenario("in-place-no-pin-check", npages=2, to="private", pinned=[1])
    run = explore(sc)
    ce = run.counterexample
    assert ce is not None and ce.violated == "pinned_page_private" and run.violations == run.schedules
    assert "check_refcounts" not in ce.schedule and ce.trace[-1].attributes == [True, True]
    # The engine refuses the conversion (EAGAIN) in every schedule and changes nothing.
    own = explore(Scenario("in-place", npages=2, to="private", pinned=[1]))
    assert own.violations == 0 and own.trace is None


def test_pinned_is_for_in_place_variants_only() -> None:
    with pytest.raises(EINVAL, match="in-place variants only"):
        explore(Scenario("linux", pinned=[0]))
    with pytest.raises(EINVAL, match="outside"):
        explore(Scenario("in-place", npages=2, pinned=[2]))


def test_fail_nth_one_fails_the_preallocation_and_changes_nothing() -> None:
    run = explore(Scenario("in-place", npages=2, to="private", fail_nth=1))
    assert run.violations == 0
    replay = explore(
        Scenario("in-place", npages=2, to="private", fail_nth=1),
        schedule=["validate", "snapshot_seq", "faultin_pfn", "install_spte"],
    )
    assert replay.trace is not None and replay.trace[-1].attributes == [False, False]
