"""The interleaving explorer: one vCPU fault raced against one conversion, every schedule.

Both actors are the engine's own step sequences (``faults.Fault.steps()`` and
``attributes.Conversion``), run one step at a time on a scratch VM; the historical variants of
the v9 review are ``V9Delta``s of the engine's rfc-v9 sequence, not copies of it. Schedules
are enumerated depth first, each replayed from a fresh VM (stateless model checking): a
conversion has at most a few dozen steps and a fault three, so a run stays small.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal

from app.core import guest_memfd
from app.core.attributes import Conversion, Unterminated, V9Delta
from app.core.errors import EINVAL, KvmError
from app.core.faults import Fault
from app.core.in_place import GmemConversion
from app.core.kvm import PRIVATE, Kvm
from app.core.limits import EngineLimits
from app.core.memslots import set_memory_region
from app.core.mmu import UNMAPPED, spte, spte_private
from app.core.steps import Step, Steps
from app.core.variants import VARIANTS, check
from app.models import explorer as model
from app.models.explorer import Invariant
from app.models.host import DEFAULT_PROFILE, PROFILES
from app.models.kvm import (
    GFN_LIMIT,
    GUEST_MEMFD_FLAG_INIT_SHARED,
    GUEST_MEMFD_FLAG_MMAP,
    KVM_MEM_GUEST_MEMFD,
    PAGE_SHIFT,
    KvmUserspaceMemoryRegion2,
    VmType,
)
from app.models.scenario import Scenario

MAX_SCHEDULES = 100_000
_HVA = 0x7F00_0000_0000
_LIMITS = EngineLimits(max_events=64)
_HOST = PROFILES[DEFAULT_PROFILE].model_copy(update={"max_gfn": GFN_LIMIT - 1})
_IN_PLACE_HOST = PROFILES["linux-7.4-in-place"].model_copy(update={"max_gfn": GFN_LIMIT - 1})


@dataclass
class _Actor:
    name: Literal["vcpu", "conversion", "punch_hole"]
    steps: Steps
    next: Step | None = None
    holds_mmu_lock: bool = False
    error: BaseException | None = None

    def __post_init__(self) -> None:
        self.next = next(self.steps)  # announces the first step; nothing runs yet

    @property
    def done(self) -> bool:
        return self.next is None

    def perform(self) -> Step:
        step = self.next
        assert step is not None
        try:
            self.next = next(self.steps)
            self.holds_mmu_lock = step.holds_mmu_lock
        except StopIteration:
            self.next, self.holds_mmu_lock = None, False
        except (KvmError, Unterminated) as e:
            self.next, self.error = None, e
            # A loop that never ends never drops mmu_lock.
            self.holds_mmu_lock = isinstance(e, Unterminated)
        return step


class _Run:
    """One schedule in progress on a fresh scratch VM."""

    def __init__(self, sc: Scenario, *, tracing: bool = False) -> None:
        variant = VARIANTS[sc.variant]
        self.tracing = tracing
        self.sc, self.start, self.end = sc, sc.start_gfn, sc.start_gfn + sc.npages
        host = _HOST if variant.in_place is None else _IN_PLACE_HOST
        kvm = self.kvm = Kvm("explorer", None, VmType.sw_protected, variant.semantics, _LIMITS, host)
        # A punch-hole's file is mmap-able, so its slot is gmem-only: every fault, shared or private,
        # takes its page from the file the hole is punched in (as every fault does in place).
        flags = GUEST_MEMFD_FLAG_MMAP if variant.punch is not None else 0
        if variant.in_place is not None:
            flags = GUEST_MEMFD_FLAG_MMAP | GUEST_MEMFD_FLAG_INIT_SHARED
        gmem = self.gmem = guest_memfd.create(kvm, sc.npages << PAGE_SHIFT, flags)
        region = KvmUserspaceMemoryRegion2(
            flags=KVM_MEM_GUEST_MEMFD,
            guest_phys_addr=self.start << PAGE_SHIFT,
            memory_size=sc.npages << PAGE_SHIFT,
            userspace_addr=_HVA,
            guest_memfd=gmem.fd,
        )
        set_memory_region(kvm, 0, region)
        self.before = sc.initial()
        attributes = kvm.attributes if gmem.attributes is None else gmem.attributes
        base = self.start if gmem.attributes is None else 0
        runs = _runs(self.before)  # one assign per run: a scratch VM per schedule must be cheap
        for lo, hi, private in runs:
            attributes.assign(base + lo, base + hi, PRIVATE if private else 0)
        for pin, offset in enumerate(sc.pinned or (), start=1):  # what pin_user_pages() leaves
            gmem.allocate(offset, offset + 1)
            gmem.pins[pin], kvm.host_pins[pin] = (offset, 1), gmem
        self.early: tuple[Invariant, str] | None = None  # a violation seen between steps
        steps: Steps
        if variant.punch is not None:
            # A bound, mapped range: each page allocated and mapped as its attribute says.
            gmem.allocate(0, sc.npages)
            for lo, hi, private in runs:
                kvm.mmu.set(0, self.start + lo, self.start + hi, spte(private, True))
            punch = guest_memfd.PunchHole(kvm, gmem, 0, sc.npages << PAGE_SHIFT)
            steps = punch.steps(free_first=variant.punch.free_first, seq_bump=variant.punch.seq_bump)
            other: Literal["conversion", "punch_hole"] = "punch_hole"
        elif variant.in_place is not None:
            kvm.fail_nth = sc.fail_nth
            value = PRIVATE if sc.to_private else 0
            steps = GmemConversion(kvm, gmem, 0, sc.npages << PAGE_SHIFT, value, fine=True).steps(variant.in_place)
            other = "conversion"
        else:
            kvm.fail_nth = sc.fail_nth
            conv = Conversion(kvm, self.start, self.end, PRIVATE if sc.to_private else 0, fine=True)
            steps = conv.linux() if variant.delta is None and kvm.linux else conv.rfc_v9(variant.delta or V9Delta())
            other = "conversion"
        self.punching = variant.punch is not None
        self.in_place = variant.in_place is not None
        access = {"private": True, "shared": False, "attribute": None}[sc.fault_access]
        self.fault = Fault(
            kvm, 0, (self.start + sc.fault_gfn_offset) << PAGE_SHIFT, write=False, private=access, mmu_seq=None
        )
        self.vcpu = _Actor("vcpu", self.fault.steps())
        self.conv = _Actor(other, steps)
        self.actors = (self.vcpu, self.conv)
        self.choices: list[int] = []
        self.labels: list[str] = []
        self.trace: list[model.ExplorerTraceEntry] = []

    def enabled(self) -> list[int]:
        out = []
        for i, actor in enumerate(self.actors):
            if actor.next is None:
                continue
            if actor is self.vcpu and actor.next.takes_mmu_lock and self.conv.holds_mmu_lock:
                continue
            out.append(i)
        return out

    def step(self, i: int) -> None:
        actor = self.actors[i]
        step = actor.perform()
        self.choices.append(i)
        self.labels.append(step.label)
        if self.early is None:
            # Between steps: a punch-hole must never leave a freed page mapped; in place, where the
            # host may touch what is shared, no mapping may disagree with its page's attribute
            # (only an install or a store can make one disagree).
            if self.punching:
                self.early = self._freed_mapped()
            elif self.in_place and (step.label == "install_spte" or step.label.startswith("store")):
                self.early = self._stale()
        if not self.tracing:
            return
        kvm = self.kvm
        present = kvm.mmu.lookup(0, self.fault.gfn)
        self.trace.append(
            model.ExplorerTraceEntry(
                step=step.label,
                actor=actor.name,
                seq=kvm.inval.seq,
                in_progress=kvm.inval.in_progress,
                attributes=self.attributes(),
                mapping=None if present == UNMAPPED else model.SpteView(private=spte_private(present)),
                allocated=self.allocated() if self.punching else None,
            )
        )

    def attributes(self) -> list[bool]:
        return [private for s, e, private in self.kvm.private_runs(self.start, self.end) for _ in range(s, e)]

    def allocated(self) -> list[bool]:
        return [bool(v) for s, e, v in self.gmem.allocated.runs(0, self.sc.npages) for _ in range(s, e)]

    def _freed_mapped(self) -> tuple[Invariant, str] | None:
        """After any step: no mapping may point at a page the file no longer has (the guest
        would reach freed memory)."""
        for s, e, _ in self.kvm.mmu.mapped_runs(0, self.start, self.end):
            for gfn in range(s, e):
                if not self.gmem.allocated.value_at(gfn - self.start):
                    return "freed_page_mapped", f"gfn {gfn:#x} is mapped but its page of the file was freed"
        return None

    def violation(self) -> tuple[Invariant, str] | None:
        """The first invariant this finished schedule breaks (a freed page mapped at any step,
        termination, rollback, stale mapping), its detail naming any other it breaks too."""
        checks = (self.early, self._termination(), self._rollback(), self._stale(), self._pinned_private())
        found = list(dict.fromkeys(v for v in checks if v is not None))  # in place, early may be the end's too
        if not found:
            return None
        detail = found[0][1] + "".join(f"; also {name}: {d}" for name, d in found[1:])
        return found[0][0], detail

    def _termination(self) -> tuple[Invariant, str] | None:
        if isinstance(self.conv.error, Unterminated):
            return "no_termination", f"the unwind passed gfn 0 and wrapped: {self.conv.error}"
        return None

    def _rollback(self) -> tuple[Invariant, str] | None:
        after = self.attributes()
        if self.conv.error is None or after == self.before:
            return None
        wrong = [
            f"gfn {self.start + o:#x} was {_kind(b)}, is {_kind(a)}"
            for o, (b, a) in enumerate(zip(self.before, after, strict=True))
            if a != b
        ]
        return "rollback_not_exact", "the conversion failed but " + ", ".join(wrong)

    def _pinned_private(self) -> tuple[Invariant, str] | None:
        for offset in self.sc.pinned or ():
            if self.gmem.first_private(offset, offset + 1) is not None:
                return "pinned_page_private", (
                    f"page {offset} of the file became private while the host holds it pinned (GUP, IOMMU)"
                )
        return None

    def _stale(self) -> tuple[Invariant, str] | None:
        for s, e, v in self.kvm.mmu.mapped_runs(0, self.start, self.end):
            for gfn in range(s, e):
                private = self.kvm.gfn_is_private(gfn)
                if spte_private(v) != private:
                    return "stale_mapping", (
                        f"gfn {gfn:#x} is mapped {_kind(spte_private(v))} but its attribute is {_kind(private)}"
                    )
        return None


def _runs(flags: list[bool]) -> list[tuple[int, int, bool]]:
    """``(first, end, value)`` of each run of equal values."""
    out: list[tuple[int, int, bool]] = []
    at = 0
    for value, group in itertools.groupby(flags):
        n = len(list(group))
        out.append((at, at + n, value))
        at += n
    return out


def _kind(private: bool) -> str:
    return "private" if private else "shared"


def explore(sc: Scenario, schedule: list[str] | None = None) -> model.ExplorerRun:
    """Run every schedule of ``sc`` (or exactly ``schedule``), checking the invariants after each;
    the answer carries the shortest violating schedule, replayed with its trace."""
    check(sc)
    runs = [_replay(sc, schedule)] if schedule is not None else _enumerate(sc)
    outcomes = dict.fromkeys(("mapped", "retry", "memory_fault_exit"), 0)
    schedules, violations, shortest = 0, 0, None
    for run in runs:
        schedules += 1
        if run.vcpu.done:
            outcomes[run.fault.outcome] += 1
        if run.violation() is not None:
            violations += 1
            if shortest is None or len(run.choices) < len(shortest):
                shortest = run.choices
    counterexample = None
    if shortest is not None:
        run = _Run(sc, tracing=True)
        for i in shortest:
            run.step(i)
        found = run.violation()
        assert found is not None, "replaying a schedule reproduces it"
        counterexample = model.Counterexample(schedule=run.labels, violated=found[0], detail=found[1], trace=run.trace)
    traced = None
    if schedule is not None:
        traced = counterexample.trace if counterexample is not None else _replay(sc, schedule, tracing=True).trace
    return model.ExplorerRun(
        variant=sc.variant,
        schedules=schedules,
        violations=violations,
        outcomes=model.FaultOutcomes(**outcomes),
        counterexample=counterexample,
        trace=traced,
    )


def _enumerate(sc: Scenario) -> Iterator[_Run]:
    """Every schedule the locks allow, depth first: each run forks at every point where both
    actors could go, the other branch queued as a prefix of choices to replay."""
    count = 0
    pending: list[list[int]] = [[]]
    while pending:
        prefix = pending.pop()
        run = _Run(sc)
        for i in prefix:
            run.step(i)
        while enabled := run.enabled():
            for alt in reversed(enabled[1:]):
                pending.append([*run.choices, alt])
            run.step(enabled[0])
        count += 1
        if count > MAX_SCHEDULES:
            raise EINVAL(f"more than {MAX_SCHEDULES:,} schedules: narrow the scenario")
        yield run


def _replay(sc: Scenario, schedule: list[str], *, tracing: bool = False) -> _Run:
    run = _Run(sc, tracing=tracing)
    for n, label in enumerate(schedule):
        match = [i for i in run.enabled() if _label(run.actors[i].next) == label]
        if not match:
            nexts = ", ".join(f"{a.name}: {_label(a.next)}" for a in run.actors if a.next is not None)
            raise EINVAL(f"schedule step {n} {label!r} cannot run here (next: {nexts or 'nothing'})")
        run.step(match[0])
    if run.enabled():
        raise EINVAL(f"the schedule ends after {len(schedule)} steps, before both actors are done")
    return run


def _label(step: Step | None) -> str | None:
    return None if step is None else step.label


def variants() -> model.ExplorerVariants:
    return model.ExplorerVariants(
        variants=[
            model.ExplorerVariant(name=v.name, description=v.description, historical=v.historical)
            for v in VARIANTS.values()
        ]
    )


__all__ = ["MAX_SCHEDULES", "VARIANTS", "explore", "variants"]
