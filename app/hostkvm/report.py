"""``kvm-memattr verify-host``: run the differential check and print what it found."""

from __future__ import annotations

import json
import sys
from dataclasses import asdict

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from app.hostkvm.ioctls import HostKvmError, Kvm
from app.hostkvm.verify import Report, cli_lines, read_profile, verify


def run(steps: int, seed: int, as_json: bool, console: Console, device: str = "/dev/kvm") -> int:
    """0: no divergence; 1: divergences (printed as reproducers); 2: no usable /dev/kvm."""
    try:
        kvm = Kvm(device)
    except HostKvmError as e:
        print(f"kvm-memattr: verify-host needs a usable KVM device: {e.strerror}", file=sys.stderr)
        return 2
    with kvm:
        profile = read_profile(kvm)
        report: Report | None = None
        show = not as_json and console.is_terminal
        with Progress(
            TextColumn("steps"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=console,
            disable=not show,
        ) as progress:
            task = progress.add_task("verify", total=steps)
            for report in verify(kvm, profile, steps, seed):
                progress.update(task, completed=min(report.steps, steps))
    assert report is not None
    if as_json:
        print(json.dumps(_document(report), indent=2))
    else:
        _print(report, console)
    return 1 if report.divergences else 0


def _document(report: Report) -> dict[str, object]:
    return {
        "profile": asdict(report.profile),
        "seed": report.seed,
        "steps": report.steps,
        "vms": report.vms,
        "divergences": [
            {
                "steps": d.steps,
                "results": [{"engine": mine, "host": theirs} for mine, theirs in d.results],
                "cli": cli_lines(d),
            }
            for d in report.divergences
        ],
    }


def _print(report: Report, console: Console) -> None:
    p = report.profile
    table = Table(title="host", title_justify="left", show_header=False, box=None, pad_edge=False)
    for key, value in asdict(p).items():
        table.add_row(key, hex(value) if key == "max_gfn" else str(value))
    console.print(table)
    if not p.memory_attributes:
        console.print("no KVM_CAP_MEMORY_ATTRIBUTES here: memslots and guest_memfd checked, conversions not")
    for n, d in enumerate(report.divergences, 1):
        console.print(f"\n[bold red]divergence {n}[/] after {len(d.steps)} step(s):")
        for step, (mine, theirs) in zip(d.steps, d.results, strict=False):
            mark = "" if mine == theirs else "   <- differs"
            console.print(f"  {json.dumps(step)}: engine {mine}, host {theirs}{mark}", markup=False, soft_wrap=True)
        console.print("  as kvm-memattr commands (against a server started with KVM_MEMATTR_ADDRESS_SPACES=1):")
        for line in cli_lines(d):
            console.print(f"    {line}", markup=False, soft_wrap=True)
    verdict = (
        "[green]no divergence[/]" if not report.divergences else f"[red]{len(report.divergences)} divergence(s)[/]"
    )
    console.print(f"seed {report.seed}: {report.steps} steps on {report.vms} VM pairs, {verdict}")
