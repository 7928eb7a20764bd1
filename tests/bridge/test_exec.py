"""``kvm-memattr exec``: an unmodified program's KVM calls answered by the engine, errno for errno.

kvmprobe (tests/bridge/kvmprobe.c) drives /dev/kvm as a VMM does and prints each call's result;
each test runs it under the bridge and checks what the kernel of the profile would answer.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from harness.live import ROOT, live_server
from tests.bridge.conftest import Probes, exec_argv, lines, run_exec

pytestmark = pytest.mark.usefixtures("bridge")


def probe_run(probe: str, mode: str = "memory", *options: str) -> dict[str, str]:
    done = run_exec(*options, "--", probe, mode)
    assert done.returncode == 0, done.stdout + done.stderr
    return lines(done.stdout)


def test_memslots_attributes_guest_memfd_and_errnos_as_linux_6_18(probe: Probes) -> None:
    out = probe_run(probe.dynamic)
    expected = {
        "KVM_GET_API_VERSION": "12",
        "KVM_GET_API_VERSION(1)": "EINVAL",  # kvm_dev_ioctl(): the argument must be 0
        "KVM_CHECK_EXTENSION(234)": "1",  # KVM_CAP_GUEST_MEMFD
        "KVM_CHECK_EXTENSION(235)": "63",  # KVM_CAP_VM_TYPES: all six
        "KVM_CREATE_VM(31)": "EINVAL",  # kvm_arch_init_vm(): no such type
        "KVM_CREATE_VM": "1",  # KVM_X86_SW_PROTECTED_VM
        "vm KVM_CHECK_EXTENSION(118)": "1",  # a private-memory VM has no SMM address space
        "region slot 0": "0",
        "region v1 GUEST_MEMFD": "EINVAL",  # kvm_vm_ioctl(): v1 takes LOG_DIRTY_PAGES | READONLY only
        "region unaligned size": "EINVAL",
        "region overlap": "EEXIST",
        "region move": "0",
        "region resize": "EINVAL",
        "region flags only": "0",
        "region delete absent": "EINVAL",
        "region slot id too big": "EINVAL",
        "region as_id 2": "EINVAL",
        "region hva above user": "EINVAL",
        "region bad pointer": "EFAULT",  # copy_from_user()
        "region2 unknown flag": "EINVAL",
        "attributes private": "0",
        "attributes flags": "EINVAL",
        "attributes unaligned": "EINVAL",
        "attributes size 0": "EINVAL",
        "attributes unknown bit": "EINVAL",
        "attributes shared": "0",
        "gmem size 0": "EINVAL",
        "gmem unaligned": "EINVAL",
        "gmem flag 63": "EINVAL",
        "gmem 4M": "0",
        "gmem st_size": str(4 << 20),  # fstat() shows the guest_memfd's size, not its stand-in's
        "gmem read": "EINVAL",  # kvm_gmem_fops has no read
        "gmem write": "EINVAL",
        "gmem mmap": "ENODEV",  # created without GUEST_MEMFD_FLAG_MMAP
        "gmem fallocate": "0",
        "gmem fallocate unaligned": "EINVAL",
        "gmem fallocate past end": "EINVAL",
        "gmem fallocate no KEEP_SIZE": "EOPNOTSUPP",
        "gmem punch hole": "0",
        "gmem SET_MEMORY_ATTRIBUTES2": "ENOTTY",  # no ioctl on guest_memfd before 7.4
        "bind": "0",
        "bind overlap in the file": "EINVAL",  # 6.18: kvm_gmem_bind()'s overlap is EINVAL
        "bind past the file": "EINVAL",
        "bind unaligned offset": "EINVAL",
        "bind kvm fd": "EINVAL",  # fget() finds it, but its f_op is not kvm_gmem_fops
        "bind closed fd": "EBADF",
        "bind READONLY": "EINVAL",
        "bind second half": "0",
        "gmem close": "0",
        "gmem ioctl after close": "EBADF",
        "rebind a new file": "0",
        "delete bound slot": "0",
        "default VM: bind": "0",  # 6.18: guest_memfd slots in any VM
        "KVM_GET_VCPU_MMAP_SIZE": "12288",
        "KVM_CREATE_VCPU": "0",
        "KVM_CREATE_VCPU again": "EEXIST",
        "KVM_PRE_FAULT_MEMORY flags": "EINVAL",
        "child: vm KVM_CHECK_EXTENSION": "EIO",  # kvm_vm_ioctl(): kvm->mm != current->mm
        "child: region": "EIO",
        "child: kvm KVM_GET_API_VERSION": "12",  # /dev/kvm has no owner
        "vm close": "0",
        "vm ioctl after close": "EBADF",
        "non-KVM ioctl on a pipe": "ENOTTY",  # not ours: the kernel answers
    }
    assert {k: out.get(k) for k in expected} == expected


def test_an_overlap_in_the_file_is_eexist_on_6_12_and_einval_on_6_18(probe: Probes) -> None:
    """Slot 11 binds the range of the file slot 10 has, at another gpa: 6.12.118's
    kvm_gmem_commit_memory_region() says EEXIST, 6.18's kvm_gmem_bind() EINVAL."""
    old, new = probe_run(probe.dynamic, "memory", "--profile", "linux-6.12"), probe_run(probe.dynamic)
    assert (old["bind overlap in the file"], new["bind overlap in the file"]) == ("EEXIST", "EINVAL")
    # and what else 6.12 lacks: guest_memfd flags, TDX, guest_memfd slots in a VM without private memory
    assert (old["KVM_CHECK_EXTENSION(244)"], old["KVM_CHECK_EXTENSION(235)"]) == ("0", "31")
    assert (old["default VM: bind"], new["default VM: bind"]) == ("EINVAL", "0")
    differ = {k for k in old if old[k] != new.get(k)}
    assert differ == {
        "KVM_CHECK_EXTENSION(235)",
        "KVM_CHECK_EXTENSION(244)",
        "vm KVM_CHECK_EXTENSION(235)",
        "vm KVM_CHECK_EXTENSION(244)",
        "bind overlap in the file",
        "default VM: bind",
    }


