"""A VM's whole state as one versioned JSON document (``GET .../snapshot``, ``POST /v1/vms/import``).

Everything is stored as runs or small lists, so a document is O(runs), not O(pages).
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from app.models.host import HostProfile
from app.models.kvm import Semantics, VmType

SNAPSHOT_FORMAT: Literal["kvm-memattr/vm-snapshot"] = "kvm-memattr/vm-snapshot"
SNAPSHOT_VERSION = 2
"""2 added ``profile``; a version-1 document loads as the service's default host."""


class _Doc(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SnapshotFile(_Doc):
    """A guest_memfd file; ``fd`` null once closed (an ``rfc-v9`` slot may still hold it)."""

    id: int = Field(ge=0)
    fd: int | None = Field(ge=0)
    size: int = Field(ge=0)
    flags: int = Field(ge=0)


class SnapshotMemslot(_Doc):
    as_id: int = Field(ge=0)
    id: int = Field(ge=0)
    flags: int = Field(ge=0)
    base_gfn: int = Field(ge=0)
    npages: int = Field(ge=1)
    userspace_addr: int = Field(ge=0)
    file: int | None = Field(None, description="id of the bound file, if the slot still has one")
    guest_memfd: int | None = Field(None, description="the fd the slot was created with")
    guest_memfd_offset: int = Field(0, ge=0)


class SnapshotMapping(_Doc):
    start_gfn: int = Field(ge=0)
    end_gfn: int = Field(ge=0)
    private: bool
    writable: bool


class SnapshotNotifier(_Doc):
    id: int = Field(ge=0)
    hva_start: int = Field(ge=0)
    hva_end: int = Field(ge=0)
    gfn_ranges: list[tuple[int, int, int]] = Field(description="(as_id, start_gfn, end_gfn)")


class SnapshotInvalidation(_Doc):
    mmu_invalidate_seq: int = Field(ge=0)
    mmu_invalidate_in_progress: int = Field(ge=0)
    mmu_invalidate_range_start: int | None
    mmu_invalidate_range_end: int | None


class SnapshotStats(_Doc):
    attribute_updates: int = Field(ge=0)
    tlb_flushes: int = Field(ge=0)
    pages_zapped: int = Field(ge=0)
    faults: int = Field(ge=0)
    fault_retries: int = Field(ge=0)
    memory_fault_exits: int = Field(ge=0)
    mmio_exits: int = Field(ge=0)


class VmSnapshot(_Doc):
    """Everything observable about one VM except its event trace (the next event id is kept)."""

    format: Literal["kvm-memattr/vm-snapshot"] = SNAPSHOT_FORMAT
    version: int = Field(description=f"{SNAPSHOT_VERSION} (1 is still read); another version is refused")
    name: str | None = Field(None, max_length=200)
    type: VmType
    semantics: Semantics
    profile: HostProfile | None = Field(None, description="the host the VM behaves as (absent in version 1)")
    attributes: list[tuple[int, int, int]] = Field(description="(start_gfn, end_gfn, attributes) covering [0, 2^52)")
    memslots: list[SnapshotMemslot]
    files: list[SnapshotFile]
    mappings: list[list[SnapshotMapping]] = Field(description="present mappings, per address space")
    invalidation: SnapshotInvalidation
    notifiers: list[SnapshotNotifier]
    next_notifier_id: int = Field(ge=1)
    next_fd: int = Field(ge=0)
    pinned_regions: list[tuple[int, int]] = Field(description="(addr, size) in registration order")
    fail_nth: int | None = Field(None, ge=1)
    stats: SnapshotStats
    next_event_id: int = Field(ge=1)
