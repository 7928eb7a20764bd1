"""The simulated device: the files a program gets from ``/dev/kvm`` and what each does with an ioctl
or a file call, decoded as ``virt/kvm/kvm_main.c`` decodes it and answered by the engine.

One class a file (``KvmFile``, ``VmFile``, ``VcpuFile``, ``GmemFile``), one method an ioctl. An
ioctl returns its value, a ``NewFile`` (the fd it makes) or raises ``BridgeError``; a file call
may also answer ``CONTINUE``: the kernel runs it on the file that stands in for ours (a memfd).
What is not served fails with ``ENOTTY`` (``--trace`` names it), and no guest code runs
(``KVM_RUN``: ``EOPNOTSUPP`` and one line on stderr).
"""

from __future__ import annotations

import errno
import os
import struct
import sys
from dataclasses import dataclass
from typing import ClassVar, Protocol

from app.bridge.backend import Backend, BridgeError
from app.core.errors import KvmError
from app.core.guest_memfd import check_mmap
from app.core.kvm import GuestMemfdFile
from app.models import uapi
from app.models.host import HostProfile
from app.models.kvm import (
    GUEST_MEMFD_FLAG_INIT_SHARED,
    GUEST_MEMFD_FLAG_MMAP,
    KVM_API_VERSION,
    KVM_MEM_GUEST_MEMFD,
    PAGE_SHIFT,
    PAGE_SIZE,
    KvmMemoryAttributes,
    KvmMemoryAttributes2,
    KvmUserspaceMemoryRegion2,
)

CONTINUE = object()
"""A file call's answer: run it in the kernel, on the memfd that stands in for the fake file."""

VCPU_MMAP_SIZE = 3 * PAGE_SIZE
"""``KVM_GET_VCPU_MMAP_SIZE`` on x86: ``struct kvm_run``, the PIO page, the coalesced MMIO ring."""
KVM_MAX_VCPUS = 4096
"""Debian's ``CONFIG_KVM_MAX_NR_VCPUS``; ``KVM_MAX_VCPU_IDS`` is 4 times as many."""
KVM_MAX_VCPU_IDS = 4 * KVM_MAX_VCPUS
NOT_OPEN = 0xFFFF_FFFF
"""The engine fd a ``guest_memfd`` field becomes when the program has no such fd: none, so EBADF."""
OPEN_NOT_GMEM = 0
"""... and when it names a file that is not a guest_memfd of this VM: stdio to the engine, EINVAL."""

GENERIC_CAPS = {
    9: min(os.cpu_count() or 1, KVM_MAX_VCPUS),  # KVM_CAP_NR_VCPUS
    21: 1,  # KVM_CAP_DESTROY_MEMORY_REGION_WORKS
    30: 1,  # KVM_CAP_JOIN_MEMORY_REGIONS_WORKS
    66: KVM_MAX_VCPUS,  # KVM_CAP_MAX_VCPUS
    105: 1,  # KVM_CAP_CHECK_EXTENSION_VM
    128: KVM_MAX_VCPU_IDS,  # KVM_CAP_MAX_VCPU_ID
    136: 1,  # KVM_CAP_IMMEDIATE_EXIT (the kernel selftests' library requires it)
}
"""``KVM_CHECK_EXTENSION`` answers beside the engine's (which a profile sets): what
``kvm_vm_ioctl_check_extension_generic()`` and x86 answer unconditionally and the bridge serves.
Every other capability is 0: not served."""


_DECIMAL = ("guest_memfd", "nent")
"""Fields ``--trace`` shows in decimal (an fd, a count); the rest are addresses, sizes, flags."""


class Caller(Protocol):
    """The thread that made the call, as the device may ask of it."""

    def read(self, addr: int, size: int) -> bytes: ...
    def write(self, addr: int, data: bytes) -> None: ...
    def tgid(self) -> int: ...
    def in_group(self, tgid: int) -> bool:
        """Whether it belongs to that thread group (``kvm->mm == current->mm``)."""
        ...

    def lookup(self, fd: int) -> FakeFile | bool:
        """Its fd -> our file, else whether it is open at all (another file)."""
        ...


