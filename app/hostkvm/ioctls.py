"""A thin, typed layer over ``/dev/kvm``: one method per ioctl, the kernel's errno unchanged.

Only the ioctls that configure memory are here, and none touches guest memory:
``KVM_SET_USER_MEMORY_REGION(2)`` only range-checks ``userspace_addr``, so any user-half
address is safe to pass. Struct layouts are the uapi's (``include/uapi/linux/kvm.h``).
"""

from __future__ import annotations

import errno
import fcntl
import os
from types import TracebackType
from typing import Self

from app.models import uapi
from app.models.uapi import (
    KVM_CHECK_EXTENSION,
    KVM_CREATE_GUEST_MEMFD,
    KVM_CREATE_VM,
    KVM_GET_API_VERSION,
    KVM_SET_MEMORY_ATTRIBUTES,
    KVM_SET_USER_MEMORY_REGION,
    KVM_SET_USER_MEMORY_REGION2,
)

KVM_CAP_NR_MEMSLOTS = 10
KVM_CAP_READONLY_MEM = 81
KVM_CAP_MULTI_ADDRESS_SPACE = 118
KVM_CAP_USER_MEMORY2 = 231
KVM_CAP_MEMORY_ATTRIBUTES = 233
KVM_CAP_GUEST_MEMFD = 234
KVM_CAP_VM_TYPES = 235
KVM_CAP_GUEST_MEMFD_FLAGS = 244


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
        _ioctl(self.fd, KVM_SET_USER_MEMORY_REGION, uapi.REGION.pack(slot, flags, gpa, size, hva))

    def set_user_memory_region2(
        self, slot: int, flags: int, gpa: int, size: int, hva: int, guest_memfd: int = 0, offset: int = 0
    ) -> None:
        """``KVM_SET_USER_MEMORY_REGION2``."""
        arg = uapi.REGION2.pack(slot, flags, gpa, size, hva, offset, guest_memfd, 0)
        _ioctl(self.fd, KVM_SET_USER_MEMORY_REGION2, arg)

    def set_memory_attributes(self, address: int, size: int, attributes: int, flags: int = 0) -> None:
        """``KVM_SET_MEMORY_ATTRIBUTES``."""
        _ioctl(self.fd, KVM_SET_MEMORY_ATTRIBUTES, uapi.ATTRIBUTES.pack(address, size, attributes, flags))

    def create_guest_memfd(self, size: int, flags: int = 0) -> int:
        """``KVM_CREATE_GUEST_MEMFD``: the new file's fd."""
        return _ioctl(self.fd, KVM_CREATE_GUEST_MEMFD, uapi.CREATE_GUEST_MEMFD.pack(size, flags, *[0] * 6))

    def close(self) -> None:
        os.close(self.fd)
