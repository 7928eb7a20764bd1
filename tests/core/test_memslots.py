"""semantics.md section 5: KVM_SET_USER_MEMORY_REGION2 and KVM_CREATE_GUEST_MEMFD."""

from __future__ import annotations

import pytest

from app.core import Engine
from app.core.errors import EBADF, EBUSY, EEXIST, EINVAL, ENOENT
from app.models.kvm import FaultRequest, KvmCreateGuestMemfd, KvmMemoryAttributes, NotifierRequest
from app.models.vm import VmCreate
from tests.core.conftest import GIB4, HVA, MakeVm, add_gmem_slot, region

MIB2 = 0x200000


@pytest.mark.parametrize(
    ("vm_type", "semantics", "raw", "req"),
    [
        ("sw_protected", "linux", 32764, region(0, MIB2)),  # 1. id >= KVM_USER_MEM_SLOTS
        ("sw_protected", "linux", 0, region(0, MIB2, flags=8)),  # 2. unknown flag
        ("sw_protected", "linux", 0, region(0, MIB2, flags=4 | 1, fd=3)),  # 2. GUEST_MEMFD + LOG_DIRTY
        ("sw_protected", "linux", 0, region(0, MIB2, flags=4 | 2, fd=3)),  # 2. GUEST_MEMFD + READONLY
        ("default", "rfc-v9", 0, region(0, MIB2, flags=4, fd=3)),  # 2. rfc-v9: gmem only on private VMs
        ("sw_protected", "linux", 0, region(0, 0x1800)),  # 3. size unaligned
        ("sw_protected", "linux", 0, region(0x800, MIB2)),  # 3. gpa unaligned
        ("sw_protected", "linux", 0, region(0, MIB2, hva=HVA + 1)),  # 3. hva unaligned
        ("sw_protected", "linux", 0, region(0, 0x2000, hva=0x7FFFFFFFE000)),  # 3. beyond the user half
        ("sw_protected", "linux", 0, region(0, MIB2, flags=4, fd=3, off=0x800)),  # 4. gmem offset unaligned
        ("sw_protected", "linux", 0, region(0, MIB2, flags=4, fd=3, off=2**64 - 0x1000)),  # 4. offset wraps
        ("sw_protected", "linux", 1 << 16, region(0, MIB2)),  # 5. no SMM space on private linux VMs
        ("sw_protected", "rfc-v9", 2 << 16, region(0, MIB2)),  # 5. as_id 2
        ("sw_protected", "linux", 0, region(2**64 - 0x1000, MIB2, hva=0)),  # 6. gpa + size wraps
        ("default", "linux", 0, region(0, 1 << 43, hva=0)),  # 6. > 2^31 - 1 pages
        ("sw_protected", "linux", 5, region(0, 0)),  # 7. delete of a missing slot
        ("sw_protected", "linux", 0, region(1 << 52, MIB2)),  # 11. beyond max_gfn
    ],
)
def test_checks_are_einval(make_vm: MakeVm, vm_type: str, semantics: str, raw: int, req) -> None:  # type: ignore[no-untyped-def]
    vm = make_vm(vm_type, semantics)
    vm.create_guest_memfd(KvmCreateGuestMemfd(size=MIB2))
    with pytest.raises(EINVAL):
        vm.set_user_memory_region(raw, req)
    assert vm.memslots() == []


def test_check_order_alignment_before_as_id(make_vm: MakeVm) -> None:
    vm = make_vm("sw_protected", "linux")
    with pytest.raises(EINVAL, match="aligned"):
        vm.set_user_memory_region(1 << 16, region(0x800, MIB2))


def test_32764_slots_fit_and_the_next_id_does_not(make_vm: MakeVm) -> None:
    vm = make_vm("default", "linux")
    for sid in range(32764):
        vm.set_user_memory_region(sid, region(sid * 0x1000, 0x1000, hva=sid * 0x1000))
    assert vm.model().memslot_count == 32764
    with pytest.raises(EINVAL):
        vm.set_user_memory_region(32764, region(1 << 30, 0x1000))