@dataclass
class Call:
    """One ioctl as the caller made it."""

    request: int
    arg: int
    caller: Caller
    fields: dict[str, int] | None = None
    """The decoded argument, for ``--trace`` (formatted only there)."""

    def show(self) -> str:
        if self.fields is None:
            return hex(self.arg)
        return "{" + ", ".join(f"{k}={v}" if k in _DECIMAL else f"{k}={v:#x}" for k, v in self.fields.items()) + "}"

    def read(self, layout: struct.Struct) -> tuple[int, ...]:
        """``copy_from_user()`` of the argument: EFAULT where it cannot be read."""
        try:
            values = layout.unpack(self.caller.read(self.arg, layout.size))
        except OSError:
            raise BridgeError(errno.EFAULT, f"cannot read {layout.size} bytes at {self.arg:#x}") from None
        return values

    def write(self, layout: struct.Struct, *values: int) -> None:
        try:
            self.caller.write(self.arg, layout.pack(*values))
        except OSError:
            raise BridgeError(errno.EFAULT, f"cannot write {layout.size} bytes at {self.arg:#x}") from None


@dataclass
class NewFile:
    """An ioctl's answer that is a new fd (``anon_inode_getfd()``)."""

    file: FakeFile
    cloexec: bool


class FakeFile:
    """A file the program holds. A memfd stands in for it (``host_size()`` bytes long, what a host
    mapping of it may touch), so ``mmap`` of it is a real mapping."""

    kind: ClassVar[str]

    def __init__(self, device: Device) -> None:
        self.device = device
        self.memfd = -1
        """Our fd of the memfd (set by the supervisor)."""

    def ioctl(self, call: Call) -> int | NewFile:
        raise _not_served(self, call)

    def release(self) -> None:
        """The last reference went (``f_op->release``)."""

    def describe(self) -> str:
        return self.kind

    def created(self) -> str:
        """How ``--trace`` names it when the program gets it."""
        return self.describe()

    def host_size(self) -> int:
        return 0

    # file calls on it: what its f_op has, or lacks
    def io(self) -> object:
        """``read``/``write`` and kin, ``ftruncate``: no such op, EINVAL (``vfs_read()``)."""
        raise BridgeError(errno.EINVAL, f"{self.kind} has no read/write")

    def lseek(self) -> object:
        return 0  # noop_llseek: /dev/kvm, VM and vCPU fds stay at 0

    def fallocate(self, mode: int, offset: int, length: int) -> object:
        if offset >= 1 << 63 or length == 0 or length >= 1 << 63:
            raise BridgeError(errno.EINVAL, "fallocate offset < 0 or len <= 0")
        raise BridgeError(errno.ENODEV, f"{self.kind} is not a regular file (vfs_fallocate())")

    def stat_size(self) -> int | None:
        """The ``st_size`` to show instead of the memfd's, or None to let ``fstat`` run."""
        return None

    def mmap(self, offset: int, length: int, shared: bool) -> object:
        raise BridgeError(errno.ENODEV, f"{self.kind} has no mmap")


def _not_served(f: FakeFile, call: Call) -> BridgeError:
    return BridgeError(errno.ENOTTY, f"ioctl {uapi.ioctl_name(call.request)} on {f.kind}: not served by the bridge")


class KvmFile(FakeFile):
    """``/dev/kvm`` (``kvm_dev_ioctl()``). Stateless: every open shares one."""

    kind = "kvm"

    def ioctl(self, call: Call) -> int | NewFile:
        r, dev = call.request, self.device
        if r == uapi.KVM_CHECK_EXTENSION:
            return dev.check_extension(dev.system_caps, call.arg)
        if r == uapi.KVM_GET_API_VERSION:
            return _no_arg(call, KVM_API_VERSION)
        if r == uapi.KVM_CREATE_VM:
            tgid = call.caller.tgid()
            vm = dev.backend.create_vm(call.arg, dev.vm_name(tgid))
            return NewFile(VmFile(dev, vm, tgid), cloexec=True)
        if r == uapi.KVM_GET_VCPU_MMAP_SIZE:
            return _no_arg(call, VCPU_MMAP_SIZE)
        if r == uapi.KVM_GET_SUPPORTED_CPUID:
            return supported_cpuid(call, dev.backend.profile)
        raise _not_served(self, call)


def _no_arg(call: Call, value: int) -> int:
    if call.arg:
        raise BridgeError(errno.EINVAL, "the argument must be 0")
    return value


