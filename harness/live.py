"""A real ``kvm-memattr serve`` in a subprocess, for the tests and benches that need HTTP over a socket."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

import httpx

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def live_server(
    env: dict[str, str] | None = None, port: int | None = None, stderr: IO[bytes] | None = None
) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """Start the service; yield (url, process); stop it with SIGTERM (SIGKILL if it hangs)."""
    port = port or free_port()
    proc = start_server(port, env, stderr)
    try:
        yield f"http://127.0.0.1:{port}", proc
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def start_server(
    port: int, env: dict[str, str] | None = None, stderr: IO[bytes] | None = None, argv: list[str] | None = None
) -> subprocess.Popen[bytes]:
    """Start ``argv`` (default: ``kvm-memattr serve`` on ``port``) and wait until its /healthz answers 200."""
    full_env = {**os.environ, "KVM_MEMATTR_LOG_LEVEL": "warning", "PYTHONPATH": str(ROOT), **(env or {})}
    argv = argv or [sys.executable, "-m", "app.cli", "serve", "--port", str(port)]
    proc = subprocess.Popen(argv, env=full_env, cwd=ROOT, stderr=stderr)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError("server did not start in 30 s")
