"""Per-ioctl cost through ``kvm-memattr exec`` against the same ioctl on this host's /dev/kvm, in one run.

    python bench/bridge.py [--calls 5000] [--rounds 5] [--url]

Builds tests/bridge/kvmprobe.c and runs its ``time`` mode (each call N times in a loop, timed in
the program with CLOCK_MONOTONIC): natively where /dev/kvm is usable, then under the bridge with
the engine in this process, round after round, interleaved so that drift in the machine hits
both alike; each figure is the best round's. Beside the program's wall time per call it shows the
supervisor's own CPU time per trapped call (getrusage). ``--url`` adds a round against a running
service (one HTTP request a call). The machine's load average is printed: other work on its two
cores shows in every figure.

Target (issue 25): a trapped memslot ioctl (KVM_SET_USER_MEMORY_REGION, create and delete
alternately) <= 25 us in process.
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.pop(0)  # not bench/: its http.py would shadow the standard library's http
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from app.bridge.backend import Backend, EngineBackend, ServiceBackend
from app.bridge.supervisor import run
from harness.live import ROOT, live_server

MEMSLOT = "KVM_SET_USER_MEMORY_REGION"
TARGET_US = 25.0
TRAPPED = 4  # calls of the time mode that the bridge answers (getppid is not trapped)


def parse(output: str) -> dict[str, float]:
    return {name: float(value) for name, value in (line.split(" = ") for line in output.splitlines() if " = " in line)}


def native(probe: str, calls: int) -> dict[str, float]:
    done = subprocess.run([probe, "time", str(calls)], capture_output=True, text=True, check=True, timeout=600)
    return parse(done.stdout)


def bridged(probe: str, calls: int, backend: Backend) -> tuple[dict[str, float], float]:
    """The program's figures, and the supervisor's CPU time per trapped call (us)."""
    read, write = os.pipe()
    saved = os.dup(1)
    sys.stdout.flush()
    os.dup2(write, 1)
    os.close(write)
    before = resource.getrusage(resource.RUSAGE_SELF)
    try:
        code = run([probe, "time", str(calls)], backend)
    finally:
        os.dup2(saved, 1)
        os.close(saved)
    after = resource.getrusage(resource.RUSAGE_SELF)
    with os.fdopen(read) as f:
        output = f.read()
    assert code == 0, output
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return parse(output), cpu / (calls * TRAPPED) * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=5000, help="calls of each kind per round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--url", action="store_true", help="also a round against a running service (slow)")
    args = parser.parse_args()
    gcc = shutil.which("gcc")
    assert gcc, "gcc builds kvmprobe"
    with tempfile.TemporaryDirectory() as tmp:
        probe = str(Path(tmp) / "kvmprobe")
        subprocess.run([gcc, "-O2", "-pthread", "-o", probe, str(ROOT / "tests/bridge/kvmprobe.c")], check=True)
        real = os.access("/dev/kvm", os.R_OK | os.W_OK)
        rows: dict[str, list[dict[str, float]]] = {"real": [], "bridge": []}
        cpus: list[float] = []
        for _ in range(args.rounds):
            if real:
                rows["real"].append(native(probe, args.calls))
            backend = EngineBackend()
            try:
                figures, cpu = bridged(probe, args.calls, backend)
            finally:
                backend.close()
            rows["bridge"].append(figures)
            cpus.append(cpu)
        if args.url:
            with live_server() as (url, _):
                service = ServiceBackend(url, None, None)
                try:
                    rows["service"] = [bridged(probe, max(1, args.calls // 50), service)[0]]
                finally:
                    service.close()
    best = {kind: {name: min(r[name] for r in runs) for name in runs[0]} for kind, runs in rows.items() if runs}
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    print(
        f"{args.rounds} rounds of {args.calls} calls each, best round, us per call (load average {load}; {os.uname().release})"
    )
    kinds = list(best)
    print(f"  {'call':36}" + "".join(f"{k:>12}" for k in kinds))
    for name in best["bridge"]:
        print(f"  {name:36}" + "".join(f"{best[k][name]:12.2f}" for k in kinds))
    print(f"  supervisor CPU per trapped call: {min(cpus):.1f} us (best round)")
    ok = best["bridge"][MEMSLOT] <= TARGET_US
    print(
        f"  {MEMSLOT} through the bridge: {best['bridge'][MEMSLOT]:.1f} us, target <= {TARGET_US:.0f}: {'OK' if ok else 'MISS'}"
    )
    raise SystemExit(0 if ok else 1)


if __name__ == "__main__":
    main()
