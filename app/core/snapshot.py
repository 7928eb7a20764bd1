"""VM snapshots: ``Kvm`` -> one versioned document and back, in O(runs).

Loading checks the document the way the kernel would have built such a state (slots that do not
overlap, bindings inside their file, runs in order covering the gfn space, counters that agree),
so a tampered or inconsistent document is refused with EINVAL naming what is wrong, before
anything is created.
"""

from __future__ import annotations

from app.core import guest_memfd
from app.core.budget import UNBOUNDED, ServiceBudget
from app.core.errors import EINVAL, ENOMEM, KvmError
from app.core.kvm import PRIVATE, Kvm, NotifierInvalidation, Stats
from app.core.limits import EngineLimits
from app.core.memslots import GuestMemfdFile, Memslot
from app.core.mmu import spte, spte_private, spte_writable
from app.models.host import HostProfile
from app.models.kvm import (
    GFN_LIMIT,
    KVM_MEM_GUEST_MEMFD,
    KVM_MEM_LOG_DIRTY_PAGES,
    KVM_MEM_MAX_NR_PAGES,
    KVM_MEM_READONLY,
    PAGE_SHIFT,
    PAGE_SIZE,
    U64_MAX,
    USER_HVA_LIMIT,
)
from app.models.snapshot import (
    SNAPSHOT_VERSION,
    SnapshotFile,
    SnapshotInvalidation,
    SnapshotMapping,
    SnapshotMemslot,
    SnapshotNotifier,
    SnapshotStats,
    VmSnapshot,
)


def dump(kvm: Kvm) -> VmSnapshot:
    """The whole state of ``kvm``."""
    # Open files by fd, then files only slots still hold, in the order the slots are listed, so
    # that dumping a loaded copy gives the same document (found by the stateful test).
    files = {id(f): f for f in kvm.gmem_files.values()}
    for space in kvm.spaces:
        for slot in space.by_gfn.values():
            if slot.gmem is not None:
                files.setdefault(id(slot.gmem), slot.gmem)
    file_ids = {key: n for n, key in enumerate(files)}
    open_fds = {id(f): fd for fd, f in kvm.gmem_files.items()}
    return VmSnapshot(
        version=SNAPSHOT_VERSION,
        name=kvm.name,
        type=kvm.type,
        semantics=kvm.semantics,
        profile=kvm.host,
        attributes=list(kvm.attributes.runs(0, GFN_LIMIT)),
        memslots=[
            SnapshotMemslot(
                as_id=slot.as_id,
                id=slot.id,
                flags=slot.flags,
                base_gfn=slot.base_gfn,
                npages=slot.npages,
                userspace_addr=slot.userspace_addr,
                file=None if slot.gmem is None else file_ids[id(slot.gmem)],
                guest_memfd=slot.gmem_fd,
                guest_memfd_offset=slot.gmem_offset,
            )
            for space in kvm.spaces
            for slot in space.by_gfn.values()
        ],
        files=[
            SnapshotFile(id=file_ids[key], fd=open_fds.get(key), size=f.size, flags=f.flags) for key, f in files.items()
        ],
        mappings=[
            [
                SnapshotMapping(start_gfn=s, end_gfn=e, private=spte_private(v), writable=spte_writable(v))
                for s, e, v in kvm.mmu.mapped_runs(as_id, 0, GFN_LIMIT)
            ]
            for as_id in range(kvm.nr_as)
        ],
        invalidation=SnapshotInvalidation(
            mmu_invalidate_seq=kvm.inval.seq,
            mmu_invalidate_in_progress=kvm.inval.in_progress,
            mmu_invalidate_range_start=kvm.inval.range_start,
            mmu_invalidate_range_end=kvm.inval.range_end,
        ),
        notifiers=[
            SnapshotNotifier(id=n.id, hva_start=n.hva_start, hva_end=n.hva_end, gfn_ranges=n.gfn_ranges)
            for n in kvm.notifiers.values()
        ],
        next_notifier_id=kvm.next_notifier_id,
        next_fd=kvm.next_fd,
        pinned_regions=list(kvm.pinned),
        fail_nth=kvm.fail_nth,
        stats=SnapshotStats(**vars(kvm.stats)),
        next_event_id=kvm.events.next_id,
    )


def _check(ok: bool, what: str) -> None:
    if not ok:
        raise EINVAL(f"snapshot: {what}")


