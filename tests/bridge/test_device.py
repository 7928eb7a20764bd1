"""The bridge without a kernel: its BPF filter run by a small interpreter, and the device's ioctl
decoding with a caller made of bytes. These need no seccomp and run everywhere."""

from __future__ import annotations

import errno
import struct

import pytest

from app.bridge import seccomp
from app.bridge.backend import BridgeError, EngineBackend
from app.bridge.device import Call, Device, FakeFile, GmemFile, NewFile, VmFile
from app.models import uapi

# ------------------------------------------------------------------ the filter


def run_filter(nr: int, args: tuple[int, ...] = (0,) * 6, arch: int = seccomp.AUDIT_ARCH_X86_64) -> int:
    """Run the filter on one ``struct seccomp_data`` (the classic BPF it uses: ld, jeq, jge, ja,
    and, ret) and return its verdict."""
    data = struct.pack("=iIQ6Q", nr, arch, 0, *args)
    code = seccomp.filter_program()
    insns = [struct.unpack_from("=HBBI", code, at) for at in range(0, len(code), 8)]
    acc, pc = 0, 0
    while True:
        op, jt, jf, k = insns[pc]
        pc += 1
        if op == 0x20:
            acc = struct.unpack_from("=I", data, k)[0]
        elif op == 0x54:
            acc &= k
        elif op == 0x05:
            pc += k
        elif op in (0x15, 0x35):
            pc += jt if (acc == k if op == 0x15 else acc >= k) else jf
        elif op == 0x06:
            return k
        else:
            raise AssertionError(f"unexpected BPF op {op:#x}")


NOTIFY, ALLOW = seccomp.SECCOMP_RET_USER_NOTIF, seccomp.SECCOMP_RET_ALLOW
NR = seccomp.NR


@pytest.mark.parametrize(
    ("nr", "args", "verdict"),
    [
        (NR["openat"], (2**32 - 100, 0, 0, 0, 0, 0), NOTIFY),  # every open: BPF cannot read the path
        (NR["open"], (0,) * 6, NOTIFY),
        (NR["openat2"], (0,) * 6, NOTIFY),
        (NR["ioctl"], (3, uapi.KVM_CREATE_VM, 0, 0, 0, 0), NOTIFY),  # KVM's type byte, any fd
        (NR["ioctl"], (700, uapi.KVM_SET_USER_MEMORY_REGION2 | 1 << 32, 0, 0, 0, 0), NOTIFY),
        (NR["ioctl"], (1, 0x5401, 0, 0, 0, 0), ALLOW),  # TCGETS stays in the kernel
        (NR["read"], (3, 0, 0, 0, 0, 0), ALLOW),
        (NR["read"], (600, 0, 0, 0, 0, 0), NOTIFY),  # the fake fds' range
        (NR["fstat"], (599, 0, 0, 0, 0, 0), ALLOW),
        (NR["newfstatat"], (2**32 - 100, 0, 0, 0, 0, 0), ALLOW),  # AT_FDCWD
        (NR["newfstatat"], (601, 0, 0, 0, 0, 0), NOTIFY),
        (NR["mmap"], (0, 4096, 3, 0x22, 2**64 - 1, 0), ALLOW),  # anonymous: fd -1
        (NR["mmap"], (0, 4096, 3, 0x01, 601, 0), NOTIFY),
        (NR["fallocate"], (602, 3, 0, 4096, 0, 0), NOTIFY),
        (39, (0,) * 6, ALLOW),  # getpid
        (NR["close"], (3, 0, 0, 0, 0, 0), ALLOW),
        (NR["close"], (650, 0, 0, 0, 0, 0), NOTIFY),  # the supervisor forgets what fd 650 was
        (NR["dup2"], (3, 600, 0, 0, 0, 0), NOTIFY),
        (NR["dup3"], (601, 4, 0, 0, 0, 0), ALLOW),  # a fake fd copied below 600: not seen
        (NR["close_range"], (3, 2**32 - 1, 0, 0, 0, 0), NOTIFY),
        (NR["close_range"], (3, 100, 0, 0, 0, 0), ALLOW),
        (NR["execve"], (0,) * 6, NOTIFY),
        (NR["ioctl"] | seccomp.X32_SYSCALL_BIT, (3, uapi.KVM_CREATE_VM, 0, 0, 0, 0), 0x50000 | errno.ENOSYS),
    ],
)
def test_the_filter_traps_opens_kvm_ioctls_and_file_calls_on_fake_fds(
    nr: int, args: tuple[int, ...], verdict: int
) -> None:
    assert run_filter(nr, args) == verdict


def test_another_abi_is_killed() -> None:
    assert run_filter(54, arch=0x40000003) == seccomp.SECCOMP_RET_KILL_PROCESS  # i386's ioctl