@pytest.mark.parametrize("gpa", [GIB4 - MIB2, GIB4 + MIB2, GIB4, GIB4 - 0x1000 * 511, GIB4 - 0x1000])
def test_overlap_in_any_shape_is_eexist(make_vm: MakeVm, gpa: int) -> None:
    vm = make_vm("default", "linux")
    vm.set_user_memory_region(0, region(GIB4, 2 * MIB2))
    req = region(gpa, 2 * MIB2, hva=HVA + 0x10000000)
    if gpa + 2 * MIB2 <= GIB4:
        vm.set_user_memory_region(1, req)
        return
    with pytest.raises(EEXIST):
        vm.set_user_memory_region(1, req)
    # The other address space does not overlap.
    assert vm.set_user_memory_region(1 << 16 | 1, req).change == "create"


def test_modify_rules(make_vm: MakeVm) -> None:
    vm = make_vm("default", "linux")
    created = vm.set_user_memory_region(0, region(GIB4, MIB2, flags=0))
    assert created.change == "create" and created.memslot is not None
    assert vm.set_user_memory_region(0, region(GIB4, MIB2)).change == "none"
    assert vm.set_user_memory_region(0, region(GIB4, MIB2, flags=1)).change == "flags_only"
    for bad in (
        region(GIB4, MIB2, flags=1 | 2),
        region(GIB4, 2 * MIB2, flags=1),
        region(GIB4, MIB2, hva=HVA + 0x1000, flags=1),
    ):
        with pytest.raises(EINVAL):
            vm.set_user_memory_region(0, bad)
    vm.fault(FaultRequest(gpa=GIB4))
    moved = vm.set_user_memory_region(0, region(2 * GIB4, MIB2, flags=1))
    assert (moved.change, moved.pages_zapped) == ("move", 1)
    assert vm.mmu_model().stats.tlb_flushes == 1
    assert vm.mmu_model().mmu_invalidate_seq == 0, "delete/move do not touch the invalidation counters"
    deleted = vm.set_user_memory_region(0, region(0, 0, hva=0))
    assert (deleted.change, deleted.memslot) == ("delete", None)


def test_guest_memfd_slot_can_only_be_deleted(make_vm: MakeVm) -> None:
    vm = make_vm("sw_protected", "linux")
    fd = add_gmem_slot(vm, raw=10)
    with pytest.raises(EINVAL):
        vm.set_user_memory_region(10, region(GIB4, 0x400000, flags=4, fd=fd))  # even identical
    vm2 = make_vm("sw_protected", "linux")
    vm2.set_user_memory_region(0, region(GIB4, MIB2))
    fd2 = vm2.create_guest_memfd(KvmCreateGuestMemfd(size=MIB2)).fd
    with pytest.raises(EINVAL):
        vm2.set_user_memory_region(0, region(GIB4, MIB2, flags=4, fd=fd2))