def load(
    doc: VmSnapshot, vm_id: str, limits: EngineLimits, host: HostProfile, budget: ServiceBudget = UNBOUNDED
) -> Kvm:
    """A new ``Kvm`` with exactly the state of ``doc``; EINVAL, creating nothing, if it is not one.
    ``host`` is the document's profile, or for a version-1 document (which has none) the default."""
    _check(doc.version in (1, SNAPSHOT_VERSION), f"version {doc.version} is not {SNAPSHOT_VERSION} (or 1)")
    _check(doc.version > 1 or doc.profile is None, "a version-1 document has no profile")
    _check(doc.version == 1 or doc.profile is not None, f"a version-{doc.version} document needs its profile")
    kvm = Kvm(vm_id, doc.name, doc.type, doc.semantics, limits, host, budget)
    try:
        _load_state(kvm, doc)
    except KvmError:
        kvm.release()
        raise
    return kvm


def _load_state(kvm: Kvm, doc: VmSnapshot) -> None:
    _load_attributes(kvm, doc.attributes)
    files = _load_files(kvm, doc.files, doc.next_fd)
    for s in doc.memslots:
        _load_memslot(kvm, s, files)
    for as_id, runs in enumerate(doc.mappings):
        _check(as_id < kvm.nr_as, f"mappings for address space {as_id}, the VM has {kvm.nr_as}")
        _load_mappings(kvm, as_id, runs)
    _check(len(doc.mappings) == kvm.nr_as, f"mappings for {len(doc.mappings)} address spaces, the VM has {kvm.nr_as}")
    _load_notifiers(kvm, doc)
    inv = doc.invalidation
    matched = sum(1 for n in kvm.notifiers.values() if n.gfn_ranges)
    _check(
        inv.mmu_invalidate_in_progress == matched,
        f"mmu_invalidate_in_progress is not the number of open notifier invalidations that matched a slot ({matched})",
    )
    rs, re_ = inv.mmu_invalidate_range_start, inv.mmu_invalidate_range_end
    _check((rs is None) == (re_ is None), "the invalidation range needs both ends or neither")
    _check(rs is None or re_ is None or 0 <= rs < re_ <= GFN_LIMIT, "the invalidation range is empty or past 2^52")
    _check(not matched or rs is not None, "invalidations are open but no range is recorded")
    kvm.inval.seq, kvm.inval.in_progress = inv.mmu_invalidate_seq, inv.mmu_invalidate_in_progress
    kvm.inval.range_start, kvm.inval.range_end = rs, re_
    _check(kvm.sev_guest or not doc.pinned_regions, "pinned regions on a VM that is not an SEV guest")
    for addr, size in doc.pinned_regions:
        _check(size > 0 and addr + size <= U64_MAX, f"pinned region ({addr:#x}, {size:#x}) is empty or wraps")
    kvm.pinned = list(doc.pinned_regions)
    kvm.fail_nth = doc.fail_nth
    kvm.stats = Stats(**doc.stats.model_dump())
    kvm.events.next_id = doc.next_event_id


def _load_attributes(kvm: Kvm, runs: list[tuple[int, int, int]]) -> None:
    supported = PRIVATE if kvm.has_private_mem else 0
    _check(bool(runs) and runs[0][0] == 0 and runs[-1][1] == GFN_LIMIT, "attribute runs must cover [0, 2^52)")
    for (s, e, v), nxt in zip(runs, [*runs[1:], None], strict=True):
        _check(s < e, f"attribute run ({s:#x}, {e:#x}) is empty")
        _check(nxt is None or nxt[0] == e, f"attribute runs out of order or not contiguous after {e:#x}")
        _check(not v & ~supported, f"attributes {v:#x} at gfn {s:#x} are not supported by this VM")
    if len(runs) > kvm.limits.max_attribute_runs:
        raise ENOMEM(f"snapshot: {len(runs)} attribute runs exceed the per-VM budget ({kvm.limits.max_attribute_runs})")
    for s, e, v in runs:
        kvm.attributes.assign(s, e, v)


def _load_files(kvm: Kvm, files: list[SnapshotFile], next_fd: int) -> dict[int, GuestMemfdFile]:
    out: dict[int, GuestMemfdFile] = {}
    supported = guest_memfd.supported_flags(kvm)
    for f in files:
        _check(f.id not in out, f"file id {f.id} appears twice")
        _check(f.size > 0 and f.size % PAGE_SIZE == 0 and f.size < 1 << 63, f"file {f.id} has an invalid size")
        _check(not f.flags & ~supported, f"file {f.id} has flags {f.flags:#x} outside {supported:#x}")
        gmem = out[f.id] = GuestMemfdFile(f.fd if f.fd is not None else -1, f.size, f.flags)
        if f.fd is not None:
            _check(f.fd not in kvm.gmem_files, f"fd {f.fd} is open twice")
            _check(f.fd < next_fd, f"fd {f.fd} is not below next_fd {next_fd}")
            kvm.gmem_files[f.fd] = gmem
    kvm.next_fd = next_fd
    return out


