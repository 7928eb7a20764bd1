"""The memory-map summary on a VM with 1,000,000 attribute runs: 2048 buckets over the whole space.

    python bench/memory_map.py [--runs N] [--repeat N]

Prints the first call after a change (which rebuilds the prefix-sum index, O(runs)), the median
of repeated calls on the unchanged VM (O(buckets x log runs)), and the same on a VM with one run,
so the ratio shows whether the cost grows with fragmentation. Target: < 50 ms per call.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from app.core import Engine
from app.models.kvm import GFN_LIMIT, KvmUserspaceMemoryRegion2, Semantics, VmType
from app.models.vm import VmCreate

BUCKETS = 2048
TARGET_MS = 50.0


def timed(fn: object, repeat: int) -> tuple[float, float]:
    """(first call, median of the next ``repeat``) in ms."""
    assert callable(fn)
    t0 = time.perf_counter()
    fn()
    first = (time.perf_counter() - t0) * 1e3
    rest = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        rest.append((time.perf_counter() - t0) * 1e3)
    return first, statistics.median(rest)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=1_000_000)
    parser.add_argument("--repeat", type=int, default=20)
    args = parser.parse_args()
    engine = Engine()
    results = {}
    for label, runs in (("1 run", 1), (f"{args.runs:,} runs", args.runs)):
        vm = engine.create_vm(VmCreate(type=VmType.sw_protected, semantics=Semantics.linux))
        vm.set_user_memory_region(
            0, KvmUserspaceMemoryRegion2(guest_phys_addr=0, memory_size=1 << 32, userspace_addr=0x10000000)
        )
        # Every other gfn private, written straight into the run map (the API would take minutes).
        for i in range(runs // 2):
            vm.kvm.attributes.assign(2 * i + 1, 2 * i + 2, 8)
        whole = lambda vm=vm: vm.memory_map(0, GFN_LIMIT, BUCKETS)  # noqa: E731
        first, warm = timed(whole, args.repeat)
        results[label] = warm
        print(
            f"{label:>16}: {vm.usage()['attribute_runs']:>9,} runs, first call {first:8.1f} ms "
            f"(builds the index), then {warm:6.2f} ms per call (median of {args.repeat})"
        )
    big = results[f"{args.runs:,} runs"]
    verdict = "OK" if big < TARGET_MS else "MISS"
    print(f"{BUCKETS} buckets, whole gfn space: {big:.2f} ms per call, target < {TARGET_MS:.0f} ms   {verdict}")
    print(f"fragmented / one run: {big / results['1 run']:.2f}x")


if __name__ == "__main__":
    main()
