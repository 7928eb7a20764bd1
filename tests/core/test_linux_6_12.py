"""The linux-6.12 profile: Debian's 6.12.118, read in linux-source-6.12 (virt/kvm/guest_memfd.c,
kvm_main.c). What its KVM selftests and kvmprobe found under kvm-memattr exec, at the engine."""

from __future__ import annotations

import pytest

from app.core import Engine
from app.core.errors import EEXIST, EINVAL
from app.core.vm import VirtualMachine
from app.models.kvm import KvmCreateGuestMemfd, Semantics, VmType
from app.models.vm import VmCreate
from tests.core.conftest import GIB4, region

MIB2 = 0x20_0000


def vm_of(profile: str, vm_type: str = "sw_protected") -> VirtualMachine:
    return Engine().create_vm(VmCreate(type=VmType(vm_type), semantics=Semantics.linux, profile=profile))


def bind(vm: VirtualMachine, slot: int, gpa: int, fd: int, off: int = 0, size: int = MIB2) -> None:
    vm.set_user_memory_region(slot, region(gpa, size, hva=0, flags=4, fd=fd, off=off))


@pytest.mark.parametrize(("profile", "errno"), [("linux-6.12", EEXIST), ("linux-6.18", EINVAL), ("linux-7.3", EEXIST)])
def test_a_binding_over_another_in_the_file_at_another_gpa(profile: str, errno: type[Exception]) -> None:
    """6.12.118's kvm_gmem_commit_memory_region() and 7.2's kvm_gmem_bind(): -EEXIST; 6.18: -EINVAL."""
    vm = vm_of(profile)
    fd = vm.create_guest_memfd(KvmCreateGuestMemfd(size=2 * MIB2)).fd
    bind(vm, 10, GIB4, fd)
    with pytest.raises(errno):
        bind(vm, 11, 2 * GIB4, fd)
    bind(vm, 11, 2 * GIB4, fd, off=MIB2)  # the other half of the file is free


def test_6_12_finds_the_overlap_after_the_arch_checks() -> None:
    """kvm_set_memslot(): kvm_prepare_memory_region() (max_gfn: EINVAL) before the commit's EEXIST."""
    for profile, errno in (("linux-6.12", EINVAL), ("linux-7.3", EEXIST)):
        vm = vm_of(profile)
        fd = vm.create_guest_memfd(KvmCreateGuestMemfd(size=MIB2)).fd
        bind(vm, 10, GIB4, fd)
        past_max_gfn = (vm.kvm.host.max_gfn + 1) << 12
        with pytest.raises(errno):
            bind(vm, 11, past_max_gfn, fd)


def test_6_12_compares_the_binding_end_unsigned() -> None:
    """kvm_gmem_prepare_memory_region(): u64 offset + size > i_size (6.12.114). 6.18's loff_t lets an
    end at 2^63 wrap negative and pass (verify-host found it on a real 6.18 host)."""
    offset = (1 << 63) - 0x1000
    for profile, accepted in (("linux-6.12", False), ("linux-6.18", True)):
        vm = vm_of(profile)
        fd = vm.create_guest_memfd(KvmCreateGuestMemfd(size=MIB2)).fd
        if accepted:
            bind(vm, 10, GIB4, fd, off=offset, size=0x1000)
        else:
            with pytest.raises(EINVAL):
                bind(vm, 10, GIB4, fd, off=offset, size=0x1000)


def test_6_12_binds_guest_memfd_only_in_vms_with_private_memory() -> None:
    """check_memory_region_flags(): KVM_MEM_GUEST_MEMFD only if kvm_arch_has_private_mem(); a VM fd
    answers KVM_CAP_GUEST_MEMFD the same way. Creating the file is allowed on any VM."""
    old, new = vm_of("linux-6.12", "default"), vm_of("linux-6.18", "default")
    for vm in (old, new):
        fd = vm.create_guest_memfd(KvmCreateGuestMemfd(size=MIB2)).fd
        if vm is old:
            with pytest.raises(EINVAL):
                bind(vm, 0, 0, fd)
        else:
            bind(vm, 0, 0, fd)
    assert (old.capabilities()["KVM_CAP_GUEST_MEMFD"], new.capabilities()["KVM_CAP_GUEST_MEMFD"]) == (0, 1)
    assert vm_of("linux-6.12").capabilities()["KVM_CAP_GUEST_MEMFD"] == 1
    assert vm_of("linux-6.12").capabilities()["KVM_CAP_GUEST_MEMFD_FLAGS"] == 0  # kvm_gmem_create(): no flags
