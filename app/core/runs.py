"""Run-length maps: the range-based store behind attributes and mappings.

The kernel keeps one xarray entry per gfn; a guest can flip 2^40 gfns in one
call, so kvm-memattr stores maximal runs instead. Every operation costs
O(log n + runs touched), never O(pages).
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Callable, Iterable, Iterator
from itertools import accumulate
from operator import mul, sub

from sortedcontainers import SortedDict

from app.core.budget import UNBOUNDED, ServiceBudget

Run = tuple[int, int, int]
"""``(start, end, value)``, half-open."""


class RunMap:
    """A total map from ``[0, limit)`` to ints, stored as coalesced runs.

    Keys of the sorted dict are run starts; a run extends to the next key (or
    ``limit``). Adjacent runs always hold different values, so ``len()`` is the
    number of maximal runs.
    """

    __slots__ = ("_d", "_indexes", "budget", "limit", "version")

    def __init__(self, limit: int, default: int = 0, budget: ServiceBudget = UNBOUNDED) -> None:
        self.limit = limit
        self.budget = budget
        self._d: SortedDict = SortedDict({0: default})
        budget.add(1)
        self.version = 0  # bumped by every assign, so indexes know when they are stale
        self._indexes: dict[Callable[[int], bool], _PrefixIndex] = {}

    def __len__(self) -> int:
        return len(self._d)

    def value_at(self, x: int) -> int:
        """Value of the run holding ``x``."""
        i = self._d.bisect_right(x) - 1
        return int(self._d.peekitem(i)[1])

    def run_at(self, x: int) -> Run:
        """The maximal run holding ``x``."""
        d = self._d
        i = d.bisect_right(x) - 1
        start, value = d.peekitem(i)
        end = d.peekitem(i + 1)[0] if i + 1 < len(d) else self.limit
        return int(start), int(end), int(value)

    def runs(self, start: int, end: int) -> Iterator[Run]:
        """Maximal runs clipped to ``[start, end)``, in order."""
        if start >= end:
            return
        d = self._d
        cur_start, cur_val = start, self.value_at(start)
        for k in d.irange(start, end, inclusive=(False, False)):
            yield cur_start, k, cur_val
            cur_start, cur_val = k, d[k]
        yield cur_start, end, cur_val

    def is_uniform(self, start: int, end: int, value: int) -> bool:
        """True iff every x in ``[start, end)`` maps to ``value``."""
        d = self._d
        i = d.bisect_right(start) - 1
        if d.peekitem(i)[1] != value:
            return False
        return i + 1 == len(d) or int(d.peekitem(i + 1)[0]) >= end

    def count_after_assign(self, start: int, end: int, value: int) -> int:
        """How many runs ``assign(start, end, value)`` would leave, without doing it."""
        before, after = self._neighbours(start, end)
        removed: int = self._d.bisect_right(end) - self._d.bisect_left(start)
        added = int(before != value) + int(end < self.limit and after != value)
        return len(self._d) - removed + added

    def exceeds_after_assign(self, start: int, end: int, value: int, limit: int) -> bool:
        """Whether ``assign(start, end, value)`` would leave more than ``limit`` runs."""
        # One assign adds at most two runs: count exactly only near the limit.
        return len(self._d) + 2 > limit and self.count_after_assign(start, end, value) > limit

    def count(self, start: int, end: int, selected: Callable[[int], bool]) -> int:
        """How many x in ``[start, end)`` have a selected value: O(log n) from a prefix-sum index
        over all runs, which is rebuilt (O(n), in C) only after the map changed."""
        index = self._indexes.get(selected)
        if index is None or index.version != self.version:
            index = self._indexes[selected] = _PrefixIndex(self, selected)
        return index.below(end) - index.below(start)

    def assign(self, start: int, end: int, value: int) -> None:
        """Set every x in ``[start, end)`` to ``value``, keeping runs maximal."""
        if start >= end:
            return
        self.version += 1
        d = self._d
        runs_before = len(d)
        before, after = self._neighbours(start, end)
        for k in list(d.irange(start, end)):
            del d[k]
        if before != value:
            d[start] = value
        if end < self.limit and after != value:
            d[end] = after
        self.budget.add(len(d) - runs_before)

    def load(self, runs: Iterable[Run]) -> None:
        """Replace the whole map by ``runs``, which cover ``[0, limit)`` in order: O(n), where n
        ``assign()`` calls cost O(n log n) (a snapshot of a million runs: 14 s before)."""
        d: dict[int, int] = {}
        last = None
        for start, _, value in runs:
            if value != last:  # coalesced: runs stay maximal
                d[start] = last = value
        self.version += 1
        before = len(self._d)
        self._d = SortedDict(d)
        self.budget.add(len(self._d) - before)

    def release(self) -> None:
        """Give the map's runs back to the service budget (its VM is gone)."""
        self.budget.add(-len(self._d))

    def _neighbours(self, start: int, end: int) -> tuple[int | None, int | None]:
        # The value just left of start and the value at end decide whether the
        # new run coalesces with its neighbours or splits them.
        before = self.value_at(start - 1) if start > 0 else None
        after = self.value_at(end) if end < self.limit else None
        return before, after


class _PrefixIndex:
    """Run starts, whether each run is selected, and the selected points before each start."""

    __slots__ = ("cum", "flags", "starts", "version")

    def __init__(self, runs: RunMap, selected: Callable[[int], bool]) -> None:
        self.version = runs.version
        self.starts: list[int] = list(runs._d.keys())
        self.flags: list[bool] = list(map(selected, runs._d.values()))
        lengths = map(sub, [*self.starts[1:], runs.limit], self.starts)
        self.cum: list[int] = [0, *accumulate(map(mul, lengths, self.flags))]

    def below(self, x: int) -> int:
        """Selected points in ``[0, x)``."""
        i = bisect_right(self.starts, x) - 1
        if i < 0:
            return 0
        return self.cum[i] + (x - self.starts[i] if self.flags[i] else 0)
