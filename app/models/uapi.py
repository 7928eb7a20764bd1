"""The binary uapi: ioctl numbers and struct layouts of ``include/uapi/linux/kvm.h`` (x86-64).

What talks to a ``/dev/kvm`` in bytes shares these: ``app.hostkvm`` (the real device) and
``app.bridge`` (the simulated one, for unmodified programs). Standard library only.
"""

from __future__ import annotations

import struct

KVMIO = 0xAE
_IOC_NONE, _IOC_WRITE, _IOC_READ = 0, 1, 2


def ioc(direction: int, nr: int, size: int, kind: int = KVMIO) -> int:
    """``_IOC()`` of ``include/uapi/asm-generic/ioctl.h``."""
    return (direction << 30) | (size << 16) | (kind << 8) | nr


# struct layouts, little-endian x86-64, each asserted to the size the uapi gives it
REGION = struct.Struct("=IIQQQ")
"""``struct kvm_userspace_memory_region``: slot, flags, guest_phys_addr, memory_size, userspace_addr."""
REGION2 = struct.Struct("=IIQQQQII112x")
"""``struct kvm_userspace_memory_region2``: the same, then guest_memfd_offset, guest_memfd, pad1, pad2[14]."""
ATTRIBUTES = struct.Struct("=QQQQ")
"""``struct kvm_memory_attributes``: address, size, attributes, flags."""
ATTRIBUTES2 = struct.Struct("=QQQQQ11Q")
"""``struct kvm_memory_attributes2`` (in-place series v8): offset, size, attributes, flags, error_offset, reserved[11]."""
CREATE_GUEST_MEMFD = struct.Struct("=QQ6Q")
"""``struct kvm_create_guest_memfd``: size, flags, reserved[6]."""
ENC_REGION = struct.Struct("=QQ")
"""``struct kvm_enc_region``: addr, size."""
PRE_FAULT_MEMORY = struct.Struct("=QQQ5Q")
"""``struct kvm_pre_fault_memory``: gpa, size, flags, padding[5]."""
CPUID2 = struct.Struct("=II")
"""``struct kvm_cpuid2`` without its entries: nent, padding."""
CPUID_ENTRY2 = struct.Struct("=IIIIIII12x")
"""``struct kvm_cpuid_entry2``: function, index, flags, eax, ebx, ecx, edx, padding[3]."""
assert (REGION.size, REGION2.size, ATTRIBUTES.size, ATTRIBUTES2.size) == (32, 160, 32, 128)
assert (CREATE_GUEST_MEMFD.size, ENC_REGION.size, PRE_FAULT_MEMORY.size, CPUID_ENTRY2.size) == (64, 16, 64, 40)

# /dev/kvm
KVM_GET_API_VERSION = ioc(_IOC_NONE, 0x00, 0)
KVM_CREATE_VM = ioc(_IOC_NONE, 0x01, 0)
KVM_CHECK_EXTENSION = ioc(_IOC_NONE, 0x03, 0)
KVM_GET_VCPU_MMAP_SIZE = ioc(_IOC_NONE, 0x04, 0)
KVM_GET_SUPPORTED_CPUID = ioc(_IOC_READ | _IOC_WRITE, 0x05, CPUID2.size)
# a VM fd
KVM_CREATE_VCPU = ioc(_IOC_NONE, 0x41, 0)
KVM_SET_USER_MEMORY_REGION = ioc(_IOC_WRITE, 0x46, REGION.size)
KVM_SET_USER_MEMORY_REGION2 = ioc(_IOC_WRITE, 0x49, REGION2.size)
KVM_MEMORY_ENCRYPT_REG_REGION = ioc(_IOC_READ, 0xBB, ENC_REGION.size)
KVM_MEMORY_ENCRYPT_UNREG_REGION = ioc(_IOC_READ, 0xBC, ENC_REGION.size)
KVM_SET_MEMORY_ATTRIBUTES = ioc(_IOC_WRITE, 0xD2, ATTRIBUTES.size)
KVM_CREATE_GUEST_MEMFD = ioc(_IOC_READ | _IOC_WRITE, 0xD4, CREATE_GUEST_MEMFD.size)
# a vCPU fd
KVM_RUN = ioc(_IOC_NONE, 0x80, 0)
KVM_PRE_FAULT_MEMORY = ioc(_IOC_READ | _IOC_WRITE, 0xD5, PRE_FAULT_MEMORY.size)
# a guest_memfd (in place, 7.4): the VM ioctl's number with another size and direction
KVM_SET_MEMORY_ATTRIBUTES2 = ioc(_IOC_READ | _IOC_WRITE, 0xD2, ATTRIBUTES2.size)

KVM_SET_USER_MEMORY_REGION_V1_FLAGS = 0b11
"""``KVM_MEM_LOG_DIRTY_PAGES | KVM_MEM_READONLY``: what the v1 ioctl accepts (``kvm_vm_ioctl()``)."""

IOCTL_NAMES: dict[int, str] = {
    value: name for name, value in list(globals().items()) if name.startswith("KVM_") and value >> 8 & 0xFF == KVMIO
}
"""ioctl number -> its uapi name (for traces)."""


def ioctl_name(request: int) -> str:
    """The uapi name of an ioctl number, or the number in hex."""
    return IOCTL_NAMES.get(request, f"{request:#x}")
