"""The kernel interface of the bridge: seccomp user notification, the program's memory, inotify.

Standard library only (``ctypes`` for the calls Python lacks, ``fcntl.ioctl`` on the listener).
Numbers and layouts are x86-64's, from ``include/uapi/linux/seccomp.h``, ``filter.h``,
``inotify.h`` and ``arch/x86/entry/syscalls/syscall_64.tbl``.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import os
import platform
import signal
import struct
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

FAKE_FD_BASE = 600
"""Injected fds are placed from here up: the filter traps file calls only on fds this high, so a
program's own files cost nothing (an fd below it that a program ``dup2()``s there is not seen)."""

# syscall numbers (x86-64)
NR = {
    "read": 0,
    "write": 1,
    "open": 2,
    "close": 3,
    "fstat": 5,
    "lseek": 8,
    "mmap": 9,
    "ioctl": 16,
    "pread64": 17,
    "pwrite64": 18,
    "readv": 19,
    "writev": 20,
    "dup2": 33,
    "execve": 59,
    "ftruncate": 77,
    "openat": 257,
    "newfstatat": 262,
    "fallocate": 285,
    "dup3": 292,
    "preadv": 295,
    "pwritev": 296,
    "seccomp": 317,
    "execveat": 322,
    "preadv2": 327,
    "pwritev2": 328,
    "statx": 332,
    "close_range": 436,
    "openat2": 437,
}
NAMES = {v: k for k, v in NR.items()}
OPENS = ("open", "openat", "openat2")
FD_CALLS = (
    "read",
    "write",
    "pread64",
    "pwrite64",
    "readv",
    "writev",
    "preadv",
    "pwritev",
    "preadv2",
    "pwritev2",
    "ftruncate",
    "fallocate",
    "fstat",
    "newfstatat",
    "statx",
    "lseek",
)
"""File calls trapped on fds >= FAKE_FD_BASE, by their first argument; ``mmap`` by its fifth."""
FD_TABLE_CALLS = ("close", "dup2", "dup3", "close_range", "execve", "execveat")
"""What changes which file an fd >= FAKE_FD_BASE is (``close`` and ``dup2``/``dup3`` onto one,
``close_range`` up to one, exec closing CLOEXEC fds): trapped so that the supervisor forgets what
it knew of them, then run as they are."""

AUDIT_ARCH_X86_64 = 0xC000003E
X32_SYSCALL_BIT = 0x40000000
KVM_IOCTL_TYPE = 0xAE00

SECCOMP_SET_MODE_FILTER = 1
SECCOMP_FILTER_FLAG_NEW_LISTENER = 1 << 3
SECCOMP_FILTER_FLAG_WAIT_KILLABLE_RECV = 1 << 5
SECCOMP_RET_KILL_PROCESS = 0x80000000
SECCOMP_RET_ERRNO = 0x00050000
SECCOMP_RET_USER_NOTIF = 0x7FC00000
SECCOMP_RET_ALLOW = 0x7FFF0000
SECCOMP_USER_NOTIF_FLAG_CONTINUE = 1
SECCOMP_ADDFD_FLAG_SETFD = 1
SECCOMP_ADDFD_FLAG_SEND = 2
SECCOMP_USER_NOTIF_FD_SYNC_WAKE_UP = 1
PR_SET_PDEATHSIG = 1
PR_SET_NO_NEW_PRIVS = 38

_NOTIF = struct.Struct("=QIIiIQ6Q")  # struct seccomp_notif: id, pid, flags, then struct seccomp_data
_RESP = struct.Struct("=QqiI")  # struct seccomp_notif_resp: id, val, error, flags
_ADDFD = struct.Struct("=QIIII")  # struct seccomp_notif_addfd: id, flags, srcfd, newfd, newfd_flags
_SECCOMP_IOC = ord("!")
NOTIF_RECV = (3 << 30) | (_NOTIF.size << 16) | (_SECCOMP_IOC << 8) | 0
NOTIF_SEND = (3 << 30) | (_RESP.size << 16) | (_SECCOMP_IOC << 8) | 1
NOTIF_ID_VALID = (1 << 30) | (8 << 16) | (_SECCOMP_IOC << 8) | 2
NOTIF_ADDFD = (1 << 30) | (_ADDFD.size << 16) | (_SECCOMP_IOC << 8) | 3
NOTIF_SET_FLAGS = (1 << 30) | (8 << 16) | (_SECCOMP_IOC << 8) | 4
_ZERO_NOTIF = bytes(_NOTIF.size)

