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
import os
import shutil
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wall(cmd: list[str]) -> float:
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, cwd=ROOT)
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=30)
    args = parser.parse_args()
    compileall.compile_dir(ROOT / "app", quiet=1)
    port = free_port()
    env = {**os.environ, "KVM_MEMATTR_LOG_LEVEL": "warning"}
    server = subprocess.Popen([sys.executable, "-m", "app.cli", "serve", "--port", str(port)], env=env, cwd=ROOT)
    script = shutil.which("kvm-memattr", path=str(Path(sys.executable).parent)) or shutil.which("kvm-memattr")
    cli = [script] if script else [sys.executable, "-m", "app.cli"]
    url = ["--url", f"http://127.0.0.1:{port}"]
    cases = {
        'python -c "import httpx"': [sys.executable, "-c", "import httpx"],
        "kvm-memattr health": [*cli, *url, "health"],
        "kvm-memattr --json health": [*cli, *url, "--json", "health"],
        "kvm-memattr vm list": [*cli, *url, "vm", "list"],
        "kvm-memattr --version": [*cli, "--version"],
        "kvm-memattr --help": [*cli, "--help"],
    }
    try:
        for _ in range(100):
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.1).close()
                break
            except OSError:
                time.sleep(0.1)
        times: dict[str, list[float]] = {name: [] for name in cases}
        for cmd in cases.values():  # warm-up: file cache
            wall(cmd)
        for _ in range(args.runs):
            for name, cmd in cases.items():
                times[name].append(wall(cmd))
    finally:
        server.terminate()
        server.wait(timeout=10)
    anchor = statistics.median(times['python -c "import httpx"'])
    print(f"{args.runs} runs each, interleaved, median wall time ({' '.join(cli[-1:])})")
    for name, t in times.items():
        print(f"  {name:27}: {statistics.median(t) * 1e3:7.1f} ms  {statistics.median(t) / anchor:5.2f}x")
    ratio = statistics.median(times["kvm-memattr health"]) / anchor
    print(f"  health / import httpx      : {ratio:5.2f}  target <= 1.50: {'OK' if ratio <= 1.5 else 'MISS'}")
    raise SystemExit(0 if ratio <= 1.5 else 1)


if __name__ == "__main__":
    main()
