"""What makes a ``VirtualMachine`` method an ioctl: atomic under the VM lock, and for state
changes written ahead to the journal in call order (and the VM compacted when its tail is long)."""

from __future__ import annotations

from collections.abc import Callable
from functools import wraps
from typing import Any, Concatenate, ParamSpec, Protocol, TypeVar

from app.core import snapshot
from app.core.journal import Journal
from app.core.kvm import Kvm


class VmFd(Protocol):
    id: str
    lock: Any  # a threading.RLock: slots_lock and mmu_lock rolled into one
    journal: Journal | None
    kvm: Kvm


S = TypeVar("S", bound=VmFd)
P = ParamSpec("P")
R = TypeVar("R")


def locked(method: Callable[Concatenate[S, P], R]) -> Callable[Concatenate[S, P], R]:
    """Every operation is atomic: slots_lock and mmu_lock rolled into one per-VM lock."""

    @wraps(method)
    def wrapper(self: S, /, *args: P.args, **kwargs: P.kwargs) -> R:
        with self.lock:
            return method(self, *args, **kwargs)

    return wrapper


JOURNALED: list[str] = []
"""The names of every method ``@mutation`` made: what a journal row may replay (one list, so a new
ioctl cannot be left out of it: three were, and a restart after a crash refused the journal)."""


def mutation(method: Callable[Concatenate[S, P], R]) -> Callable[Concatenate[S, P], R]:
    """A state-changing ioctl: atomic, and written ahead to the journal (if any) in call order.

    Failed calls are journaled too: some failures change state the kernel way (the rfc-v9
    rollback bumps the seq, faults count), and replay reproduces the same failure. A call the
    service-wide budget refused is marked, so replay refuses it again whatever the other VMs hold.
    """
    name = method.__name__
    JOURNALED.append(name)

    @wraps(method)
    def wrapper(self: S, /, *args: P.args, **kwargs: P.kwargs) -> R:
        if kwargs:
            raise TypeError(f"{name}() takes positional arguments only, so the journal can replay it")
        with self.lock:
            journal = self.journal
            if journal is None:
                return method(self, *args, **kwargs)
            row = journal.record(self.id, name, args)
            budget = self.kvm.budget
            budget.begin_call()
            try:
                return method(self, *args, **kwargs)  # kwargs is empty: checked above
            finally:
                if budget.refused_call():  # an outcome replay cannot decide again: record it
                    journal.mark_budget_refused(row)
                if journal.wants_compaction(self.id):
                    journal.compact(self.id, snapshot.dump(self.kvm))

    return wrapper
