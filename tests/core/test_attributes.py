"""semantics.md section 4: changing attributes under rfc-v9, linux and the SEV HVA path."""

from __future__ import annotations

import pytest

from app.core.errors import EINVAL, ENOMEM, ENOTTY, KvmError
from app.core.vm import VirtualMachine
from app.models.kvm import FaultRequest, KvmEncRegion, KvmMemoryAttributes
from tests.core.conftest import GIB4, HVA, MakeVm, add_gmem_slot, region

MIB2 = 0x200000
GFN4G = GIB4 >> 12


def attrs(address: int, size: int, attributes: int = 8, flags: int = 0) -> KvmMemoryAttributes:
    return KvmMemoryAttributes(address=address, size=size, attributes=attributes, flags=flags)


def runs(vm, start: int = 0, end: int = 1 << 52) -> list[tuple[int, int, int]]:  # type: ignore[no-untyped-def]
    return [(r.start_gfn, r.end_gfn, r.attributes) for r in vm.attribute_runs(start, end, 10_000)[0]]


# ---------------------------------------------------------------- defaults


@pytest.mark.parametrize(
    ("vm_type", "semantics", "default"),
    [
        ("sw_protected", "rfc-v9", 8),
        ("snp", "rfc-v9", 8),
        ("tdx", "rfc-v9", 8),
        ("default", "rfc-v9", 0),
        ("sev", "rfc-v9", 0),
        ("sw_protected", "linux", 0),
        ("default", "linux", 0),
    ],
)
def test_initial_attributes(make_vm: MakeVm, vm_type: str, semantics: str, default: int) -> None:
    assert runs(make_vm(vm_type, semantics)) == [(0, 1 << 52, default)]


# ---------------------------------------------------------------- rfc-v9


@pytest.mark.parametrize(
    ("addr", "size"),
    [(0, 0), (2**64 - 4096, 4096), (4096, 2**64 - 4096), (1, 4096), (0, 4095), (0x800, 0x1000)],
)
def test_rfc_v9_validation_is_einval_and_changes_nothing(make_vm: MakeVm, addr: int, size: int) -> None:
    vm = make_vm("sw_protected", "rfc-v9")
    with pytest.raises(EINVAL):
        vm.memory_encrypt_unreg_region(KvmEncRegion(addr=addr, size=size))
    assert vm.mmu_model().mmu_invalidate_seq == 0
    assert runs(vm) == [(0, 1 << 52, 8)]


def test_rfc_v9_always_invalidates_even_without_memslot_or_change(make_vm: MakeVm) -> None:
    vm = make_vm("sw_protected", "rfc-v9")
    up = vm.memory_encrypt_reg_region(KvmEncRegion(addr=GIB4, size=MIB2))  # already private, no slot
    assert up.invalidated and not up.noop and not up.tlb_flushed
    assert up.mmu.mmu_invalidate_seq == 1
    assert (up.mmu.mmu_invalidate_range_start, up.mmu.mmu_invalidate_range_end) == (GFN4G, GFN4G + 512)
    assert up.mmu.mmu_invalidate_in_progress == 0


def test_rfc_v9_unreg_then_reg(make_vm: MakeVm) -> None:
    vm = make_vm("sw_protected", "rfc-v9")
    vm.memory_encrypt_unreg_region(KvmEncRegion(addr=GIB4, size=MIB2))
    assert runs(vm, GFN4G - 1, GFN4G + 513) == [
        (GFN4G - 1, GFN4G, 8),
        (GFN4G, GFN4G + 512, 0),
        (GFN4G + 512, GFN4G + 513, 8),
    ]
    vm.memory_encrypt_reg_region(KvmEncRegion(addr=GIB4, size=MIB2))
    assert runs(vm) == [(0, 1 << 52, 8)]
    assert vm.mmu_model().stats.attribute_updates == 2