def test_a_static_binary_is_served_the_same(probe: Probes) -> None:
    """No dynamic loader, no libc wrapper to hook: the filter sees the syscalls themselves."""
    assert probe_run(probe.static) == probe_run(probe.dynamic)


def test_raw_syscall_instructions_are_served(probe: Probes) -> None:
    """What a Go program (no libc) does: openat and ioctl by the syscall instruction."""
    out = probe_run(probe.static, "raw")
    assert out == {
        "raw openat": "ok",
        "raw KVM_GET_API_VERSION": "12",
        "raw KVM_CHECK_EXTENSION(USER_MEMORY2)": "1",
        "raw KVM_CREATE_VM": "ok",
        "raw region": "0",
        "raw region unaligned": "EINVAL",
    }


def test_threads_calling_at_once_all_get_their_answers(probe: Probes) -> None:
    done = run_exec("--", probe.dynamic, "threads", "4")
    assert done.returncode == 0, done.stderr
    assert "threads 4 x 250 x 4 calls, wrong answers = 0" in done.stdout


def test_an_mmap_able_guest_memfd_is_host_memory(probe: Probes) -> None:
    """GUEST_MEMFD_FLAG_MMAP | INIT_SHARED (6.18): MAP_SHARED only, and a punched hole reads zeros."""
    out = probe_run(probe.dynamic, "mmap")
    assert out == {
        "gmem MMAP|INIT_SHARED": "0",
        "mmap MAP_PRIVATE": "EINVAL",  # kvm_gmem_mmap(): shared mappings only
        "mmap MAP_SHARED": "0",
        "read back": "42",
        "punch hole": "0",
        "read after punch": "0",
        "close while mapped": "0",
        "read after close": "0",  # the mapping holds the file
    }
    assert probe_run(probe.dynamic, "mmap", "--profile", "linux-6.12")["gmem MMAP|INIT_SHARED"] == "EINVAL"


def test_kvm_run_fails_with_an_errno_and_one_line(probe: Probes) -> None:
    done = run_exec("--", probe.dynamic, "run")
    assert done.returncode == 0
    assert lines(done.stdout) == {"KVM_RUN": "EOPNOTSUPP"}
    said = [line for line in done.stderr.splitlines() if "KVM_RUN" in line]
    assert len(said) == 1 and "no guest code runs" in said[0]


def test_the_exit_status_is_the_programs(probe: Probes) -> None:
    assert run_exec("--", "sh", "-c", "exit 7").returncode == 7
    assert run_exec("--", "sh", "-c", "kill -TERM $$").returncode == 128 + signal.SIGTERM
    missing = run_exec("--", "/nonexistent/program")
    assert missing.returncode == 127 and "/nonexistent/program" in missing.stderr
    assert run_exec().returncode == 2  # no program