def _load_memslot(kvm: Kvm, s: SnapshotMemslot, files: dict[int, GuestMemfdFile]) -> None:
    name = f"memslot (as_id {s.as_id}, id {s.id})"
    _check(s.as_id < kvm.nr_as, f"{name}: the VM has {kvm.nr_as} address spaces")
    _check(s.id < kvm.host.caps.KVM_CAP_NR_MEMSLOTS, f"{name}: id >= KVM_USER_MEM_SLOTS")
    space = kvm.spaces[s.as_id]
    _check(s.id not in space.by_id, f"{name} appears twice")
    gmem = bool(s.flags & KVM_MEM_GUEST_MEMFD)
    allowed = KVM_MEM_GUEST_MEMFD if gmem else KVM_MEM_LOG_DIRTY_PAGES | KVM_MEM_READONLY
    readonly_ok = kvm.has_readonly_mem or not s.flags & KVM_MEM_READONLY
    _check(not s.flags & ~allowed and (not gmem or kvm.gmem_slots) and readonly_ok, f"{name}: flags {s.flags:#x}")
    _check(s.npages <= KVM_MEM_MAX_NR_PAGES, f"{name}: too many pages")
    _check(s.base_gfn + s.npages - 1 <= kvm.host.max_gfn, f"{name}: past max_gfn")
    _check(s.userspace_addr % PAGE_SIZE == 0, f"{name}: userspace_addr not aligned")
    _check(s.userspace_addr + (s.npages << PAGE_SHIFT) <= USER_HVA_LIMIT, f"{name}: userspace range past the user half")
    _check(not space.overlaps_other(s.base_gfn, s.base_gfn + s.npages, None), f"{name} overlaps another slot")
    slot = Memslot(s.as_id, s.id, s.flags, s.base_gfn, s.npages, s.userspace_addr)
    _check(s.file is None or gmem, f"{name}: a file bound to a slot without KVM_MEM_GUEST_MEMFD")
    _check(s.file is not None or not gmem or kvm.linux, f"{name}: an rfc-v9 guest_memfd slot always holds its file")
    if s.file is not None:
        _check(s.file in files, f"{name}: unknown file {s.file}")
        f, size = files[s.file], s.npages << PAGE_SHIFT
        off = s.guest_memfd_offset
        _check(off % PAGE_SIZE == 0 and off + size <= f.size, f"{name}: binding past the end of file {s.file}")
        _check(not f.bind_conflict(off, size), f"{name}: binding overlaps another binding of file {s.file}")
        f.bindings[slot.slot] = (off, size)
        slot.gmem = f
    if gmem:
        slot.gmem_fd, slot.gmem_offset = s.guest_memfd, s.guest_memfd_offset
    space.add(slot)


def _load_mappings(kvm: Kvm, as_id: int, runs: list[SnapshotMapping]) -> None:
    for m, nxt in zip(runs, [*runs[1:], None], strict=False):
        _check(m.start_gfn < m.end_gfn <= GFN_LIMIT, f"mapping run ({m.start_gfn:#x}, {m.end_gfn:#x}) in as {as_id}")
        _check(nxt is None or nxt.start_gfn >= m.end_gfn, f"mapping runs of as {as_id} out of order or overlapping")
        kvm.mmu.set(as_id, m.start_gfn, m.end_gfn, spte(m.private, m.writable))
    if kvm.mmu.runs() > kvm.limits.max_mapping_runs:
        raise ENOMEM(f"snapshot: mapping runs exceed the per-VM budget ({kvm.limits.max_mapping_runs})")


def _load_notifiers(kvm: Kvm, doc: VmSnapshot) -> None:
    for n in doc.notifiers:
        _check(n.id not in kvm.notifiers and n.id < doc.next_notifier_id, f"notifier id {n.id}")
        _check(n.hva_start < n.hva_end, f"notifier {n.id}: empty hva range")
        for a, s, e in n.gfn_ranges:
            _check(a < kvm.nr_as and s < e <= GFN_LIMIT, f"notifier {n.id}: gfn range ({a}, {s:#x}, {e:#x})")
        kvm.notifiers[n.id] = NotifierInvalidation(n.id, n.hva_start, n.hva_end, list(n.gfn_ranges))
    kvm.next_notifier_id = doc.next_notifier_id