# BPF (include/uapi/linux/bpf_common.h, filter.h)
_LD_W_ABS, _JEQ, _JGE, _JA, _AND, _RET = 0x20, 0x15, 0x35, 0x05, 0x54, 0x06
_INSN = struct.Struct("=HBBI")  # struct sock_filter
_DATA_NR, _DATA_ARCH = 0, 4


def _arg_lo(i: int) -> int:
    """Offset of the low 32 bits of ``seccomp_data.args[i]`` (little-endian)."""
    return 16 + 8 * i


Insn = tuple[int, str | int, str | int, int]
"""(code, jt, jf, k): jumps name a label or are 0; a label is ``(0, name, 0, 0)`` with code 0."""


def assemble(program: Sequence[Insn | str]) -> bytes:
    """A BPF program from instructions and label names (a str alone marks the next instruction)."""
    labels: dict[str, int] = {}
    insns: list[Insn] = []
    for item in program:
        if isinstance(item, str):
            labels[item] = len(insns)
        else:
            insns.append(item)

    def offset(pc: int, target: str | int) -> int:
        """A jump's distance: from the instruction after ``pc`` to the label."""
        return target if isinstance(target, int) else labels[target] - pc - 1

    out = bytearray()
    for pc, (code, jt, jf, k) in enumerate(insns):
        if code == _JA:
            k, jt, jf = offset(pc, jt), 0, 0
        out += _INSN.pack(code, offset(pc, jt), offset(pc, jf), k)
    return bytes(out)


def filter_program() -> bytes:
    """The filter: opens and execs always, ioctls of KVM's type, file calls on fds >= FAKE_FD_BASE
    and what changes those fds go to the supervisor; everything else is allowed. Another ABI (x32, i386) cannot reach KVM unseen: i386
    is killed, x32 answered ENOSYS."""
    fd_calls = [(_JEQ, "fd_arg0", 0, NR[name]) for name in (*FD_CALLS, "close")]
    return assemble(
        [
            (_LD_W_ABS, 0, 0, _DATA_ARCH),
            (_JEQ, 0, "kill", AUDIT_ARCH_X86_64),
            (_LD_W_ABS, 0, 0, _DATA_NR),
            (_JGE, "enosys", 0, X32_SYSCALL_BIT),
            *[(_JEQ, "notify", 0, NR[name]) for name in (*OPENS, "execve", "execveat")],
            (_JEQ, "ioctl", 0, NR["ioctl"]),
            (_JEQ, "fd_arg4", 0, NR["mmap"]),
            *fd_calls,
            *[(_JEQ, "fd_arg1", 0, NR[name]) for name in ("dup2", "dup3", "close_range")],
            (_RET, 0, 0, SECCOMP_RET_ALLOW),
            "fd_arg1",  # the new fd, or close_range's last (unsigned: ~0U closes them all)
            (_LD_W_ABS, 0, 0, _arg_lo(1)),
            (_JGE, "notify", "allow", FAKE_FD_BASE),
            "ioctl",
            (_LD_W_ABS, 0, 0, _arg_lo(1)),
            (_AND, 0, 0, 0xFF00),
            (_JEQ, "notify", "allow", KVM_IOCTL_TYPE),
            "fd_arg4",
            (_LD_W_ABS, 0, 0, _arg_lo(4)),
            (_JA, "fd_check", 0, 0),
            "fd_arg0",
            (_LD_W_ABS, 0, 0, _arg_lo(0)),
            "fd_check",
            (_JGE, 0, "allow", FAKE_FD_BASE),
            (_JGE, "allow", "notify", 0x80000000),  # a negative int (-1, AT_FDCWD) is no fd of ours
            "notify",
            (_RET, 0, 0, SECCOMP_RET_USER_NOTIF),
            "allow",
            (_RET, 0, 0, SECCOMP_RET_ALLOW),
            "kill",
            (_RET, 0, 0, SECCOMP_RET_KILL_PROCESS),
            "enosys",
            (_RET, 0, 0, SECCOMP_RET_ERRNO | errno.ENOSYS),
        ]
    )


