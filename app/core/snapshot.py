"""VM snapshots: ``Kvm`` -> one versioned document and back, in O(runs).

Loading builds the state through the ioctls' own rules: every file passes ``kvm_gmem_create()``'s
checks and every memslot the whole plan of ``kvm_set_memory_region()`` (``kvm_gmem_bind()``
included), so an import accepts exactly what the API can reach, on that VM's type and host
profile. What no single ioctl checks (runs in order covering the gfn space, mappings that agree
with the attributes and lie inside memslots, counters that agree) is checked here. A document
that is not such a state is refused with EINVAL naming what is wrong, before anything is created.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from typing import ParamSpec, TypeVar

from app.core import guest_memfd, sev
from app.core.budget import UNBOUNDED, ServiceBudget
from app.core.errors import EINVAL, ENOMEM, KvmError
from app.core.gfn_range import hva_ranges
from app.core.kvm import PGOFF_LIMIT, PRIVATE, GuestMemfdFile, HostMapping, Kvm, NotifierInvalidation
from app.core.limits import EngineLimits
from app.core.memslots import install, plan_set_memory_region
from app.core.mmu import spte, spte_private, spte_writable
from app.models.host import HostProfile
from app.models.kvm import (
    GFN_LIMIT,
    GUEST_MEMFD_FLAG_MMAP,
    KVM_MEM_GUEST_MEMFD,
    PAGE_SHIFT,
    PAGE_SIZE,
    KvmUserspaceMemoryRegion2,
)
from app.models.snapshot import (
    SNAPSHOT_VERSION,
    SnapshotFile,
    SnapshotHostMapping,
    SnapshotInvalidation,
    SnapshotMapping,
    SnapshotMemslot,
    SnapshotNotifier,
    SnapshotPin,
    VmSnapshot,
)


def dump(kvm: Kvm) -> VmSnapshot:
    """The whole state of ``kvm``."""
    # Kvm.files() lists them in an order a loaded copy reproduces (found by the stateful test).
    files = {id(f): f for f in kvm.files()}
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
                gmem_only=slot.gmem_only,
            )
            for space in kvm.spaces
            for slot in space.by_gfn.values()
        ],
        files=[
            SnapshotFile(
                id=file_ids[key],
                fd=open_fds.get(key),
                size=f.size,
                flags=f.flags,
                allocated=[(s, e) for s, e, v in f.allocated.runs(0, PGOFF_LIMIT) if v],
                private=None if f.attributes is None else [(s, e) for s, e, p in f.private_runs(0, PGOFF_LIMIT) if p],
                pins=[
                    SnapshotPin(id=pin, first=first, npages=n, detached=f.detached.get(pin, []))
                    for pin, (first, n) in f.pins.items()
                ],
            )
            for key, f in files.items()
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
        host_mappings=[
            SnapshotHostMapping(id=m.id, file=file_ids[id(m.file)], pgoff=m.pgoff, npages=m.npages)
            for m in kvm.host_mappings.values()
        ],
        next_mapping_id=kvm.next_mapping_id,
        next_pin_id=kvm.next_pin_id,
        fail_nth=kvm.fail_nth,
        stats=kvm.stats.model_copy(),
        next_event_id=kvm.events.next_id,
    )


def _check(ok: bool, what: str) -> None:
    if not ok:
        raise EINVAL(f"snapshot: {what}")


T = TypeVar("T")
P = ParamSpec("P")


def _as_ioctl(what: str, check: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
    """Run an ioctl's own checks; a refusal is the document's fault, so EINVAL naming the errno."""
    try:
        return check(*args, **kwargs)
    except KvmError as e:
        raise EINVAL(f"snapshot: {what}: the ioctl refuses it ({e.errno}: {e.detail})") from None


def load(
    doc: VmSnapshot, vm_id: str, limits: EngineLimits, host: HostProfile, budget: ServiceBudget = UNBOUNDED
) -> Kvm:
    """A new ``Kvm`` with exactly the state of ``doc``; EINVAL, creating nothing, if it is not one.
    ``host`` is the document's profile, or for a version-1 document (which has none) the default."""
    _check(1 <= doc.version <= SNAPSHOT_VERSION, f"version {doc.version} is not {SNAPSHOT_VERSION} (or 1 or 2)")
    _check(
        doc.version >= 3 or not (doc.host_mappings or any(f.allocated for f in doc.files)),
        f"a version-{doc.version} document has no host side of guest_memfd (version 3 added it)",
    )
    _check(
        doc.version >= 4 or not any(f.private is not None or f.pins for f in doc.files),
        f"a version-{doc.version} document has no in-place conversion (version 4 added it)",
    )
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
    # Refuse a document the service cannot hold before building any of it.
    items = len(doc.attributes) + sum(map(len, doc.mappings)) + len(doc.memslots) + len(doc.files)
    items += len(doc.notifiers) + len(doc.pinned_regions) + len(doc.host_mappings)
    items += sum(2 * len(f.allocated) + 1 + 2 * len(f.private or []) + 1 + len(f.pins) for f in doc.files)
    if not kvm.budget.room(items):
        raise ENOMEM(f"snapshot: {items} items do not fit the service-wide budget ({kvm.budget.limit} items)")
    _load_attributes(kvm, doc.attributes)
    files = _load_files(kvm, doc.files, doc.next_fd, doc.next_pin_id)
    _load_host_mappings(kvm, doc, files)
    for s in doc.memslots:
        _load_memslot(kvm, s, files, doc.version)
    for n, f in files.items():
        _check(
            f.fd >= 0 or bool(f.bindings) or bool(f.mmaps) or bool(f.pins),
            f"file {n} is neither open nor held by a slot, a mapping or a pin",
        )
    for as_id, runs in enumerate(doc.mappings):
        _check(as_id < kvm.nr_as, f"mappings for address space {as_id}, the VM has {kvm.nr_as}")
        _load_mappings(kvm, as_id, runs)
    _check(len(doc.mappings) == kvm.nr_as, f"mappings for {len(doc.mappings)} address spaces, the VM has {kvm.nr_as}")
    _check_mappings(kvm)
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
        _as_ioctl(f"pinned region ({addr:#x}, {size:#x})", sev.check_region, addr, size)
    kvm.pinned = list(doc.pinned_regions)
    kvm.budget.add(len(kvm.pinned))  # each stored object counts as it appears: release() gives back what is there
    kvm.fail_nth = doc.fail_nth
    kvm.stats = doc.stats.model_copy()
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
    kvm.attributes.load(runs)


