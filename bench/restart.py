"""Restart time against history: a VM with 1,000,000 journaled calls whose final state is small.

    python bench/restart.py [--calls N]

Writes the journal a server would have written (a guest_memfd slot, then N faults and
conversions over 256 pages), then times a restart that replays it all, compacts the VM to its
snapshot (as a graceful shutdown does), and times the restart again. Target after compaction:
< 2 s, whatever the history.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sqlite3
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from app.core import Engine
from app.core.journal import SqliteJournal, _encode
from app.models.kvm import (
    FaultRequest,
    KvmCreateGuestMemfd,
    KvmMemoryAttributes,
    KvmUserspaceMemoryRegion2,
    Semantics,
    VmType,
)
from app.models.vm import VmCreate

GIB4 = 0x1_0000_0000
TARGET_S = 2.0


def history(calls: int) -> list[tuple[str, str, str]]:
    """The rows a server journals for this workload, in order."""
    vm = "bench"
    rows = [
        (vm, "create_vm", VmCreate(type=VmType.sw_protected, semantics=Semantics.linux)),
        (vm, "create_guest_memfd", KvmCreateGuestMemfd(size=0x100000)),
    ]
    out = [(v, op, json.dumps([_encode(a)])) for v, op, a in rows]
    slot = KvmUserspaceMemoryRegion2(
        flags=4, guest_phys_addr=GIB4, memory_size=0x100000, userspace_addr=0x7F0000000000, guest_memfd=3
    )
    out.append((vm, "set_user_memory_region", json.dumps([10, _encode(slot)])))
    for i in range(calls):
        page = i % 256
        if i % 4 == 3:
            req = KvmMemoryAttributes(address=GIB4 + page * 0x1000, size=0x1000, attributes=8 * (i // 4 % 2))
            out.append((vm, "set_memory_attributes", json.dumps([_encode(req)])))
        else:
            out.append((vm, "fault", json.dumps([_encode(FaultRequest(gpa=GIB4 + page * 0x1000))])))
    return out


def restart(db: Path) -> tuple[float, Engine]:
    t0 = time.perf_counter()
    engine = Engine()
    journal = SqliteJournal(db)
    engine.restore(journal)
    elapsed = time.perf_counter() - t0
    engine.attach_journal(journal)
    return elapsed, engine


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--calls", type=int, default=1_000_000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        db = Path(tmp) / "state.sqlite3"
        SqliteJournal(db, compact_after=1 << 62).close()
        with contextlib.closing(sqlite3.connect(db)) as conn:
            conn.executemany("INSERT INTO journal (vm_id, op, args) VALUES (?, ?, ?)", history(args.calls))
            conn.commit()
        print(f"{args.calls:,} journaled calls, {db.stat().st_size / 2**20:.0f} MiB")
        before, engine = restart(db)
        vm = engine.vm("bench")
        runs = vm.usage()["attribute_runs"] + vm.usage()["mapping_runs"]
        print(f"restart replaying every call: {before:8.2f} s  (final state: {runs} runs)")
        engine.compact_all()
        after, again = restart(db)
        assert again.vm("bench").snapshot() == vm.snapshot()
        print(f"restart after compaction:     {after * 1000:8.1f} ms (snapshot + empty tail)")
        verdict = "OK" if after < TARGET_S else "MISS"
        print(f"speed-up {before / after:,.0f}x; target after compaction < {TARGET_S:.0f} s   {verdict}")


if __name__ == "__main__":
    main()