# ------------------------------------------------------------------ libc

_libc = ctypes.CDLL(None, use_errno=True)
_syscall = _libc.syscall
_syscall.restype = ctypes.c_long


class _Iovec(ctypes.Structure):
    _fields_ = [("base", ctypes.c_void_p), ("len", ctypes.c_size_t)]


class _Fprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_char_p)]


def _prototype(name: str, *argtypes: type) -> Any:
    fn = getattr(_libc, name)
    fn.argtypes = list(argtypes)
    fn.restype = ctypes.c_ssize_t if name.startswith("process_vm") else ctypes.c_int
    return fn


_iov = ctypes.POINTER(_Iovec)
_process_vm_readv = _prototype(
    "process_vm_readv", ctypes.c_int, _iov, ctypes.c_ulong, _iov, ctypes.c_ulong, ctypes.c_ulong
)
_process_vm_writev = _prototype(
    "process_vm_writev", ctypes.c_int, _iov, ctypes.c_ulong, _iov, ctypes.c_ulong, ctypes.c_ulong
)
_prctl = _prototype("prctl", ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong)
_inotify_init1 = _prototype("inotify_init1", ctypes.c_int)
_inotify_add_watch = _prototype("inotify_add_watch", ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32)
_inotify_rm_watch = _prototype("inotify_rm_watch", ctypes.c_int, ctypes.c_int)
_fallocate = _prototype("fallocate", ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long)


def _check(result: int) -> int:
    if result < 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))
    return result


def supported() -> str | None:
    """Why this machine cannot run the bridge, or None: x86-64 Linux with seccomp user notification."""
    if platform.system() != "Linux" or platform.machine() != "x86_64":
        return f"the bridge needs Linux on x86-64 (this is {platform.system()} on {platform.machine()})"
    if not os.path.exists("/proc/self/fd"):
        return "the bridge needs /proc"
    return None


def install_filter() -> int:
    """In the child, before exec: ``PR_SET_NO_NEW_PRIVS``, then the filter; the listener fd.
    ``WAIT_KILLABLE_RECV`` (5.19) keeps a signal from restarting a trapped call the supervisor is
    already serving; an older kernel runs without it."""
    _check(_prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0))
    code = filter_program()
    prog = _Fprog(len(code) // _INSN.size, code)
    flags = SECCOMP_FILTER_FLAG_NEW_LISTENER | SECCOMP_FILTER_FLAG_WAIT_KILLABLE_RECV
    args = (ctypes.c_long(NR["seccomp"]), ctypes.c_long(SECCOMP_SET_MODE_FILTER))
    fd = _syscall(*args, ctypes.c_long(flags), ctypes.byref(prog))
    if fd < 0 and ctypes.get_errno() == errno.EINVAL:
        fd = _syscall(*args, ctypes.c_long(SECCOMP_FILTER_FLAG_NEW_LISTENER), ctypes.byref(prog))
    return _check(fd)


def die_with_parent() -> None:
    """``PR_SET_PDEATHSIG(SIGKILL)``: the program dies with the supervisor, never left to find
    every trapped call failing with ENOSYS."""
    _check(_prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0))


@dataclass(slots=True)
class Notification:
    """One trapped call: ``pid`` is the calling thread's id (as the supervisor sees it)."""

    id: int
    pid: int
    nr: int
    args: tuple[int, ...]


