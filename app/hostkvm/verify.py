"""``kvm-memattr verify-host``: the same operations on the engine and on this host's ``/dev/kvm``.

Each sequence starts a fresh VM on both sides (the engine configured as the host: its
capabilities, its number of address spaces, its largest guest physical address) and runs its
steps on both, comparing success or errno step by step. A divergence is shrunk to a minimal
sequence (steps removed while it still diverges) and printed as a reproducer.

Steps name guest_memfd files by creation order, not fd number: the host reuses fd numbers, the
engine does not. A closed or missing file is passed as an fd no process has (the engine's
closed fd, the host's ``0xffffffff``): both must answer ``EBADF``.
"""

from __future__ import annotations

import os
import random
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import assert_never

from app.core import Engine
from app.core.errors import KvmError
from app.core.vm import VirtualMachine
from app.hostkvm.ioctls import HostKvmError, Kvm, VmFd
from app.hostkvm.steps import Binding, CloseGmem, CreateGmem, CreateVm, SetAttributes, SetMemslot, Step, VmOp
from app.models.host import CAP_NUMBERS, KERNELS, HostCaps, HostProfile, Kernel
from app.models.kvm import (
    GFN_LIMIT,
    KvmCreateGuestMemfd,
    KvmMemoryAttributes,
    KvmUserspaceMemoryRegion2,
    Semantics,
    VmType,
)
from app.models.vm import VmCreate

NO_FD = 0xFFFF_FFFF
PAGE = 4096
SAFE_PAGES = 1 << 20
"""The largest slot sent to the host that it might accept: the kernel allocates per-page
metadata for an accepted slot (8 bytes a page for rmaps), so 2^31 - 1 pages would cost 16 GiB."""


def read_profile(kvm: Kvm) -> HostProfile:
    """This host as a profile: ``KVM_CHECK_EXTENSION`` of every capability a profile records, and
    ``max_gfn`` found by probing one-page memslots."""
    vm = kvm.create_vm()
    try:
        lo, hi = 0, GFN_LIMIT  # lo is accepted; find the last accepted gfn below hi
        while hi - lo > 1:
            mid = (lo + hi) // 2
            try:
                vm.set_user_memory_region(0, 0, mid * PAGE, PAGE, 0x1000_0000)
                vm.set_user_memory_region(0, 0, mid * PAGE, 0, 0x1000_0000)
                lo = mid
            except HostKvmError:
                hi = mid
    finally:
        vm.close()
    release = os.uname().release
    caps = HostCaps.model_validate({name: kvm.check_extension(nr) for name, nr in CAP_NUMBERS.items()})
    return HostProfile(
        name="host-" + re.sub(r"[^A-Za-z0-9._+-]", "_", release)[:59],
        description="measured by kvm-memattr host-profile",
        kernel=modelled_kernel(release),
        release=release,
        max_gfn=lo,
        caps=caps,
        gmem_in_place_conversion=read_module_param(IN_PLACE_PARAM) == "Y",
    )


IN_PLACE_PARAM = Path("/sys/module/kvm/parameters/gmem_in_place_conversion")
"""v8's name for the knob (0444): where a 7.4 host says whether it converts in place."""


def read_module_param(path: Path) -> str | None:
    """A kvm module parameter as sysfs shows it, or None where the kernel has no such parameter."""
    try:
        return path.read_text().strip()
    except OSError:
        return None


def modelled_kernel(release: str) -> Kernel:
    """The newest kernel version the engine models that is not newer than ``release`` (the oldest
    modelled one for an older host: its rules are the closest there are)."""
    version = tuple(int(n) for n in re.findall(r"\d+", release)[:2])
    best = KERNELS[0]
    for k in KERNELS:
        if tuple(int(n) for n in k.split(".")) <= version:
            best = k
    return best


# ---------------------------------------------------------------- running a sequence


@dataclass
class _File:
    engine_fd: int
    host_fd: int
    open: bool = True