def test_rfc_v9_unmaps_every_mapping_in_range_and_flushes_once(make_vm: MakeVm) -> None:
    vm = make_vm("sw_protected", "rfc-v9")
    vm.set_user_memory_region(0, region(GIB4, MIB2))  # plain slot: shared pages only
    vm.set_user_memory_region(1 << 16 | 0, region(GIB4, MIB2, hva=HVA + MIB2))  # SMM address space
    vm.memory_encrypt_unreg_region(KvmEncRegion(addr=GIB4, size=MIB2))
    for as_id in (0, 1):
        for i in range(3):
            assert vm.fault(FaultRequest(gpa=GIB4 + i * 4096, as_id=as_id)).outcome == "mapped"
    up = vm.memory_encrypt_unreg_region(KvmEncRegion(addr=GIB4, size=4096 * 2))  # already shared: still unmaps
    assert (up.pages_zapped, up.tlb_flushed) == (4, True)
    assert up.mmu.mapped_pages == 2
    assert up.mmu.stats.tlb_flushes == 1


@pytest.mark.parametrize("start_gfn", [0, 5])
def test_rfc_v9_injected_failure_rolls_back_exactly_and_still_bumps_seq(make_vm: MakeVm, start_gfn: int) -> None:
    vm = make_vm("sw_protected", "rfc-v9")
    # A mixed previous state: gfn start+1 already shared (the review's third bug).
    vm.memory_encrypt_unreg_region(KvmEncRegion(addr=(start_gfn + 1) * 4096, size=4096))
    vm.set_user_memory_region(0, region(0, 64 * 4096))
    vm.fault(FaultRequest(gpa=(start_gfn + 1) * 4096))
    before, seq = runs(vm), vm.mmu_model().mmu_invalidate_seq
    vm.set_fault_injection(3)
    with pytest.raises(ENOMEM):
        vm.memory_encrypt_unreg_region(KvmEncRegion(addr=start_gfn * 4096, size=8 * 4096))
    mmu = vm.mmu_model()
    assert runs(vm) == before
    assert (mmu.mmu_invalidate_seq, mmu.mmu_invalidate_in_progress) == (seq + 1, 0)
    assert mmu.mapped_pages == 1, "the unmap is skipped on failure"
    assert vm.fault_injection().fail_nth is None


def test_fault_injection_beyond_range_completes_and_disarms(make_vm: MakeVm) -> None:
    vm = make_vm("sw_protected", "rfc-v9")
    vm.set_fault_injection(9)
    vm.memory_encrypt_unreg_region(KvmEncRegion(addr=0, size=8 * 4096))
    assert runs(vm)[0] == (0, 8, 0)
    assert vm.fault_injection().fail_nth is None


def test_fault_injection_rejects_zero(make_vm: MakeVm) -> None:
    with pytest.raises(EINVAL):
        make_vm().set_fault_injection(0)


@pytest.mark.parametrize(("vm_type", "semantics"), [("default", "rfc-v9"), ("sw_protected", "linux"), ("tdx", "linux")])
def test_enc_region_enotty_off_the_gpa_and_sev_paths(make_vm: MakeVm, vm_type: str, semantics: str) -> None:
    vm = make_vm(vm_type, semantics)
    vm.set_fault_injection(1)
    with pytest.raises(ENOTTY):
        vm.memory_encrypt_reg_region(KvmEncRegion(addr=0, size=4096))
    assert vm.fault_injection().fail_nth == 1, "a call refused with ENOTTY does not consume the injection"


def test_set_memory_attributes_enotty_under_rfc_v9(make_vm: MakeVm) -> None:
    with pytest.raises(ENOTTY):
        make_vm("sw_protected", "rfc-v9").set_memory_attributes(attrs(0, 4096))


# ---------------------------------------------------------------- linux


