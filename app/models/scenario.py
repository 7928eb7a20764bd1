"""The explorer's scenario, defined once: one vCPU fault on ``start_gfn + fault_gfn_offset`` raced
against one conversion of ``[start_gfn, start_gfn + npages)``.

Every surface derives from this class: the API's request (``app.models.explorer.ExplorerRunRequest``)
is a subclass that adds the wire types and descriptions, the engine runs one (``app.core.explorer``),
the client sends one, and ``kvm-memattr explore`` has one option a field
(``app.cli.commands.SCENARIO_OPTIONS``). A new field is a line here, its documentation on those
surfaces, and what the engine does with it.

Pydantic-free, so the CLI and the client read the fields and their defaults without loading the models.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from .names import VariantName

Target = Literal["private", "shared"]
FaultAccess = Literal["private", "shared", "attribute"]


@dataclass(frozen=True)
class Scenario:
    variant: VariantName
    start_gfn: int = 0
    npages: int = 2
    to: Target = "private"
    fail_nth: int | None = None  # the nth per-gfn store (linux: reservation) fails
    initial_private: list[int] | None = None  # offsets; None: the opposite of ``to`` everywhere
    fault_gfn_offset: int = 0
    fault_access: FaultAccess = "attribute"  # attribute: as private as the gfn reads
    pinned: list[int] | None = None  # in-place variants: offsets the host holds pinned

    @property
    def to_private(self) -> bool:
        return self.to == "private"

    def initial(self) -> list[bool]:
        """Whether each gfn of the range is private before the conversion."""
        if self.initial_private is None:
            return [not self.to_private] * self.npages
        return [o in self.initial_private for o in range(self.npages)]
