"""HTTP throughput and p99 of conversions against GET /healthz, same server, same run.

    python bench/http.py [--seconds 5] [--connections 16]

Starts `kvm-memattr serve` (uvicorn, one worker) pinned to CPU 0 and drives it from CPU 1
with a minimal asyncio HTTP/1.1 keep-alive client (raw sockets, so the client costs little
next to the server). Target: reg/unreg-region reaches >= 60% of /healthz throughput at 16
connections, with p99 under 10 ms.
"""

from __future__ import annotations

import argparse
import asyncio
import json
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


async def request(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, raw: bytes) -> tuple[int, bytes]:
    writer.write(raw)
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head[9:12])
    length = 0
    for line in head.split(b"\r\n"):
        if line[:15].lower() == b"content-length:":
            length = int(line[15:])
    body = await reader.readexactly(length) if length else b""
    return status, body


def build(method: str, path: str, body: dict[str, object] | None = None) -> bytes:
    data = json.dumps(body).encode() if body is not None else b""
    head = f"{method} {path} HTTP/1.1\r\nHost: bench\r\nContent-Length: {len(data)}\r\n"
    if body is not None:
        head += "Content-Type: application/json\r\n"
    return head.encode() + b"\r\n" + data


async def load(port: int, requests: list[bytes], connections: int, seconds: float) -> tuple[float, list[float], int]:
    latencies: list[float] = []
    errors = 0
    deadline = time.perf_counter() + seconds

    async def client(n: int) -> None:
        nonlocal errors
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        i = n
        while time.perf_counter() < deadline:
            t0 = time.perf_counter()
            status, _ = await request(reader, writer, requests[i % len(requests)])
            latencies.append(time.perf_counter() - t0)
            errors += status >= 400
            i += connections
        writer.close()

    start = time.perf_counter()
    await asyncio.gather(*(client(n) for n in range(connections)))
    elapsed = time.perf_counter() - start
    return len(latencies) / elapsed, latencies, errors


def p99(latencies: list[float]) -> float:
    return statistics.quantiles(latencies, n=100)[98]


async def setup(port: int) -> str:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    _, body = await request(reader, writer, build("POST", "/v1/vms", {"type": "sw_protected", "semantics": "rfc-v9"}))
    vm = json.loads(body)["id"]
    slot = {"guest_phys_addr": "0x100000000", "memory_size": "0x40000000", "userspace_addr": "0x7f0000000000"}
    await request(reader, writer, build("PUT", f"/v1/vms/{vm}/memslots/0", slot))
    await request(reader, writer, build("POST", f"/v1/vms/{vm}/prefault", {"gpa": "0x100000000", "size": "0x200000"}))
    writer.close()
    return str(vm)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--connections", type=int, default=16)
    args = parser.parse_args()
    port = free_port()
    pin = ["taskset", "-c", "0"] if shutil.which("taskset") and (os.cpu_count() or 1) > 1 else []
    env = {**os.environ, "KVM_MEMATTR_LOG_LEVEL": "warning", "PYTHONPATH": str(ROOT)}
    server = subprocess.Popen([*pin, sys.executable, "-m", "app.cli", "serve", "--port", str(port)], env=env, cwd=ROOT)
    if pin:
        os.sched_setaffinity(0, {1})
    try:
        for _ in range(100):
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.1).close()
                break
            except OSError:
                time.sleep(0.1)
        vm = asyncio.run(setup(port))
        health = [build("GET", "/healthz")]
        convert = []
        for i in range(64):
            region = {"addr": hex(0x100000000 + i * 0x1000), "size": "0x1000"}
            convert.append(build("POST", f"/v1/vms/{vm}/memory-encrypt/unreg-region", region))
            convert.append(build("POST", f"/v1/vms/{vm}/memory-encrypt/reg-region", region))
        asyncio.run(load(port, health, args.connections, 1.0))  # warm-up
        # Interleave short rounds so drift in machine load hits both sides alike.
        rounds = max(1, int(args.seconds / 0.5))
        totals: dict[str, list[float]] = {"h": [0.0, 0.0], "c": [0.0, 0.0]}
        h_lat, c_lat, h_err, c_err = [], [], 0, 0
        for _ in range(rounds):
            for key, reqs, lat in (("h", health, h_lat), ("c", convert, c_lat)):
                rps, latencies, errors = asyncio.run(load(port, reqs, args.connections, args.seconds / rounds))
                totals[key][0] += len(latencies)
                totals[key][1] += len(latencies) / rps
                lat.extend(latencies)
                if key == "h":
                    h_err += errors
                else:
                    c_err += errors
        h_rps = totals["h"][0] / totals["h"][1]
        c_rps = totals["c"][0] / totals["c"][1]
    finally:
        server.terminate()
        server.wait(timeout=10)
    where = "server on CPU 0, client on CPU 1" if pin else "server and client unpinned"
    print(f"{args.connections} connections, {args.seconds:.0f} s each in interleaved 0.5 s rounds, {where}")
    print(f"  GET /healthz            : {h_rps:8.0f} req/s  p99 {p99(h_lat) * 1e3:6.2f} ms  errors {h_err}")
    print(f"  POST reg/unreg-region   : {c_rps:8.0f} req/s  p99 {p99(c_lat) * 1e3:6.2f} ms  errors {c_err}")
    ratio = c_rps / h_rps
    ok = ratio >= 0.6 and p99(c_lat) < 0.010
    print(f"  conversions / healthz   : {ratio:8.2f}   target >= 0.60 with p99 < 10 ms: {'OK' if ok else 'MISS'}")


if __name__ == "__main__":
    main()
