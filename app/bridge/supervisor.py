"""``kvm-memattr exec``: start the program under the filter, then serve its trapped calls until it
and every process it started are gone; its exit status is ours.

Which fake file an fd is: the inode behind ``/proc/TID/fd/N`` (``stat``), so dups, forks, exec and
threads all see the same file; remembered per thread until the thread exits (its pidfd says so) or
any fd from FAKE_FD_BASE up may have changed (a trapped ``close``, ``dup2``/``dup3``,
``close_range`` or exec). When a fake file is released: inotify ``IN_CLOSE`` on the memfd
that stands in for it (``CloseWatch``), after its last fd, dup or mapping is gone, as the kernel's
``release`` runs. A VM outlives its fd while its guest_memfds and vCPUs are open (each holds a
reference to the ``struct kvm``), and is destroyed in the engine with the last of them.
"""

from __future__ import annotations

import errno
import os
import select
import signal
import socket
import stat
import sys
from collections.abc import Callable
from typing import TextIO

from app.bridge import seccomp
from app.bridge.backend import Backend, BridgeError
from app.bridge.device import CONTINUE, Call, Device, FakeFile, GmemFile, NewFile, VcpuFile, VmFile
from app.bridge.seccomp import FAKE_FD_BASE, NAMES, NR, Notification
from app.models import uapi

AT_FDCWD = -100
AT_EMPTY_PATH = 0x1000
KVM_DEVICE = os.makedev(10, 232)
PIDFD_THREAD = os.O_EXCL
"""``pidfd_open()`` of a thread, not only of a process (6.9): readable when that thread exits."""
_READ_WRITE = {NR[n] for n in ("read", "write", "pread64", "pwrite64", "readv", "writev", "ftruncate")} | {
    NR[n] for n in ("preadv", "pwritev", "preadv2", "pwritev2")
}
FALLOC_FL_PUNCH_HOLE = 0x02


class Gone(Exception):
    """The trapped call went away (its thread was killed) while we served it: nothing to answer."""


def _int(value: int) -> int:
    """A syscall's ``int`` argument (fd, dirfd) from its 64-bit register."""
    value &= 0xFFFF_FFFF
    return value - (1 << 32) if value >= 1 << 31 else value


class Thread:
    """The caller of one trapped call, as the device asks of it (``device.Caller``)."""

    def __init__(self, sup: Supervisor, n: Notification) -> None:
        self.sup, self.n = sup, n
        self.mem = sup.memory(n.pid)

    def read(self, addr: int, size: int) -> bytes:
        data = self.mem.read(addr, size)
        self.check()
        return data

    def check(self) -> None:
        """Before acting on what was read: the call still waits (else the data may be a reused pid's)."""
        if not self.sup.listener.valid(self.n.id):
            raise Gone

    def write(self, addr: int, data: bytes) -> None:
        self.mem.write(addr, data)

    def tgid(self) -> int:
        with open(f"/proc/{self.n.pid}/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Tgid:"):
                    return int(line.split()[1])
        raise Gone

    def in_group(self, tgid: int) -> bool:
        tid = self.n.pid
        key = (tgid, tid)
        if tid == tgid or key in self.sup.members:
            return True
        if os.path.exists(f"/proc/{tgid}/task/{tid}"):
            self.sup.members.add(key)
            return True
        return False

    def lookup(self, fd: int) -> FakeFile | bool:
        return self.sup.file_at(self.n.pid, fd)