def supported_cpuid(call: Call, profile: HostProfile) -> int:
    """``KVM_GET_SUPPORTED_CPUID``, as a policy: the leaves that tell the address widths (what
    ``vm_create()`` in the kernel selftests reads): the physical one from the profile's
    ``max_gfn``, 48 virtual bits. The protocol is the kernel's: ``E2BIG`` while ``nent`` is short."""
    pa_bits = profile.max_gfn.bit_length() + PAGE_SHIFT
    vendor = _cpu_vendor()
    b, d, c = struct.unpack("=III", vendor)
    leaves = [
        (0, 1, b, c, d),
        (1, 0, 0, 0, 0),
        (0x8000_0000, 0x8000_0008, 0, 0, 0),
        (0x8000_0008, pa_bits | 48 << 8, 0, 0, 0),
    ]
    (nent, _) = call.read(uapi.CPUID2)
    call.fields = {"nent": nent}
    if nent < len(leaves):
        raise BridgeError(errno.E2BIG, f"nent {nent} < {len(leaves)} entries")
    entries = b"".join(uapi.CPUID_ENTRY2.pack(fn, 0, 0, a, eb, ec, ed) for fn, a, eb, ec, ed in leaves)
    try:
        call.caller.write(call.arg + uapi.CPUID2.size, entries)
    except OSError:
        raise BridgeError(errno.EFAULT, "cannot write the entries") from None
    call.write(uapi.CPUID2, len(leaves), 0)
    return 0


def _cpu_vendor() -> bytes:
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("vendor_id"):
                    vendor = line.split(":", 1)[1].strip().encode()
                    if len(vendor) == 12:
                        return vendor
    except OSError:
        pass
    return b"GenuineIntel"


class VmFile(FakeFile):
    """A VM fd (``kvm_vm_ioctl()``): the engine's VM ``vm``, created by thread group ``tgid``."""

    kind = "vm"

    def __init__(self, device: Device, vm: str, tgid: int) -> None:
        super().__init__(device)
        self.vm, self.tgid = vm, tgid
        self.vcpus: set[int] = set()
        self.caps: dict[int, int] | None = None

    def describe(self) -> str:
        return f"vm {self.vm[:8]}"

    def created(self) -> str:
        return f"vm {self.vm}"  # the whole id, as the API and the memory-map page name it

    def ioctl(self, call: Call) -> int | NewFile:
        if not call.caller.in_group(self.tgid):
            raise BridgeError(errno.EIO, "a VM fd used from another process (kvm->mm != current->mm)")
        r, backend = call.request, self.device.backend
        if r == uapi.KVM_SET_USER_MEMORY_REGION2 or r == uapi.KVM_SET_USER_MEMORY_REGION:
            slot, req = self._region(call)
            backend.set_memory_region(self.vm, slot, req)
            return 0
        if r == uapi.KVM_SET_MEMORY_ATTRIBUTES:
            address, size, attributes, flags = call.read(uapi.ATTRIBUTES)
            call.fields = {"address": address, "size": size, "attributes": attributes, "flags": flags}
            attrs = KvmMemoryAttributes.model_validate(
                {"address": address, "size": size, "attributes": attributes, "flags": flags}
            )
            backend.set_memory_attributes(self.vm, attrs)
            return 0
        if r == uapi.KVM_CHECK_EXTENSION:
            if self.caps is None:  # they are the VM's type's and host's: asked once
                self.caps = backend.vm_caps(self.vm)
            return self.device.check_extension(self.caps, call.arg)
        if r == uapi.KVM_CREATE_GUEST_MEMFD:
            size, flags, *_ = call.read(uapi.CREATE_GUEST_MEMFD)
            call.fields = {"size": size, "flags": flags}
            fd = backend.create_guest_memfd(self.vm, size, flags)
            return NewFile(GmemFile(self.device, self, fd, size, flags), cloexec=False)
        if r == uapi.KVM_MEMORY_ENCRYPT_REG_REGION or r == uapi.KVM_MEMORY_ENCRYPT_UNREG_REGION:
            addr, size = call.read(uapi.ENC_REGION)
            call.fields = {"addr": addr, "size": size}
            backend.enc_region(self.vm, r == uapi.KVM_MEMORY_ENCRYPT_REG_REGION, addr, size)
            return 0
        if r == uapi.KVM_CREATE_VCPU:
            return self._create_vcpu(call.arg)
        raise _not_served(self, call)

    def _region(self, call: Call) -> tuple[int, KvmUserspaceMemoryRegion2]:
        """``kvm_vm_ioctl()``'s copy of either struct into a ``kvm_userspace_memory_region2``; the
        guest_memfd field names an fd of the caller, which becomes the engine's fd for it."""
        gmem_fd: int | None = None
        offset = 0
        if call.request == uapi.KVM_SET_USER_MEMORY_REGION:
            slot, flags, gpa, size, hva = call.read(uapi.REGION)
            if flags & ~uapi.KVM_SET_USER_MEMORY_REGION_V1_FLAGS:
                raise BridgeError(errno.EINVAL, f"flags {flags:#x}: KVM_SET_USER_MEMORY_REGION takes only 0x3")
        else:
            slot, flags, gpa, size, hva, offset, fd, _ = call.read(uapi.REGION2)
            if flags & KVM_MEM_GUEST_MEMFD:
                gmem_fd = self._engine_fd(call, fd)
        call.fields = {"slot": slot, "flags": flags, "gpa": gpa, "size": size, "hva": hva}
        if gmem_fd is not None:
            call.fields |= {"guest_memfd_offset": offset, "guest_memfd": fd}
        req = KvmUserspaceMemoryRegion2.model_validate(
            {
                "flags": flags,
                "guest_phys_addr": gpa,
                "memory_size": size,
                "userspace_addr": hva,
                "guest_memfd": gmem_fd,
                "guest_memfd_offset": offset,
            }
        )
        return slot, req

    def _engine_fd(self, call: Call, fd: int) -> int:
        """``kvm_gmem_bind()``'s ``fget(fd)``, then ``f_op == &kvm_gmem_fops`` and ``gmem->kvm == kvm``."""
        found = call.caller.lookup(fd) if fd < 1 << 31 else False
        if isinstance(found, GmemFile) and found.vm is self:
            return found.fd
        return OPEN_NOT_GMEM if found else NOT_OPEN

    def _create_vcpu(self, vcpu_id: int) -> NewFile:
        """``kvm_vm_ioctl_create_vcpu()``'s checks; the vCPU is the bridge's (the engine has none)."""
        if vcpu_id >= KVM_MAX_VCPU_IDS:
            raise BridgeError(errno.EINVAL, f"vcpu id {vcpu_id} >= KVM_MAX_VCPU_IDS ({KVM_MAX_VCPU_IDS})")
        if len(self.vcpus) >= KVM_MAX_VCPUS:
            raise BridgeError(errno.EINVAL, f"{KVM_MAX_VCPUS} vCPUs already")
        if vcpu_id in self.vcpus:
            raise BridgeError(errno.EEXIST, f"vcpu {vcpu_id} exists")
        self.vcpus.add(vcpu_id)
        return NewFile(VcpuFile(self.device, self, vcpu_id), cloexec=True)

    def release(self) -> None:
        self.device.backend.destroy_vm(self.vm)


