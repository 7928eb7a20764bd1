"""RSS at the documented service-wide bound (max_service_items), per kind of stored item.

    python bench/service_bound.py [--items N] [--kinds attribute_run,memslot,...]

Each kind fills a fresh process with N items of that kind only (through the engine's own calls,
the service budget counting), and reads the resident set size before and after; the growth per
item times ``max_service_items`` (4,000,000 by default) is the RSS a service full of that kind
would reach. The worst kind bounds the service.

Then the import: a snapshot at the per-VM budget (``max_attribute_runs`` runs), the largest an
import can hold, posted to the service in a fresh process: its peak RSS and time; and one past
the service-wide budget, refused before it is parsed.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path[0] = str(Path(__file__).resolve().parents[1])  # the repo, not bench/ (whose http.py would shadow the stdlib)

KINDS = ["attribute_run", "mapping_run", "event", "memslot", "guest_memfd", "notifier", "pinned_region"]
MIB = 1 << 20


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def fill(kind: str, n: int) -> dict[str, float]:
    """In this process: n items of one kind, through the engine; RSS growth per item."""
    import gc

    from app.core import Engine
    from app.core.limits import EngineLimits
    from app.models.kvm import (
        FaultRequest,
        KvmCreateGuestMemfd,
        KvmEncRegion,
        KvmMemoryAttributes,
        KvmUserspaceMemoryRegion2,
        NotifierRequest,
    )
    from app.models.vm import VmCreate

    engine = Engine(EngineLimits(max_service_items=n + 10_000, max_vms=1024, max_events=10_000))
    gc.collect()
    before = rss()
    vm = engine.create_vm(VmCreate(type="sev" if kind == "pinned_region" else "sw_protected", semantics="linux"))
    if kind == "mapping_run":
        req = KvmUserspaceMemoryRegion2(guest_phys_addr=0, memory_size=(2 * n) << 12, userspace_addr=0)
        vm.set_user_memory_region(0, req)
    done = 0
    while engine.budget.used < n:
        i = done
        if kind == "attribute_run":  # every other page private
            vm.set_memory_attributes(KvmMemoryAttributes(address=(2 * i + 1) << 12, size=4096, attributes=8))
        elif kind == "mapping_run":  # every other page mapped
            vm.fault(FaultRequest(gpa=(2 * i) << 12))
        elif kind == "event":  # full event logs, VM after VM
            if i and i % 10_000 == 0:
                vm = engine.create_vm(VmCreate(semantics="linux"))
            vm.kvm.events.emit("bench", n=i)
        elif kind == "memslot":  # 32,764 slots a VM, VM after VM
            if i and i % 32_000 == 0:
                vm = engine.create_vm(VmCreate(semantics="linux"))
            slot = i % 32_000
            req = KvmUserspaceMemoryRegion2(guest_phys_addr=slot << 12, memory_size=4096, userspace_addr=slot << 12)
            vm.set_user_memory_region(slot, req)
        elif kind == "guest_memfd":
            vm.create_guest_memfd(KvmCreateGuestMemfd(size=4096))
        elif kind == "notifier":
            vm.notifier_start(NotifierRequest(hva_start=i << 12, hva_end=(i + 1) << 12))
        else:
            vm.memory_encrypt_reg_region(KvmEncRegion(addr=i << 12, size=4096))
        done += 1
    gc.collect()
    grown = rss() - before
    return {"items": engine.budget.used, "bytes_per_item": grown / engine.budget.used}


def import_at_the_budget(runs: int, service_items: int) -> dict[str, float]:
    """In this process: POST /v1/vms/import of a snapshot with ``runs`` attribute runs."""
    import asyncio
    import resource

    import httpx

    from app.main import create_app
    from app.settings import Settings

    app = create_app(Settings(log_level="warning", max_service_items=service_items))
    doc = app.state.engine.create_vm(_vm_create()).snapshot().model_dump(mode="json")
    doc["attributes"] = "RUNS"
    head, tail = json.dumps(doc).encode().split(b'"RUNS"')
    # Written as text: a list of lists of this size would cost the bench more than the service.
    runs_text = b",".join(b"[%d,%d,%d]" % (i, i + 1, 8 * (i & 1)) for i in range(runs - 1))
    body = head + b"[" + runs_text + b",[%d,%d,0]]" % (runs - 1, 1 << 52) + tail
    del runs_text
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss << 10

    async def post() -> int:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://localhost") as client:
            r = await client.post("/v1/vms/import", content=body, headers={"content-type": "application/json"})
            return r.status_code

    t0 = time.perf_counter()
    status = asyncio.run(post())
    elapsed = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss << 10
    return {"status": status, "mib": len(body) / MIB, "seconds": elapsed, "peak_growth_mib": (peak - before) / MIB}


def _vm_create() -> object:
    from app.models.vm import VmCreate

    return VmCreate(type="sw_protected", semantics="linux")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--items", type=int, default=400_000, help="items per kind (default 400,000)")
    parser.add_argument("--kinds", default=",".join(KINDS))
    parser.add_argument("--fill", help=argparse.SUPPRESS)  # the child process: one kind
    parser.add_argument("--import-runs", type=int, help=argparse.SUPPRESS)  # the child process: an import
    parser.add_argument("--service-items", type=int, default=4_000_000, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.fill:
        print(json.dumps(fill(args.fill, args.items)))
        return
    if args.import_runs:
        print(json.dumps(import_at_the_budget(args.import_runs, args.service_items)))
        return
    from app.core.limits import EngineLimits

    bound = EngineLimits().max_service_items
    print(f"{args.items:,} items of each kind, one fresh process each; bound max_service_items = {bound:,}")
    print(f"{'kind':<15}{'bytes/item':>12}{'RSS at the bound':>20}")
    worst = 0.0
    for kind in args.kinds.split(","):
        t0 = time.perf_counter()
        out = subprocess.run(
            [sys.executable, __file__, "--fill", kind, "--items", str(args.items)],
            capture_output=True,
            text=True,
            check=True,
        )
        result = json.loads(out.stdout)
        per = result["bytes_per_item"]
        worst = max(worst, per)
        print(f"{kind:<15}{per:>12.0f}{per * bound / 2**30:>17.2f} GiB   ({time.perf_counter() - t0:.0f} s)")
    print(f"worst kind: {worst * bound / 2**30:.2f} GiB at the bound")
    limits = EngineLimits()
    # The per-VM budget's worth of runs, fitting and not; then a body at the import limit
    # (max_import_bytes, 256 MiB: about 11,000,000 runs), past every budget.
    cases = [
        ("at the per-VM budget, fits", limits.max_attribute_runs, bound),
        ("at the per-VM budget, past the service budget", limits.max_attribute_runs, 100_000),
        ("at the import limit", 11_000_000, bound),
    ]
    for what, runs, service_items in cases:
        argv = [sys.executable, __file__, "--import-runs", str(runs), "--service-items", str(service_items)]
        r = json.loads(subprocess.run(argv, capture_output=True, text=True, check=True).stdout)
        print(
            f"import of {runs:,} runs ({r['mib']:.0f} MiB), {what}: {r['status']} in {r['seconds']:.2f} s, "
            f"peak RSS +{r['peak_growth_mib']:.0f} MiB"
        )


if __name__ == "__main__":
    main()
