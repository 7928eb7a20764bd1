"""semantics.md sections 3, 6 and 7: retry check, faults, prefault, host MMU notifier."""

from __future__ import annotations

import pytest

from app.core.errors import EAGAIN, EFAULT, EINVAL, ENOENT, ENOMEM, ENOTTY, EOPNOTSUPP
from app.core.invalidation import MmuInvalidation
from app.models.kvm import FaultRequest, KvmMemoryAttributes, NotifierRequest, PrefaultRequest
from tests.core.conftest import GIB4, HVA, MakeVm, add_gmem_slot, region

GFN = GIB4 >> 12


def test_invalidation_protocol() -> None:
    inv = MmuInvalidation()
    inv.begin()
    assert (inv.in_progress, inv.range_start) == (1, None)
    inv.range_add(10, 20)
    inv.begin()
    inv.range_add(30, 40)
    assert (inv.range_start, inv.range_end) == (10, 40)
    assert inv.retry_reason(25, 0) == "invalidation_in_progress"
    assert inv.retry_reason(40, 0) is None
    inv.end()
    assert inv.retry_reason(5, 0) == "mmu_seq_changed"
    inv.end()
    assert (inv.seq, inv.in_progress, inv.range_start, inv.range_end) == (2, 0, 10, 40), "the range is not cleared"
    assert inv.retry_reason(15, 2) is None
    inv.begin()
    assert inv.range_start is None, "reset at the next 0 -> 1 begin"


def test_fault_order(make_vm: MakeVm) -> None:
    vm = make_vm("sw_protected", "linux")
    # 3. no memslot -> MMIO exit with the gpa as given
    r = vm.fault(FaultRequest(gpa=GIB4 + 0x123, write=True))
    assert r.outcome == "mmio_exit" and r.exit is not None
    assert (r.exit.reason_code, r.exit.gpa, r.exit.is_write) == (6, GIB4 + 0x123, True)
    # 1. mismatch -> memory fault exit, flags from the access
    r = vm.fault(FaultRequest(gpa=GIB4 + 0x123, private=True))
    assert r.outcome == "memory_fault_exit" and r.exit is not None
    assert (r.exit.reason_code, r.exit.flags, r.exit.gpa, r.exit.size, r.exit.errno) == (39, 8, GIB4, 4096, "EFAULT")
    # 2. private access, private attribute, slot without guest_memfd
    vm.set_user_memory_region(0, region(GIB4, 0x200000))
    vm.set_memory_attributes(KvmMemoryAttributes(address=GIB4, size=0x1000, attributes=8))
    r = vm.fault(FaultRequest(gpa=GIB4))
    assert r.outcome == "memory_fault_exit" and r.private and r.exit and r.exit.flags == 8
    # shared access to the private gfn: mismatch, flags 0
    r = vm.fault(FaultRequest(gpa=GIB4, private=False))
    assert r.exit is not None and r.exit.flags == 0
    # 4. stale snapshot -> retry, nothing mapped
    r = vm.fault(FaultRequest(gpa=GIB4 + 0x1000, mmu_seq=0))
    assert (r.outcome, r.retry_reason, r.mmu_seq) == ("retry", "mmu_seq_changed", 0)
    # 5. map
    r = vm.fault(FaultRequest(gpa=GIB4 + 0x1000, mmu_seq=1, write=True))
    assert r.outcome == "mapped"
    assert vm.fault(FaultRequest(gpa=GIB4 + 0x1000)).outcome == "mapped"
    st = vm.mmu_model().stats
    assert (st.faults, st.fault_retries, st.memory_fault_exits, st.mmio_exits) == (7, 1, 3, 1)
    assert vm.mmu_model().mapped_pages == 1


def test_private_fault_after_gmem_slot_deleted(make_vm: MakeVm) -> None:
    """private_mem_kvm_exits_test: delete the slot of a private page -> KVM_EXIT_MEMORY_FAULT."""
    vm = make_vm("sw_protected", "linux")
    add_gmem_slot(vm, raw=10, gpa=0xC0000000)
    vm.set_memory_attributes(KvmMemoryAttributes(address=0xC0000000, size=0x1000, attributes=8))
    assert vm.fault(FaultRequest(gpa=0xC0000000)).outcome == "mapped"
    vm.delete_memslot(10)
    r = vm.fault(FaultRequest(gpa=0xC0000000))
    assert r.exit is not None and (r.exit.flags, r.exit.gpa, r.exit.size) == (8, 0xC0000000, 4096)