@pytest.mark.parametrize(
    ("vm_type", "req"),
    [
        ("sw_protected", attrs(0, 4096, flags=1)),
        ("sw_protected", attrs(0, 4096, attributes=1)),
        ("default", attrs(0, 4096, attributes=8)),
        ("sw_protected", attrs(0, 0)),
        ("sw_protected", attrs(2**64 - 4096, 4096)),
        ("sw_protected", attrs(4096, 1)),
        ("sw_protected", attrs(1, 4096)),
    ],
)
def test_linux_validation(make_vm: MakeVm, vm_type: str, req: KvmMemoryAttributes) -> None:
    vm = make_vm(vm_type, "linux")
    vm.set_fault_injection(1)
    with pytest.raises(EINVAL):
        vm.set_memory_attributes(req)
    assert vm.fault_injection().fail_nth == 1


def test_linux_no_memslot_check_no_max_gfn_and_no_invalidation(make_vm: MakeVm) -> None:
    vm = make_vm("sw_protected", "linux")
    top = (1 << 52) - 2  # the last page below 2^64 - 4096: a range ending at 2^64 wraps
    up = vm.set_memory_attributes(attrs(top << 12, 4096))
    assert (up.start_gfn, up.end_gfn, up.invalidated, up.noop) == (top, top + 1, False, False)
    assert up.mmu.mmu_invalidate_seq == 0
    assert up.mmu.mmu_invalidate_range_start is None
    assert runs(vm, top - 1, top + 1) == [(top - 1, top, 0), (top, top + 1, 8)]


def test_linux_noop_shortcut_does_not_bump_seq_or_consume_injection(make_vm: MakeVm) -> None:
    vm = make_vm("sw_protected", "linux")
    add_gmem_slot(vm)
    vm.set_fault_injection(1)
    up = vm.set_memory_attributes(attrs(GIB4, MIB2, attributes=0))
    assert up.noop and not up.invalidated
    assert up.mmu.mmu_invalidate_seq == 0
    assert vm.fault_injection().fail_nth == 1


def test_default_vm_accepts_attribute_zero_as_noop(make_vm: MakeVm) -> None:
    up = make_vm("default", "linux").set_memory_attributes(attrs(0, 1 << 30, attributes=0))
    assert up.noop


def test_linux_reservation_failure_changes_nothing(make_vm: MakeVm) -> None:
    vm = make_vm("sw_protected", "linux")
    add_gmem_slot(vm)
    vm.set_fault_injection(512)
    with pytest.raises(ENOMEM):
        vm.set_memory_attributes(attrs(GIB4, MIB2))
    mmu = vm.mmu_model()
    assert (mmu.mmu_invalidate_seq, mmu.mmu_invalidate_range_start) == (0, None)
    assert runs(vm) == [(0, 1 << 52, 0)]
    assert vm.fault_injection().fail_nth is None


def _shared_and_private_mapping(vm: VirtualMachine) -> None:
    add_gmem_slot(vm)
    vm.fault(FaultRequest(gpa=GIB4))  # shared mapping at gfn 0
    vm.set_memory_attributes(attrs(GIB4 + 4096, 4096))
    vm.fault(FaultRequest(gpa=GIB4 + 4096))  # private mapping at gfn 1


def test_linux_tdx_unmaps_only_the_opposite_kind(make_vm: MakeVm) -> None:
    """TDX keeps private SPTEs in the mirror root: the filter of the unmap is honoured."""
    vm = make_vm("tdx", "linux")
    _shared_and_private_mapping(vm)
    # To private over both: only the shared mapping goes.
    up = vm.set_memory_attributes(attrs(GIB4, 2 * 4096))
    assert (up.pages_zapped, up.tlb_flushed, up.invalidated) == (1, True, True)
    assert vm.gfn_info(GFN4G + 1).mappings[0].private
    # Already private where mapped: re-setting 4 pages private zaps nothing, but still invalidates.
    up = vm.set_memory_attributes(attrs(GIB4, 4 * 4096))
    assert (up.pages_zapped, up.tlb_flushed, up.invalidated) == (0, False, True)
    assert up.mmu.stats.tlb_flushes == 1
    up = vm.set_memory_attributes(attrs(GIB4, 4 * 4096, attributes=0))
    assert up.pages_zapped == 1


