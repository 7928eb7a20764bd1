"""``kvm-memattr serve``: the service in this process, with its start-up checks."""

from __future__ import annotations

import argparse
import sys


def cannot_listen(host: str, port: int) -> str | None:
    """Why the server could not bind, said before start-up logs "ready" (uvicorn binds after it)."""
    import errno
    import socket

    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError as e:
        return f"{e.strerror or e} (is the host name right?)"
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(address)
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                return "the address is already in use (another kvm-memattr? pick one with --port)"
            return e.strerror or str(e)
    return None


def serve(args: argparse.Namespace) -> int:
    import uvicorn
    from pydantic import ValidationError

    from app.connections import bounded_protocol
    from app.core.journal import StateFileError
    from app.main import create_app
    from app.settings import ProfileError, Settings

    if args.workers != 1:
        # State lives in this process: a second worker would be a second, diverging "kernel".
        print("kvm-memattr: refusing --workers != 1: VM state lives in one process", file=sys.stderr)
        return 2
    overrides = {
        k: v for k, v in (("host", args.host), ("port", args.port), ("log_level", args.log_level)) if v is not None
    }
    try:
        settings = Settings(**overrides)
    except ValidationError as e:
        first = e.errors()[0]
        print(f"kvm-memattr: KVM_MEMATTR_{str(first['loc'][0]).upper()}: {first['msg']}", file=sys.stderr)
        return 2
    problem = cannot_listen(settings.host, settings.port)
    if problem:
        print(f"kvm-memattr: cannot listen on {settings.host}:{settings.port}: {problem}", file=sys.stderr)
        return 3
    try:
        app = create_app(settings)
    except (StateFileError, ProfileError) as e:
        print(f"kvm-memattr: {e}", file=sys.stderr)
        return 2
    uvicorn.run(
        app,
        host=settings.host,
        port=settings.port,
        http=bounded_protocol(settings.max_connections, settings.first_byte_timeout),
        workers=1,
        log_level=settings.log_level,
        access_log=False,  # the app logs one line per request, with its request id
        timeout_graceful_shutdown=5,  # then open streams are cut: SIGTERM ends well inside Docker's 10 s
    )
    return 0