@pytest.mark.parametrize(
    ("flags", "write", "outcome", "writable"),
    [
        (2, True, "mmio_exit", None),
        (2, False, "mapped", False),
        (1, False, "mapped", False),
        (1, True, "mapped", True),
        (0, False, "mapped", True),
    ],
)
def test_writable_rules(make_vm: MakeVm, flags: int, write: bool, outcome: str, writable: bool | None) -> None:
    vm = make_vm("default", "linux")
    vm.set_user_memory_region(0, region(0, 0x1000, flags=flags))
    assert vm.fault(FaultRequest(gpa=0, write=write)).outcome == outcome
    maps = vm.gfn_info(0).mappings
    assert [m.writable for m in maps] == ([] if writable is None else [writable])


def test_fault_racing_a_conversion_retries(make_vm: MakeVm) -> None:
    vm = make_vm("sw_protected", "linux")
    add_gmem_slot(vm)
    inv = vm.notifier_start(NotifierRequest(hva_start=HVA, hva_end=HVA + 0x2000))
    assert [(g.start_gfn, g.end_gfn) for g in inv.gfn_ranges] == [(GFN, GFN + 2)]
    assert vm.fault(FaultRequest(gpa=GIB4 + 0x1000)).retry_reason == "invalidation_in_progress"
    assert vm.fault(FaultRequest(gpa=GIB4 + 0x2000)).outcome == "mapped"
    vm.notifier_end(inv.id)
    assert vm.fault(FaultRequest(gpa=GIB4, mmu_seq=0)).retry_reason == "mmu_seq_changed"
    assert vm.fault(FaultRequest(gpa=GIB4)).outcome == "mapped"


def test_fault_bad_as_id(make_vm: MakeVm) -> None:
    with pytest.raises(EINVAL):
        make_vm("sw_protected", "linux").fault(FaultRequest(gpa=0, as_id=1))


@pytest.mark.parametrize(("vm_type", "zapped"), [("tdx", 3), ("sw_protected", 4)])
def test_notifier_unmap_scope_and_widening(make_vm: MakeVm, vm_type: str, zapped: int) -> None:
    """tdx: shared mappings only (private memory has no userspace mapping and lives in the
    mirror root); every other type: all mappings, as the filter is ignored without mirrored TDP."""
    vm = make_vm(vm_type, "linux")
    add_gmem_slot(vm)
    vm.set_memory_attributes(KvmMemoryAttributes(address=GIB4, size=0x1000, attributes=8))
    for page in range(4):
        assert vm.fault(FaultRequest(gpa=GIB4 + page * 0x1000)).outcome == "mapped"
    a = vm.notifier_start(NotifierRequest(hva_start=HVA + 0x800, hva_end=HVA + 0x1800))  # pages 0 and 1
    assert [(g.start_gfn, g.end_gfn) for g in a.gfn_ranges] == [(GFN, GFN + 2)]
    assert a.pages_zapped == zapped - 2
    b = vm.notifier_start(NotifierRequest(hva_start=HVA + 0x3000, hva_end=HVA + 0x3001))
    assert (b.mmu.mmu_invalidate_in_progress, b.mmu.mmu_invalidate_range_start, b.mmu.mmu_invalidate_range_end) == (
        2,
        GFN,
        GFN + 4,
    )
    assert (b.pages_zapped, b.mmu.stats.tlb_flushes) == (1, 2)
    assert [i.id for i in vm.open_notifiers()] == [a.id, b.id]
    vm.notifier_end(a.id)
    end = vm.notifier_end(b.id).mmu
    assert (end.mmu_invalidate_seq, end.mmu_invalidate_in_progress, end.open_notifier_invalidations) == (3, 0, 0)
    assert end.stats.pages_zapped == zapped - 1
    with pytest.raises(ENOENT):
        vm.notifier_end(a.id)


def test_rfc_v9_notifier_zaps_all(make_vm: MakeVm) -> None:
    vm = make_vm("tdx", "rfc-v9")  # private by default
    add_gmem_slot(vm)
    assert vm.fault(FaultRequest(gpa=GIB4)).outcome == "mapped"
    assert vm.notifier_start(NotifierRequest(hva_start=HVA, hva_end=HVA + 0x1000)).pages_zapped == 1


