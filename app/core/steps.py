"""Protocols as sequences of steps, so the production path and the interleaving explorer run the
same code: the engine runs a sequence back to back under the VM lock; the explorer interleaves
two of them (a conversion and a vCPU fault) one step at a time.

A sequence is a generator that *announces* each step (``yield Step(...)``) and then performs it
when resumed; it ends (``return``, or raising the ioctl's errno) right after its last step's
work, so a caller always knows whether another step remains.
"""

from __future__ import annotations

from collections.abc import Generator
from dataclasses import dataclass

Steps = Generator["Step", None, None]


@dataclass(frozen=True, slots=True)
class Step:
    label: str
    holds_mmu_lock: bool
    """Whether the actor holds ``mmu_lock`` once this step is done (a vCPU cannot take it then)."""
    takes_mmu_lock: bool = False
    """The step takes and drops ``mmu_lock`` itself, so it waits while another actor holds it."""


def run(steps: Steps) -> None:
    """Run a sequence back to back, as one ioctl does under the VM lock; its errno propagates."""
    for _ in steps:
        pass
