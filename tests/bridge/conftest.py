"""What the bridge's tests share: ``kvmprobe`` built with gcc (dynamic and static), and
``kvm-memattr exec`` run as a user runs it. They skip only where this kernel cannot run the bridge
(no seccomp user notification: before 5.9, or not x86-64 Linux)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from harness.live import ROOT

PROBE_C = Path(__file__).with_name("kvmprobe.c")


def exec_argv(*options: str) -> list[str]:
    return [sys.executable, "-m", "app.cli", "exec", *options]


def run_exec(*argv: str, timeout: float = 120, **kwargs: object) -> subprocess.CompletedProcess[str]:
    """``kvm-memattr exec OPTIONS... -- PROGRAM...`` to completion, output captured."""
    return subprocess.run(exec_argv(*argv), capture_output=True, text=True, cwd=ROOT, timeout=timeout, **kwargs)  # type: ignore[call-overload, no-any-return]


@pytest.fixture(scope="session")
def bridge() -> None:
    """Skip where the bridge cannot run here, saying why."""
    from app.bridge import seccomp

    reason = seccomp.supported()
    if reason is None:
        done = run_exec("--", "/bin/true", timeout=60)
        if done.returncode == 126 and "seccomp" in done.stderr:
            reason = f"this kernel lacks seccomp user notification: {done.stderr.strip()}"
        else:
            assert done.returncode == 0, done.stderr
    if reason:
        pytest.skip(reason)


@dataclass(frozen=True)
class Probes:
    dynamic: str
    static: str


@pytest.fixture(scope="session")
def probe(bridge: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Probes]:
    """kvmprobe, built twice: as usual, and static (no dynamic loader, no libc wrappers to hook)."""
    gcc = shutil.which("gcc")
    assert gcc, "gcc builds the test program (Debian's gcc, on every machine of this project)"
    out = tmp_path_factory.mktemp("kvmprobe")
    built = {}
    for kind, extra in (("dynamic", []), ("static", ["-static"])):
        exe = out / f"kvmprobe-{kind}"
        cmd = [gcc, "-O2", "-Wall", "-Werror", "-pthread", *extra, "-o", str(exe), str(PROBE_C)]
        subprocess.run(cmd, check=True, capture_output=True, timeout=120)
        built[kind] = str(exe)
    yield Probes(**built)


def lines(output: str) -> dict[str, str]:
    """kvmprobe's "name = result" lines as a dict."""
    return dict(line.split(" = ", 1) for line in output.splitlines() if " = " in line)