@pytest.mark.parametrize("semantics", ["linux", "rfc-v9"])
def test_guest_memfd_binding(make_vm: MakeVm, semantics: str) -> None:
    vm = make_vm("sw_protected", semantics)
    with pytest.raises(EBADF):
        vm.set_user_memory_region(0, region(GIB4, MIB2, flags=4, fd=42))
    with pytest.raises(EBADF):
        vm.set_user_memory_region(0, region(GIB4, MIB2, flags=4, fd=None))
    fd = vm.create_guest_memfd(KvmCreateGuestMemfd(size=2 * MIB2)).fd
    with pytest.raises(EINVAL):  # offset + size beyond the file
        vm.set_user_memory_region(0, region(GIB4, MIB2, flags=4, fd=fd, off=MIB2 + 0x1000))
    vm.set_user_memory_region(0, region(GIB4, MIB2, flags=4, fd=fd))
    with pytest.raises(EINVAL):  # the same file range bound twice
        vm.set_user_memory_region(1, region(2 * GIB4, MIB2, hva=HVA + MIB2, flags=4, fd=fd))
    vm.set_user_memory_region(1, region(2 * GIB4, MIB2, hva=HVA + MIB2, flags=4, fd=fd, off=MIB2))
    assert [(b.slot, b.offset) for b in vm.guest_memfd(fd).bindings] == [(0, 0), (1, MIB2)]
    vm.close_guest_memfd(fd)
    with pytest.raises(ENOENT):
        vm.guest_memfd(fd)
    # rfc-v9: the binding keeps the file alive; linux: the slot lost it. Either way the fd is gone.
    assert vm.memslot(0).guest_memfd == (None if semantics == "linux" else fd)
    assert vm.memslot(0).flags == 4
    with pytest.raises(EBADF):
        vm.set_user_memory_region(2, region(3 * GIB4, MIB2, flags=4, fd=fd))
    assert vm.delete_memslot(0).change == "delete"


@pytest.mark.parametrize(
    ("semantics", "size", "flags"), [("linux", 0, 0), ("linux", 0x1800, 0), ("linux", 0x1000, 4), ("rfc-v9", 0x1000, 1)]
)
def test_create_guest_memfd_einval(make_vm: MakeVm, semantics: str, size: int, flags: int) -> None:
    with pytest.raises(EINVAL):
        make_vm("sw_protected", semantics).create_guest_memfd(KvmCreateGuestMemfd(size=size, flags=flags))


def test_guest_memfd_flags_and_fds(make_vm: MakeVm) -> None:
    vm = make_vm("default", "linux")
    a = vm.create_guest_memfd(KvmCreateGuestMemfd(size=0x1000, flags=3))
    b = vm.create_guest_memfd(KvmCreateGuestMemfd(size=0x2000))
    assert a.fd != b.fd and a.flags == 3
    # 6.18 allows guest_memfd slots on ordinary VMs under linux.
    assert vm.set_user_memory_region(0, region(0, 0x1000, flags=4, fd=a.fd)).change == "create"


def test_ebusy_while_a_notifier_invalidation_is_open(make_vm: MakeVm) -> None:
    vm = make_vm("default", "linux")
    vm.set_user_memory_region(0, region(GIB4, MIB2))
    inv = vm.notifier_start(NotifierRequest(hva_start=1, hva_end=2))  # matches no slot
    assert inv.gfn_ranges == []
    for raw, req in [
        (1, region(0, 0x1000, hva=0)),
        (0, region(2 * GIB4, MIB2)),
        (0, region(GIB4, MIB2, flags=1)),
        (0, region(0, 0)),
    ]:
        with pytest.raises(EBUSY):
            vm.set_user_memory_region(raw, req)
    assert vm.set_user_memory_region(0, region(GIB4, MIB2)).change == "none"
    with pytest.raises(EEXIST):  # the checks still come first
        vm.set_user_memory_region(1, region(GIB4, MIB2))
    vm.notifier_end(inv.id)
    assert vm.set_user_memory_region(1, region(0, 0x1000, hva=0)).change == "create"


def test_delete_api_is_enoent_for_missing(make_vm: MakeVm) -> None:
    vm = make_vm()
    with pytest.raises(ENOENT):
        vm.delete_memslot(0)
    with pytest.raises(ENOENT):
        vm.memslot(3 << 16)


def test_memslots_sorted_by_as_then_base(make_vm: MakeVm) -> None:
    vm = make_vm("default", "rfc-v9")
    vm.set_user_memory_region(1 << 16 | 3, region(0, 0x1000))
    vm.set_user_memory_region(7, region(0x5000, 0x1000))
    vm.set_user_memory_region(2, region(0x1000, 0x1000))
    assert [m.slot for m in vm.memslots()] == [2, 7, 1 << 16 | 3]


