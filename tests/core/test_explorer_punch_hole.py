"""The explorer races a vCPU fault against a punch-hole of the range's file (kvm_gmem_punch_hole())."""

from __future__ import annotations

import pytest

from app.core.explorer import explore
from app.models.scenario import Scenario


@pytest.mark.parametrize("npages", [1, 2, 3])
@pytest.mark.parametrize("access", ["attribute", "private", "shared"])
def test_the_engines_punch_hole_is_safe_in_every_schedule(npages: int, access: str) -> None:
    initial = [0] if access == "private" else []
    run = explore(Scenario(variant="punch-hole", npages=npages, fault_access=access, initial_private=initial))  # type: ignore[arg-type]
    assert run.violations == 0 and run.counterexample is None
    # Some schedules retry (the fault saw the invalidation), some map: the race is really explored.
    assert run.outcomes.retry > 0 and run.outcomes.mapped > 0
    assert run.schedules == sum(run.outcomes.model_dump().values())


def test_freeing_before_the_invalidation_maps_freed_pages() -> None:
    run = explore(Scenario(variant="punch-hole-free-first", npages=2))
    ce = run.counterexample
    assert ce is not None and ce.violated == "freed_page_mapped"
    # The range starts mapped, so the first truncate already leaves mappings of freed pages.
    truncate = ce.schedule.index("truncate")
    assert ce.trace[truncate].allocated == [False, False] and ce.trace[truncate].mapping is not None
    assert run.violations == run.schedules


def test_an_end_without_seq_bump_lets_a_stale_fault_install_a_freed_page() -> None:
    run = explore(Scenario(variant="punch-hole-no-seq-bump", npages=1))
    ce = run.counterexample
    assert ce is not None and ce.violated == "freed_page_mapped"
    # The one bad interleaving: the fault resolves its page, the whole hole runs, the fault installs.
    assert ce.schedule == [
        "snapshot_seq",
        "faultin_pfn",
        "invalidate_begin",
        "truncate",
        "invalidate_end",
        "install_spte",
    ]
    assert run.violations == 1
    end = ce.trace[ce.schedule.index("invalidate_end")]
    assert (end.seq, end.in_progress) == (0, 0)  # nothing tells the fault it is stale
    # The same schedule under the engine's order retries instead.
    safe = explore(Scenario(variant="punch-hole", npages=1), schedule=ce.schedule)
    assert safe.counterexample is None and safe.outcomes.retry == 1


def test_fail_nth_does_not_apply_to_a_punch_hole() -> None:
    plain, armed = (
        explore(Scenario(variant="punch-hole-no-seq-bump")),
        explore(Scenario(variant="punch-hole-no-seq-bump", fail_nth=1)),
    )
    assert armed == plain