def _load_files(kvm: Kvm, files: list[SnapshotFile], next_fd: int, next_pin_id: int) -> dict[int, GuestMemfdFile]:
    out: dict[int, GuestMemfdFile] = {}
    for f in files:
        _check(f.id not in out, f"file id {f.id} appears twice")
        _as_ioctl(f"file {f.id}", guest_memfd.check_create, kvm, f.size, f.flags)
        fd = f.fd if f.fd is not None else -1
        gmem = out[f.id] = GuestMemfdFile(fd, f.size, f.flags, kvm.budget, in_place=kvm.in_place)
        gmem.allocated.load(_runs(f.allocated, f"file {f.id}: allocated pages"))
        _check((f.private is None) == (gmem.attributes is None), f"file {f.id}: private pages only in place")
        if gmem.attributes is not None and f.private is not None:
            gmem.attributes.load(_runs(f.private, f"file {f.id}: private pages", PRIVATE))
        for p in f.pins:
            pin = p.id
            _check(pin not in kvm.host_pins and pin < next_pin_id, f"pin {pin}: id repeated or not below next")
            _check(p.first + p.npages <= PGOFF_LIMIT, f"pin {pin}: pages past 2^52")
            bounds = [p.first, *(x for r in p.detached for x in r), p.first + p.npages]
            ordered = all(a < b for a, b in itertools.pairwise(bounds[1:-1])) and bounds == sorted(bounds)
            _check(ordered, f"pin {pin}: detached ranges not inside it, apart and in order")
            gmem.pins[pin] = (p.first, p.npages)
            if p.detached:
                gmem.detached[pin] = list(p.detached)
            kvm.host_pins[pin] = gmem
            kvm.budget.add(1)
        if f.fd is not None:
            _check(f.fd not in kvm.gmem_files, f"fd {f.fd} is open twice")
            _check(
                guest_memfd.FIRST_FD <= f.fd < next_fd,
                f"fd {f.fd} is not in [{guest_memfd.FIRST_FD}, next_fd {next_fd})",
            )
            kvm.gmem_files[f.fd] = gmem
            kvm.budget.add(1)
    _check(next_fd >= guest_memfd.FIRST_FD, f"next_fd {next_fd} < {guest_memfd.FIRST_FD}")
    kvm.next_fd = next_fd
    kvm.next_pin_id = next_pin_id
    return out