def test_attributes_survive_slot_changes(make_vm: MakeVm) -> None:
    from app.models.kvm import KvmMemoryAttributes

    vm = make_vm("sw_protected", "linux")
    add_gmem_slot(vm)
    vm.set_memory_attributes(KvmMemoryAttributes(address=GIB4, size=0x1000, attributes=8))
    vm.delete_memslot(10)
    assert vm.gfn_info(GIB4 >> 12).private


@pytest.mark.parametrize(("vm_type", "zapped"), [("sw_protected", 2), ("tdx", 1)])
def test_linux_guest_memfd_close_invalidates_bound_slots(make_vm: MakeVm, vm_type: str, zapped: int) -> None:
    """kvm_gmem_release(): unbind every slot, then begin / range_add + unmap per slot / flush / end."""
    vm = make_vm(vm_type, "linux")
    fd = add_gmem_slot(vm, raw=0, gpa=GIB4, size=MIB2)
    vm.set_memory_attributes(KvmMemoryAttributes(address=GIB4, size=0x1000, attributes=8))
    assert vm.fault(FaultRequest(gpa=GIB4)).private
    assert vm.fault(FaultRequest(gpa=GIB4 + 0x1000)).outcome == "mapped"  # shared
    closed = vm.close_guest_memfd(fd)
    assert (closed.pages_zapped, closed.invalidated) == (zapped, True)
    mmu = closed.mmu
    assert (mmu.mmu_invalidate_seq, mmu.mmu_invalidate_in_progress) == (2, 0)
    assert (mmu.mmu_invalidate_range_start, mmu.mmu_invalidate_range_end) == (GIB4 >> 12, (GIB4 + MIB2) >> 12)
    assert mmu.stats.tlb_flushes == 1
    r = vm.fault(FaultRequest(gpa=GIB4))  # private, the file is gone: kvm_gmem_get_pfn() fails
    assert r.outcome == "memory_fault_exit" and r.exit is not None and r.exit.flags == 8
    assert vm.fault(FaultRequest(gpa=GIB4 + 0x2000)).outcome == "mapped", "shared faults still map"
    assert vm.delete_memslot(0).change == "delete"


def test_guest_memfd_close_without_binding_or_under_rfc_v9_does_not_invalidate(make_vm: MakeVm) -> None:
    vm = make_vm("sw_protected", "linux")
    fd = vm.create_guest_memfd(KvmCreateGuestMemfd(size=MIB2)).fd
    closed = vm.close_guest_memfd(fd)
    assert (closed.pages_zapped, closed.invalidated, closed.mmu.mmu_invalidate_seq) == (0, False, 0)
    v9 = make_vm("sw_protected", "rfc-v9")
    fd = add_gmem_slot(v9, raw=0, gpa=GIB4, size=MIB2)
    assert v9.fault(FaultRequest(gpa=GIB4)).outcome == "mapped"
    closed = v9.close_guest_memfd(fd)
    assert (closed.pages_zapped, closed.invalidated, closed.mmu.mapped_pages) == (0, False, 1)
    assert v9.fault(FaultRequest(gpa=GIB4 + 0x1000)).outcome == "mapped", "the slot keeps the file"


@pytest.mark.parametrize(
    ("vm_type", "semantics", "flags", "ok"),
    [
        ("sev_es", "linux", 2, False),
        ("snp", "linux", 2, False),
        ("tdx", "linux", 2, False),
        ("sev", "linux", 2, True),
        ("sw_protected", "linux", 2, True),
        ("tdx", "rfc-v9", 2, True),
    ],
)
def test_readonly_refused_where_state_is_protected(
    make_vm: MakeVm, vm_type: str, semantics: str, flags: int, ok: bool
) -> None:
    """kvm_arch_has_readonly_mem() is !has_protected_state under linux."""
    vm = make_vm(vm_type, semantics)
    if ok:
        assert vm.set_user_memory_region(0, region(0, 0x1000, flags=flags)).change == "create"
    else:
        with pytest.raises(EINVAL):
            vm.set_user_memory_region(0, region(0, 0x1000, flags=flags))


