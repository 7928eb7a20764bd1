"""A VM's whole state as one versioned JSON document (``GET .../snapshot``, ``POST /v1/vms/import``).

Everything is stored as runs or small lists, so a document is O(runs), not O(pages).
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

from .host import HostProfile
from .kvm import U64_MAX, Semantics, VmType
from .state import MmuStats

N = Annotated[int, Field(ge=0, le=U64_MAX)]
"""Every number of a snapshot is a kernel ``__u64`` (or narrower, which the loader checks)."""
Fd = Annotated[int, Field(ge=0, le=2**31 - 1)]
"""A file descriptor: a non-negative C ``int``."""

SNAPSHOT_FORMAT: Literal["kvm-memattr/vm-snapshot"] = "kvm-memattr/vm-snapshot"
SNAPSHOT_VERSION = 4
"""2 added ``profile``; 3 the host side of guest_memfd (allocated pages, host mappings,
gmem-only slots); 4 in-place conversion (a file's private pages, pins). Older documents load as
the service's default host (1) and with none of what 3 and 4 added."""


class _Doc(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SnapshotPin(_Doc):
    id: Annotated[int, Field(ge=1, le=U64_MAX)]
    first: N = Field(description="first page")
    npages: Annotated[int, Field(ge=1, le=U64_MAX)]
    detached: list[tuple[N, N]] = Field([], description="(start, end) page ranges punched out of the file since")


class SnapshotFile(_Doc):
    """A guest_memfd file; ``fd`` null once closed (an ``rfc-v9`` slot may still hold it)."""

    id: N
    fd: Fd | None
    size: N
    flags: N
    allocated: list[tuple[N, N]] = Field([], description="(start, end) page ranges with a folio, in order")
    private: list[tuple[N, N]] | None = Field(
        None, description="in place (7.4): (start, end) page ranges that are private, in order; else null"
    )
    pins: list[SnapshotPin] = Field([], description="what the host holds pinned")


class SnapshotMemslot(_Doc):
    as_id: N
    id: N
    flags: N
    base_gfn: N
    npages: Annotated[int, Field(ge=1, le=U64_MAX)]
    userspace_addr: N
    file: N | None = Field(None, description="id of the bound file, if the slot still has one")
    guest_memfd: Fd | None = Field(None, description="the fd the slot was created with")
    guest_memfd_offset: N = 0
    gmem_only: bool = Field(False, description="KVM_MEMSLOT_GMEM_ONLY (kept after its file is released)")


class SnapshotHostMapping(_Doc):
    id: Annotated[int, Field(ge=1, le=U64_MAX)]
    file: N = Field(description="id of the mapped file")
    pgoff: N
    npages: Annotated[int, Field(ge=1, le=U64_MAX)]


class SnapshotMapping(_Doc):
    start_gfn: N
    end_gfn: N
    private: bool
    writable: bool


class SnapshotNotifier(_Doc):
    id: N
    hva_start: N
    hva_end: N
    gfn_ranges: list[tuple[N, N, N]] = Field(description="(as_id, start_gfn, end_gfn)")


class SnapshotInvalidation(_Doc):
    mmu_invalidate_seq: N
    mmu_invalidate_in_progress: N
    mmu_invalidate_range_start: N | None
    mmu_invalidate_range_end: N | None


class VmSnapshot(_Doc):
    """Everything observable about one VM except its event trace (the next event id is kept)."""

    format: Literal["kvm-memattr/vm-snapshot"] = SNAPSHOT_FORMAT
    version: int = Field(description=f"{SNAPSHOT_VERSION} (1 is still read); another version is refused")
    name: str | None = Field(None, max_length=200)
    type: VmType
    semantics: Semantics
    profile: HostProfile | None = Field(None, description="the host the VM behaves as (absent in version 1)")
    attributes: list[tuple[N, N, N]] = Field(description="(start_gfn, end_gfn, attributes) covering [0, 2^52)")
    memslots: list[SnapshotMemslot]
    files: list[SnapshotFile]
    mappings: list[list[SnapshotMapping]] = Field(description="present mappings, per address space")
    invalidation: SnapshotInvalidation
    notifiers: list[SnapshotNotifier]
    next_notifier_id: Annotated[int, Field(ge=1, le=U64_MAX)]
    next_fd: N
    pinned_regions: list[tuple[N, N]] = Field(description="(addr, size) in registration order")
    host_mappings: list[SnapshotHostMapping] = []
    next_mapping_id: Annotated[int, Field(ge=1, le=U64_MAX)] = 1
    next_pin_id: Annotated[int, Field(ge=1, le=U64_MAX)] = 1
    fail_nth: int | None = Field(None, ge=1, le=U64_MAX)
    stats: MmuStats
    next_event_id: Annotated[int, Field(ge=1, le=U64_MAX)]
