"""The commands that are more than one operation: explore, export, import, delete, inject."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from app.cli.args import int_list
from app.cli.output import PRINTED, Output
from app.client import Client
from app.client import operations as ops
from app.models.names import VARIANT_NAMES

VIOLATED = 4
"""explore's exit status when a schedule broke an invariant (so CI can gate on it)."""


def explore(client: Client, args: argparse.Namespace, out: Output) -> int:
    """Run the explorer; 0, or ``VIOLATED`` when a schedule broke an invariant."""
    from app.timeline import REVIEW_SCENARIO, show_run, summary

    if args.all:
        runs = [client.run_explorer(v, **REVIEW_SCENARIO) for v in VARIANT_NAMES]  # type: ignore[arg-type]
        if out.as_json:
            print(json.dumps([r.model_dump(mode="json") for r in runs], indent=2))
        elif not out.quiet:
            out.console.print(summary(runs))
        return VIOLATED if any(r.violations for r in runs) else 0
    scenario: dict[str, Any] = {
        "start_gfn": args.start_gfn,
        "npages": args.npages,
        "to": args.to,
        "fail_nth": args.fail_nth,
        "initial_private": None if args.initial_private is None else int_list(args.initial_private),
        "fault_gfn_offset": args.fault_offset,
        "fault_access": args.access,
    }
    schedule = None if args.schedule is None else [s.strip() for s in args.schedule.split(",") if s.strip()]
    run = client.run_explorer(args.variant, schedule=schedule, **scenario)
    if out.as_json:
        print(json.dumps(run.model_dump(mode="json"), indent=2))
    elif not out.quiet:
        defaults = {
            "start_gfn": 0,
            "npages": 2,
            "to": "private",
            "fail_nth": None,
            "initial_private": None,
            "fault_gfn_offset": 0,
            "fault_access": "attribute",
        }
        flags = {
            "start_gfn": "--start-gfn",
            "npages": "--npages",
            "to": "--to",
            "fail_nth": "--fail-nth",
            "initial_private": "--initial-private",
            "fault_gfn_offset": "--fault-offset",
            "fault_access": "--access",
        }
        replay = "".join(
            f" {flags[k]} {','.join(map(str, v)) if isinstance(v, list) else hex(v) if k == 'start_gfn' else v}"
            for k, v in scenario.items()
            if v != defaults[k]
        )
        show_run(out.console, run, replay)
    return VIOLATED if run.violations else 0


def export_vm(client: Client, args: argparse.Namespace) -> Any:
    print(client.get_vm_snapshot(args.vm).model_dump_json(indent=2))
    return PRINTED


def import_vm(client: Client, args: argparse.Namespace) -> Any:
    try:
        text = sys.stdin.read() if args.file == "-" else open(args.file, encoding="utf-8").read()  # noqa: SIM115
        doc = json.loads(text)
    except (OSError, ValueError) as e:
        raise SystemExit(f"kvm-memattr: cannot read a snapshot from {args.file}: {e}") from e
    return ops.import_vm(doc, name=args.name)


def delete_vm(client: Client, args: argparse.Namespace) -> Any:
    if args.all == (args.vm is not None):
        raise SystemExit("kvm-memattr: vm delete takes a VM id or --all")
    return ops.delete_all_vms() if args.all else ops.delete_vm(args.vm)


def inject(client: Client, args: argparse.Namespace) -> Any:
    if args.nth is None:
        return ops.get_fault_injection(args.vm)
    return ops.set_fault_injection(args.vm, None if args.nth == "off" else int(args.nth))
