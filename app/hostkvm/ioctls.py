"""A thin, typed layer over ``/dev/kvm``: one method per ioctl, the kernel's errno unchanged.

Only the ioctls that configure memory are here, and none touches guest memory:
``KVM_SET_USER_MEMORY_REGION(2)`` only range-checks ``userspace_addr``, so any user-half
address is safe to pass. Struct layouts are the uapi's (``include/uapi/linux/kvm.h``).
"""

from __future__ import annotations

import errno
import fcntl
import os
import struct
from types import TracebackType
from typing import Self

KVMIO = 0xAE
_IOC_WRITE, _IOC_READ = 1, 2


def _ioc(direction: int, nr: int, size: int) -> int:
    return (direction << 30) | (size << 16) | (KVMIO << 8) | nr


KVM_GET_API_VERSION = _ioc(0, 0x00, 0)
KVM_CREATE_VM = _ioc(0, 0x01, 0)
KVM_CHECK_EXTENSION = _ioc(0, 0x03, 0)
KVM_SET_USER_MEMORY_REGION = _ioc(_IOC_WRITE, 0x46, 32)
KVM_SET_USER_MEMORY_REGION2 = _ioc(_IOC_WRITE, 0x49, 160)
KVM_SET_MEMORY_ATTRIBUTES = _ioc(_IOC_WRITE, 0xD2, 32)
KVM_CREATE_GUEST_MEMFD = _ioc(_IOC_WRITE | _IOC_READ, 0xD4, 64)

KVM_CAP_NR_MEMSLOTS = 10
KVM_CAP_READONLY_MEM = 81
KVM_CAP_MULTI_ADDRESS_SPACE = 118
KVM_CAP_USER_MEMORY2 = 231
KVM_CAP_MEMORY_ATTRIBUTES = 233
KVM_CAP_GUEST_MEMFD = 234
KVM_CAP_VM_TYPES = 235
KVM_CAP_GUEST_MEMFD_FLAGS = 244

_REGION = struct.Struct("=IIQQQ")  # struct kvm_userspace_memory_region: 32 bytes
_REGION2 = struct.Struct("=IIQQQQII112x")  # struct kvm_userspace_memory_region2: 160 bytes
_ATTRIBUTES = struct.Struct("=QQQQ")  # struct kvm_memory_attributes: 32 bytes
_GMEM = struct.Struct("=QQ48x")  # struct kvm_create_guest_memfd: 64 bytes
assert (_REGION.size, _REGION2.size, _ATTRIBUTES.size, _GMEM.size) == (32, 160, 32, 64)


class HostKvmError(OSError):
    """An ioctl failed; ``errno_name`` is the kernel's errno, unchanged."""

    @property
    def errno_name(self) -> str:
        return errno.errorcode.get(self.errno or 0, str(self.errno))


def _ioctl(fd: int, request: int, arg: int | bytes) -> int:
    """The ioctl's return value; a struct goes in a mutable buffer, so Python hands that back."""
    try:
        if isinstance(arg, int):
            return fcntl.ioctl(fd, request, arg)
        result: int = fcntl.ioctl(fd, request, bytearray(arg), True)
        return result
    except OSError as e:
        raise HostKvmError(e.errno, os.strerror(e.errno or 0)) from None


class Kvm:
    """``/dev/kvm``: system-scope ioctls and ``KVM_CREATE_VM``."""

    def __init__(self, path: str = "/dev/kvm") -> None:
        try:
            self.fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except OSError as e:
            raise HostKvmError(e.errno, f"{path}: {os.strerror(e.errno or 0)}") from None

    def api_version(self) -> int:
        """``KVM_GET_API_VERSION``."""
        return _ioctl(self.fd, KVM_GET_API_VERSION, 0)

    def check_extension(self, cap: int) -> int:
        """``KVM_CHECK_EXTENSION`` on ``/dev/kvm``."""
        return _ioctl(self.fd, KVM_CHECK_EXTENSION, cap)

    def create_vm(self, vm_type: int = 0) -> VmFd:
        """``KVM_CREATE_VM``."""
        return VmFd(_ioctl(self.fd, KVM_CREATE_VM, vm_type))

    def close(self) -> None:
        os.close(self.fd)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: type[BaseException] | BaseException | TracebackType | None) -> None:
        self.close()


class VmFd:
    """A VM fd: its memory ioctls. Close it to destroy the VM."""

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def check_extension(self, cap: int) -> int:
        """``KVM_CHECK_EXTENSION`` on the VM fd."""
        return _ioctl(self.fd, KVM_CHECK_EXTENSION, cap)

    def set_user_memory_region(self, slot: int, flags: int, gpa: int, size: int, hva: int) -> None:
        """``KVM_SET_USER_MEMORY_REGION``."""
        _ioctl(self.fd, KVM_SET_USER_MEMORY_REGION, _REGION.pack(slot, flags, gpa, size, hva))

    def set_user_memory_region2(
        self, slot: int, flags: int, gpa: int, size: int, hva: int, guest_memfd: int = 0, offset: int = 0
    ) -> None:
        """``KVM_SET_USER_MEMORY_REGION2``."""
        arg = _REGION2.pack(slot, flags, gpa, size, hva, offset, guest_memfd, 0)
        _ioctl(self.fd, KVM_SET_USER_MEMORY_REGION2, arg)

    def set_memory_attributes(self, address: int, size: int, attributes: int, flags: int = 0) -> None:
        """``KVM_SET_MEMORY_ATTRIBUTES``."""
        _ioctl(self.fd, KVM_SET_MEMORY_ATTRIBUTES, _ATTRIBUTES.pack(address, size, attributes, flags))

    def create_guest_memfd(self, size: int, flags: int = 0) -> int:
        """``KVM_CREATE_GUEST_MEMFD``: the new file's fd."""
        return _ioctl(self.fd, KVM_CREATE_GUEST_MEMFD, _GMEM.pack(size, flags))

    def close(self) -> None:
        os.close(self.fd)