def test_notifier_without_slot_does_not_invalidate(make_vm: MakeVm) -> None:
    vm = make_vm("default", "rfc-v9")
    inv = vm.notifier_start(NotifierRequest(hva_start=0x1000, hva_end=0x2000))
    assert inv.mmu.mmu_invalidate_in_progress == 0
    assert vm.notifier_end(inv.id).mmu.mmu_invalidate_seq == 0
    with pytest.raises(EINVAL):
        vm.notifier_start(NotifierRequest(hva_start=0x2000, hva_end=0x2000))


def test_notifier_walks_both_address_spaces(make_vm: MakeVm) -> None:
    vm = make_vm("default", "rfc-v9")
    vm.set_user_memory_region(0, region(0, 0x4000, hva=HVA))
    vm.set_user_memory_region(1 << 16, region(0x100000, 0x4000, hva=HVA + 0x2000))
    inv = vm.notifier_start(NotifierRequest(hva_start=HVA + 0x3000, hva_end=HVA + 0x5000))
    assert [(g.as_id, g.start_gfn, g.end_gfn) for g in inv.gfn_ranges] == [(0, 3, 4), (1, 0x101, 0x103)]
    assert (inv.mmu.mmu_invalidate_range_start, inv.mmu.mmu_invalidate_range_end) == (3, 0x103)


def test_prefault_walks_until_the_first_unmappable_page(make_vm: MakeVm) -> None:
    """kvm_vcpu_pre_fault_memory(): page by page; the first page a fault would not map stops it."""
    vm = make_vm("sw_protected", "linux")
    vm.set_user_memory_region(0, region(0, 0x4000))  # plain: no guest_memfd
    vm.set_memory_attributes(KvmMemoryAttributes(address=0x2000, size=0x1000, attributes=8))
    r = vm.prefault(PrefaultRequest(gpa=0, size=0x8000))
    assert (r.mapped_pages, r.already_mapped_pages, r.stopped) == (2, 0, "EFAULT")
    assert (r.remaining.gpa, r.remaining.size) == (0x2000, 0x6000)
    r = vm.prefault(PrefaultRequest(gpa=0, size=0x2000))
    assert (r.mapped_pages, r.already_mapped_pages, r.stopped, r.remaining.size) == (0, 2, None, 0)
    r = vm.prefault(PrefaultRequest(gpa=0x3000, size=0x2000))  # gfn 3 maps, gfn 4 has no slot
    assert (r.mapped_pages, r.stopped, r.remaining.gpa) == (1, "ENOENT", 0x4000)
    mmu = vm.mmu_model()
    assert (mmu.stats.faults, mmu.mapped_pages) == (0, 3), "not counted as faults"
    # Stopped on the first page: that errno, nothing changes.
    with pytest.raises(EFAULT):
        vm.prefault(PrefaultRequest(gpa=0x2000, size=0x2000))
    with pytest.raises(ENOENT):
        vm.prefault(PrefaultRequest(gpa=0x4000, size=0x1000))
    inv = vm.notifier_start(NotifierRequest(hva_start=HVA, hva_end=HVA + 0x1000))
    with pytest.raises(EAGAIN):
        vm.prefault(PrefaultRequest(gpa=0, size=0x1000))
    r = vm.prefault(PrefaultRequest(gpa=0x3000, size=0x1000))  # outside the open range
    assert (r.already_mapped_pages, r.stopped) == (1, None)
    vm.notifier_end(inv.id)
    assert vm.mmu_model().mapped_pages == 2
    for bad in (
        PrefaultRequest(gpa=0, size=0),
        PrefaultRequest(gpa=1, size=0x1000),
        PrefaultRequest(gpa=2**64 - 0x1000, size=0x1000),
    ):
        with pytest.raises(EINVAL):
            vm.prefault(bad)


def test_prefault_stops_inside_an_open_invalidation_midway(make_vm: MakeVm) -> None:
    vm = make_vm("default", "linux")
    vm.set_user_memory_region(0, region(0, 0x10000, hva=0))
    inv = vm.notifier_start(NotifierRequest(hva_start=0x4000, hva_end=0x6000))
    r = vm.prefault(PrefaultRequest(gpa=0, size=0x10000))
    assert (r.mapped_pages, r.stopped, r.remaining.gpa, r.remaining.size) == (4, "EAGAIN", 0x4000, 0xC000)
    vm.notifier_end(inv.id)


