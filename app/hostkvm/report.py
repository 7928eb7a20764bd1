"""``kvm-memattr verify-host``: run the differential check and print what it found."""

from __future__ import annotations

import json
import sys

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from app.hostkvm.ioctls import HostKvmError, Kvm
from app.hostkvm.steps import as_json
from app.hostkvm.verify import Report, cli_lines, coverage, read_profile, verify
from app.models.host import HostProfile


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


def host_profile(as_json: bool, console: Console, device: str = "/dev/kvm") -> int:
    """``kvm-memattr host-profile``: this host as a profile document (0), or 2 without a KVM device."""
    try:
        kvm = Kvm(device)
    except HostKvmError as e:
        print(f"kvm-memattr: host-profile needs a usable KVM device: {e.strerror}", file=sys.stderr)
        return 2
    with kvm:
        profile = read_profile(kvm)
    if as_json:
        print(profile.model_dump_json(indent=2))
    else:
        _print_profile(profile, console)
        console.print("record it with --json > host.json; then: kvm-memattr vm create --profile host.json ...")
    return 0


def _print_profile(p: HostProfile, console: Console) -> None:
    table = Table(title=f"host profile {p.name}", title_justify="left", show_header=False, box=None, pad_edge=False)
    table.add_row("kernel", f"{p.kernel} (release {p.release})" if p.release else p.kernel)
    table.add_row("max_gfn", hex(p.max_gfn))
    for key, value in p.caps.model_dump().items():
        table.add_row(key, hex(value) if key == "KVM_CAP_VM_TYPES" else str(value))
    console.print(table)


def _document(report: Report) -> dict[str, object]:
    checked, cannot = coverage(report.profile)
    return {
        "profile": report.profile.model_dump(mode="json"),
        "seed": report.seed,
        "steps": report.steps,
        "vms": report.vms,
        "vm_types": [{"type": t, "engine": mine, "host": theirs} for t, mine, theirs in report.vm_types],
        "checked": checked,
        "not_checked": cannot,
        "divergences": [
            {
                "steps": [as_json(s) for s in d.steps],
                "results": [{"engine": mine, "host": theirs} for mine, theirs in d.results],
                "cli": cli_lines(d),
            }
            for d in report.divergences
        ],
    }


def _print(report: Report, console: Console) -> None:
    _print_profile(report.profile, console)
    checked, cannot = coverage(report.profile)
    console.print("checked: " + "; ".join(checked), markup=False)
    console.print("not checked on this host: " + "; ".join(cannot), markup=False)
    for n, d in enumerate(report.divergences, 1):
        console.print(f"\n[bold red]divergence {n}[/] after {len(d.steps)} step(s):")
        for step, (mine, theirs) in zip(d.steps, d.results, strict=False):
            mark = "" if mine == theirs else "   <- differs"
            console.print(
                f"  {json.dumps(as_json(step))}: engine {mine}, host {theirs}{mark}", markup=False, soft_wrap=True
            )
        console.print("  as kvm-memattr commands against any server (host.json: kvm-memattr host-profile --json):")
        for line in cli_lines(d):
            console.print(f"    {line}", markup=False, soft_wrap=True)
    verdict = (
        "[green]no divergence[/]" if not report.divergences else f"[red]{len(report.divergences)} divergence(s)[/]"
    )
    console.print(f"seed {report.seed}: {report.steps} steps on {report.vms} VM pairs, {verdict}")