@dataclass
class _Pair:
    """A fresh VM on each side, and the files created so far."""

    engine_vm: VirtualMachine
    host_vm: VmFd
    files: list[_File | None] = field(default_factory=list)  # one per gmem step; None: it failed

    def file(self, index: int | None) -> _File | None:
        return self.files[index] if index is not None and index < len(self.files) else None

    def created(self, index: int) -> _File:
        """The file a close refers to: run_sequence skips a close of a file that is not there."""
        f = self.file(index)
        assert f is not None
        return f

    def fds(self, index: int | None) -> tuple[int | None, int]:
        f = self.file(index)
        if f is None:
            return None, NO_FD
        return f.engine_fd, f.host_fd if f.open else NO_FD

    def close(self) -> None:
        for f in self.files:
            if f is not None and f.open:
                os.close(f.host_fd)
        self.host_vm.close()


def _engine(pair: _Pair, step: VmOp) -> tuple[str, int | None]:
    vm = pair.engine_vm
    try:
        match step:
            case SetMemslot():
                fd, _ = pair.fds(step.file)
                req = KvmUserspaceMemoryRegion2(
                    flags=step.flags,
                    guest_phys_addr=step.gpa,
                    memory_size=step.size,
                    userspace_addr=step.hva,
                    guest_memfd=fd,
                    guest_memfd_offset=step.offset,
                )
                vm.set_user_memory_region(step.slot, req)
            case CreateGmem():
                return "ok", vm.create_guest_memfd(KvmCreateGuestMemfd(size=step.size, flags=step.flags)).fd
            case SetAttributes():
                vm.set_memory_attributes(
                    KvmMemoryAttributes(
                        address=step.address, size=step.size, attributes=step.attributes, flags=step.flags
                    )
                )
            case CloseGmem():
                vm.close_guest_memfd(pair.created(step.file).engine_fd)
            case _:
                assert_never(step)
    except KvmError as e:
        return e.errno, None
    return "ok", None


def _host(pair: _Pair, step: VmOp) -> tuple[str, int | None]:
    vm = pair.host_vm
    try:
        match step:
            case SetMemslot():
                if SAFE_PAGES * PAGE < step.size < (1 << 31) * PAGE:
                    raise ValueError(f"refusing a {step.size:#x}-byte slot: the host could accept it at great cost")
                _, fd = pair.fds(step.file)
                vm.set_user_memory_region2(step.slot, step.flags, step.gpa, step.size, step.hva, fd, step.offset)
            case CreateGmem():
                return "ok", vm.create_guest_memfd(step.size, step.flags)
            case SetAttributes():
                # On a default VM nothing is stored: attributes 0 are a no-op, anything else EINVAL.
                vm.set_memory_attributes(step.address, step.size, step.attributes, step.flags)
            case CloseGmem():
                os.close(pair.created(step.file).host_fd)
            case _:
                assert_never(step)
    except HostKvmError as e:
        return e.errno_name, None
    return "ok", None


@dataclass
class Outcome:
    steps: Sequence[Step]
    results: list[tuple[str, str]]  # (engine, host) per step run
    diverged_at: int | None


def run_sequence(kvm: Kvm, profile: HostProfile, steps: list[VmOp]) -> Outcome:
    """Run ``steps`` on a fresh VM pair until they disagree."""
    engine = Engine(host=profile)
    pair = _Pair(engine.create_vm(VmCreate(type=VmType.default, semantics=Semantics.linux)), kvm.create_vm(0))
    results: list[tuple[str, str]] = []
    try:
        for n, step in enumerate(steps):
            if isinstance(step, CloseGmem):
                f = pair.file(step.file)
                if f is None or not f.open:
                    results.append(("skipped", "skipped"))  # nothing to close there
                    continue
            (mine, engine_fd), (theirs, host_fd) = _engine(pair, step), _host(pair, step)
            results.append((mine, theirs))
            if isinstance(step, CreateGmem):
                both = engine_fd is not None and host_fd is not None
                pair.files.append(_File(engine_fd, host_fd) if both else None)  # type: ignore[arg-type]
                if host_fd is not None and not both:
                    os.close(host_fd)
            elif isinstance(step, CloseGmem) and mine == "ok":
                pair.created(step.file).open = False
            if mine != theirs:
                return Outcome(steps, results, n)
    finally:
        pair.close()
    return Outcome(steps, results, None)


