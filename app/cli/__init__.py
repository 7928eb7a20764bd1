"""The ``kvm-memattr`` command: ``serve`` the API, drive it from a terminal, or run the ``demo``.

One module a room: ``args`` (argument types), ``output`` (tables and JSON), ``parser`` (every
command and option), ``commands`` (the commands that are more than one operation), ``serve``.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Sequence

import httpx

from app.cli.commands import explore
from app.cli.output import Output
from app.cli.parser import Parser, build_parser
from app.cli.serve import serve
from app.client import DEFAULT_URL, Client, KvmMemattrError
from app.client.operations import Op
from app.client.transport import StdlibTransport

_PROBLEM_MEMBERS = {"type", "title", "status", "detail", "errno", "instance", "errors"}
"""RFC 9457's members and the validation errors: the rest of a problem document is the kernel's."""


def main(argv: Sequence[str] | None = None) -> int:
    try:
        return _main(argv)
    except BrokenPipeError:  # `kvm-memattr ... | head`: the reader left, which is not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


def _main(argv: Sequence[str] | None) -> int:
    parser = build_parser()
    Parser.argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    if args.url and "://" not in args.url:  # `--url localhost:8000`, the form of every curl in the README
        args.url = f"http://{args.url}"
    if args.command is None:
        parser.print_help()
        return 0
    if getattr(args, "serve", False):
        return serve(args)
    out = Output(args.json, args.quiet)
    if getattr(args, "verify_host", False):
        from app.hostkvm.report import run

        return run(args.steps, args.seed, args.json, out.console, args.device)
    if getattr(args, "host_profile", False):
        from app.hostkvm.report import host_profile

        return host_profile(args.json, out.console, args.device)
    if getattr(args, "bridge", False):
        from app.bridge.command import exec_command
        from app.cli.args import profile_arg

        return exec_command(args, profile_arg(args.profile))
    if getattr(args, "demo", False):
        from app.demo import run_demo

        return run_demo(args.url, args.token, in_process=args.in_process, quiet=args.quiet, as_json=args.json)
    url = args.url or os.environ.get("KVM_MEMATTR_URL") or DEFAULT_URL
    url = url if "://" in url else f"http://{url}"
    exploring = getattr(args, "explore", False)
    try:
        if exploring and not (args.url or os.environ.get("KVM_MEMATTR_URL")):
            client = Client.in_process()  # a pure computation: no server needed
        else:
            # A CLI call is one short process: plain http goes over the standard library (no httpcore).
            transport = StdlibTransport() if url.lower().startswith("http://") else None
            client = Client(url, token=args.token, transport=transport)
        with client:
            if exploring:
                return explore(client, args, out)
            result = args.run(client, args)
            # A command builds its operation; its answer is shown as the JSON it is (no models).
            out.show(client.send_json(result) if isinstance(result, Op) else result)
    except KvmMemattrError as e:
        if args.json:  # the problem document, for a script reading stdout
            print(json.dumps(e.problem))
        # What the kernel hands back beside the errno (error_offset, a host access's signal).
        extra = {k: v for k, v in e.problem.items() if k not in _PROBLEM_MEMBERS and v is not None}
        more = "".join(f" {k}={hex(v) if isinstance(v, int) else v}" for k, v in extra.items())
        out.errors.print(
            f"kvm-memattr: {e.errno} (HTTP {e.status}): {e.detail}{more and ' [' + more[1:] + ']'}", markup=False
        )
        return 1
    except httpx.TransportError as e:
        out.errors.print(f"kvm-memattr: cannot reach {url}: {e}", markup=False)
        return 3
    return 0