@pytest.mark.parametrize(
    ("vm_type", "semantics", "errno"),
    [("snp", "linux", EOPNOTSUPP), ("tdx", "linux", EOPNOTSUPP), ("sw_protected", "rfc-v9", ENOTTY)],
)
def test_prefault_refused(make_vm: MakeVm, vm_type: str, semantics: str, errno: type[Exception]) -> None:
    with pytest.raises(errno):
        make_vm(vm_type, semantics).prefault(PrefaultRequest(gpa=0, size=0x1000))


def test_prefault_whole_slot_is_range_based(make_vm: MakeVm) -> None:
    vm = make_vm("default", "linux")
    size = 1 << 43  # 2^31 pages: too many for the kernel's 2^31 - 1 limit
    vm.set_user_memory_region(0, region(0, size - 0x1000, hva=0))
    r = vm.prefault(PrefaultRequest(gpa=0, size=size))
    assert (r.mapped_pages, r.stopped, r.remaining.gpa, r.remaining.size) == (
        (1 << 31) - 1,
        "ENOENT",
        size - 0x1000,
        0x1000,
    )
    assert len(vm.mapping_runs(0, 0, 1 << 52, 10)[0]) == 1


def test_mapping_budget(make_vm: MakeVm) -> None:
    from app.core import Engine, EngineLimits
    from app.models.vm import VmCreate

    vm = Engine(EngineLimits(max_mapping_runs=5)).create_vm(VmCreate(type="default", semantics="linux"))
    vm.set_user_memory_region(0, region(0, 0x10000, hva=0))
    vm.fault(FaultRequest(gpa=0x2000))  # as0: 3 runs, as1: 1 run
    with pytest.raises(ENOMEM):
        vm.fault(FaultRequest(gpa=0x5000))
    assert vm.mmu_model().stats.faults == 1, "a failed fault changes nothing"
    with pytest.raises(ENOMEM):
        vm.prefault(PrefaultRequest(gpa=0x5000, size=0x1000))
    assert vm.mmu_model().mapped_pages == 1
    assert vm.prefault(PrefaultRequest(gpa=0x3000, size=0x1000)).mapped_pages == 1  # coalesces


def test_events_explain_a_conversion(make_vm: MakeVm) -> None:
    vm = make_vm("sw_protected", "linux")
    add_gmem_slot(vm)
    vm.fault(FaultRequest(gpa=GIB4))
    vm.set_memory_attributes(KvmMemoryAttributes(address=GIB4, size=0x200000, attributes=8))
    events, cursor = vm.events_page(0, 100)
    assert cursor is None
    types = [e["type"] for e in events]
    tail = types[types.index("invalidate_begin") :]
    assert tail == [
        "invalidate_begin",
        "invalidate_range_add",
        "unmap",
        "tlb_flush",
        "attributes_store",
        "invalidate_end",
    ]
    first, cursor = vm.events_page(0, 2)
    assert cursor == first[-1]["id"]
    assert vm.events_page(cursor, 1)[0][0]["id"] == cursor + 1


def test_event_log_is_bounded() -> None:
    from app.core.events import EventLog

    log = EventLog(3)
    for i in range(10):
        log.emit("x", i=i)
    events, cursor = log.page(0, 100)
    assert [e["id"] for e in events] == [8, 9, 10] and cursor is None


