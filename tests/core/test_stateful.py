"""The engine against the naive per-gfn reference model, step by step (hypothesis)."""

from __future__ import annotations

import itertools
import os
import tempfile
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from app.core import Engine, KvmError, attributes
from app.core.journal import SqliteJournal
from app.core.vm import VirtualMachine
from app.models.host import PROFILES
from app.models.kvm import (
    FallocateRequest,
    FaultRequest,
    KvmCreateGuestMemfd,
    KvmEncRegion,
    KvmMemoryAttributes,
    KvmMemoryAttributes2,
    KvmUserspaceMemoryRegion2,
    MmapRequest,
    NotifierRequest,
    PrefaultRequest,
    Semantics,
    TouchRequest,
    VmType,
)
from app.models.vm import VmCreate
from harness.reference import PAGE, RefVM

WINDOW = 16  # gfns the rules touch: small, so slots, conversions and faults collide
MAX_GFN = 13  # so some slots cross kvm_mmu_max_gfn()
HVA_BASES = [0x10000000, 0x10010000, 0x10020000]
HUGEPAGES = (2, 4)

pages = st.integers(0, WINDOW - 1)
small = st.integers(0, 10)


def same(engine_call: Callable[[], Any], ref_call: Callable[[], Any]) -> tuple[Any, Any]:
    """Run both; they must succeed together or fail with the same errno."""
    try:
        got = engine_call()
    except KvmError as e:
        try:
            ref_call()
        except KvmError as r:
            assert e.errno == r.errno, f"engine {e.errno} ({e.detail}) != reference {r.errno}"
            return None, None
        raise AssertionError(f"engine raised {e.errno} ({e.detail}), reference succeeded") from e
    try:
        want = ref_call()
    except KvmError as r:
        raise AssertionError(f"reference raised {r.errno}, engine returned {got}") from r
    return got, want