def _runs(ranges: list[tuple[int, int]], what: str, value: int = 1) -> list[tuple[int, int, int]]:
    """Page ranges holding ``value`` (in order, not touching) as the maximal runs of a file's pages."""
    out, at, prev = [], 0, -1
    for s, e in ranges:
        _check(prev < s < e <= PGOFF_LIMIT, f"{what} [{s:#x}, {e:#x}) not maximal runs in order")
        prev = e
        if s > at:
            out.append((at, s, 0))
        out.append((s, e, value))
        at = e
    if at < PGOFF_LIMIT:
        out.append((at, PGOFF_LIMIT, 0))
    return out


def _load_host_mappings(kvm: Kvm, doc: VmSnapshot, files: dict[int, GuestMemfdFile]) -> None:
    """Each mapping as ``mmap()`` made it: of an mmap-able file (``kvm_gmem_mmap()``), MAP_SHARED."""
    for m in doc.host_mappings:
        name = f"host mapping {m.id}"
        _check(m.id not in kvm.host_mappings and m.id < doc.next_mapping_id, f"{name}: id repeated or not below next")
        _check(m.file in files, f"{name}: unknown file {m.file}")
        gmem = files[m.file]
        _as_ioctl(name, guest_memfd.check_mmap, gmem, m.pgoff << PAGE_SHIFT, m.npages << PAGE_SHIFT, True)
        kvm.host_mappings[m.id] = HostMapping(m.id, gmem, m.pgoff, m.npages)
        gmem.mmaps.add(m.id)
        kvm.budget.add(1)
    kvm.next_mapping_id = doc.next_mapping_id


LARGEST_FILE = (1 << 63) - PAGE_SIZE
"""The largest guest_memfd ``kvm_gmem_create()`` allows."""


def _load_memslot(kvm: Kvm, s: SnapshotMemslot, files: dict[int, GuestMemfdFile], version: int) -> None:
    """The slot as ``KVM_SET_USER_MEMORY_REGION2`` created it: the ioctl's plan, then its commit."""
    name = f"memslot (as_id {s.as_id}, id {s.id})"
    is_gmem = bool(s.flags & KVM_MEM_GUEST_MEMFD)
    _check(s.as_id < kvm.nr_as and s.id <= 0xFFFF, f"{name}: the VM has {kvm.nr_as} address spaces")
    gmem: GuestMemfdFile | None = None
    if s.file is not None:
        _check(s.file in files, f"{name}: unknown file {s.file}")
        _check(is_gmem, f"{name}: a file bound to a slot without KVM_MEM_GUEST_MEMFD")
        gmem = files[s.file]
        fd = s.guest_memfd
        if gmem.fd >= 0:
            _check(fd == gmem.fd, f"{name}: guest_memfd {fd} is not its file's fd {gmem.fd}")
        else:  # rfc-v9 (restrictedmem): the fd the slot was created with, closed since
            _check(
                not kvm.linux or bool(gmem.mmaps),
                f"{name}: on a linux VM releasing a file unbinds it (kvm_gmem_release())",
            )
            _check(
                fd is not None and guest_memfd.FIRST_FD <= fd < kvm.next_fd and fd not in kvm.gmem_files,
                f"{name}: fd {fd}",
            )
    elif is_gmem:
        # linux: the file was closed since (kvm_gmem_release() cleared the binding). It was bound
        # then, so the binding must fit some file: check it against the largest one there can be.
        _check(kvm.linux, f"{name}: an rfc-v9 guest_memfd slot always holds its file")
        _check(s.guest_memfd is None, f"{name}: a slot whose file was closed has no fd")
        gmem = GuestMemfdFile(-1, LARGEST_FILE, GUEST_MEMFD_FLAG_MMAP if s.gmem_only else 0)
    else:
        _check(s.guest_memfd is None and s.guest_memfd_offset == 0, f"{name}: guest_memfd fields without the flag")
        _check(not s.gmem_only, f"{name}: gmem_only without KVM_MEM_GUEST_MEMFD")
    req = KvmUserspaceMemoryRegion2.model_construct(
        flags=s.flags,
        guest_phys_addr=s.base_gfn << PAGE_SHIFT,
        memory_size=s.npages << PAGE_SHIFT,
        userspace_addr=s.userspace_addr,
        guest_memfd=0 if is_gmem else None,
        guest_memfd_offset=s.guest_memfd_offset,
    )
    fds = {0: gmem} if gmem is not None else {}
    plan = _as_ioctl(name, plan_set_memory_region, kvm, s.as_id << 16 | s.id, req, fds)
    _check(plan.change == "create" and plan.new is not None, f"{name} appears twice")
    install(kvm, plan)
    kvm.budget.add(1)
    assert plan.new is not None
    # kvm_gmem_bind() decided gmem-only (a closed file's stand-in carries the document's word).
    _check(version < 3 or plan.new.gmem_only == s.gmem_only, f"{name}: gmem_only is not what binding its file makes it")
    if s.file is None and is_gmem:
        guest_memfd.unbind(kvm, plan.new)
    plan.new.gmem_fd = s.guest_memfd


