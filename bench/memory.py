"""Memory per attribute run with 1,000,000 runs in one VM (target: <= 250 bytes per run).

    python bench/memory.py [--runs N]

Measured with tracemalloc around filling one VM's attribute store, so it counts every Python
object the runs cost (sorted-dict keys, the dict entries, the sorted list's index).
"""

from __future__ import annotations

import argparse
import gc
import sys
import tracemalloc
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from app.core import Engine
from app.models.kvm import Semantics, VmType
from app.models.vm import VmCreate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=1_000_000)
    args = parser.parse_args()
    vm = Engine().create_vm(VmCreate(type=VmType.sw_protected, semantics=Semantics.linux))
    gc.collect()
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    # Every other gfn private: what a guest converting scattered pages leaves behind.
    for i in range(args.runs // 2):
        vm.kvm.attributes.assign(2 * i + 1, 2 * i + 2, 8)
    gc.collect()
    after = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    runs = len(vm.kvm.attributes)
    per_run = (after - before) / runs
    print(f"{runs:,} attribute runs in one VM: {(after - before) / 2**20:.1f} MiB, {per_run:.0f} bytes per run")
    print(f"  target <= 250 bytes per run: {'OK' if per_run <= 250 else 'MISS'}")


if __name__ == "__main__":
    main()
