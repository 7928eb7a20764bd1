"""The steps ``verify-host`` runs on both sides: one frozen dataclass an operation.

A step names guest_memfd files by creation order (the index of their ``CreateGmem`` step in the
sequence), not by fd number: the host reuses fd numbers, the engine does not.

A report shows a step as ``{"op": ..., <its fields>}`` (``as_json``); a memslot's guest_memfd
binding, when it has one, is inlined as ``"file"`` and ``"offset"``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import ClassVar


@dataclass(frozen=True)
class Binding:
    """A memslot's guest_memfd: a file by creation order (None: no file, so an fd no process has)."""

    file: int | None
    offset: int = 0


@dataclass(frozen=True)
class SetMemslot:
    """``KVM_SET_USER_MEMORY_REGION2``."""

    op: ClassVar[str] = "set"
    slot: int
    flags: int
    gpa: int
    size: int
    hva: int
    binding: Binding | None = None

    @property
    def file(self) -> int | None:
        return self.binding.file if self.binding else None

    @property
    def offset(self) -> int:
        return self.binding.offset if self.binding else 0


@dataclass(frozen=True)
class CreateGmem:
    """``KVM_CREATE_GUEST_MEMFD``."""

    op: ClassVar[str] = "gmem"
    size: int
    flags: int


@dataclass(frozen=True)
class CloseGmem:
    """``close()`` of a guest_memfd file, by creation order."""

    op: ClassVar[str] = "close"
    file: int


@dataclass(frozen=True)
class SetAttributes:
    """``KVM_SET_MEMORY_ATTRIBUTES``."""

    op: ClassVar[str] = "attrs"
    address: int
    size: int
    attributes: int
    flags: int


@dataclass(frozen=True)
class CreateVm:
    """``KVM_CREATE_VM`` of a type: only alone, from ``check_vm_types``, never in a sequence."""

    op: ClassVar[str] = "vm"
    type: str


VmOp = SetMemslot | CreateGmem | CloseGmem | SetAttributes
"""What a sequence runs on its VM pair."""

Step = VmOp | CreateVm


def as_json(step: Step) -> dict[str, object]:
    """``{"op": ..., <fields>}``: a step as a report shows it."""
    doc: dict[str, object] = {"op": step.op, **asdict(step)}
    binding = doc.pop("binding", None)
    if isinstance(binding, dict):
        doc |= binding
    return doc