class VcpuFile(FakeFile):
    """A vCPU fd (``kvm_vcpu_ioctl()``): it takes ``KVM_PRE_FAULT_MEMORY``; it runs nothing."""

    kind = "vcpu"

    def __init__(self, device: Device, vm: VmFile, vcpu_id: int) -> None:
        super().__init__(device)
        self.vm, self.id = vm, vcpu_id
        self.warned = False

    def describe(self) -> str:
        return f"vcpu {self.id} of {self.vm.describe()}"

    def host_size(self) -> int:
        return VCPU_MMAP_SIZE  # kvm_vcpu_mmap(): struct kvm_run and its pages

    def mmap(self, offset: int, length: int, shared: bool) -> object:
        return CONTINUE  # a real mapping of the memfd: zeros, since nothing runs to fill struct kvm_run

    def ioctl(self, call: Call) -> int | NewFile:
        vm = self.vm
        if not call.caller.in_group(vm.tgid):
            raise BridgeError(errno.EIO, "a vCPU fd used from another process (kvm->mm != current->mm)")
        if call.request == uapi.KVM_PRE_FAULT_MEMORY:
            return self._pre_fault(call)
        if call.request == uapi.KVM_RUN:
            if not self.warned:
                self.warned = True
                print(
                    f"kvm-memattr exec: KVM_RUN on vCPU {self.id} of VM {vm.vm}: no guest code runs under the "
                    "bridge; it fails with EOPNOTSUPP",
                    file=sys.stderr,
                    flush=True,
                )
            raise BridgeError(errno.EOPNOTSUPP, "no guest code runs under the bridge")
        raise _not_served(self, call)

    def _pre_fault(self, call: Call) -> int:
        """``kvm_vcpu_pre_fault_memory()``: the range left is written back, done or not."""
        gpa, size, flags, *pad = call.read(uapi.PRE_FAULT_MEMORY)
        call.fields = {"gpa": gpa, "size": size, "flags": flags}
        if flags:
            raise BridgeError(errno.EINVAL, f"flags {flags:#x} must be 0")
        if gpa % PAGE_SIZE or size % PAGE_SIZE or gpa + size <= gpa or gpa + size >= 1 << 64:
            raise BridgeError(errno.EINVAL, "gpa and size must be page aligned, size > 0, no wrap")
        left_gpa, left_size = self.device.backend.prefault(self.vm.vm, gpa, size)
        call.write(uapi.PRE_FAULT_MEMORY, left_gpa, left_size, flags, *pad)
        return 0