def shrink(kvm: Kvm, profile: HostProfile, steps: list[VmOp]) -> Outcome:
    """Remove steps one at a time while the sequence still diverges, until none can go."""
    best = run_sequence(kvm, profile, steps)
    assert best.diverged_at is not None
    steps = steps[: best.diverged_at + 1]
    changed = True
    while changed:
        changed = False
        for i in range(len(steps) - 1, -1, -1):
            trial = _renumber(steps, i)
            outcome = run_sequence(kvm, profile, trial)
            if outcome.diverged_at is not None:
                steps, best, changed = trial[: outcome.diverged_at + 1], outcome, True
                break
    return run_sequence(kvm, profile, steps)


def _renumber(steps: list[VmOp], drop: int) -> list[VmOp]:
    """``steps`` without step ``drop``; file references after a dropped ``gmem`` shift down (a
    reference to the dropped file is gone: a binding to it has no file, a close of it goes)."""
    rest = steps[:drop] + steps[drop + 1 :]
    if not isinstance(steps[drop], CreateGmem):
        return rest
    gone = sum(1 for s in steps[:drop] if isinstance(s, CreateGmem))

    def shifted(f: int | None) -> int | None:
        return f if f is None or f < gone else None if f == gone else f - 1

    out: list[VmOp] = []
    for s in rest:
        if isinstance(s, SetMemslot) and s.binding is not None:
            s = replace(s, binding=replace(s.binding, file=shifted(s.binding.file)))
        elif isinstance(s, CloseGmem):
            f = shifted(s.file)
            if f is None:
                continue
            s = CloseGmem(f)
        out.append(s)
    return out


# ---------------------------------------------------------------- generating sequences