@pytest.mark.parametrize("vm_type", ["sw_protected", "snp"])
def test_linux_without_mirrored_tdp_unmaps_every_mapping_in_range(make_vm: MakeVm, vm_type: str) -> None:
    """kvm_gfn_range_filter_to_root_types(): without a mirror root the filter is ignored."""
    vm = make_vm(vm_type, "linux")
    _shared_and_private_mapping(vm)
    up = vm.set_memory_attributes(attrs(GIB4, 2 * 4096))
    assert (up.pages_zapped, up.tlb_flushed, up.invalidated) == (2, True, True)
    assert vm.gfn_info(GFN4G + 1).mappings == []
    assert up.mmu.mapped_pages == 0


def test_linux_hugepage_widening_of_the_recorded_range(make_vm: MakeVm) -> None:
    """kvm_arch_pre_set_memory_attributes(): uniform head/tail hugepages inside the slot widen the range."""
    vm = make_vm("sw_protected", "linux")
    add_gmem_slot(vm, size=0x4000_0000)  # 1 GiB at 4 GiB: gfns [0x100000, 0x140000)
    base = GFN4G
    up = vm.set_memory_attributes(attrs(GIB4 + 0x201000, 0x1000))  # gfn base + 0x201: inside one 2M page
    # The 2M page [base + 0x200, base + 0x400) and the 1G page [base, base + 0x40000) are uniform and in the slot.
    assert (up.mmu.mmu_invalidate_range_start, up.mmu.mmu_invalidate_range_end) == (base, base + 0x40000)
    # Now that 2M page is mixed: only the 1G page widens... which is mixed too. Nothing but the range itself.
    up = vm.set_memory_attributes(attrs(GIB4 + 0x203000, 0x1000))
    assert (up.mmu.mmu_invalidate_range_start, up.mmu.mmu_invalidate_range_end) == (base + 0x203, base + 0x204)
    # A neighbouring 2M page, still uniform: it widens (head), the 1G page does not (mixed).
    up = vm.set_memory_attributes(attrs(GIB4 + 0x401000, 0x2000))
    assert (up.mmu.mmu_invalidate_range_start, up.mmu.mmu_invalidate_range_end) == (base + 0x400, base + 0x600)
    # Only what changes is unmapped: a mapping in the widened part stays.
    vm.fault(FaultRequest(gpa=GIB4 + 0x600000))
    up = vm.set_memory_attributes(attrs(GIB4 + 0x601000, 0x1000))
    assert (up.mmu.mmu_invalidate_range_start, up.mmu.mmu_invalidate_range_end) == (base + 0x600, base + 0x800)
    assert up.pages_zapped == 0 and up.mmu.mapped_pages == 1


def test_linux_hugepage_widening_stays_inside_the_slot(make_vm: MakeVm) -> None:
    vm = make_vm("sw_protected", "linux")
    add_gmem_slot(vm, gpa=GIB4 + 0x1000, size=0x800000)  # starts one page into a 2M page
    up = vm.set_memory_attributes(attrs(GIB4 + 0x2000, 0x1000))
    # Head 2M page [base, base + 0x200) starts before the slot: no widening there.
    assert (up.mmu.mmu_invalidate_range_start, up.mmu.mmu_invalidate_range_end) == (GFN4G + 2, GFN4G + 3)
    # A range starting at a 2M page and ending inside it: that page widens it (the head).
    up = vm.set_memory_attributes(attrs(GIB4 + 0x200000, 0x3000))
    assert (up.mmu.mmu_invalidate_range_start, up.mmu.mmu_invalidate_range_end) == (GFN4G + 0x200, GFN4G + 0x400)
    # Crossing from one uniform 2M page into the next: head and tail both widen it.
    up = vm.set_memory_attributes(attrs(GIB4 + 0x5FF000, 0x2000))
    assert (up.mmu.mmu_invalidate_range_start, up.mmu.mmu_invalidate_range_end) == (GFN4G + 0x400, GFN4G + 0x800)