class GmemFile(FakeFile):
    """A guest_memfd (``kvm_gmem_fops``): the engine's file ``fd`` of VM ``vm``."""

    kind = "guest_memfd"

    def __init__(self, device: Device, vm: VmFile, fd: int, size: int, flags: int) -> None:
        super().__init__(device)
        self.vm, self.fd, self.size, self.flags = vm, fd, size, flags

    def host_size(self) -> int:
        """Shared pages are the host's to touch: all of an INIT_SHARED file, none of another (a
        touch past the memfd's end is SIGBUS, as a private page's fault is)."""
        mapped = GUEST_MEMFD_FLAG_MMAP | GUEST_MEMFD_FLAG_INIT_SHARED
        return self.size if self.flags & mapped == mapped else 0

    def describe(self) -> str:
        return f"guest_memfd {self.fd} of {self.vm.describe()}"

    def ioctl(self, call: Call) -> int | NewFile:
        backend = self.device.backend
        if not backend.profile.gmem_in_place_conversion:  # kvm_gmem_fops has no unlocked_ioctl
            raise BridgeError(errno.ENOTTY, "guest_memfd has no ioctl on a host that does not convert in place")
        if call.request != uapi.KVM_SET_MEMORY_ATTRIBUTES2:
            raise _not_served(self, call)
        offset, size, attributes, flags, _, *reserved = call.read(uapi.ATTRIBUTES2)
        call.fields = {"offset": offset, "size": size, "attributes": attributes, "flags": flags}
        req = KvmMemoryAttributes2.model_validate(
            {
                "offset": offset,
                "size": size,
                "attributes": attributes,
                "flags": flags,
                "error_offset": 0,
                "reserved": reserved,
            }
        )
        try:
            backend.set_gmem_attributes(self.vm.vm, self.fd, req)
        except BridgeError as e:
            if e.error_offset is not None:
                call.write(uapi.ATTRIBUTES2, offset, size, attributes, flags, e.error_offset, *reserved)
            raise
        return 0

    def release(self) -> None:
        self.device.backend.close_guest_memfd(self.vm.vm, self.fd)

    def lseek(self) -> object:
        raise BridgeError(errno.ESPIPE, "guest_memfd has no llseek")

    def fallocate(self, mode: int, offset: int, length: int) -> object:
        self.device.backend.fallocate(self.vm.vm, self.fd, mode, offset, length)
        return 0

    def stat_size(self) -> int:
        return self.size

    def mmap(self, offset: int, length: int, shared: bool) -> object:
        """``do_mmap()``'s checks and ``kvm_gmem_mmap()``'s, the engine's; then a real mapping."""
        try:
            check_mmap(GuestMemfdFile(self.fd, self.size, self.flags), offset, length, shared)
        except KvmError as e:
            raise BridgeError(e.errno_value, e.detail) from None
        return CONTINUE


class Device:
    """The simulated ``/dev/kvm`` of one ``exec``: the backend, and its answers that are not the
    engine's (capabilities it does not model, VM names)."""

    def __init__(self, backend: Backend, program: str) -> None:
        self.backend = backend
        self.system_caps = backend.system_caps()
        self.kvm = KvmFile(self)
        self.program = os.path.basename(program)
        self._vms = 0

    def check_extension(self, caps: dict[int, int], cap: int) -> int:
        return caps.get(cap, GENERIC_CAPS.get(cap, 0))

    def vm_name(self, tgid: int) -> str:
        """What the service lists the VM as: the program, its pid, the how-manyth VM."""
        self._vms += 1
        return f"{self.program}[{tgid}] #{self._vms}"
