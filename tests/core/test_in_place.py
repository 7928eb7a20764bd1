"""In-place conversion (7.4, ``gmem_in_place_conversion``): ``KVM_SET_MEMORY_ATTRIBUTES2`` on a
guest_memfd. The selftests of the series (``x86/guest_memfd_conversions_test.c``: init_private,
init_shared, indexing, truncate, elevated_refcount, ...) as engine tests, plus the errno order of
``kvm_gmem_ioctl()`` / ``kvm_gmem_set_attributes()`` that no selftest checks."""

from __future__ import annotations

from typing import Any

import pytest

from app.core import Engine
from app.core.errors import EAGAIN, EBADF, EFAULT, EINVAL, ENOMEM, ENOTTY, KvmError
from app.core.vm import VirtualMachine
from app.models.kvm import (
    FallocateRequest,
    FaultRequest,
    KvmCreateGuestMemfd,
    KvmMemoryAttributes,
    KvmMemoryAttributes2,
    MmapRequest,
    Semantics,
    TouchRequest,
    VmType,
)
from app.models.vm import VmCreate
from tests.core.conftest import GIB4, region

PAGE = 0x1000
MMAP, INIT_SHARED = 1, 2
IN_PLACE = "linux-7.4-in-place"


def _vm(engine: Engine, profile: str = IN_PLACE, vm_type: str = "sw_protected") -> VirtualMachine:
    return engine.create_vm(VmCreate(type=VmType(vm_type), semantics=Semantics.linux, profile=profile))


def _file(vm: VirtualMachine, pages: int = 4, flags: int = MMAP | INIT_SHARED, slot: bool = True) -> int:
    fd = vm.create_guest_memfd(KvmCreateGuestMemfd(size=pages * PAGE, flags=flags)).fd
    if slot:
        vm.set_user_memory_region(0, region(GIB4, pages * PAGE, flags=4, fd=fd))
    return fd


def _convert(vm: VirtualMachine, fd: int, offset: int, size: int, private: bool, **more: Any) -> Any:
    req = KvmMemoryAttributes2(offset=offset, size=size, attributes=8 if private else 0, **more)
    return vm.set_gmem_attributes(fd, req)