class Supervisor:
    """Serves one program's trapped calls from the device."""

    def __init__(self, device: Device, listener: seccomp.Listener, trace: TextIO | None) -> None:
        self.device, self.listener, self.trace = device, listener, trace
        self.watch = seccomp.CloseWatch()
        self.files: dict[tuple[int, int], FakeFile] = {}
        """Stand-in inode (st_dev, st_ino) -> its fake file."""
        self.watches: dict[int, tuple[tuple[int, int], FakeFile]] = {}
        self.members: set[tuple[int, int]] = set()
        """(tgid, tid) pairs seen: a thread of that process (while the thread lives)."""
        self.known: dict[tuple[int, int], FakeFile] = {}
        """(tid, fd) -> the fake file there, while the thread lives and its fds >= 600 stay put."""
        self.threads: dict[int, int] = {}
        """tid -> a pidfd of it, polled: when it exits, what was known of it goes (its tid may be reused)."""
        self.memories: dict[int, seccomp.Memory] = {}
        """tid -> its memory, kept open while the thread lives and has not exec'd."""
        self.poller = select.poll()
        self.refs: dict[VmFile, int] = {}
        """What holds each VM: its fd, its guest_memfds and vCPUs (``kvm_get_kvm()``)."""
        self._kvm_src = self._stand_in(device.kvm)  # /dev/kvm: one file for every open, never released

    # ------------------------------------------------------------------ the loop

    def serve(self, child: int) -> int:
        """Until the program is reaped and no process is left under the filter; its exit status."""
        pidfd = os.pidfd_open(child)
        for fd in (self.listener.fd, self.watch.fd, pidfd):
            self.poller.register(fd, select.POLLIN)
        status: int | None = None
        listening = True
        while listening or status is None:
            # A thread's exit before a trapped call in the same batch: its tid may be the caller's.
            for fd, events in sorted(self.poller.poll(), key=lambda e: e[0] == self.listener.fd):
                if fd == self.listener.fd:
                    if events & select.POLLIN:
                        n = self.listener.receive()
                        if n is not None:
                            self._handle(n)
                    elif events & (select.POLLHUP | select.POLLERR):  # no process left under the filter
                        self.poller.unregister(fd)
                        listening = False
                elif fd == self.watch.fd:
                    self.release_closed()
                elif fd == pidfd:
                    status = os.waitpid(child, 0)[1]
                    self.poller.unregister(pidfd)
                    os.close(pidfd)
                else:
                    self._thread_exited(fd)
        self.release_closed()
        self._forget_memories()
        for fd in list(self.threads.values()):
            os.close(fd)
        code = os.waitstatus_to_exitcode(status)
        return code if code >= 0 else 128 - code

    def _handle(self, n: Notification) -> None:
        name = NAMES.get(n.nr, str(n.nr))
        try:
            if name == "ioctl":
                self._ioctl(n)
            elif name in seccomp.OPENS:
                self._open(n, name)
            elif name in seccomp.FD_TABLE_CALLS:
                self.known.clear()  # whatever it closes or replaces: every thread's fds are looked up anew
                if name.startswith("exec"):  # a new mm: /proc/TID/mem opened before shows the old one
                    self._forget_memories()
                self._answer(n, lambda: f"{name}({', '.join(hex(a) for a in n.args[:3])})", CONTINUE)
            else:
                self._file_call(n, name)
        except Gone:
            self._log(n, lambda: f"{name}(...)", "caller gone")

    def _log(self, n: Notification, call: Callable[[], str], result: str) -> None:
        if self.trace is not None:
            print(f"[{n.pid}] {call()} = {result}", file=self.trace, flush=True)

    def _answer(self, n: Notification, call: Callable[[], str], result: object) -> None:
        """Send ``result``: a value, a ``BridgeError``, ``CONTINUE`` or a ``NewFile``; ``call``
        describes the call for ``--trace``."""
        if result is CONTINUE:
            self.listener.proceed(n.id)
            self._log(n, call, "(the kernel's)")
        elif isinstance(result, BridgeError):
            self.listener.answer(n.id, error=result.errno)
            self._log(n, call, f"-1 {result.name}: {result.detail}")
        elif isinstance(result, NewFile):
            fd = self._install(n, result.file, result.cloexec)
            self._log(n, call, f"{fd} [{result.file.created()}]")
        else:
            assert isinstance(result, int)
            self.listener.answer(n.id, value=result)
            self._log(n, call, str(result))

    # ------------------------------------------------------------------ which file

    def file_at(self, tid: int, fd: int) -> FakeFile | bool:
        """The fake file at the thread's ``fd``; else whether that fd is open at all."""
        found = self.known.get((tid, fd))
        if found is not None:
            return found
        try:
            st = os.stat(f"/proc/{tid}/fd/{fd}")
        except FileNotFoundError:
            return False
        except OSError as e:
            if e.errno == errno.ESRCH:
                raise Gone from None
            return False
        f = self.files.get((st.st_dev, st.st_ino))
        if f is None:
            return True
        if fd >= FAKE_FD_BASE and self._follow(tid):  # below it, a close or dup2 is not trapped
            self.known[(tid, fd)] = f
        return f

    def _follow(self, tid: int) -> bool:
        """Whether the thread's exit will be seen (a pidfd of it, polled)."""
        pidfd = self.threads.get(tid)
        if pidfd is None:
            try:
                pidfd = os.pidfd_open(tid, PIDFD_THREAD)
            except OSError:  # before 6.9, or gone: nothing is remembered of it
                return False
            self.threads[tid] = pidfd
            self.poller.register(pidfd, select.POLLIN)
        return True

    def _thread_exited(self, pidfd: int) -> None:
        tid = next(t for t, fd in self.threads.items() if fd == pidfd)
        del self.threads[tid]
        self.poller.unregister(pidfd)
        os.close(pidfd)
        self.known = {k: f for k, f in self.known.items() if k[0] != tid}
        self.members = {m for m in self.members if m[1] != tid}
        memory = self.memories.pop(tid, None)
        if memory is not None:
            memory.close()

    def memory(self, tid: int) -> seccomp.Memory:
        """The thread's memory: kept open while its exit can be seen (else opened for one call)."""
        memory = self.memories.get(tid)
        if memory is None:
            memory = seccomp.Memory(tid, keep_open=self._follow(tid))
            if memory.fd >= 0:
                self.memories[tid] = memory
        return memory

    def _forget_memories(self) -> None:
        for memory in self.memories.values():
            memory.close()
        self.memories.clear()

    def _fake(self, n: Notification, fd: int) -> FakeFile | None:
        found = self.file_at(n.pid, fd) if fd >= 0 else False
        return found if isinstance(found, FakeFile) else None

    # ------------------------------------------------------------------ ioctl

    def _ioctl(self, n: Notification) -> None:
        fd, request, arg = _int(n.args[0]), n.args[1] & 0xFFFF_FFFF, n.args[2]
        f = self._fake(n, fd)
        if f is None:  # a KVM ioctl on a file not ours (the real /dev/kvm, or a tty): the kernel's
            self._answer(n, lambda: f"ioctl({fd}, {uapi.ioctl_name(request)}, {arg:#x})", CONTINUE)
            return
        call = Call(request, arg, Thread(self, n))
        result: object
        try:
            result = f.ioctl(call)
        except BridgeError as e:
            result = e
        self._answer(n, lambda: f"ioctl({fd} [{f.describe()}], {uapi.ioctl_name(request)}, {call.show()})", result)

    # ------------------------------------------------------------------ open

    def _open(self, n: Notification, name: str) -> None:
        a = n.args
        if name == "open":
            dirfd, path_at, flags = AT_FDCWD, a[0], a[1]
        else:
            dirfd, path_at, flags = _int(a[0]), a[1], a[2]
        thread = Thread(self, n)
        try:
            path = thread.mem.read_string(path_at)
            if name == "openat2":
                flags = int.from_bytes(thread.read(a[2], 8), "little")  # struct open_how.flags
        except OSError:  # EFAULT, ENAMETOOLONG: the kernel says so itself
            self._answer(n, lambda: f"{name}(...)", CONTINUE)
            return

        def call() -> str:
            return f"{name}({dirfd if dirfd != AT_FDCWD else 'AT_FDCWD'}, {os.fsdecode(path)!r}, {flags:#o})"

        target = self._resolve(n.pid, dirfd, path)
        if target is None:
            self._answer(n, call, CONTINUE)
        elif isinstance(target, FakeFile):  # reopening one of ours through /proc: as a socket would
            self._answer(n, call, BridgeError(errno.ENXIO, f"{target.describe()} cannot be reopened"))
        else:
            thread.check()
            self._answer(n, call, NewFile(self.device.kvm, cloexec=bool(flags & os.O_CLOEXEC)))

    def _resolve(self, tid: int, dirfd: int, path: bytes) -> FakeFile | bool | None:
        """What the path opens, seen from the caller: ``/dev/kvm`` (True), one of our files (a
        ``/proc/self/fd/N`` of it), or something else (None). Resolved against the caller's cwd or
        dirfd, its ``/proc/self``, and symlinks; on a host without ``/dev/kvm``, by name."""
        text = os.fsdecode(path)
        if text == "/dev/kvm":
            return True
        if not text.startswith("/"):
            base = f"/proc/{tid}/cwd" if dirfd == AT_FDCWD else f"/proc/{tid}/fd/{dirfd}"
            text = f"{base}/{text}"
        for self_link in ("/proc/self", "/proc/thread-self"):
            if text == self_link or text.startswith(self_link + "/"):
                text = f"/proc/{tid}" + text[len(self_link) :]
        try:
            st = os.stat(text)
        except OSError:
            return True if os.path.realpath(text) == "/dev/kvm" else None
        if stat.S_ISCHR(st.st_mode) and st.st_rdev == KVM_DEVICE:
            return True
        return self.files.get((st.st_dev, st.st_ino))

    # ------------------------------------------------------------------ file calls on fds >= 600

    def _file_call(self, n: Notification, name: str) -> None:
        a = n.args
        fd = _int(a[4] if name == "mmap" else a[0])
        f = self._fake(n, fd)
        if f is None:
            self._answer(n, lambda: f"{name}({fd}, ...)", CONTINUE)
            return
        shown = {"mmap": (1, 2, 3, 5), "fallocate": (1, 2, 3), "lseek": (1, 2)}.get(name, ())

        def call() -> str:
            return f"{name}({fd} [{f.describe()}]{''.join(f', {a[i]:#x}' for i in shown)})"

        result: object
        try:
            result = self._on_file(n, f, name)
        except BridgeError as e:
            result = e
        self._answer(n, call, result)

    def _on_file(self, n: Notification, f: FakeFile, name: str) -> object:
        a = n.args
        if n.nr in _READ_WRITE:
            return f.io()
        if name == "lseek":
            return f.lseek()
        if name == "mmap":  # mmap(addr, len, prot, flags, fd, off)
            return f.mmap(a[5], a[1], a[3] & 0x0F in (0x01, 0x03))  # MAP_SHARED, MAP_SHARED_VALIDATE
        if name == "fallocate":  # fallocate(fd, mode, offset, len)
            mode = a[1] & 0xFFFF_FFFF
            result = f.fallocate(mode, a[2], a[3])
            if mode & FALLOC_FL_PUNCH_HOLE and f.host_size():  # what the host maps reads zeros after
                seccomp.fallocate(f.memfd, mode, a[2], a[3])
            return result
        # fstat(fd, buf), newfstatat(fd, "", buf, AT_EMPTY_PATH), statx(fd, "", AT_EMPTY_PATH, mask, buf)
        size = f.stat_size()
        if size is None:
            return CONTINUE
        thread = Thread(self, n)
        if name != "fstat":
            flags = a[3] if name == "newfstatat" else a[2]
            try:
                empty = thread.mem.read_string(a[1], 1) == b""
            except OSError:
                return CONTINUE
            if not (empty and flags & AT_EMPTY_PATH):
                return CONTINUE
        st = os.fstat(f.memfd)
        data = seccomp.pack_statx(st, size) if name == "statx" else seccomp.pack_stat(st, size)
        try:
            thread.write(a[4] if name == "statx" else a[1] if name == "fstat" else a[2], data)
        except OSError:
            return BridgeError(errno.EFAULT, "cannot write the stat buffer")
        return 0

    # ------------------------------------------------------------------ files in, files out

    def _stand_in(self, f: FakeFile) -> int:
        """A memfd for ``f`` (watched for its release), and a file of it to hand the program."""
        memfd = os.memfd_create(f.kind, os.MFD_CLOEXEC)
        os.ftruncate(memfd, f.host_size())
        link = f"/proc/self/fd/{memfd}"
        src = os.open(link, os.O_RDWR | os.O_CLOEXEC)  # memfd's own file sends no inotify events
        st = os.fstat(src)
        key = (st.st_dev, st.st_ino)
        f.memfd = memfd
        self.files[key] = f
        if f is not self.device.kvm:
            self.watches[self.watch.add(link)] = (key, f)
        return src

    def _install(self, n: Notification, f: FakeFile, cloexec: bool) -> int:
        """Give the caller a new fd of ``f``, from FAKE_FD_BASE up, as the call's return value."""
        shared = f is self.device.kvm
        src = self._kvm_src if shared else self._stand_in(f)
        if not shared:
            self._hold(f, +1)
        try:
            try:
                fd = self.listener.install_fd(n.id, src, self._free_fd(n.pid), cloexec)
            except OSError:  # past RLIMIT_NOFILE: the lowest free fd, as the kernel would give
                fd = self.listener.install_fd(n.id, src, None, cloexec)
        finally:
            if not shared:
                os.close(src)  # the program's is the last reference now (if it got one: else released)
        return fd

    def _free_fd(self, tid: int) -> int:
        try:
            used = {int(name) for name in os.listdir(f"/proc/{tid}/fd")}
        except OSError:
            raise Gone from None
        fd = FAKE_FD_BASE
        while fd in used:
            fd += 1
        return fd

    def _hold(self, f: FakeFile, delta: int) -> None:
        """Count the references to a VM: its own fd and each guest_memfd and vCPU made from it."""
        vm = f if isinstance(f, VmFile) else f.vm if isinstance(f, GmemFile | VcpuFile) else None
        if vm is None:
            return
        self.refs[vm] = self.refs.get(vm, 0) + delta
        if self.refs[vm] == 0:
            del self.refs[vm]
            self._release(vm)

    def release_closed(self) -> None:
        """Every fake file whose last reference went: ``release`` it (a VM with its last holder)."""
        for wd in self.watch.events():
            entry = self.watches.pop(wd, None)
            if entry is None:
                continue
            key, f = entry
            self.watch.remove(wd)
            del self.files[key]
            os.close(f.memfd)
            if not isinstance(f, VmFile):
                self._release(f)
            self._hold(f, -1)

    def _release(self, f: FakeFile) -> None:
        try:
            f.release()
            self._trace_release(f, "released")
        except BridgeError as e:
            self._trace_release(f, f"release failed: {e.name}: {e.detail}")

    def _trace_release(self, f: FakeFile, what: str) -> None:
        if self.trace is not None:
            print(f"[bridge] {f.describe()} {what}", file=self.trace, flush=True)


