from __future__ import annotations

import itertools

from hypothesis import given
from hypothesis import strategies as st

from app.core.runs import RunMap

LIMIT = 64
ops = st.lists(st.tuples(st.integers(0, LIMIT), st.integers(0, LIMIT), st.integers(0, 3)), max_size=30)


@given(ops)
def test_runmap_matches_a_list_and_stays_maximal(assignments: list[tuple[int, int, int]]) -> None:
    m, ref = RunMap(LIMIT, 0), [0] * LIMIT
    for a, b, v in assignments:
        s, e = min(a, b), max(a, b)
        predicted = m.count_after_assign(s, e, v)
        for limit in (len(m) - 1, len(m), len(m) + 1, len(m) + 2):
            if s < e:  # callers never assign an empty range
                assert m.exceeds_after_assign(s, e, v, limit) == (predicted > limit)
        m.assign(s, e, v)
        ref[s:e] = [v] * (e - s)
        runs = list(m.runs(0, LIMIT))
        assert [v for s_, e_, v in runs for _ in range(s_, e_)] == ref
        assert all(x[2] != y[2] for x, y in itertools.pairwise(runs))
        assert len(m) == len(runs)
        if s < e:
            assert predicted == len(m)
    for s in range(0, LIMIT, 7):
        for e in range(s + 1, LIMIT + 1, 5):
            assert m.is_uniform(s, e, ref[s]) == (len(set(ref[s:e])) == 1)


def test_whole_space_assign_is_two_runs() -> None:
    m = RunMap(1 << 52, 8)
    m.assign(0, 1 << 52, 0)
    assert list(m.runs(0, 1 << 52)) == [(0, 1 << 52, 0)]
    m.assign(5, 6, 8)
    assert len(m) == 3
    m.assign(5, 6, 0)
    assert len(m) == 1


def _odd(value: int) -> bool:
    return bool(value & 1)


@given(ops, st.lists(st.tuples(st.integers(0, LIMIT), st.integers(0, LIMIT)), min_size=1, max_size=8))
def test_count_matches_a_list_across_changes(
    assignments: list[tuple[int, int, int]], windows: list[tuple[int, int]]
) -> None:
    """The prefix-sum index behind the memory map: exact, and rebuilt after every change."""
    m, ref = RunMap(LIMIT, 0), [0] * LIMIT
    for a, b, v in assignments:
        s, e = min(a, b), max(a, b)
        m.assign(s, e, v)
        ref[s:e] = [v] * (e - s)
        for x, y in windows:
            lo, hi = min(x, y), max(x, y)
            assert m.count(lo, hi, _odd) == sum(map(_odd, ref[lo:hi]))


@given(st.lists(st.tuples(st.integers(1, 9), st.integers(0, 3)), min_size=1, max_size=30))
def test_load_is_the_same_map_as_assigning_each_run(pieces: list[tuple[int, int]]) -> None:
    """A snapshot's runs loaded at once (O(n)) give the map assigning them one by one gives."""
    runs, at = [], 0
    for length, value in pieces:
        runs.append((at, at + length, value))
        at += length
    runs[-1] = (runs[-1][0], LIMIT + at, runs[-1][2])  # the last run reaches the limit
    limit = runs[-1][1]
    loaded, assigned = RunMap(limit, 5), RunMap(limit, 5)
    loaded.load(runs)
    for s, e, v in runs:
        assigned.assign(s, e, v)
    assert list(loaded.runs(0, limit)) == list(assigned.runs(0, limit))
    assert len(loaded) == len(assigned)
    assert loaded.value_at(limit - 1) == runs[-1][2]
