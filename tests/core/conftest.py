from __future__ import annotations

from collections.abc import Callable

import pytest

from app.core import Engine, EngineLimits
from app.core.vm import VirtualMachine
from app.models.kvm import KvmCreateGuestMemfd, KvmUserspaceMemoryRegion2, Semantics, VmType
from app.models.vm import VmCreate

GIB4 = 0x1_0000_0000
HVA = 0x7F00_0000_0000

MakeVm = Callable[..., VirtualMachine]


@pytest.fixture
def engine() -> Engine:
    return Engine(EngineLimits())


@pytest.fixture
def make_vm(engine: Engine) -> MakeVm:
    def make(vm_type: str = "sw_protected", semantics: str = "linux") -> VirtualMachine:
        return engine.create_vm(VmCreate(type=VmType(vm_type), semantics=Semantics(semantics)))

    return make


def region(
    gpa: int, size: int, hva: int = HVA, flags: int = 0, fd: int | None = None, off: int = 0
) -> KvmUserspaceMemoryRegion2:
    return KvmUserspaceMemoryRegion2(
        flags=flags, guest_phys_addr=gpa, memory_size=size, userspace_addr=hva, guest_memfd=fd, guest_memfd_offset=off
    )


def add_gmem_slot(vm: VirtualMachine, raw: int = 10, gpa: int = GIB4, size: int = 0x400000, hva: int = HVA) -> int:
    """A guest_memfd-backed slot, as private_mem_conversions_test sets up."""
    fd = vm.create_guest_memfd(KvmCreateGuestMemfd(size=size)).fd
    vm.set_user_memory_region(raw, region(gpa, size, hva, flags=4, fd=fd))
    return fd
