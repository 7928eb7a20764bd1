"""Terminal views of explorer runs: a verdict, the counterexample as a two-lane timeline
(vCPU | conversion or punch-hole) with the state after each step, and the one-table summary of
``--all``."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.table import Table

from app.models.explorer import ExplorerRun, ExplorerTraceEntry

REVIEW_SCENARIO: dict[str, Any] = {"npages": 2, "start_gfn": 0, "to": "private", "fail_nth": 2}
"""The review's case: two gfns from gfn 0 made private, the second store fails."""

SHOWCASE: dict[str, dict[str, Any]] = {"in-place-no-pin-check": {"pinned": [1]}}
"""What ``--all`` changes in the review's case for a wrong order it cannot show: a missing pin
check shows only with a pinned page."""


def showcase(variant: str) -> dict[str, Any]:
    """The scenario ``--all`` runs ``variant`` on."""
    return {**REVIEW_SCENARIO, **SHOWCASE.get(variant, {})}


def _attrs(private: list[bool]) -> str:
    return "".join("P" if p else "s" for p in private)


def _spte(entry: ExplorerTraceEntry) -> str:
    return "-" if entry.mapping is None else ("P" if entry.mapping.private else "s")


def _file(allocated: list[bool] | None) -> str:
    return "".join("A" if a else "." for a in allocated or ())


def timeline(trace: list[ExplorerTraceEntry], title: str) -> Table:
    """One row per step, the acting lane filled in; attributes P = private, s = shared; for a
    punch-hole, the file's pages A = allocated, . = freed."""
    punch = any(e.allocated is not None for e in trace)
    table = Table(title=title or None, title_justify="left", box=None, pad_edge=False, header_style="bold")
    columns = [
        ("#", "right"),
        ("vCPU", "left"),
        ("punch-hole" if punch else "conversion", "left"),
        ("seq", "right"),
        ("in_prog", "right"),
        ("attrs", "left"),
        ("spte", "left"),
    ]
    for col, justify in columns + ([("file", "left")] if punch else []):
        table.add_column(col, justify=justify, no_wrap=True)  # type: ignore[arg-type]
    for n, e in enumerate(trace, 1):
        vcpu, conv = (e.step, "") if e.actor == "vcpu" else ("", e.step)
        row = [str(n), vcpu, conv, str(e.seq), str(e.in_progress), _attrs(e.attributes), _spte(e)]
        table.add_row(*row, *([_file(e.allocated)] if punch else []))
    return table


_LEGEND = "attrs and spte: P private, s shared, - not mapped"
_FILE_LEGEND = "; file: A allocated, . freed"


def _legend(trace: list[ExplorerTraceEntry]) -> str:
    return _LEGEND + (_FILE_LEGEND if any(e.allocated is not None for e in trace) else "")


def show_run(console: Console, run: ExplorerRun, replay_args: str) -> None:
    o = run.outcomes
    if run.trace is not None:  # one schedule replayed
        verdict = "violates an invariant" if run.violations else "keeps every invariant"
        console.print(f"[bold]{run.variant}[/]: this schedule {verdict}")
        console.print(_legend(run.trace), style="dim")
        console.print(timeline(run.trace, ""))
    elif run.violations:
        console.print(f"[bold]{run.variant}[/]: {run.violations} of {run.schedules} schedules violate an invariant")
    else:
        console.print(f"[bold]{run.variant}[/]: all {run.schedules} schedules keep every invariant")
    console.print(f"fault outcomes: mapped {o.mapped}, retry {o.retry}, memory_fault_exit {o.memory_fault_exit}")
    ce = run.counterexample
    if ce is None:
        return
    console.print(f"[bold red]{ce.violated}[/]: {ce.detail}", highlight=False)
    if run.trace is None:
        legend = _legend(ce.trace)
        if legend == _LEGEND:
            console.print(f"shortest counterexample; {legend}", style="dim")
        else:  # too long for one 80-column line
            console.print("shortest counterexample", style="dim")
            console.print(legend, style="dim")
        console.print(timeline(ce.trace, ""))
    console.print("replay it:", style="dim")
    console.print(
        f"  kvm-memattr explore --variant {run.variant}{replay_args} --schedule '{','.join(ce.schedule)}'",
        markup=False,
        highlight=False,
        soft_wrap=True,
    )


def summary(runs: list[ExplorerRun]) -> Table:
    table = Table(
        title="the review's scenario: gfns 0-1 made private, the 2nd store fails",
        title_justify="left",
        header_style="bold",
    )
    for col in ("variant", "schedules", "violations", "first violated"):
        table.add_column(col, no_wrap=True)
    notes: list[str] = []
    for run in runs:
        first = run.counterexample.violated if run.counterexample else "-"
        name: str = run.variant
        if run.variant in SHOWCASE:  # a changed scenario: marked, and said under the table
            mark = "*" * (len(notes) + 1)
            notes.append(f"{mark} " + ", ".join(f"{k} {_value(v)}" for k, v in SHOWCASE[run.variant].items()))
            name += mark
        table.add_row(name, str(run.schedules), str(run.violations), first)
    if notes:
        table.caption, table.caption_justify = "; ".join(notes), "left"
    return table


def _value(v: Any) -> str:
    return ",".join(map(str, v)) if isinstance(v, list) else str(v)