@pytest.mark.parametrize(
    ("vm_type", "flags", "size", "ok"),
    [
        ("default", 2, 0x1000, True),
        ("sw_protected", 2, 0x1000, False),
        ("sw_protected", 1, 0x1000, True),
        ("default", 0, 1 << 63, False),
        ("default", 0, (1 << 63) - 0x1000, True),
    ],
)
def test_guest_memfd_flags_and_size(make_vm: MakeVm, vm_type: str, flags: int, size: int, ok: bool) -> None:
    """INIT_SHARED only without private memory; a size >= 2^63 is a negative loff_t."""
    vm = make_vm(vm_type, "linux")
    req = KvmCreateGuestMemfd(size=size, flags=flags)
    if ok:
        assert vm.create_guest_memfd(req).flags == flags
    else:
        with pytest.raises(EINVAL):
            vm.create_guest_memfd(req)


@pytest.mark.parametrize(
    ("vm_type", "semantics", "zapped"), [("default", "linux", 2), ("sev", "linux", 1), ("sev", "rfc-v9", 2)]
)
def test_memslot_delete_zap_scope(make_vm: MakeVm, vm_type: str, semantics: str, zapped: int) -> None:
    """KVM_X86_QUIRK_SLOT_ZAP_ALL: only default VMs zap everything under linux; rfc-v9 always did."""
    vm = make_vm(vm_type, semantics)
    vm.set_user_memory_region(0, region(0, 0x1000))
    vm.set_user_memory_region(1, region(0x10000, 0x1000, hva=HVA + 0x10000))
    vm.fault(FaultRequest(gpa=0))
    vm.fault(FaultRequest(gpa=0x10000))
    up = vm.delete_memslot(0)
    assert up.pages_zapped == zapped
    assert vm.mmu_model().mapped_pages == 2 - zapped
    assert vm.mmu_model().mmu_invalidate_seq == 0, "no invalidation counters"


def test_guest_memfd_binding_end_overflows_loff_t_like_the_kernel(make_vm: MakeVm) -> None:
    """Found by verify-host on a 6.18 host: kvm_gmem_bind() adds in a signed loff_t, so an end
    past 2^63 wraps negative and passes the size check; an offset of 2^63 or more is refused."""
    vm = make_vm("default", "linux")
    big = (1 << 63) - 0x1000
    fd = vm.create_guest_memfd(KvmCreateGuestMemfd(size=big)).fd
    assert vm.set_user_memory_region(0, region(GIB4, MIB2, flags=4, fd=fd, off=big)).change == "create"
    small = vm.create_guest_memfd(KvmCreateGuestMemfd(size=MIB2)).fd
    with pytest.raises(EINVAL):  # an end below 2^63 still has to fit in the file
        vm.set_user_memory_region(1, region(2 * GIB4, MIB2, hva=HVA + MIB2, flags=4, fd=small, off=0x1000))
    with pytest.raises(EINVAL):  # a negative offset
        vm.set_user_memory_region(2, region(3 * GIB4, MIB2, hva=HVA + 2 * MIB2, flags=4, fd=fd, off=1 << 63))


def test_snapshot_of_closed_files_held_by_slots_round_trips(engine: Engine) -> None:
    """rfc-v9 slots keep closed files alive; a reloaded copy dumps the same document (found by the
    stateful test: file ids followed slot creation order, not the listed order)."""
    vm = engine.create_vm(VmCreate(type="sw_protected", semantics="rfc-v9"))
    for raw, gpa in ((1, 0x1000), (0, 0)):
        fd = vm.create_guest_memfd(KvmCreateGuestMemfd(size=0x1000)).fd
        vm.set_user_memory_region(raw, region(gpa, 0x1000, hva=HVA + gpa, flags=4, fd=fd))
        vm.close_guest_memfd(fd)
    doc = vm.snapshot()
    assert engine.import_vm(doc).snapshot() == doc