def run(argv: list[str], backend: Backend, trace: TextIO | None = None) -> int:
    """Run ``argv`` with ``/dev/kvm`` served from ``backend``; the program's exit status."""
    device = Device(backend, argv[0])
    ours, theirs = socket.socketpair()
    parent = os.getpid()
    sys.stdout.flush()
    sys.stderr.flush()
    child = os.fork()
    if child == 0:  # pragma: no cover - the child execs or exits
        ours.close()
        _exec_child(argv, theirs, parent)
    theirs.close()
    with ours:
        try:
            _, fds, _, _ = socket.recv_fds(ours, 1, 1)
        except OSError:
            fds = []
    if not fds:  # the child could not install the filter (it said why)
        return os.waitstatus_to_exitcode(os.waitpid(child, 0)[1])
    previous = {sig: signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGINT, signal.SIGQUIT)}
    listener = seccomp.Listener(fds[0])
    try:
        return Supervisor(device, listener, trace).serve(child)
    finally:
        listener.close()
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _exec_child(argv: list[str], sock: socket.socket, parent: int) -> None:  # pragma: no cover
    """In the child: die with the supervisor, install the filter, hand over its listener, exec."""
    try:
        seccomp.die_with_parent()
        if os.getppid() != parent:  # the supervisor died before PDEATHSIG was set
            os._exit(1)
        for sig in (signal.SIGPIPE, signal.SIGINT, signal.SIGQUIT, signal.SIGXFSZ):
            signal.signal(sig, signal.SIG_DFL)
        listener = seccomp.install_filter()
        socket.send_fds(sock, [b"L"], [listener])
        os.close(listener)
        sock.close()
    except BaseException as e:
        os.write(2, f"kvm-memattr exec: cannot install the seccomp filter: {e}\n".encode())
        os._exit(126)
    try:
        os.execvp(argv[0], argv)
    except OSError as e:
        os.write(2, f"kvm-memattr exec: {argv[0]}: {e.strerror}\n".encode())
        os._exit(127 if e.errno == errno.ENOENT else 126)