class EngineVsReference(RuleBasedStateMachine):
    vm: VirtualMachine
    ref: RefVM

    @initialize(
        vm_type=st.sampled_from(list(VmType)),
        semantics=st.sampled_from(list(Semantics)),
        profile=st.sampled_from(list(PROFILES)),
    )
    def create(self, vm_type: VmType, semantics: Semantics, profile: str) -> None:
        self._create(vm_type, semantics, profile)

    def _create(self, vm_type: VmType, semantics: Semantics, profile: str) -> None:
        # Hugepages scaled down to the window (2 and 4 gfns), so the linux widening happens here.
        self._levels = attributes.HUGEPAGE_LEVELS
        attributes.HUGEPAGE_LEVELS = dict(zip(self._levels, HUGEPAGES, strict=True))
        self.host = PROFILES[profile].model_copy(update={"max_gfn": MAX_GFN})
        engine = Engine(host=self.host)
        host = {"caps": self.host.caps, "kernel": self.host.kernel, "in_place": self.host.gmem_in_place_conversion}
        self.ref = RefVM(vm_type, semantics, MAX_GFN, hugepages=HUGEPAGES, **host)
        vm, _ = same(lambda: engine.create_vm(VmCreate(type=vm_type, semantics=semantics)), self.ref.created)
        if vm is None:  # a type this host does not have: carry on with a default VM
            self.ref = RefVM(VmType.default, semantics, MAX_GFN, hugepages=HUGEPAGES, **host)
            vm = engine.create_vm(VmCreate(type=VmType.default, semantics=semantics))
        self.vm = vm

    def teardown(self) -> None:
        if hasattr(self, "_levels"):
            attributes.HUGEPAGE_LEVELS = self._levels

    @rule(
        sid=st.sampled_from([0, 1, 2, 3, 0, 1, 32764]),
        as_id=st.sampled_from([0, 0, 0, 1, 2]),
        flags=st.sampled_from([0, 0, 0, 1, 2, 3, 4, 4, 4, 5, 8]),
        gpa_page=st.integers(0, MAX_GFN),
        npages=st.sampled_from([0, 1, 2, 3, 4, 4, 5, 6, 8]),
        hva_base=st.sampled_from(HVA_BASES),
        hva_page=st.integers(0, 4),
        fd=st.sampled_from([None, 3, 3, 3, 4, 5, 99]),
        off_page=st.sampled_from([0, 1, 2, 3, 4, 2**51 - 2, 2**51 - 1, 2**51, 2**52 - 1]),
        misalign=st.sampled_from([0] * 16 + [1, 0x800]),
    )
    def set_region(
        self,
        sid: int,
        as_id: int,
        flags: int,
        gpa_page: int,
        npages: int,
        hva_base: int,
        hva_page: int,
        fd: int | None,
        off_page: int,
        misalign: int,
    ) -> None:
        raw = as_id << 16 | sid
        gpa, size, hva, off = gpa_page * PAGE + misalign, npages * PAGE, hva_base + hva_page * PAGE, off_page * PAGE
        req = KvmUserspaceMemoryRegion2(
            flags=flags,
            guest_phys_addr=gpa,
            memory_size=size,
            userspace_addr=hva,
            guest_memfd=fd,
            guest_memfd_offset=off,
        )
        got, want = same(
            lambda: self.vm.set_user_memory_region(raw, req),
            lambda: self.ref.set_region(raw, flags, gpa, size, hva, fd, off),
        )
        if got is not None:
            assert (got.change, got.pages_zapped) == (want["change"], want["pages_zapped"])

    @rule(size_pages=st.sampled_from([*range(17), 2**51]), flags=st.sampled_from([0, 0, 1, 2, 3, 3, 4]))
    def create_gmem(self, size_pages: int, flags: int) -> None:
        got, want = same(
            lambda: self.vm.create_guest_memfd(KvmCreateGuestMemfd(size=size_pages * PAGE, flags=flags)),
            lambda: self.ref.create_gmem(size_pages * PAGE, flags),
        )
        if got is not None:
            assert got.fd == want

    @rule(
        sid=st.integers(0, 3),
        gpa_page=st.integers(0, 10),
        npages=st.integers(1, 6),
        hva_base=st.sampled_from(HVA_BASES),
        off=st.sampled_from([0, 0, 0, 2**63 - PAGE, 2**63 - 2 * PAGE]),
        flags=st.sampled_from([0, 0, 1, 3, 3]),
        mapped=st.booleans(),
    )
    def gmem_slot(
        self, sid: int, gpa_page: int, npages: int, hva_base: int, off: int, flags: int, mapped: bool
    ) -> None:
        """A guest_memfd and a slot bound to all of it: the set-up of every private-memory test
        (mmap-able files make it gmem-only), and with ``mapped`` the whole file mmap'ed by the
        host (QEMU's in-place set-up). Or, past 2^63, bound where kvm_gmem_bind()'s loff_t
        overflow lets it."""
        size = npages * PAGE
        got, fd = same(
            lambda: self.vm.create_guest_memfd(KvmCreateGuestMemfd(size=size, flags=flags)),
            lambda: self.ref.create_gmem(size, flags),
        )
        if got is None:
            return
        req = KvmUserspaceMemoryRegion2(
            flags=4,
            guest_phys_addr=gpa_page * PAGE,
            memory_size=size,
            userspace_addr=hva_base,
            guest_memfd=fd,
            guest_memfd_offset=off,
        )
        same(
            lambda: self.vm.set_user_memory_region(sid, req),
            lambda: self.ref.set_region(sid, 4, gpa_page * PAGE, size, hva_base, fd, off),
        )
        if mapped:
            same(lambda: self.vm.mmap(fd, MmapRequest(length=size)), lambda: self.ref.mmap(fd, 0, size, True))

    @rule(fd=st.integers(2, 6))
    def close_gmem(self, fd: int) -> None:
        got, want = same(lambda: self.vm.close_guest_memfd(fd), lambda: self.ref.close_gmem(fd))
        if got is not None:
            assert (got.released, got.pages_zapped, got.invalidated) == want

    @rule(
        fd=st.integers(2, 6),
        mode=st.sampled_from([1, 1, 3, 3, 3, 0, 2, 0x11, 0x09, 0x103]),
        start=st.integers(0, 10),
        npages=st.integers(0, 8),
        odd=st.sampled_from([None] * 12 + ["misalign", "negative", "efbig"]),
    )
    def fallocate(self, fd: int, mode: int, start: int, npages: int, odd: str | None) -> None:
        """kvm_gmem_fallocate(): allocate or punch a hole (over every binding, with the file's filter)."""
        offset, length = start * PAGE, npages * PAGE
        if odd == "misalign":
            offset += 0x800
        elif odd == "negative":
            offset = 2**64 - PAGE
        elif odd == "efbig":
            offset = 2**63 - PAGE
        req = FallocateRequest(mode=mode, offset=offset, len=length)
        got, want = same(lambda: self.vm.fallocate(fd, req), lambda: self.ref.fallocate(fd, mode, offset, length))
        if got is not None:
            assert (got.pages_allocated, got.pages_freed, got.invalidated, got.pages_zapped) == want

    @rule(
        fd=st.integers(2, 6),
        start=st.sampled_from([0, 0, 1, 3, 2**52 - 2]),
        npages=st.integers(0, 6),
        shared=st.sampled_from([True, True, True, False]),
    )
    def mmap(self, fd: int, start: int, npages: int, shared: bool) -> None:
        req = MmapRequest(offset=start * PAGE, length=npages * PAGE, shared=shared)
        got, want = same(lambda: self.vm.mmap(fd, req), lambda: self.ref.mmap(fd, req.offset, req.length, shared))
        if got is not None:
            assert got.id == want

    @rule(mid=st.integers(1, 6))
    def munmap(self, mid: int) -> None:
        got, want = same(lambda: self.vm.munmap(mid), lambda: self.ref.munmap(mid))
        if got is not None:
            assert (got.released, got.pages_zapped, got.invalidated) == want

    @rule(mid=st.integers(1, 6), start=st.integers(0, 8), size=st.sampled_from([0, 1, PAGE, 2 * PAGE + 1, 5 * PAGE]))
    def touch(self, mid: int, start: int, size: int) -> None:
        req = TouchRequest(offset=start * PAGE, size=size, write=True)
        got, want = same(lambda: self.vm.touch(mid, req), lambda: self.ref.touch(mid, req.offset, size))
        if got is not None:
            assert (got.pages, got.allocated_pages) == want

    @rule(mid=st.integers(1, 4), start=st.integers(0, 5), size=st.sampled_from([1, PAGE, 2 * PAGE + 1]))
    def pin(self, mid: int, start: int, size: int) -> None:
        req = TouchRequest(offset=start * PAGE, size=size)
        got, want = same(lambda: self.vm.pin(mid, req), lambda: self.ref.pin(mid, req.offset, size))
        if got is not None:
            assert got.id == want

    @rule(pid=st.integers(1, 6))
    def unpin(self, pid: int) -> None:
        got, want = same(lambda: self.vm.unpin(pid), lambda: self.ref.unpin(pid))
        if got is not None:
            assert (got.released, got.pages_zapped, got.invalidated) == want

    @rule(
        fd=st.sampled_from([2, 3, 3, 3, 4, 4, 5]),
        start=st.integers(0, 6),
        npages=st.integers(0, 6),
        private=st.booleans(),
        odd=st.sampled_from([None] * 12 + ["flags", "attr", "misalign", "wrap"]),
    )
    def convert_in_place(self, fd: int, start: int, npages: int, private: bool, odd: str | None) -> None:
        """KVM_SET_MEMORY_ATTRIBUTES2 on a file: in place, or ENOTTY."""
        offset, size = start * PAGE, npages * PAGE
        attrs, flags = (8 if private else 0) | (0x10 if odd == "attr" else 0), 1 if odd == "flags" else 0
        if odd == "misalign":
            offset += 0x800
        elif odd == "wrap":
            offset = 2**64 - PAGE
        req = KvmMemoryAttributes2(offset=offset, size=size, attributes=attrs, flags=flags)
        try:
            got = self.vm.set_gmem_attributes(fd, req)
        except KvmError as e:
            try:
                self.ref.gmem_attributes(fd, offset, size, attrs, flags)
            except KvmError as r:
                assert e.errno == r.errno, f"engine {e.errno} ({e.detail}) != reference {r.errno}"
                if e.errno in ("EAGAIN", "ENOMEM"):
                    assert e.members == {"error_offset": int(str(r))}
                return
            raise AssertionError(f"engine raised {e.errno} ({e.detail}), reference succeeded") from e
        want = self.ref.gmem_attributes(fd, offset, size, attrs, flags)
        assert (got.noop, got.invalidated, got.pages_zapped) == want

    @rule(
        start=pages,
        npages=st.integers(0, WINDOW),
        private=st.booleans(),
        misalign=st.sampled_from([0] * 10 + [1]),
        odd=st.sampled_from([None] * 10 + ["flags", "attr"]),
    )
    def convert(self, start: int, npages: int, private: bool, misalign: int, odd: str | None) -> None:
        addr, size = start * PAGE, npages * PAGE + misalign
        if self.ref.linux:
            attrs = (8 if private else 0) | (1 if odd == "attr" else 0)
            flags = 1 if odd == "flags" else 0
            req = KvmMemoryAttributes(address=addr, size=size, attributes=attrs, flags=flags)
            got, want = same(
                lambda: self.vm.set_memory_attributes(req),
                lambda: self.ref.set_attributes(addr, size, attrs, flags),
            )
        else:
            region = KvmEncRegion(addr=addr, size=size)
            call = self.vm.memory_encrypt_reg_region if private else self.vm.memory_encrypt_unreg_region
            got, want = same(lambda: call(region), lambda: self.ref.enc_region(addr, size, private))
        if got is not None and "noop" in want:
            assert (got.noop, got.invalidated, got.pages_zapped) == (
                want["noop"],
                want["invalidated"],
                want["pages_zapped"],
            )

    @rule(
        as_id=st.sampled_from([0, 0, 0, 1, 2]),
        gfn=st.integers(0, WINDOW + 4),
        write=st.booleans(),
        private=st.sampled_from([None, None, True, False]),
        seq_delta=st.sampled_from([None, None, 0, -1, 1]),
    )
    def fault(self, as_id: int, gfn: int, write: bool, private: bool | None, seq_delta: int | None) -> None:
        seq = None if seq_delta is None else max(0, self.ref.seq + seq_delta)
        req = FaultRequest(gpa=gfn * PAGE + 0x123, as_id=min(as_id, 1), write=write, private=private, mmu_seq=seq)
        if as_id == 2:
            return
        got, want = same(
            lambda: self.vm.fault(req),
            lambda: self.ref.fault(req.as_id, req.gpa, write, private, seq),
        )
        if got is not None:
            assert got.outcome == want

    @rule(start=pages, npages=st.integers(0, 12), as_id=st.sampled_from([0, 0, 1]))
    def prefault(self, start: int, npages: int, as_id: int) -> None:
        req = PrefaultRequest(gpa=start * PAGE, size=npages * PAGE, as_id=as_id)
        got, want = same(lambda: self.vm.prefault(req), lambda: self.ref.prefault(req.gpa, req.size, as_id))
        if got is not None:
            new, already, stopped, stop_gfn = want
            assert (got.mapped_pages, got.already_mapped_pages, got.stopped) == (new, already, stopped)
            assert (got.remaining.gpa, got.remaining.gpa + got.remaining.size) == (stop_gfn * PAGE, req.gpa + req.size)

    @rule(base=st.sampled_from(HVA_BASES), start=st.integers(-2, 10), length=st.integers(0, 0x6000))
    def notifier_start(self, base: int, start: int, length: int) -> None:
        hs = base + start * 0x800
        req = NotifierRequest(hva_start=hs, hva_end=hs + length)
        got, want = same(lambda: self.vm.notifier_start(req), lambda: self.ref.notifier_start(hs, hs + length))
        if got is not None:
            assert (got.id, got.pages_zapped) == want

    @rule(pick=st.integers(0, 7), page=st.integers(0, 7), write=st.booleans(), private=st.sampled_from([None, True]))
    def fault_during_notifier(self, pick: int, page: int, write: bool, private: bool | None) -> None:
        """A fault racing an open host invalidation of its own page: the retry check's place in the
        fault order decides the outcome (retry before the guest_memfd and READONLY checks)."""
        slots = sorted(self.ref.slots.values(), key=lambda s: (s.as_id, s.id))
        if not slots:
            return
        slot = slots[pick % len(slots)]
        page %= slot.npages
        hva = slot.hva + page * PAGE
        inv, nid = same(
            lambda: self.vm.notifier_start(NotifierRequest(hva_start=hva, hva_end=hva + PAGE)),
            lambda: self.ref.notifier_start(hva, hva + PAGE),
        )
        gpa = (slot.base + page) * PAGE
        req = FaultRequest(gpa=gpa, as_id=slot.as_id, write=write, private=private)
        got, want = same(lambda: self.vm.fault(req), lambda: self.ref.fault(slot.as_id, gpa, write, private, None))
        if got is not None:
            assert got.outcome == want
        if inv is not None:
            same(lambda: self.vm.notifier_end(inv.id), lambda: self.ref.notifier_end(nid[0]))

    @rule(keep=st.integers(0, 7), drop=st.integers(0, 7))
    def delete_a_slot_beside_a_mapping(self, keep: int, drop: int) -> None:
        """Map a page of one slot, delete another: what the delete zaps depends on the VM."""
        slots = sorted(self.ref.slots.values(), key=lambda s: (s.as_id, s.id))
        if len(slots) < 2:
            return
        kept, gone = slots[keep % len(slots)], slots[drop % len(slots)]
        gpa = kept.base * PAGE
        same(
            lambda: self.vm.fault(FaultRequest(gpa=gpa, as_id=kept.as_id)),
            lambda: self.ref.fault(kept.as_id, gpa, False, None, None),
        )
        raw = gone.as_id << 16 | gone.id
        req = KvmUserspaceMemoryRegion2(guest_phys_addr=0, memory_size=0, userspace_addr=gone.hva)
        got, want = same(
            lambda: self.vm.set_user_memory_region(raw, req),
            lambda: self.ref.set_region(raw, 0, 0, 0, gone.hva, None, 0),
        )
        if got is not None:
            assert (got.change, got.pages_zapped) == (want["change"], want["pages_zapped"])

    @rule(nid=st.integers(1, 8))
    def notifier_end(self, nid: int) -> None:
        same(lambda: self.vm.notifier_end(nid), lambda: self.ref.notifier_end(nid))

    @rule()
    def snapshot_and_reload(self) -> None:
        """Export the VM, import it into a fresh engine and carry on with the copy: everything the
        reference model checks afterwards is checked against the imported VM."""
        doc = self.vm.snapshot()
        copy = Engine().import_vm(doc)  # the document carries its profile: not the engine's default
        assert copy.snapshot() == doc
        assert copy.model().model_dump(exclude={"id"}) == self.vm.model().model_dump(exclude={"id"})
        self.vm = copy

    @rule(graceful=st.booleans())
    def restart_from_a_state_file(self, graceful: bool) -> None:
        """Shutdown -> restart: the VM goes into a state file (as its snapshot after a graceful
        shutdown, else as the journaled import), a new engine starts from the file, and the
        reference model carries on against the restarted VM."""
        doc = self.vm.snapshot()
        with tempfile.TemporaryDirectory() as tmp:
            db = os.path.join(tmp, "state.sqlite3")
            before, journal = Engine(), SqliteJournal(db)
            before.attach_journal(journal)
            vm = before.import_vm(doc)
            if graceful:
                before.compact_all()
            journal.close()
            after, journal = Engine(), SqliteJournal(db)
            assert after.restore(journal) == ((1, 0) if graceful else (0, 1))
            journal.close()
        restarted = after.vm(vm.id)
        assert restarted.snapshot() == doc
        self.vm = restarted

    @rule(n=st.integers(1, 12))
    def arm_fault_injection(self, n: int) -> None:
        self.vm.set_fault_injection(n)
        self.ref.fail_nth = n

    @invariant()
    def agree(self) -> None:
        if not hasattr(self, "ref"):
            return
        vm, ref = self.vm, self.ref
        mmu = vm.mmu_model()
        assert (mmu.mmu_invalidate_seq, mmu.mmu_invalidate_in_progress) == (ref.seq, ref.in_progress)
        assert (mmu.mmu_invalidate_range_start, mmu.mmu_invalidate_range_end) == (ref.rstart, ref.rend)
        assert mmu.stats.model_dump() == ref.stats
        assert mmu.open_notifier_invalidations == len(ref.notifiers)
        assert mmu.mapped_pages == len(ref.maps)
        span = 2 * WINDOW + 8
        runs, _ = vm.attribute_runs(0, 1 << 52, 10_000)
        got_attrs = {g: r.attributes for r in runs for g in range(r.start_gfn, min(r.end_gfn, span))}
        assert got_attrs == {g: ref.attr(g) for g in range(span)}
        assert runs[-1].end_gfn == 1 << 52 and runs[-1].attributes == ref.attr(span)
        assert all((a.attributes, a.private) != (b.attributes, b.private) for a, b in itertools.pairwise(runs))
        assert {g: r.private for r in runs for g in range(r.start_gfn, min(r.end_gfn, span))} == {
            g: ref.is_private(g) for g in range(span)
        }
        got_maps = {}
        for as_id in range(vm.nr_as):
            mruns, _ = vm.mapping_runs(as_id, 0, 1 << 52, 10_000)
            for r in mruns:
                for g in range(r.start_gfn, r.end_gfn):
                    got_maps[(as_id, g)] = (r.private, r.writable)
        assert got_maps == ref.maps
        slots = {
            (s.as_id, s.id): (s.base_gfn, s.npages, s.flags, s.userspace_addr, s.guest_memfd, s.gmem_only)
            for s in vm.memslots()
        }
        assert slots == {k: (s.base, s.npages, s.flags, s.hva, s.gmem_fd, s.gmem_only) for k, s in ref.slots.items()}
        for fd, f in ref.gmem.items():
            runs, _ = vm.file_runs(fd, 0, 2**64 - 1, 10_000)  # the listing stops at i_size
            listed = {p for r in runs if r.allocated for p in range(r.start // PAGE, r.end // PAGE)}
            assert listed == {p for p in f["pages"] if p < f["size"] // PAGE}
            held = vm.kvm.gmem_files[fd].allocated
            assert {p for s, e, v in held.runs(0, 1 << 52) if v for p in range(s, e)} == f["pages"]
            assert all((a.allocated, a.private) != (b.allocated, b.private) for a, b in itertools.pairwise(runs))
            listed_private = {p for r in runs if r.private for p in range(r.start // PAGE, r.end // PAGE)}
            assert listed_private == {p for p in range(f["size"] // PAGE) if ref.file_private(f, p)}
        maps = {m.id: (m.offset // PAGE, m.length // PAGE, m.fd) for m in vm.host_mappings()}
        assert maps == {
            mid: (pg, n, f["fd"] if ref.gmem.get(f["fd"]) is f else None) for mid, (f, pg, n) in ref.host_maps.items()
        }
        for mid, (f, _, _) in ref.host_maps.items():  # a closed file the mapping holds: its pages too
            fd = vm.kvm.host_mappings[mid].file
            assert {p for s, e, v in fd.allocated.runs(0, 1 << 52) if v for p in range(s, e)} == f["pages"]
        gmems = {g.fd: sorted((b.slot, b.offset, b.size) for b in g.bindings) for g in vm.guest_memfds()}
        assert gmems == {fd: sorted((k, o, s) for k, (o, s) in f["bindings"].items()) for fd, f in ref.gmem.items()}
        assert [(r.addr, r.size) for r in vm.pinned_regions()] == ref.pinned
        pins = {p.id: (p.offset // PAGE, p.size // PAGE, p.fd) for p in vm.host_pins()}
        assert pins == {
            pid: (*f["pins"][pid], f["fd"] if ref.gmem.get(f["fd"]) is f else None) for pid, f in ref.pins.items()
        }
        assert vm.kvm.budget.used == vm.kvm.items(), "the service budget counts exactly what the VM holds"
        mm = vm.memory_map(0, span, 7)
        for b in mm.buckets:
            gfns = range(b.start_gfn, b.end_gfn)
            assert b.private_pages == sum(ref.is_private(g) for g in gfns)
            assert b.mapped_pages == [sum((a, g) in ref.maps for g in gfns) for a in range(vm.nr_as)]
            assert b.memslot_pages == sum(any(s.has(g) for s in ref.slots.values()) for g in gfns)
            assert b.gmem_allocated_pages == [
                sum(
                    s.pgoff(g) in s.gmem_file["pages"]
                    for s in ref.slots.values()
                    if s.as_id == a and s.gmem_file is not None
                    for g in gfns
                    if s.has(g)
                )
                for a in range(vm.nr_as)
            ]
        assert all(a.end_gfn == b.start_gfn for a, b in itertools.pairwise(mm.buckets)), "buckets tile the window"
        assert (mm.buckets[0].start_gfn, mm.buckets[-1].end_gfn, len(mm.buckets)) == (0, span, 7)


class InPlaceVsReference(EngineVsReference):
    """The same rules on the host where most of them take new paths: a 7.4 host converting in
    place, a VM with private memory (of seven profiles and six types, the general machine reaches
    it one run in twenty)."""

    @initialize(
        vm_type=st.sampled_from([VmType.sw_protected, VmType.snp, VmType.tdx]),
        npages=st.integers(2, 6),
        flags=st.sampled_from([1, 3, 3]),
        gpa_page=st.integers(0, 4),
    )
    def create(self, vm_type: VmType, npages: int, flags: int, gpa_page: int) -> None:  # type: ignore[override]
        """With QEMU's in-place set-up, so the rules find a file (fd 3), a slot and a mapping (id 1)."""
        self._create(vm_type, Semantics.linux, "linux-7.4-in-place")
        self.gmem_slot(0, gpa_page, npages, HVA_BASES[0], 0, flags, True)


EXAMPLES = int(os.environ.get("KVM_MEMATTR_STATEFUL_EXAMPLES", "2000"))
for machine, share in ((EngineVsReference, 1), (InPlaceVsReference, 4)):
    machine.TestCase.settings = settings(
        max_examples=max(1, EXAMPLES // share),
        stateful_step_count=50,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow],
    )
TestEngineVsReference = pytest.mark.slow(EngineVsReference.TestCase)
TestInPlaceVsReference = pytest.mark.slow(InPlaceVsReference.TestCase)