def test_write_fault_upgrades_a_dirty_logging_read_mapping(make_vm: MakeVm) -> None:
    """fast_page_fault(): the write-protection fault makes the present SPTE writable (found by the stateful test)."""
    vm = make_vm("default", "linux")
    vm.set_user_memory_region(0, region(0, 0x2000, flags=1))  # KVM_MEM_LOG_DIRTY_PAGES
    vm.set_user_memory_region(1, region(0x10000, 0x1000, hva=HVA + 0x10000, flags=2))  # READONLY
    vm.fault(FaultRequest(gpa=0))
    assert [m.writable for m in vm.gfn_info(0).mappings] == [False]
    assert vm.fault(FaultRequest(gpa=0)).outcome == "mapped"
    assert [m.writable for m in vm.gfn_info(0).mappings] == [False], "a read leaves it as it was"
    assert vm.fault(FaultRequest(gpa=0, write=True)).outcome == "mapped"
    assert [m.writable for m in vm.gfn_info(0).mappings] == [True]
    assert vm.fault(FaultRequest(gpa=0)).outcome == "mapped"
    assert [m.writable for m in vm.gfn_info(0).mappings] == [True], "never downgraded by a read"
    vm.fault(FaultRequest(gpa=0x10000))
    assert vm.fault(FaultRequest(gpa=0x10000, write=True)).outcome == "mmio_exit"
    assert [m.writable for m in vm.gfn_info(0x10).mappings] == [False]


def test_linux_fault_order_v2(make_vm: MakeVm) -> None:
    """6.18 kvm_mmu_faultin_pfn(): the early retry check runs before the guest_memfd and READONLY
    checks; a private access with no memslot is a memory-fault exit (kvm_handle_noslot_fault())."""
    vm = make_vm("sw_protected", "linux")
    vm.set_memory_attributes(KvmMemoryAttributes(address=0, size=0x2000, attributes=8))
    r = vm.fault(FaultRequest(gpa=0x10000 + 0x1000 * 0))  # shared, no slot
    assert r.outcome == "mmio_exit"
    r = vm.fault(FaultRequest(gpa=0))  # private, no slot
    assert r.outcome == "memory_fault_exit" and r.exit is not None and r.exit.flags == 8
    vm.set_user_memory_region(0, region(0, 0x4000))  # plain slot
    inv = vm.notifier_start(NotifierRequest(hva_start=HVA, hva_end=HVA + 0x1000))
    # Private on a plain slot, inside the open range: retry comes first.
    assert vm.fault(FaultRequest(gpa=0)).outcome == "retry"
    assert vm.fault(FaultRequest(gpa=0x1000)).outcome == "memory_fault_exit"
    vm.notifier_end(inv.id)
    # Stale snapshot beats the missing guest_memfd too.
    assert vm.fault(FaultRequest(gpa=0x1000, mmu_seq=0)).outcome == "retry"


def test_rfc_v9_fault_order_and_exit_abi(make_vm: MakeVm) -> None:
    """v9 7/8: mismatch only checked on guest_memfd slots; its exit is reason 38, flag bit 0, no errno."""
    vm = make_vm("sw_protected", "rfc-v9")  # private by default
    vm.set_user_memory_region(0, region(0, 0x4000))  # plain slot
    r = vm.fault(FaultRequest(gpa=0, private=False))  # mismatch, but not a guest_memfd slot: maps shared
    assert r.outcome == "mapped" and not r.private
    r = vm.fault(FaultRequest(gpa=0x1000))  # private access, slot without guest_memfd
    assert r.outcome == "memory_fault_exit" and r.exit is not None
    assert (r.exit.reason_code, r.exit.flags, r.exit.errno) == (38, 1, None)
    add_gmem_slot(vm, raw=1, gpa=GIB4)
    r = vm.fault(FaultRequest(gpa=GIB4, private=False))  # mismatch on a guest_memfd slot
    assert r.exit is not None and (r.exit.reason_code, r.exit.flags, r.exit.errno) == (38, 0, None)
    assert vm.fault(FaultRequest(gpa=GIB4 + 0x1000)).outcome == "mapped"
    r = vm.fault(FaultRequest(gpa=8 * GIB4, private=False))  # no slot, shared
    assert r.outcome == "mmio_exit"


def test_event_ids_stay_in_order_through_notifier_events(make_vm: MakeVm) -> None:
    """Regression: notifier events once carried their invalidation id as the event's "id"."""
    vm = make_vm("default", "linux")
    vm.set_user_memory_region(0, region(0, 0x1000, hva=HVA))
    inv = vm.notifier_start(NotifierRequest(hva_start=HVA, hva_end=HVA + 0x1000))
    vm.notifier_end(inv.id)
    events, _ = vm.events_page(0, 100)
    assert [e["id"] for e in events] == list(range(1, len(events) + 1))
    assert [e["invalidation"] for e in events if e["type"].startswith("notifier_")] == [inv.id, inv.id]
