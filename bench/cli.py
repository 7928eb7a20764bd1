"""Wall time of a CLI call against `python -c "import httpx"`, measured in one run.

    python bench/cli.py [--runs 30]

Starts `kvm-memattr serve`, then times whole processes, interleaved so that drift in the
machine hits both sides alike: the anchor (`python -c "import httpx"`, the least any httpx
client pays) and `kvm-memattr health`, plus a few other client commands. Each figure is the
median of the runs. Bytecode is compiled first (`compileall`), as `pip install` does for a
regular install (an editable one writes it on the first run unless PYTHONDONTWRITEBYTECODE).

Target (issue 14): `kvm-memattr health` <= 1.5x the anchor.
"""

from __future__ import annotations

import argparse
import compileall
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.pop(0)  # not bench/: its http.py would shadow the standard library's http
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from harness.live import ROOT, live_server


def wall(cmd: list[str]) -> float:
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, cwd=ROOT)
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=30)
    args = parser.parse_args()
    compileall.compile_dir(ROOT / "app", quiet=1)
    script = shutil.which("kvm-memattr", path=str(Path(sys.executable).parent)) or shutil.which("kvm-memattr")
    cli = [script] if script else [sys.executable, "-m", "app.cli"]
    with live_server() as (url, _):
        cases = {
            'python -c "import httpx"': [sys.executable, "-c", "import httpx"],
            "kvm-memattr health": [*cli, "--url", url, "health"],
            "kvm-memattr --json health": [*cli, "--url", url, "--json", "health"],
            "kvm-memattr vm list": [*cli, "--url", url, "vm", "list"],
            "kvm-memattr --version": [*cli, "--version"],
            "kvm-memattr --help": [*cli, "--help"],
        }
        times: dict[str, list[float]] = {name: [] for name in cases}
        for cmd in cases.values():  # warm-up: file cache
            wall(cmd)
        for _ in range(args.runs):
            for name, cmd in cases.items():
                times[name].append(wall(cmd))
    anchor = statistics.median(times['python -c "import httpx"'])
    print(f"{args.runs} runs each, interleaved, median wall time ({' '.join(cli[-1:])})")
    for name, t in times.items():
        print(f"  {name:27}: {statistics.median(t) * 1e3:7.1f} ms  {statistics.median(t) / anchor:5.2f}x")
    ratio = statistics.median(times["kvm-memattr health"]) / anchor
    print(f"  health / import httpx      : {ratio:5.2f}  target <= 1.50: {'OK' if ratio <= 1.5 else 'MISS'}")
    raise SystemExit(0 if ratio <= 1.5 else 1)


if __name__ == "__main__":
    main()
