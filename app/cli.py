"""The ``kvm-memattr`` command: ``serve`` runs the service (more subcommands live in app/tool)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence


def _serve(args: argparse.Namespace) -> int:
    import uvicorn

    from app.main import create_app
    from app.settings import Settings

    if args.workers != 1:
        # State lives in this process: a second worker would be a second, diverging "kernel".
        print("kvm-memattr: refusing --workers != 1: VM state lives in one process", file=sys.stderr)
        return 2
    overrides = {
        k: v for k, v in (("host", args.host), ("port", args.port), ("log_level", args.log_level)) if v is not None
    }
    settings = Settings(**overrides)
    uvicorn.run(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        workers=1,
        log_level=settings.log_level,
        access_log=False,  # the app logs one line per request, with its request id
        timeout_graceful_shutdown=10,
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kvm-memattr", description="A virtual KVM memory-attribute controller.")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run the HTTP service (one worker; state is in-process)")
    serve.add_argument("--host", help="bind address (default 127.0.0.1, or KVM_MEMATTR_HOST)")
    serve.add_argument("--port", type=int, help="port (default 8000, or KVM_MEMATTR_PORT)")
    serve.add_argument("--log-level", choices=["critical", "error", "warning", "info", "debug"])
    serve.add_argument("--workers", type=int, default=1, help="must be 1")
    serve.set_defaults(func=_serve)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    result: int = args.func(args)
    return result


if __name__ == "__main__":
    raise SystemExit(main())
