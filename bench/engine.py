"""Engine cost against range size, and against a naive per-gfn model, measured in one run.

    python bench/engine.py [--quick]

Prints per-conversion times (median of repeated runs) and the ratios the project targets:
whole-gfn-space conversion within 3x of a 1-page conversion, and >= 1000x faster than the
per-gfn model (the kernel's xarray representation) at 1 GiB; and a guest_memfd punch-hole over a
whole 1 TiB file (bound, allocated and mapped) within 3x of one over one page, and so an in-place
conversion (KVM_SET_MEMORY_ATTRIBUTES2 on a 7.4 host) of a whole 1 TiB file.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from app.core import Engine
from app.core.vm import VirtualMachine
from app.models.kvm import (
    FallocateRequest,
    KvmCreateGuestMemfd,
    KvmMemoryAttributes,
    KvmMemoryAttributes2,
    KvmUserspaceMemoryRegion2,
    PrefaultRequest,
    Semantics,
    VmType,
)
from app.models.vm import VmCreate
from harness.reference import RefVM

PAGE = 4096
GIB = 1 << 30
WHOLE = (1 << 64) - PAGE  # the largest range that does not wrap: gfns [0, 2^52 - 1)
SIZES = {"1 page": PAGE, "1 GiB": GIB, "whole gfn space": WHOLE}


def new_vm() -> VirtualMachine:
    vm = Engine().create_vm(VmCreate(type=VmType.sw_protected, semantics=Semantics.linux))
    # One 4 GiB memslot so conversions run the full invalidate/unmap path.
    vm.set_user_memory_region(
        0, KvmUserspaceMemoryRegion2(guest_phys_addr=0, memory_size=4 * GIB, userspace_addr=0x10000000)
    )
    return vm


def toggle(vm: VirtualMachine, size: int) -> Callable[[], None]:
    """A conversion that is never a no-op: flips the range between private and shared."""
    state = {"attrs": 8}

    def run() -> None:
        vm.set_memory_attributes(KvmMemoryAttributes(address=0, size=size, attributes=state["attrs"]))
        state["attrs"] ^= 8

    return run


def median_time(fn: Callable[[], None], reps: int, setup: Callable[[], None] | None = None) -> float:
    times = []
    for _ in range(reps):
        if setup:
            setup()
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def fragment(vm: VirtualMachine, runs: int) -> None:
    """Make every other page private above 4 GiB until the VM holds ``runs`` attribute runs."""
    base = 4 * GIB
    for i in range(runs // 2):
        vm.set_memory_attributes(KvmMemoryAttributes(address=base + 2 * i * PAGE, size=PAGE, attributes=8))


TIB = 1 << 40


def punch_hole(size: int) -> tuple[Callable[[], None], Callable[[], None]]:
    """A 1 TiB guest_memfd bound to a slot: (refill, punch). Refill allocates the whole file and
    maps the whole slot (prefault), so every punch frees and unmaps ``size`` bytes for real."""
    vm = Engine().create_vm(VmCreate(type=VmType.default, semantics=Semantics.linux))
    fd = vm.create_guest_memfd(KvmCreateGuestMemfd(size=TIB, flags=1)).fd  # MMAP: a gmem-only slot
    region = KvmUserspaceMemoryRegion2(
        flags=4, guest_phys_addr=0, memory_size=TIB, userspace_addr=0x10000000, guest_memfd=fd
    )
    vm.set_user_memory_region(0, region)

    def refill() -> None:
        vm.fallocate(fd, FallocateRequest(mode=1, offset=0, len=TIB))
        vm.prefault(PrefaultRequest(gpa=0, size=TIB))

    def punch() -> None:
        done = vm.fallocate(fd, FallocateRequest(mode=3, offset=0, len=size))
        assert done.pages_freed == size // PAGE and done.pages_zapped == size // PAGE

    return refill, punch


def in_place(size: int) -> Callable[[], None]:
    """A 1 TiB guest_memfd bound to a slot on a 7.4 in-place host, allocated and mapped: each call
    converts ``size`` bytes of it the other way (never a no-op), unmapping what is mapped."""
    vm = Engine().create_vm(VmCreate(type=VmType.sw_protected, semantics=Semantics.linux, profile="linux-7.4-in-place"))
    fd = vm.create_guest_memfd(KvmCreateGuestMemfd(size=TIB, flags=3)).fd
    region = KvmUserspaceMemoryRegion2(
        flags=4, guest_phys_addr=0, memory_size=TIB, userspace_addr=0x10000000, guest_memfd=fd
    )
    vm.set_user_memory_region(0, region)
    vm.fallocate(fd, FallocateRequest(mode=1, offset=0, len=TIB))
    state = {"attrs": 8}

    def run() -> None:
        vm.prefault(PrefaultRequest(gpa=0, size=size))  # mapped again, as the guest would
        done = vm.set_gmem_attributes(fd, KvmMemoryAttributes2(offset=0, size=size, attributes=state["attrs"]))
        assert done.pages_zapped == size // PAGE and not done.noop
        state["attrs"] ^= 8

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="fewer repetitions and a smaller fragmented VM")
    args = parser.parse_args()
    reps = 50 if args.quick else 400
    frag_runs = 20_000 if args.quick else 100_000

    print(f"python {sys.version.split()[0]}, median of {reps} conversions (KVM_SET_MEMORY_ATTRIBUTES, linux)")
    probe = new_vm().set_memory_attributes(KvmMemoryAttributes(address=0, size=PAGE, attributes=8)).mmu
    widened = (probe.mmu_invalidate_range_start, probe.mmu_invalidate_range_end)
    print(f"  hugepage widening on: a 1-page conversion records gfn range {widened} (its 2 MiB and 1 GiB head pages)")
    engine_t: dict[str, float] = {}
    for name, size in SIZES.items():
        engine_t[name] = median_time(toggle(new_vm(), size), reps)
        print(f"  engine     {name:>16}: {engine_t[name] * 1e6:10.1f} us")

    vm = new_vm()
    fragment(vm, frag_runs)
    print(f"fragmented VM: {vm.usage()['attribute_runs']:,} attribute runs")
    frag_t: dict[str, float] = {}
    for name, size in SIZES.items():
        if name == "whole gfn space":
            # It dissolves the fragmentation: rebuild it before every (timed) repetition.
            def refragment() -> None:
                vm.set_memory_attributes(KvmMemoryAttributes(address=0, size=WHOLE, attributes=0))
                fragment(vm, frag_runs)

            frag_t[name] = median_time(
                lambda: vm.set_memory_attributes(KvmMemoryAttributes(address=0, size=WHOLE, attributes=8)),
                3,
                refragment,
            )
        else:
            frag_t[name] = median_time(toggle(vm, size), reps)
        print(f"  fragmented {name:>16}: {frag_t[name] * 1e6:10.1f} us")

    ref = RefVM(VmType.sw_protected, Semantics.linux, (1 << 40) - 1)
    ref.set_region(0, 0, 0, 4 * GIB, 0x10000000, None, 0)
    ref_t: dict[str, float] = {}
    for name in ("1 page", "1 GiB"):
        size = SIZES[name]
        state = {"attrs": 8}

        def ref_run(size: int = size, state: dict[str, int] = state) -> None:
            ref.set_attributes(0, size, state["attrs"], 0)
            state["attrs"] ^= 8

        ref_t[name] = median_time(ref_run, reps if size == PAGE else 3)
        print(f"  per-gfn    {name:>16}: {ref_t[name] * 1e6:10.1f} us")

    ratio_whole = engine_t["whole gfn space"] / engine_t["1 page"]
    speedup = ref_t["1 GiB"] / engine_t["1 GiB"]
    punch_t: dict[str, float] = {}
    for name, size in (("1 page", PAGE), ("whole 1 TiB file", TIB)):
        refill, punch = punch_hole(size)
        punch_t[name] = median_time(punch, reps // 4, refill)
        print(f"  punch-hole {name:>16}: {punch_t[name] * 1e6:10.1f} us   (bound, allocated, mapped)")

    place_t: dict[str, float] = {}
    for name, size in (("1 page", PAGE), ("whole 1 TiB file", TIB)):
        place_t[name] = median_time(in_place(size), reps // 4)
        print(f"  in place   {name:>16}: {place_t[name] * 1e6:10.1f} us   (prefault + KVM_SET_MEMORY_ATTRIBUTES2)")

    print("ratios")
    print(
        f"  whole space / 1 page (engine)          : {ratio_whole:8.2f}x   target <= 3x   {'OK' if ratio_whole <= 3 else 'MISS'}"
    )
    print(f"  1 GiB / 1 page (engine)                : {engine_t['1 GiB'] / engine_t['1 page']:8.2f}x")
    print(
        f"  per-gfn model / engine at 1 GiB        : {speedup:8.0f}x   target >= 1000x {'OK' if speedup >= 1000 else 'MISS'}"
    )
    ratio_punch = punch_t["whole 1 TiB file"] / punch_t["1 page"]
    print(
        f"  punch-hole 1 TiB file / 1 page         : {ratio_punch:8.2f}x   target <= 3x   {'OK' if ratio_punch <= 3 else 'MISS'}"
    )
    ratio_place = place_t["whole 1 TiB file"] / place_t["1 page"]
    print(
        f"  in place 1 TiB file / 1 page           : {ratio_place:8.2f}x   target <= 3x   {'OK' if ratio_place <= 3 else 'MISS'}"
    )
    print(f"  fragmented / plain, 1 page             : {frag_t['1 page'] / engine_t['1 page']:8.2f}x")
    print(
        f"  fragmented / plain, whole space        : {frag_t['whole gfn space'] / engine_t['whole gfn space']:8.0f}x"
        f"   (touches {frag_runs:,} runs)"
    )


if __name__ == "__main__":
    main()