def _private(vm: VirtualMachine, fd: int) -> list[bool]:
    runs, _ = vm.file_runs(fd, 0, 1 << 64, 1000)
    return [r.private for r in runs for _ in range(r.start // PAGE, r.end // PAGE)]


def _touch(vm: VirtualMachine, mapping: int, page: int, write: bool = True) -> None:
    vm.touch(mapping, TouchRequest(offset=page * PAGE, size=PAGE, write=write))


def _fault(vm: VirtualMachine, page: int, private: bool | None = None) -> str:
    return vm.fault(FaultRequest(gpa=GIB4 + page * PAGE, private=private)).outcome


def _mmap(vm: VirtualMachine, fd: int, pages: int = 4) -> int:
    return vm.mmap(fd, MmapRequest(offset=0, length=pages * PAGE)).id


# ----------------------------------------------------------------- the mode


def test_the_mode_moves_private_out_of_the_vm(engine: Engine) -> None:
    vm = _vm(engine)
    caps = vm.capabilities()
    assert (caps["KVM_CAP_MEMORY_ATTRIBUTES"], caps["KVM_CAP_GUEST_MEMFD_MEMORY_ATTRIBUTES"]) == (0, 8)
    assert caps["KVM_CAP_GUEST_MEMFD_FLAGS"] == MMAP | INIT_SHARED  # INIT_SHARED on a CoCo VM
    # The VM ioctl is still there but supports no attribute: PRIVATE is EINVAL, naming the new ioctl.
    with pytest.raises(EINVAL, match="KVM_SET_MEMORY_ATTRIBUTES2"):
        vm.set_memory_attributes(KvmMemoryAttributes(address=GIB4, size=PAGE, attributes=8))
    assert vm.set_memory_attributes(KvmMemoryAttributes(address=GIB4, size=PAGE, attributes=0)).noop
    assert _vm(engine, vm_type="default").capabilities()["KVM_CAP_GUEST_MEMFD_MEMORY_ATTRIBUTES"] == 0
    # Elsewhere the capability is 0 and INIT_SHARED stays refused on a CoCo VM.
    other = _vm(engine, "linux-7.3")
    assert other.capabilities()["KVM_CAP_GUEST_MEMFD_MEMORY_ATTRIBUTES"] == 0
    with pytest.raises(EINVAL):
        other.create_guest_memfd(KvmCreateGuestMemfd(size=PAGE, flags=INIT_SHARED))


@pytest.mark.parametrize("profile", ["linux-6.18", "linux-7.3"])
def test_enotty_off_the_mode_comes_before_any_argument_check(engine: Engine, profile: str) -> None:
    vm = _vm(engine, profile)
    fd = _file(vm, flags=MMAP, slot=False)
    with pytest.raises(ENOTTY, match=r"converts with KVM_SET_MEMORY_ATTRIBUTES \("):
        _convert(vm, fd, 0x800, 0, True, flags=1)  # three argument errors, and still ENOTTY
    with pytest.raises(EBADF):
        _convert(vm, 99, 0, PAGE, True)


def test_enotty_under_rfc_v9(engine: Engine) -> None:
    vm = engine.create_vm(VmCreate(type=VmType.sw_protected, semantics=Semantics.rfc_v9, profile=IN_PLACE))
    fd = vm.create_guest_memfd(KvmCreateGuestMemfd(size=PAGE)).fd
    with pytest.raises(ENOTTY, match="KVM_MEMORY_ENCRYPT_"):  # the call this VM converts with
        _convert(vm, fd, 0, PAGE, True)


# Each case breaks one check and every later one: the first broken check must answer.
_ORDER: list[tuple[str, dict[str, Any], str]] = [
    ("flags", {"flags": 1, "reserved": [1] + [0] * 10, "attributes": 1, "size": 0}, "flags"),
    ("reserved", {"reserved": [0] * 10 + [1], "attributes": 1, "size": 0}, "reserved"),
    ("attributes", {"attributes": 0x10, "size": 0}, "only KVM_MEMORY_ATTRIBUTE_PRIVATE"),
    ("size 0", {"size": 0, "offset": 0x800}, "size must not be 0"),
    ("wrap", {"offset": (1 << 64) - PAGE, "size": 2 * PAGE}, "wrap"),
    ("unaligned", {"offset": 0x800, "size": 0x10_0000_0000}, "page aligned"),
    ("past i_size", {"offset": 3 * PAGE, "size": 2 * PAGE}, "past the end of the file"),
    ("offset at i_size", {"offset": 4 * PAGE, "size": PAGE}, "past the end of the file"),
]


@pytest.mark.parametrize(("case", "fields", "message"), _ORDER, ids=[c[0] for c in _ORDER])
def test_einval_in_the_kernels_order(engine: Engine, case: str, fields: dict[str, Any], message: str) -> None:
    vm = _vm(engine)
    fd = _file(vm)
    req = {"offset": 0, "size": PAGE, "attributes": 8, **fields}
    seq = vm.mmu_model().mmu_invalidate_seq
    with pytest.raises(EINVAL, match=message):
        vm.set_gmem_attributes(fd, KvmMemoryAttributes2(**req))
    assert _private(vm, fd) == [False] * 4 and vm.mmu_model().mmu_invalidate_seq == seq


def test_a_vm_without_private_memory_is_einval_before_the_attributes(engine: Engine) -> None:
    vm = _vm(engine, vm_type="default")
    fd = _file(vm, slot=False)
    with pytest.raises(EINVAL, match="no private memory"):  # before the attributes and the size
        vm.set_gmem_attributes(fd, KvmMemoryAttributes2(offset=0, size=0, attributes=0x10))


# ------------------------------------------------------------- the selftests


def test_init_private(engine: Engine) -> None:
    """A file is private unless created INIT_SHARED: the host SIGBUSes, the guest maps it private."""
    vm = _vm(engine)
    fd = _file(vm, pages=1, flags=MMAP)
    m = _mmap(vm, fd, 1)
    with pytest.raises(EFAULT) as e:
        _touch(vm, m, 0)
    assert e.value.members == {"signal": "SIGBUS", "fault_offset": 0}
    assert "private" in e.value.detail
    assert _fault(vm, 0) == "mapped" and vm.gfn_info(GIB4 >> 12).private
    _convert(vm, fd, 0, PAGE, False)
    _touch(vm, m, 0)
    assert _fault(vm, 0) == "mapped" and not vm.gfn_info(GIB4 >> 12).private
    _convert(vm, fd, 0, PAGE, True)
    with pytest.raises(EFAULT):
        _touch(vm, m, 0, write=False)


def test_init_shared_and_indexing(engine: Engine) -> None:
    """Converting one page changes that page only (``indexing``)."""
    for page in range(4):
        vm = _vm(engine)
        fd = _file(vm)
        m = _mmap(vm, fd)
        _convert(vm, fd, page * PAGE, PAGE, True)
        assert _private(vm, fd) == [p == page for p in range(4)]
        for other in range(4):
            if other == page:
                with pytest.raises(EFAULT):
                    _touch(vm, m, other)
            else:
                _touch(vm, m, other)


def test_before_allocation_both_ways(engine: Engine) -> None:
    """Unallocated pages convert (``before_allocation_shared/private``, ``unallocated_folios``)."""
    vm = _vm(engine)
    fd = _file(vm, pages=8)
    m = _mmap(vm, fd, 8)
    _touch(vm, m, 1)
    _touch(vm, m, 2)
    assert _convert(vm, fd, 0, 8 * PAGE, True).noop is False
    assert _private(vm, fd) == [True] * 8
    assert vm.guest_memfd(fd).allocated_pages == 2  # a conversion allocates nothing
    for page in range(8):
        _convert(vm, fd, page * PAGE, PAGE, False)
    assert _private(vm, fd) == [False] * 8


def test_truncate_keeps_the_attributes(engine: Engine) -> None:
    vm = _vm(engine)
    fd = _file(vm, pages=1)
    hole = FallocateRequest(mode=3, offset=0, len=PAGE)
    vm.fallocate(fd, hole)
    assert _private(vm, fd) == [False]
    _convert(vm, fd, 0, PAGE, True)
    vm.fallocate(fd, hole)
    assert _private(vm, fd) == [True]


def test_elevated_refcount(engine: Engine) -> None:
    """A pinned page refuses to become private with EAGAIN at its offset; the rest converts; once
    unpinned, the whole (mixed) range converts."""
    vm = _vm(engine)
    fd = _file(vm)
    m = _mmap(vm, fd)
    pin = vm.pin(m, TouchRequest(offset=2 * PAGE, size=PAGE))
    assert (pin.fd, pin.offset, pin.size) == (fd, 2 * PAGE, PAGE)
    seq = vm.mmu_model().mmu_invalidate_seq
    with pytest.raises(EAGAIN) as e:
        _convert(vm, fd, 0, 4 * PAGE, True)
    assert e.value.members == {"error_offset": 2 * PAGE}
    assert _private(vm, fd) == [False] * 4 and vm.mmu_model().mmu_invalidate_seq == seq
    for page in range(4):
        if page == 2:
            with pytest.raises(EAGAIN):
                _convert(vm, fd, page * PAGE, PAGE, True)
        else:
            _convert(vm, fd, page * PAGE, PAGE, True)
    _convert(vm, fd, 2 * PAGE, PAGE, False)  # to shared: no reference check
    vm.unpin(pin.id)
    assert not _convert(vm, fd, 0, 4 * PAGE, True).noop
    assert _private(vm, fd) == [True] * 4


def test_a_pin_of_a_punched_page_no_longer_refuses(engine: Engine) -> None:
    """Only folios in the page cache are checked: after a punch-hole the pinned page is not the file's."""
    vm = _vm(engine)
    fd = _file(vm)
    m = _mmap(vm, fd)
    vm.pin(m, TouchRequest(offset=PAGE, size=PAGE))
    vm.fallocate(fd, FallocateRequest(mode=3, offset=PAGE, len=PAGE))
    _convert(vm, fd, 0, 4 * PAGE, True)
    assert _private(vm, fd) == [True] * 4


def test_a_page_faulted_in_after_the_punch_is_a_new_one_not_pinned(engine: Engine) -> None:
    """The pin holds the punched-out folio; the host's next access makes a new page there."""
    vm = _vm(engine)
    fd = _file(vm)
    m = _mmap(vm, fd)
    pin = vm.pin(m, TouchRequest(offset=0, size=3 * PAGE))
    vm.fallocate(fd, FallocateRequest(mode=3, offset=PAGE, len=PAGE))
    _touch(vm, m, 1)  # page 1 again: a new folio
    with pytest.raises(EAGAIN) as e:  # pages 0 and 2 are still the pinned ones
        _convert(vm, fd, PAGE, 2 * PAGE, True)
    assert e.value.members == {"error_offset": 2 * PAGE}
    _convert(vm, fd, PAGE, PAGE, True)
    doc = vm.snapshot()
    assert [(p.id, p.detached) for p in doc.files[0].pins] == [(pin.id, [(1, 2)])]
    assert engine.import_vm(doc).snapshot().model_dump() == doc.model_dump()


def test_pins_fault_in_like_a_touch_and_keep_the_file(engine: Engine) -> None:
    vm = _vm(engine)
    fd = _file(vm)
    m = _mmap(vm, fd)
    _convert(vm, fd, PAGE, PAGE, True)
    with pytest.raises(EFAULT, match="pin_user_pages"):  # GUP of a private page
        vm.pin(m, TouchRequest(offset=0, size=2 * PAGE))
    assert vm.host_pins() == [] and vm.guest_memfd(fd).allocated_pages == 0
    pin = vm.pin(m, TouchRequest(offset=2 * PAGE, size=2 * PAGE))
    assert vm.guest_memfd(fd).allocated_pages == 2
    vm.close_guest_memfd(fd)
    assert not vm.munmap(m).released  # the pin still holds the file
    assert vm.host_pin(pin.id).fd is None
    assert vm.unpin(pin.id).released


def test_noop_returns_before_anything(engine: Engine) -> None:
    vm = _vm(engine)
    fd = _file(vm)
    m = _mmap(vm, fd)
    vm.pin(m, TouchRequest(offset=0, size=PAGE))
    vm.set_fault_injection(1)
    seq = vm.mmu_model().mmu_invalidate_seq
    out = _convert(vm, fd, 0, 4 * PAGE, False)  # already shared: no ENOMEM, no EAGAIN
    assert out.noop and not out.invalidated and vm.mmu_model().mmu_invalidate_seq == seq
    assert vm.fault_injection().fail_nth == 1


def test_enomem_at_preallocation_changes_nothing(engine: Engine) -> None:
    vm = _vm(engine)
    fd = _file(vm)
    vm.set_fault_injection(1)
    with pytest.raises(ENOMEM) as e:
        _convert(vm, fd, PAGE, 2 * PAGE, True)
    assert e.value.members == {"error_offset": PAGE}
    assert _private(vm, fd) == [False] * 4 and vm.fault_injection().fail_nth is None
    vm.set_fault_injection(2)  # one allocation only: a later one is consumed, nothing fails
    _convert(vm, fd, PAGE, 2 * PAGE, True)
    assert _private(vm, fd) == [False, True, True, False] and vm.fault_injection().fail_nth is None


def test_conversion_invalidates_every_binding_of_the_file(engine: Engine) -> None:
    """The attributes live in the file: two slots bound to it see one conversion, each invalidated."""
    vm = _vm(engine)
    fd = vm.create_guest_memfd(KvmCreateGuestMemfd(size=4 * PAGE, flags=INIT_SHARED)).fd
    vm.set_user_memory_region(0, region(GIB4, 2 * PAGE, flags=4, fd=fd))
    vm.set_user_memory_region(1, region(2 * GIB4, 2 * PAGE, hva=0x7F10_0000_0000, flags=4, fd=fd, off=2 * PAGE))
    for gpa in (GIB4, GIB4 + PAGE, 2 * GIB4, 2 * GIB4 + PAGE):
        assert vm.fault(FaultRequest(gpa=gpa)).outcome == "mapped"
    out = _convert(vm, fd, PAGE, 2 * PAGE, True)  # page 1 (slot 0) and page 2 (slot 1)
    assert (out.invalidated, out.pages_zapped, out.tlb_flushed) == (True, 2, True)
    mmu = vm.mmu_model()
    assert (mmu.mmu_invalidate_seq, mmu.mmu_invalidate_in_progress, mmu.mapped_pages) == (1, 0, 2)
    assert [vm.gfn_info(g >> 12).private for g in (GIB4, GIB4 + PAGE, 2 * GIB4, 2 * GIB4 + PAGE)] == [
        False,
        True,
        True,
        False,
    ]
    # A fault that snapshotted the seq before the conversion retries.
    assert vm.fault(FaultRequest(gpa=GIB4 + PAGE, mmu_seq=0)).outcome == "retry"
    assert _fault(vm, 1) == "mapped"


def test_faults_come_from_the_file_and_a_missing_slot_is_mmio(engine: Engine) -> None:
    """Every fault on a bound slot takes its page from guest_memfd (gmem-only even without MMAP);
    a gfn outside any slot is shared, so a deleted slot's private gfn is an MMIO exit
    (private_mem_kvm_exits_test in the mode)."""
    vm = _vm(engine)
    fd = _file(vm, flags=INIT_SHARED)
    assert vm.memslot(0).gmem_only
    assert _fault(vm, 0) == "mapped" and vm.guest_memfd(fd).allocated_pages == 1
    _convert(vm, fd, 0, PAGE, True)
    assert _fault(vm, 0, private=False) == "memory_fault_exit"  # the access and the file disagree
    vm.delete_memslot(0)
    assert _fault(vm, 0) == "mmio_exit"


def test_close_and_punch_hole_unmap_both_kinds(engine: Engine) -> None:
    vm = _vm(engine)
    fd = _file(vm)
    _convert(vm, fd, 0, PAGE, True)
    assert _fault(vm, 0) == "mapped" and _fault(vm, 1) == "mapped"
    out = vm.fallocate(fd, FallocateRequest(mode=3, offset=0, len=4 * PAGE))
    assert out.pages_zapped == 2


def test_snapshot_round_trip(engine: Engine) -> None:
    vm = _vm(engine)
    fd = _file(vm, pages=8)
    m = _mmap(vm, fd, 8)
    vm.pin(m, TouchRequest(offset=6 * PAGE, size=PAGE))
    _convert(vm, fd, PAGE, 3 * PAGE, True)
    doc = vm.snapshot()
    assert doc.version == 4 and doc.files[0].private == [(1, 4)]
    assert [(p.id, p.first, p.npages) for p in doc.files[0].pins] == [(1, 6, 1)]
    copy = engine.import_vm(doc)
    assert copy.snapshot().model_dump() == doc.model_dump()
    with pytest.raises(EAGAIN):
        _convert(copy, fd, 0, 8 * PAGE, True)


def test_errors_are_kvm_errors_with_members() -> None:
    assert issubclass(EAGAIN, KvmError) and EAGAIN("x", error_offset=1).members == {"error_offset": 1}


def test_a_crash_restart_replays_the_in_place_calls(tmp_path: Any) -> None:
    """Every journaled call replays after a restart without a graceful shutdown (the journal once
    refused set_gmem_attributes, pin and unpin: their names were missing from a second list)."""
    from app.core.journal import SqliteJournal

    db = str(tmp_path / "state.sqlite3")
    before, journal = Engine(), SqliteJournal(db)
    before.attach_journal(journal)
    vm = _vm(before)
    fd = _file(vm)
    m = _mmap(vm, fd)
    pin = vm.pin(m, TouchRequest(offset=PAGE, size=PAGE))
    with pytest.raises(EAGAIN):
        _convert(vm, fd, 0, 4 * PAGE, True)
    vm.unpin(pin.id)
    _convert(vm, fd, 0, 2 * PAGE, True)
    vm.pin(m, TouchRequest(offset=3 * PAGE, size=PAGE))
    doc = vm.snapshot()
    journal.close()
    after, journal = Engine(), SqliteJournal(db)
    assert after.restore(journal)[0] == 0  # no snapshot: the whole journal replayed
    journal.close()
    assert after.vm(vm.id).snapshot() == doc