def test_a_dying_supervisor_takes_the_program_with_it(probe: Probes) -> None:
    """SIGKILL the supervisor while the program is in the middle of trapped calls: the program
    dies too (PR_SET_PDEATHSIG), rather than hang or see every call fail with ENOSYS."""
    sup = subprocess.Popen(
        exec_argv("--", probe.dynamic, "spin"), stdout=subprocess.PIPE, cwd=ROOT, text=True, start_new_session=True
    )
    try:
        assert sup.stdout is not None and sup.stdout.readline().strip() == "spinning"
        with open(f"/proc/{sup.pid}/task/{sup.pid}/children", encoding="ascii") as f:
            (target,) = map(int, f.read().split())
        os.kill(sup.pid, signal.SIGKILL)
        sup.wait(10)
        deadline = time.monotonic() + 10
        while _alive(target) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not _alive(target)
    finally:
        if sup.poll() is None:
            sup.kill()


def _alive(pid: int) -> bool:
    """Running (not gone, not a zombie waiting for its new parent to reap it)."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_trace_logs_every_trapped_call_and_its_answer(probe: Probes) -> None:
    done = run_exec("--trace", "--", probe.dynamic, "raw")
    trace = done.stderr.splitlines()
    assert any("openat(AT_FDCWD, '/dev/kvm'" in t and "[kvm]" in t for t in trace)
    assert any(
        "KVM_SET_USER_MEMORY_REGION, {slot=0x0, flags=0x0, gpa=0x0, size=0x1001" in t and "EINVAL" in t for t in trace
    )
    assert any(t.startswith("[bridge] vm ") and t.endswith("released") for t in trace)


def test_with_url_the_programs_vms_are_live_in_the_service(probe: Probes) -> None:
    """--url: each call goes to the service, so the API (and the memory-map page) show the VM while
    the program runs; a guest_memfd is released with its last fd, the VM with the program's."""
    from app.client import Client

    with live_server() as (url, _), Client(url) as client:
        argv = exec_argv("--url", url, "--profile", "linux-6.12", "--", probe.dynamic, "wait")
        proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, cwd=ROOT, text=True)
        assert proc.stdin is not None and proc.stdout is not None

        def step(expect: str) -> None:
            assert proc.stdout is not None
            while (line := proc.stdout.readline()) and line.strip() != expect:
                pass
            assert line.strip() == expect

        try:
            step("ready")
            (vm,) = client.list_vms().vms
            assert vm.name == f"kvmprobe-dynamic[{_child_of(proc.pid)}] #1" and vm.profile == "linux-6.12"
            (slot,) = client.list_memslots(vm.id).memslots
            assert (slot.id, slot.guest_phys_addr, slot.guest_memfd) == (10, 4 << 30, 3)
            runs = client.get_memory_attributes(vm.id, start_gfn=0x100000, end_gfn=0x100400).runs
            assert [(r.start_gfn, r.private) for r in runs] == [(0x100000, True), (0x100200, False)]
            proc.stdin.write("\n")
            proc.stdin.flush()
            step("dup closed")
            assert [g.fd for g in _wait_for(lambda: client.list_guest_memfds(vm.id).guest_memfds, 1)] == [3]
            proc.stdin.write("\n")
            proc.stdin.flush()
            step("closed")
            assert _wait_for(lambda: client.list_guest_memfds(vm.id).guest_memfds, 0) == []
            proc.stdin.write("\n")
            proc.stdin.flush()
            assert proc.wait(30) == 0
            assert client.list_vms().vms == []
        finally:
            if proc.poll() is None:
                proc.kill()


def _child_of(pid: int) -> int:
    with open(f"/proc/{pid}/task/{pid}/children", encoding="ascii") as f:
        return int(f.read().split()[0])


def _wait_for(get: object, count: int) -> list[object]:
    """The list ``get()`` returns once it has ``count`` items (a release is handled as the event comes)."""
    deadline = time.monotonic() + 10
    while True:
        found = get()  # type: ignore[operator]
        if len(found) == count or time.monotonic() > deadline:
            return list(found)
        time.sleep(0.05)


@pytest.mark.host
def test_the_bridge_answers_as_this_hosts_dev_kvm(probe: Probes, tmp_path: object) -> None:
    """Differential: kvmprobe on the real /dev/kvm and under the bridge with this host's measured
    profile (kvm-memattr host-profile --json) prints the same lines."""
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        pytest.skip("no usable /dev/kvm")
    measured = subprocess.run(
        [sys.executable, "-m", "app.cli", "host-profile", "--json"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        check=True,
    )
    profile = os.path.join(str(tmp_path), "host.json")
    with open(profile, "w", encoding="utf-8") as f:
        f.write(measured.stdout)
    native = subprocess.run([probe.dynamic, "memory"], capture_output=True, text=True, timeout=60)
    assert native.returncode == 0, native.stderr
    bridged = run_exec("--profile", profile, "--", probe.dynamic, "memory")
    assert bridged.returncode == 0, bridged.stderr
    assert bridged.stdout.splitlines() == native.stdout.splitlines()
