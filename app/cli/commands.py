"""The commands that are more than one operation: explore, export, import, delete, inject."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Any, get_args

from app.cli.args import int_list, number
from app.cli.output import PRINTED, Output
from app.client import Client
from app.client import operations as ops
from app.models.names import VARIANT_NAMES
from app.models.scenario import FaultAccess, Scenario, Target

VIOLATED = 4
"""explore's exit status when a schedule broke an invariant (so CI can gate on it)."""


@dataclass(frozen=True)
class ScenarioOption:
    """How ``explore`` takes a field of the scenario: ``flag VALUE`` read by ``type``, and how a
    replay line writes the value back."""

    flag: str
    help: str
    type: Callable[[str], Any] = str
    choices: list[str] | None = None
    show: Callable[[Any], str] = str

    @property
    def metavar(self) -> str | None:
        return None if self.choices else self.flag.removeprefix("--").upper().replace("-", "_")


SCENARIO_OPTIONS = {
    "start_gfn": ScenarioOption("--start-gfn", "first gfn of the range (default 0)", number, show=hex),
    "npages": ScenarioOption("--npages", "gfns in the range, 1..8 (default 2)", int),
    "to": ScenarioOption("--to", "default: private", choices=sorted(get_args(Target))),
    "fail_nth": ScenarioOption(
        "--fail-nth", "the nth per-gfn store (linux: reservation; in place: 1, the preallocation) fails", int
    ),
    "initial_private": ScenarioOption(  # read by explore (int_list), not argparse: --all ignores it, as the others
        "--initial-private",
        "comma-separated offsets private before (default: opposite of --to)",
        show=lambda offsets: ",".join(map(str, offsets)),
    ),
    "fault_gfn_offset": ScenarioOption("--fault-offset", "which gfn of the range the vCPU faults on", int),
    "fault_access": ScenarioOption("--access", "the vCPU's access", choices=sorted(get_args(FaultAccess))),
    "pinned": ScenarioOption(  # read by explore (int_list), as --initial-private
        "--pinned",
        "in-place variants: comma-separated offsets the host holds pinned",
        show=lambda offsets: ",".join(map(str, offsets)),
    ),
}
"""explore's option for each field of the Scenario but its variant (--variant), in its order;
the parser adds them with the field's name as ``dest`` and its default."""


def explore(client: Client, args: argparse.Namespace, out: Output) -> int:
    """Run the explorer; 0, or ``VIOLATED`` when a schedule broke an invariant."""
    from app.timeline import show_run, showcase, summary

    if args.all:
        runs = [client.run_explorer(v, **showcase(v)) for v in VARIANT_NAMES]
        if out.as_json:
            print(json.dumps([r.model_dump(mode="json") for r in runs], indent=2))
        elif not out.quiet:
            out.console.print(summary(runs))
        return VIOLATED if any(r.violations for r in runs) else 0
    scenario = {name: getattr(args, name) for name in SCENARIO_OPTIONS}
    for name in ("initial_private", "pinned"):
        if scenario[name] is not None:
            scenario[name] = int_list(scenario[name])
    schedule = None if args.schedule is None else [s.strip() for s in args.schedule.split(",") if s.strip()]
    run = client.run_explorer(args.variant, schedule=schedule, **scenario)
    if out.as_json:
        print(json.dumps(run.model_dump(mode="json"), indent=2))
    elif not out.quiet:
        defaults = {f.name: f.default for f in fields(Scenario)}
        replay = "".join(
            f" {SCENARIO_OPTIONS[name].flag} {SCENARIO_OPTIONS[name].show(value)}"
            for name, value in scenario.items()
            if value != defaults[name]
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
