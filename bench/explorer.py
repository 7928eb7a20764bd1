"""Explorer throughput: schedules checked per second, for every variant, on the API's default
scenario (2 gfns) and the largest (8 gfns, with and without the 5th store failing).

    python bench/explorer.py [--repeat N]

Each figure is the best of N runs of one whole exploration (scratch VMs, every schedule, the
invariants after each, the counterexample replayed with its trace). Target: >= 2,000 schedules/s.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from app.core.explorer import VARIANTS, explore
from app.models.scenario import Scenario

TARGET = 2_000


def rate(sc: Scenario, repeat: int) -> tuple[int, float]:
    best = float("inf")
    schedules = 0
    for _ in range(repeat):
        t0 = time.perf_counter()
        schedules = explore(sc).schedules
        best = min(best, time.perf_counter() - t0)
    return schedules, schedules / best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    print(f"python {sys.version.split()[0]}, best of {args.repeat}")
    print(f"{'variant':<18} {'scenario':<22} {'schedules':>9} {'schedules/s':>12}")
    worst = float("inf")
    for name in VARIANTS:
        for label, sc in (
            ("default (2 gfns)", Scenario(name)),
            ("8 gfns", Scenario(name, npages=8)),
            ("8 gfns, 5th store fails", Scenario(name, npages=8, fail_nth=5)),
        ):
            n, per_s = rate(sc, args.repeat)
            worst = min(worst, per_s)
            print(f"{name:<18} {label:<22} {n:>9} {per_s:>12,.0f}")
    verdict = "OK" if worst >= TARGET else "MISS"
    print(f"slowest: {worst:,.0f} schedules/s = {worst / TARGET:.2f}x the target of {TARGET:,}/s   {verdict}")


if __name__ == "__main__":
    main()