def _load_mappings(kvm: Kvm, as_id: int, runs: list[SnapshotMapping]) -> None:
    if len(runs) > kvm.limits.max_mapping_runs:
        raise ENOMEM(f"snapshot: mapping runs exceed the per-VM budget ({kvm.limits.max_mapping_runs})")
    for m, nxt in zip(runs, [*runs[1:], None], strict=False):
        _check(m.start_gfn < m.end_gfn <= GFN_LIMIT, f"mapping run ({m.start_gfn:#x}, {m.end_gfn:#x}) in as {as_id}")
        _check(nxt is None or nxt.start_gfn >= m.end_gfn, f"mapping runs of as {as_id} out of order or overlapping")
    kvm.mmu.load(as_id, [(m.start_gfn, m.end_gfn, spte(m.private, m.writable)) for m in runs])
    if kvm.mmu.runs() > kvm.limits.max_mapping_runs:
        raise ENOMEM(f"snapshot: mapping runs exceed the per-VM budget ({kvm.limits.max_mapping_runs})")


def _load_notifiers(kvm: Kvm, doc: VmSnapshot) -> None:
    """Each open invalidation matched what its hva range covers now (slots cannot change while
    one is open: EBUSY), so its gfn ranges are recomputed by the notifier's own walk and compared."""
    for n in doc.notifiers:
        _check(n.id not in kvm.notifiers and n.id < doc.next_notifier_id, f"notifier id {n.id}")
        _check(n.hva_start < n.hva_end, f"notifier {n.id}: empty hva range")
        matched = [(r.as_id, r.start, r.end) for r in hva_ranges(kvm, n.hva_start, n.hva_end)]
        _check(list(n.gfn_ranges) == matched, f"notifier {n.id}: gfn ranges are not what its hva range covers")
        kvm.notifiers[n.id] = NotifierInvalidation(n.id, n.hva_start, n.hva_end, matched)
        kvm.budget.add(1)
    kvm.next_notifier_id = doc.next_notifier_id


def _check_mappings(kvm: Kvm) -> None:
    """What the fault path can have installed: every mapping inside a memslot of its address space,
    writable only where the slot is, private exactly where the gfn is private (linux; rfc-v9 on
    guest_memfd slots, shared elsewhere) and only where the slot still has its file.
    O(mapping runs x log), never O(pages)."""
    for as_id in range(kvm.nr_as):
        space = kvm.spaces[as_id]
        for start, end, value in kvm.mmu.mapped_runs(as_id, 0, GFN_LIMIT):
            where = f"mapping [{start:#x}, {end:#x}) of address space {as_id}"
            covered = start
            for slot in space.overlapping(start, end):
                _check(slot.base_gfn <= covered, f"{where}: gfn {covered:#x} is in no memslot")
                a, b = covered, min(end, slot.end_gfn)
                covered = b
                private = spte_private(value)
                _check(not spte_writable(value) or slot.writable(True), f"{where}: writable in a read-only slot")
                if kvm.linux or slot.is_gmem:
                    uniform = all(p == private for _, _, p in kvm.private_runs(a, b))
                    _check(uniform, f"{where}: {_privacy(private)}")
                if slot.faults_from_gmem(private):
                    kind = "private" if private else "gmem-only shared"
                    _check(slot.gmem is not None, f"{where}: a {kind} mapping without a guest_memfd file")
                    assert slot.gmem is not None
                    pages = (slot.gmem_pgoff(a), slot.gmem_pgoff(b))
                    _check(
                        slot.gmem.allocated.is_uniform(*pages, 1), f"{where}: maps file pages that are not allocated"
                    )
            _check(covered == end, f"{where}: gfn {covered:#x} is in no memslot")


def _privacy(private: bool) -> str:
    return "a private mapping over a shared gfn" if private else "a shared mapping over a private gfn"