class Listener:
    """The listener fd of the filter: receive a trapped call, answer it, hand the program a file."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        try:  # 6.6: the program and the supervisor hand over on one CPU, ~6 us a call instead of ~40
            fcntl.ioctl(fd, NOTIF_SET_FLAGS, SECCOMP_USER_NOTIF_FD_SYNC_WAKE_UP)
            self.sync_wake_up = True
        except OSError:
            self.sync_wake_up = False

    def receive(self) -> Notification | None:
        """The next trapped call (None: it went away before we took it, the caller was killed)."""
        buf = bytearray(_ZERO_NOTIF)
        try:
            fcntl.ioctl(self.fd, NOTIF_RECV, buf, True)
        except OSError as e:
            if e.errno in (errno.ENOENT, errno.EINTR):
                return None
            raise
        nid, pid, _, nr, _, _, *args = _NOTIF.unpack(buf)
        return Notification(nid, pid, nr, tuple(args))

    def _send(self, request: int, data: bytes) -> int:
        try:
            result: int = fcntl.ioctl(self.fd, request, bytearray(data), True)
            return result
        except OSError as e:
            if e.errno == errno.ENOENT:  # the caller is gone (killed, or its pid reused)
                return -1
            raise

    def answer(self, nid: int, value: int = 0, error: int = 0) -> None:
        """The trapped call returns ``value``, or fails with ``error`` (a positive errno)."""
        self._send(NOTIF_SEND, _RESP.pack(nid, value, -error if error else 0, 0))

    def proceed(self, nid: int) -> None:
        """The kernel runs the trapped call as if nothing had stopped it."""
        self._send(NOTIF_SEND, _RESP.pack(nid, 0, 0, SECCOMP_USER_NOTIF_FLAG_CONTINUE))

    def install_fd(self, nid: int, srcfd: int, newfd: int | None, cloexec: bool) -> int:
        """Put our ``srcfd`` into the caller's fd table (at ``newfd``, else the lowest free) and
        answer the call with that number in one step; -1 if the caller is gone."""
        flags = SECCOMP_ADDFD_FLAG_SEND | (SECCOMP_ADDFD_FLAG_SETFD if newfd is not None else 0)
        return self._send(NOTIF_ADDFD, _ADDFD.pack(nid, flags, srcfd, newfd or 0, os.O_CLOEXEC if cloexec else 0))

    def valid(self, nid: int) -> bool:
        """Whether the call still waits (its thread was not killed, its pid not reused): checked
        after reading the caller's memory and before acting on it."""
        return self._send(NOTIF_ID_VALID, struct.pack("=Q", nid)) == 0

    def close(self) -> None:
        os.close(self.fd)


class Memory:
    """The memory of a traced thread: read through ``/proc/TID/mem`` when it is kept open (one
    ``pread``; the supervisor keeps it while the thread lives and has not exec'd), else with
    ``process_vm_readv``; written with ``process_vm_writev``, which keeps page protections as
    ``copy_to_user()`` does. Both need ptrace-attach rights (a parent has them over its child); a
    bad address fails with EFAULT, as ``copy_from_user()``."""

    _buf = ctypes.create_string_buffer(4096)  # one supervisor thread: one buffer for every read
    _local = _Iovec(ctypes.cast(_buf, ctypes.c_void_p), 0)
    _remote = _Iovec(0, 0)

    def __init__(self, pid: int, keep_open: bool = False) -> None:
        self.pid = pid
        self.fd = -1
        if keep_open:
            with contextlib.suppress(OSError):
                self.fd = os.open(f"/proc/{pid}/mem", os.O_RDONLY | os.O_CLOEXEC)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def read(self, addr: int, size: int) -> bytes:
        if self.fd >= 0:
            try:
                data = os.pread(self.fd, size, addr)
            except (OSError, OverflowError):  # unmapped (EIO), or past 2^63 (a kernel address)
                data = b""
            if len(data) == size:
                return data
        elif size <= len(self._buf):
            self._local.len = self._remote.len = size
            self._remote.base = addr
            if _process_vm_readv(self.pid, ctypes.byref(self._local), 1, ctypes.byref(self._remote), 1, 0) == size:
                return ctypes.string_at(self._buf, size)
        else:
            return b"".join(self.read(addr + at, min(4096, size - at)) for at in range(0, size, 4096))
        raise OSError(errno.EFAULT, f"cannot read {size} bytes at {addr:#x} of thread {self.pid}")

    def write(self, addr: int, data: bytes) -> None:
        buf = ctypes.create_string_buffer(data, len(data))
        local = _Iovec(ctypes.cast(buf, ctypes.c_void_p), len(data))
        remote = _Iovec(addr, len(data))
        n = _process_vm_writev(self.pid, ctypes.byref(local), 1, ctypes.byref(remote), 1, 0)
        if n != len(data):
            raise OSError(errno.EFAULT, f"cannot write {len(data)} bytes at {addr:#x} of thread {self.pid}")

    def read_string(self, addr: int, limit: int = 4096) -> bytes:
        """A NUL-terminated string, read a page at a time (it may end just before unmapped memory)."""
        out = b""
        while len(out) < limit:
            chunk = 4096 - (addr + len(out)) % 4096
            part = self.read(addr + len(out), chunk)
            end = part.find(b"\0")
            if end >= 0:
                return out + part[:end]
            out += part
        raise OSError(errno.ENAMETOOLONG, "path too long")


