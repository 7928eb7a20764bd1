"""``kvm-memattr exec [--profile P] [--url URL] [--trace] -- PROGRAM ARGS...``."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from app.bridge import seccomp
from app.bridge.backend import Backend, EngineBackend, ServiceBackend
from app.bridge.supervisor import run


def exec_command(args: argparse.Namespace, profile: str | dict[str, Any] | None) -> int:
    """The program's exit status; 126 where the bridge cannot run, 2 without a program. ``profile``:
    a name, a profile document, or None for the default (the engine's, or the service's)."""
    program = list(args.program)
    if program[:1] == ["--"]:
        program = program[1:]
    if not program:
        print("kvm-memattr exec: no program given (kvm-memattr exec [options] -- PROGRAM [ARGS...])", file=sys.stderr)
        return 2
    reason = seccomp.supported()
    if reason:
        print(f"kvm-memattr exec: {reason}", file=sys.stderr)
        return 126
    backend: Backend = ServiceBackend(args.url, args.token, profile) if args.url else EngineBackend(profile)
    try:
        return run(program, backend, sys.stderr if args.trace else None)
    finally:
        backend.close()