class Generator:
    """Random sequences biased to the edges where kernel checks live: overlaps and adjacency,
    alignment, wrap, the slot-id and address-space bits, the user-half limit, max_gfn, guest_memfd
    offsets and double binding, delete / move / flags-only, READONLY toggles."""

    def __init__(self, rng: random.Random, profile: HostProfile) -> None:
        self.rng, self.profile = rng, profile

    def sequence(self, length: int) -> list[VmOp]:
        self.slots: dict[int, SetMemslot] = {}
        self.files: list[int] = []  # sizes, by creation order
        return [self.step() for _ in range(length)]

    def step(self) -> VmOp:
        r = self.rng.random()
        if r < 0.2:
            return self.gmem()
        if r < 0.27 and self.files:
            return CloseGmem(file=self.rng.randrange(len(self.files)))
        if r < 0.32:
            return self.attrs()
        return self.memslot()

    def attrs(self) -> SetAttributes:
        """``KVM_SET_MEMORY_ATTRIBUTES`` on the default VM: its checks and their order."""
        rng = self.rng
        return SetAttributes(
            address=rng.choice([0, 0x1_0000_0000, 0x800, (1 << 64) - PAGE]),
            size=rng.choice([PAGE, 0x200000, 0, 0x800, 1 << 63]),
            attributes=rng.choice([0, 0, 8, 1, 0x10]),
            flags=rng.choice([0, 0, 0, 0, 1]),
        )

    def gmem(self) -> CreateGmem:
        rng = self.rng
        size = rng.choice([PAGE, 2 * PAGE, 0x200000, 0x400000, 0, PAGE + 1, 0x800, 1 << 63, (1 << 63) - PAGE, 1 << 40])
        flags = rng.choice([0, 0, 0, 1, 2, 3, 4, 8])
        self.files.append(size)  # files are numbered by gmem step, whether or not it succeeds
        return CreateGmem(size=size, flags=flags)

    def memslot(self) -> SetMemslot:
        """Mostly a well-formed request (so later steps meet real slots), with at most one edge."""
        rng = self.rng
        if self.slots and rng.random() < 0.45:
            return self.modify(rng.choice(list(self.slots)))
        sid = rng.randrange(4)
        flags = rng.choice([0, 0, 1, 2, 3, 4, 4, 4])
        npages = rng.choice([1, 1, 2, 4, 16, 512])
        step = SetMemslot(
            slot=sid,
            flags=flags,
            gpa=self.gpa(npages),
            size=npages * PAGE,
            hva=0x1000_0000 + rng.randrange(8) * 0x100_0000,
        )
        if rng.random() < 0.4:
            step = self.edge(step)
        if step.flags & 4 or rng.random() < 0.05:
            step = replace(step, binding=self.binding(step.size))
        if step.size:
            self.slots[step.slot] = step
        return step

    def edge(self, step: SetMemslot) -> SetMemslot:
        """One parameter at a boundary of a kernel check."""
        rng = self.rng
        size = step.size
        kind = rng.randrange(9)
        if kind == 0:
            return replace(step, slot=rng.choice([1, 2, 0x7FFF]) << 16 | step.slot)
        if kind == 1:
            return replace(step, slot=rng.choice([32763, 32764, 65535]))
        if kind == 2:
            return replace(step, flags=rng.choice([5, 6, 7, 8, 0x80000000]))
        if kind == 3:
            key = rng.choice(["size", "gpa", "hva"])
            return replace(step, **{key: (getattr(step, key) + 0x800) % (1 << 64)})
        if kind == 4:
            # 2^31 pages is refused before anything is allocated; an accepted slot costs the host
            # per-page metadata (rmaps), so accepted sizes stay small.
            return replace(step, size=rng.choice([1 << 31, (1 << 31) + 1]) * PAGE)
        if kind == 5:
            top = self.profile.max_gfn + 1
            return replace(step, gpa=(top - rng.choice([size // PAGE, size // PAGE - 1, 1])) * PAGE)
        if kind == 6:
            return replace(step, gpa=(1 << 64) - rng.choice([PAGE, size, 2 * size]))
        if kind == 7:
            return replace(step, hva=0x7FFF_FFFF_F000 - size + rng.choice([0, PAGE]))
        return replace(step, size=0)  # a delete of whatever is (not) there

    def gpa(self, npages: int) -> int:
        rng = self.rng
        top = self.profile.max_gfn + 1
        existing = [s for s in self.slots.values() if s.size]
        choices = [0x1_0000_0000, 0, 0x2000, (top - npages) * PAGE, (top - npages + 1) * PAGE, (1 << 64) - PAGE]
        if existing:
            other = rng.choice(existing)
            start, end = other.gpa, other.gpa + other.size
            choices += [end, start - npages * PAGE, start + PAGE, start] * 2  # adjacency and overlap
        return (rng.choice(choices) + rng.choice([0] * 16 + [0x800])) % (1 << 64)

    def binding(self, size: int) -> Binding:
        rng = self.rng
        file = rng.randrange(len(self.files)) if self.files and rng.random() < 0.9 else None
        fsize = self.files[file] if file is not None else 0
        offset = rng.choice([0, 0, 0, PAGE, 0x200000, max(0, fsize - size), fsize, 0x800, (1 << 64) - PAGE])
        return Binding(file, offset)

    def modify(self, slot: int) -> SetMemslot:
        """Delete, move, flags-only, identical, READONLY toggle, or a changed size/hva of an existing slot."""
        rng = self.rng
        old = self.slots[slot]
        kind = rng.choice(["delete", "move", "flags", "same", "readonly", "size", "hva", "gmem"])
        if kind == "delete":
            del self.slots[slot]
            return replace(old, size=0)
        if kind == "move":
            return replace(old, gpa=self.gpa(old.size // PAGE))
        if kind == "flags":
            return replace(old, flags=old.flags ^ 1)
        if kind == "readonly":
            return replace(old, flags=old.flags ^ 2)
        if kind == "size":
            return replace(old, size=old.size + PAGE)
        if kind == "hva":
            return replace(old, hva=old.hva + PAGE)
        if kind == "gmem":
            return replace(old, flags=old.flags | 4, binding=self.binding(old.size))
        return old


# ---------------------------------------------------------------- the report


@dataclass
class Report:
    profile: HostProfile
    seed: int
    steps: int = 0
    vms: int = 0
    vm_types: list[tuple[str, str, str]] = field(default_factory=list)  # (type, engine, host)
    divergences: list[Outcome] = field(default_factory=list)


def check_vm_types(kvm: Kvm, profile: HostProfile) -> list[tuple[str, str, str]]:
    """``KVM_CREATE_VM`` of every x86 type on both sides: ``kvm_is_vm_type_supported()``."""
    engine = Engine(host=profile)
    out = []
    for t in VmType:
        try:
            engine.create_vm(VmCreate(type=t, semantics=Semantics.linux))
            mine = "ok"
        except KvmError as e:
            mine = e.errno
        try:
            kvm.create_vm(t.value_code).close()
            theirs = "ok"
        except HostKvmError as e:
            theirs = e.errno_name
        out.append((t.value, mine, theirs))
    return out


def coverage(profile: HostProfile) -> tuple[list[str], list[str]]:
    """What a run on this host checks, and what it cannot (said in the summary, never implied)."""
    caps = profile.caps
    checked = ["KVM_CREATE_VM of every VM type", "memslots (KVM_SET_USER_MEMORY_REGION2)"]
    cannot = ["faults and prefault (they need vCPUs)"]
    if caps.KVM_CAP_GUEST_MEMFD:
        checked.append("guest_memfd: create, bind and close")
    else:
        checked.append("guest_memfd refused alike (no guest_memfd here: ENOTTY, EINVAL)")
        cannot.append("guest_memfd files and bindings")
    if caps.KVM_CAP_MEMORY_ATTRIBUTES:
        checked.append("KVM_SET_MEMORY_ATTRIBUTES checks on a default VM")
    else:
        checked.append("KVM_SET_MEMORY_ATTRIBUTES refused alike (ENOTTY)")
    private = [t.value for t in VmType if t.has_private_mem and profile.supports_vm_type(t)]
    if not private:
        cannot.append("conversions (no private-memory VM type here)")
    else:
        cannot.append(f"conversions (private-memory VMs: {', '.join(private)}, not driven yet)")
    return checked, cannot


def verify(kvm: Kvm, profile: HostProfile, steps: int, seed: int) -> Iterator[Report]:
    """Every VM type, then about ``steps`` steps in sequences of 4 to 24; yields the report after each."""
    rng = random.Random(seed)
    gen = Generator(rng, profile)
    report = Report(profile, seed, vm_types=check_vm_types(kvm, profile))
    for t, mine, theirs in report.vm_types:
        if mine != theirs:
            report.divergences.append(Outcome([CreateVm(t)], [(mine, theirs)], 0))
    seen: set[str] = set()
    while report.steps < steps:
        seq = gen.sequence(rng.randint(4, 24))
        outcome = run_sequence(kvm, profile, seq)
        report.steps += len(outcome.results)
        report.vms += 1
        if outcome.diverged_at is not None:
            small = shrink(kvm, profile, seq)
            key = repr([(s.op, r) for s, r in zip(small.steps, small.results, strict=False)])
            if key not in seen:  # the same shape of divergence once
                seen.add(key)
                report.divergences.append(small)
        yield report


def cli_lines(outcome: Outcome) -> list[str]:
    """The reproducer as ``kvm-memattr`` commands against any server, with this host's profile
    (recorded by ``kvm-memattr host-profile --json > host.json``); the engine numbers fds 3, 4, ..."""
    create = "kvm-memattr --json vm create --semantics linux --profile host.json"
    lines = [f"VM=$({create} --type default | jq -r .id)"]
    fds: list[int | None] = []
    next_fd = 3
    for s, (mine, _) in zip(outcome.steps, outcome.results, strict=False):
        match s:
            case CreateVm():
                return [f"{create} --type {s.type}"]
            case CreateGmem():
                fds.append(next_fd if mine == "ok" else None)
                next_fd += mine == "ok"
                lines.append(f"kvm-memattr gmem create $VM --size {s.size:#x} --flags {s.flags}")
            case CloseGmem():
                if mine != "skipped":
                    lines.append(f"kvm-memattr gmem close $VM {fds[s.file]}")
            case SetAttributes():
                lines.append(
                    f"kvm-memattr attrs set $VM {s.address:#x} {s.size:#x} --attributes {s.attributes:#x}"
                    f" --flags {s.flags:#x}"
                )
            case SetMemslot():
                line = (
                    f"kvm-memattr memslot set $VM {s.slot:#x} --gpa {s.gpa:#x} --size {s.size:#x}"
                    f" --hva {s.hva:#x} --flags {s.flags:#x}"
                )
                fd = fds[s.file] if s.file is not None and s.file < len(fds) else None
                if fd is not None:
                    line += f" --gmem {fd} --gmem-offset {s.offset:#x}"
                lines.append(line)
            case _:
                assert_never(s)
    return lines