def test_linux_range_is_the_union_of_slot_intersections(make_vm: MakeVm) -> None:
    vm = make_vm("default", "linux")
    vm.set_user_memory_region(0, region(0x10000, 0x2000))
    vm.set_user_memory_region(1, region(0x20000, 0x1000, hva=HVA + 0x100000))
    up = vm.set_memory_attributes(attrs(0, 0x100000, attributes=0))
    assert up.noop
    vm2 = make_vm("sw_protected", "linux")
    vm2.set_user_memory_region(0, region(0x10000, 0x2000))
    vm2.set_user_memory_region(1, region(0x20000, 0x1000, hva=HVA + 0x100000))
    up = vm2.set_memory_attributes(attrs(0, 0x100000))
    assert (up.mmu.mmu_invalidate_range_start, up.mmu.mmu_invalidate_range_end) == (0x10, 0x21)
    assert up.mmu.mmu_invalidate_seq == 1


def test_attribute_budget(make_vm: MakeVm) -> None:
    from app.core import Engine, EngineLimits
    from app.models.vm import VmCreate

    vm = Engine(EngineLimits(max_attribute_runs=3)).create_vm(VmCreate(semantics="linux"))
    vm.set_memory_attributes(attrs(0, 4096))  # runs: [0,1) private, rest shared -> 2
    with pytest.raises(ENOMEM):
        vm.set_memory_attributes(attrs(0x10000, 4096))  # would make 4
    assert len(runs(vm)) == 2
    vm.set_memory_attributes(attrs(4096, 4096))  # coalesces: still 2
    rfc = Engine(EngineLimits(max_attribute_runs=2)).create_vm(VmCreate())
    rfc.memory_encrypt_unreg_region(KvmEncRegion(addr=0, size=4096))
    with pytest.raises(ENOMEM):
        rfc.memory_encrypt_unreg_region(KvmEncRegion(addr=0x10000, size=4096))
    assert rfc.mmu_model().mmu_invalidate_seq == 2, "rfc-v9 budget failure still bumps the seq"


# ---------------------------------------------------------------- SEV HVA path


@pytest.mark.parametrize(("vm_type", "semantics"), [("sev", "rfc-v9"), ("sev_es", "linux"), ("snp", "linux")])
def test_sev_pins_hva_regions(make_vm: MakeVm, vm_type: str, semantics: str) -> None:
    vm = make_vm(vm_type, semantics)
    r = KvmEncRegion(addr=HVA, size=0x1000)
    assert vm.memory_encrypt_reg_region(r).pinned_regions == 1  # type: ignore[union-attr]
    assert vm.memory_encrypt_reg_region(r).pinned_regions == 2  # type: ignore[union-attr]
    assert vm.memory_encrypt_reg_region(KvmEncRegion(addr=HVA + 1, size=7)).pinned_regions == 3  # type: ignore[union-attr]
    with pytest.raises(EINVAL):
        vm.memory_encrypt_unreg_region(KvmEncRegion(addr=HVA, size=0x2000))
    with pytest.raises(EINVAL):
        vm.memory_encrypt_reg_region(KvmEncRegion(addr=HVA, size=0))
    with pytest.raises(EINVAL):
        vm.memory_encrypt_reg_region(KvmEncRegion(addr=2**64 - 1, size=1))
    assert vm.memory_encrypt_unreg_region(r).pinned_regions == 2  # type: ignore[union-attr]
    assert [(p.addr, p.size) for p in vm.pinned_regions()] == [(HVA, 0x1000), (HVA + 1, 7)]
    assert vm.mmu_model().mmu_invalidate_seq == 0
    assert runs(vm) == [(0, 1 << 52, 0)]


def test_errors_carry_errno_names_and_values() -> None:
    err: KvmError = ENOMEM("x")
    assert (err.errno, err.errno_value) == ("ENOMEM", 12)