# ------------------------------------------------------------------ the device, with bytes for a caller


class FakeCaller:
    """Memory at address 0x1000 onwards, and a table of the caller's fds."""

    def __init__(self, data: bytes = b"", fds: dict[int, FakeFile | bool] | None = None) -> None:
        self.mem = bytearray(0x1000) + bytearray(data) + bytearray(0x1000)
        self.fds = fds or {}

    def read(self, addr: int, size: int) -> bytes:
        if addr < 0x1000 or addr + size > len(self.mem):
            raise OSError(errno.EFAULT, "bad address")
        return bytes(self.mem[addr : addr + size])

    def write(self, addr: int, data: bytes) -> None:
        self.mem[addr : addr + len(data)] = data

    def tgid(self) -> int:
        return 100

    def in_group(self, tgid: int) -> bool:
        return tgid == 100

    def lookup(self, fd: int) -> FakeFile | bool:
        return self.fds.get(fd, False)


def call(f: FakeFile, request: int, arg: int = 0x1000, caller: FakeCaller | None = None) -> int | NewFile:
    return f.ioctl(Call(request, arg, caller or FakeCaller()))


@pytest.fixture
def device() -> Device:
    return Device(EngineBackend("linux-6.12"), "/usr/bin/qemu")


def errno_of(f: FakeFile, request: int, caller: FakeCaller) -> str:
    with pytest.raises(BridgeError) as e:
        call(f, request, caller=caller)
    return e.value.name


def test_supported_cpuid_says_e2big_until_nent_is_enough(device: Device) -> None:
    short = FakeCaller(struct.pack("=II", 1, 0) + bytes(40))
    assert errno_of(device.kvm, uapi.KVM_GET_SUPPORTED_CPUID, short) == "E2BIG"
    enough = FakeCaller(struct.pack("=II", 100, 0) + bytes(4000))
    assert call(device.kvm, uapi.KVM_GET_SUPPORTED_CPUID, caller=enough) == 0
    nent = struct.unpack_from("=I", enough.mem, 0x1000)[0]
    entries = [uapi.CPUID_ENTRY2.unpack_from(enough.mem, 0x1008 + 40 * i) for i in range(nent)]
    max_phys = {e[0]: e[3] for e in entries}[0x8000_0008]
    assert (max_phys & 0xFF, max_phys >> 8 & 0xFF) == (52, 48)  # the profile's max_gfn, 48 virtual bits


def test_a_guest_memfd_field_names_an_fd_of_the_caller(device: Device) -> None:
    """kvm_gmem_bind()'s fget(): not open is EBADF; open but not this VM's guest_memfd is EINVAL."""
    vm = call(device.kvm, uapi.KVM_CREATE_VM, 1)
    assert isinstance(vm, NewFile) and isinstance(vm.file, VmFile)
    gmem = call(
        vm.file, uapi.KVM_CREATE_GUEST_MEMFD, caller=FakeCaller(uapi.CREATE_GUEST_MEMFD.pack(1 << 21, 0, *[0] * 6))
    )
    assert isinstance(gmem, NewFile) and isinstance(gmem.file, GmemFile)

    def bind(fd: int, fds: dict[int, FakeFile | bool]) -> FakeCaller:
        region = uapi.REGION2.pack(10, 4, 1 << 32, 1 << 21, 0, 0, fd, 0)
        return FakeCaller(region, fds)

    assert errno_of(vm.file, uapi.KVM_SET_USER_MEMORY_REGION2, bind(7, {})) == "EBADF"
    assert errno_of(vm.file, uapi.KVM_SET_USER_MEMORY_REGION2, bind(7, {7: True})) == "EINVAL"
    assert errno_of(vm.file, uapi.KVM_SET_USER_MEMORY_REGION2, bind(7, {7: device.kvm})) == "EINVAL"
    assert call(vm.file, uapi.KVM_SET_USER_MEMORY_REGION2, caller=bind(9, {9: gmem.file})) == 0


def test_unserved_ioctls_are_enotty_and_bad_pointers_efault(device: Device) -> None:
    vm = call(device.kvm, uapi.KVM_CREATE_VM, 0)
    assert isinstance(vm, NewFile)
    assert errno_of(vm.file, 0xAE60, FakeCaller()) == "ENOTTY"  # KVM_CREATE_IRQCHIP: not served
    assert errno_of(device.kvm, 0xAE0A, FakeCaller()) == "ENOTTY"
    with pytest.raises(BridgeError) as e:
        call(vm.file, uapi.KVM_SET_MEMORY_ATTRIBUTES, arg=8)
    assert e.value.name == "EFAULT"
    other_process = FakeCaller()
    other_process.in_group = lambda tgid: False  # type: ignore[method-assign]
    assert errno_of(vm.file, uapi.KVM_CHECK_EXTENSION, other_process) == "EIO"