IN_CLOSE = 0x08 | 0x10  # IN_CLOSE_WRITE | IN_CLOSE_NOWRITE
IN_IGNORED = 0x8000
_EVENT = struct.Struct("=iIII")  # struct inotify_event without its name


class CloseWatch:
    """inotify ``IN_CLOSE`` on files: the event comes when a ``struct file`` is freed, after its
    last reference (every fd, dup, fork and mapping of it) is gone: ``kvm_gmem_release()``'s and
    ``kvm_vm_release()``'s moment."""

    def __init__(self) -> None:
        self.fd = _check(_inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC))

    def add(self, path: str) -> int:
        return _check(_inotify_add_watch(self.fd, os.fsencode(path), IN_CLOSE))

    def remove(self, wd: int) -> None:
        _inotify_rm_watch(self.fd, wd)  # gone already if its inode was: nothing to undo

    def events(self) -> Iterator[int]:
        """The watch descriptors of files closed since the last call."""
        while True:
            try:
                data = os.read(self.fd, 64 * 1024)
            except BlockingIOError:
                return
            at = 0
            while at < len(data):
                wd, mask, _, length = _EVENT.unpack_from(data, at)
                at += _EVENT.size + length
                if mask & IN_CLOSE:
                    yield wd

    def close(self) -> None:
        os.close(self.fd)


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    """``fallocate(2)`` on one of our own files (Python has only ``posix_fallocate``)."""
    _check(_fallocate(fd, mode, offset, length))


_STAT = struct.Struct("=QQQIIIiQqqq6q24x")  # struct stat (x86-64), 144 bytes
_STATX = struct.Struct("=IIQIIIHHQQQQ" + "qIi" * 4 + "IIII112x")  # struct statx, 256 bytes
STATX_BASIC_STATS = 0x7FF
assert (_STAT.size, _STATX.size) == (144, 256)


def pack_stat(st: os.stat_result, size: int) -> bytes:
    """``struct stat`` of a stand-in file, as the file it stands in for: its size, a page per block."""
    times = (st.st_atime_ns, st.st_mtime_ns, st.st_ctime_ns)
    return _STAT.pack(
        st.st_dev, st.st_ino, st.st_nlink, st.st_mode, st.st_uid, st.st_gid, 0, st.st_rdev, size, 4096, 0,
        *(part for ns in times for part in divmod(ns, 10**9)),
    )  # fmt: skip


def pack_statx(st: os.stat_result, size: int) -> bytes:
    """``struct statx`` (the basic fields) of a stand-in file, as ``pack_stat``."""
    atime, btime, ctime, mtime = (divmod(ns, 10**9) for ns in (st.st_atime_ns, 0, st.st_ctime_ns, st.st_mtime_ns))
    return _STATX.pack(
        STATX_BASIC_STATS, 4096, 0, st.st_nlink, st.st_uid, st.st_gid, st.st_mode, 0, st.st_ino, size, 0, 0,
        *atime, 0, *btime, 0, *ctime, 0, *mtime, 0,
        os.major(st.st_rdev), os.minor(st.st_rdev), os.major(st.st_dev), os.minor(st.st_dev),
    )  # fmt: skip
