"""``kvm-memattr demo``: the story of the v9 patch, one protocol step at a time.

It drives the API through the typed client (a running server, or an app in this process) and
prints after each step what changed: attributes, mappings, ``mmu_invalidate_*`` and counters.
"""

from __future__ import annotations

import json
import os
from typing import Any

import httpx
from rich.console import Console
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from app.client import DEFAULT_URL, Client, KvmMemattrError
from app.models.state import GfnRange, MemoryFaultExit, Mmu
from app.timeline import REVIEW_SCENARIO, timeline

GPA = 0x1_0000_0000  # 4 GiB, as private_mem_conversions_test uses
HVA = 0x7F00_0000_0000
SLOT_SIZE = 0x40_0000  # 4 MiB
GFN = GPA >> 12


DEMO_NAME = "kvm-memattr-demo"
"""The demo's VM, replaced by the next run."""
IN_PLACE_NAME = "kvm-memattr-demo-in-place"
"""The VM of the in-place chapter, replaced by the next run."""


def _connect(url: str | None, token: str | None, in_process: bool) -> tuple[Client, str]:
    """The server at ``--url`` (which must answer), else at $KVM_MEMATTR_URL or the default
    address if one answers there, else an app in this process."""
    if in_process:
        return Client.in_process(), "an app in this process"
    target = url or os.environ.get("KVM_MEMATTR_URL") or DEFAULT_URL
    try:
        httpx.get(f"{target}/healthz", timeout=1.0).raise_for_status()
        return Client(target, token=token), target
    except httpx.HTTPError:
        if url:
            raise
        return Client.in_process(), f"an app in this process (no server answers at {target})"


class Story:
    def __init__(self, client: Client, console: Console) -> None:
        self.kvm, self.console, self.step_no = client, console, 0
        self.vm = ""
        self.last: Mmu | None = None
        self.steps: list[dict[str, Any]] = []  # what --json prints: each step, what it said, the MMU after it

    def step(self, title: str, why: str) -> None:
        self.step_no += 1
        self.steps.append({"step": self.step_no, "title": title, "why": why, "said": [], "mmu": None})
        self.console.print()
        self.console.rule(f"[bold cyan]{self.step_no}. {title}", align="left")
        self.console.print(why, style="dim")

    def say(self, text: str) -> None:
        if self.steps:
            self.steps[-1]["said"].append(Text.from_markup(text).plain)
        self.console.print(text)

    def mmu(self) -> None:
        """Print the invalidation state, with what moved since the last print."""
        mmu = self.kvm.get_mmu(self.vm)
        table = Table(show_header=True, box=None, pad_edge=False)
        for col in ("seq", "in_progress", "range", "mapped", "flushes", "zapped", "retries", "exits"):
            table.add_column(col, no_wrap=True)

        def cell(now: Any, before: Any) -> str:
            return f"[bold yellow]{now}[/]" if self.last is not None and now != before else str(now)

        prev = self.last or mmu
        rng = (
            "INVALID_GPA"
            if mmu.mmu_invalidate_range_start is None
            else f"[{mmu.mmu_invalidate_range_start:#x}, {mmu.mmu_invalidate_range_end:#x})"
        )
        prev_rng = (prev.mmu_invalidate_range_start, prev.mmu_invalidate_range_end)
        table.add_row(
            cell(mmu.mmu_invalidate_seq, prev.mmu_invalidate_seq),
            cell(mmu.mmu_invalidate_in_progress, prev.mmu_invalidate_in_progress),
            cell(rng, rng if prev_rng == (mmu.mmu_invalidate_range_start, mmu.mmu_invalidate_range_end) else None),
            cell(mmu.mapped_pages, prev.mapped_pages),
            cell(mmu.stats.tlb_flushes, prev.stats.tlb_flushes),
            cell(mmu.stats.pages_zapped, prev.stats.pages_zapped),
            cell(mmu.stats.fault_retries, prev.stats.fault_retries),
            cell(mmu.stats.memory_fault_exits, prev.stats.memory_fault_exits),
        )
        self.console.print(table)
        self.last = mmu
        if self.steps:
            self.steps[-1]["mmu"] = mmu.model_dump(mode="json")

    def attributes(self, npages: int = 16, vm: str | None = None) -> None:
        vm = vm or self.vm
        runs = self.kvm.get_memory_attributes(vm, start_gfn=GFN, end_gfn=GFN + npages).runs
        line = "".join(("P" if r.private else "s") * (r.end_gfn - r.start_gfn) for r in runs)
        maps = {
            g
            for r in self.kvm.get_mappings(vm, start_gfn=GFN, end_gfn=GFN + npages).runs
            for g in range(r.start_gfn, r.end_gfn)
        }
        mapped = "".join("M" if GFN + i in maps else "." for i in range(npages))
        self.say(f"  attributes gfn {GFN:#x}+: [magenta]{line}[/]  (P private, s shared)")
        self.say(f"  mappings   gfn {GFN:#x}+: [green]{mapped}[/]  (M mapped)")


def _ranges(ranges: list[GfnRange]) -> str:
    return ", ".join(f"[{g.start_gfn:#x}, {g.end_gfn:#x})" for g in ranges)


def run_demo(
    url: str | None, token: str | None, *, in_process: bool = False, quiet: bool = False, as_json: bool = False
) -> int:
    """The story in a terminal; ``as_json``: the same steps as one JSON document on stdout."""
    console = Console(highlight=False, quiet=quiet or as_json)
    try:
        client, where = _connect(url, token, in_process)
    except httpx.HTTPError as e:
        Console(stderr=True).print(f"kvm-memattr demo: cannot reach {url}: {e}", markup=False)
        return 3
    with client:
        story = Story(client, console)
        try:
            _tell(story, where)
        except KvmMemattrError as e:
            Console(stderr=True).print(f"kvm-memattr demo: unexpected {e.errno}: {e.detail}", markup=False)
            return 1
    if as_json and not quiet:
        print(json.dumps({"talking_to": where, "vm": story.vm, "steps": story.steps}, indent=2))
    return 0


def _tell(s: Story, where: str) -> None:
    kvm = s.kvm
    s.console.print(
        Panel.fit(
            "[bold]kvm-memattr demo[/]: the v9 patch 'KVM: Register/unregister the guest private memory regions'\n"
            f"talking to {where}",
        )
    )

    s.step(
        "Create a software-protected VM",
        "KVM_CREATE_VM(KVM_X86_SW_PROTECTED_VM), rfc-v9 semantics: every gfn starts private.",
    )
    for old in kvm.list_vms().vms:  # the previous run's VMs: one demo at a time on a server
        if old.name in (DEMO_NAME, IN_PLACE_NAME):
            kvm.delete_vm(old.id)
    vm = kvm.create_vm(type="sw_protected", semantics="rfc-v9", name=DEMO_NAME)
    s.vm = vm.id
    s.say(f"  vm {vm.id}: {vm.address_spaces} address spaces, has_private_mem={vm.has_private_mem}")
    s.mmu()

    s.step(
        "Add a memslot backed by a guest_memfd",
        "KVM_CREATE_GUEST_MEMFD + KVM_SET_USER_MEMORY_REGION2 with KVM_MEM_GUEST_MEMFD: 4 MiB at 4 GiB.",
    )
    fd = kvm.create_guest_memfd(vm.id, SLOT_SIZE).fd
    kvm.set_memslot(vm.id, 10, GPA, SLOT_SIZE, HVA, flags=4, guest_memfd=fd)
    s.say(f"  slot 10: gpa {GPA:#x}, {SLOT_SIZE >> 20} MiB, guest_memfd {fd}")

    s.step(
        "The guest touches 8 pages",
        "Each EPT violation maps the page as private (its attribute), from the guest_memfd.",
    )
    for i in range(8):
        kvm.fault(vm.id, GPA + i * 0x1000, write=True)
    s.attributes()
    s.mmu()

    s.step(
        "Convert 4 pages to shared",
        "KVM_MEMORY_ENCRYPT_UNREG_REGION: invalidate begin(range), store, unmap every mapping in range, flush TLBs once, invalidate end.",
    )
    up = kvm.unreg_region(vm.id, GPA + 0x2000, 0x4000)
    s.say(f"  pages_zapped={up.pages_zapped} tlb_flushed={up.tlb_flushed}")  # type: ignore[union-attr]
    s.attributes()
    s.mmu()
    events = kvm.get_events(vm.id).events
    begin = max(i for i, e in enumerate(events) if e.type == "invalidate_begin")
    s.say("  event trace: " + " -> ".join(e.type for e in events[begin:]))

    s.step(
        "A racing fault retries",
        "A vCPU snapshotted mmu_invalidate_seq before the conversion; is_page_fault_stale() sees the bump.",
    )
    stale = (s.last.mmu_invalidate_seq - 1) if s.last else 0
    r = kvm.fault(vm.id, GPA + 0x2000, mmu_seq=stale)
    s.say(f"  fault with mmu_seq={stale}: outcome={r.outcome} ({r.retry_reason})")
    r = kvm.fault(vm.id, GPA + 0x2000)
    s.say(f"  fault again with a fresh seq: outcome={r.outcome}, private={r.private}")
    r = kvm.fault(vm.id, GPA + 0x2000 + 0x1000, private=True)
    if isinstance(r.exit, MemoryFaultExit):
        s.say(
            f"  a private access to a shared page: {r.outcome}, v9's KVM_EXIT_MEMORY_FAULT "
            f"(reason {r.exit.reason_code}, flags={r.exit.flags}, KVM_RUN returns 0)"
        )
    s.attributes()
    s.mmu()

    s.step(
        "The host invalidates userspace memory",
        "mmu_notifier invalidate_range_start on two HVA ranges: while both are open the range only widens.",
    )
    a = kvm.start_invalidation(vm.id, HVA + 0x2000, HVA + 0x3000)
    s.say(f"  #{a.id} -> gfns {_ranges(a.gfn_ranges)}, zapped {a.pages_zapped} page(s); the range restarts here")
    s.mmu()
    b = kvm.start_invalidation(vm.id, HVA + 0x8000, HVA + 0xA000)
    s.say(f"  #{b.id} -> gfns {_ranges(b.gfn_ranges)}, zapped {b.pages_zapped}; the range widens to cover both")
    r = kvm.fault(vm.id, GPA + 0x5000)
    s.say(f"  fault between the two, inside the widened range: {r.outcome} ({r.retry_reason})")
    s.mmu()
    kvm.end_invalidation(vm.id, a.id)
    kvm.end_invalidation(vm.id, b.id)
    s.say("  both ended: seq bumped twice, in_progress back to 0, range kept until the next begin")
    s.mmu()

    s.step(
        "An allocation fails half way",
        "fail-nth=3: the third per-gfn store fails; v9's review asked for an exact rollback that still bumps seq.",
    )
    kvm.set_fault_injection(vm.id, 3)
    before = kvm.get_memory_attributes(vm.id, start_gfn=GFN, end_gfn=GFN + 16).runs
    try:
        kvm.reg_region(vm.id, GPA, 0x8000)
    except KvmMemattrError as e:
        s.say(f"  KVM_MEMORY_ENCRYPT_REG_REGION -> {e.errno}: {e.detail}")
    after = kvm.get_memory_attributes(vm.id, start_gfn=GFN, end_gfn=GFN + 16).runs
    s.say(f"  attributes identical to before: {before == after}")
    s.attributes()
    s.mmu()

    s.step(
        "Why the error path must bump the seq",
        "The interleaving explorer races a vCPU fault against the conversion, one kernel step at a time, over every "
        "schedule. The review's ordering (stores first; on failure only an unwind) against the engine's rfc-v9.",
    )
    bad = kvm.run_explorer("reviewer-reorder", **REVIEW_SCENARIO)
    if bad.counterexample is not None:
        s.say(
            f"  reviewer-reorder: {bad.violations} of {bad.schedules} schedules end with {bad.counterexample.violated}"
        )
        s.console.print(timeline(bad.counterexample.trace, ""))
        s.say(
            "  The vCPU read the store that the unwind then undid; nothing bumped mmu_invalidate_seq, so"
            " install_spte saw no reason to retry and mapped the page private."
        )
    good = kvm.run_explorer("rfc-v9", **REVIEW_SCENARIO)
    s.say(
        f"  rfc-v9 (begin before the stores, end on the error path too): {good.violations} of {good.schedules}"
        f" schedules violate anything; fault outcomes: {good.outcomes.retry} retries, {good.outcomes.mapped} mapped."
    )

    _in_place(s)

    s.console.print()
    s.console.print(
        Panel.fit(
            "Next: open Swagger UI at /docs and try the same calls; GET /v1/vms/{id}/events shows every protocol step;\n"
            "create a VM with semantics 'linux' to see KVM_SET_MEMORY_ATTRIBUTES' no-op and no-memslot shortcuts;\n"
            "kvm-memattr explore --all compares the conversion variants of the v9 review, of punch-hole and in place.\n"
            f"These VMs ({DEMO_NAME}, {IN_PLACE_NAME}) stay for you to look at; the next demo replaces them.",
            title="where to look next",
        )
    )


def _in_place(s: Story) -> None:
    """What QEMU-style code does on a 7.4 host converting in place: a memory-fault exit, the
    conversion through the file, EAGAIN on a pinned page, unpin, retry, the fault retried."""
    kvm = s.kvm
    s.step(
        "In place (Linux 7.4): the VMM's view",
        "Host linux-7.4-in-place: private/shared lives in the guest_memfd, which the host mmaps; a device holds one "
        "page pinned (pin_user_pages, as VFIO would).",
    )
    vm = kvm.create_vm(type="sw_protected", semantics="linux", name=IN_PLACE_NAME, profile="linux-7.4-in-place").id
    fd = kvm.create_guest_memfd(vm, SLOT_SIZE, flags=3).fd  # MMAP | INIT_SHARED: shared until converted
    kvm.set_memslot(vm, 10, GPA, SLOT_SIZE, HVA, flags=4, guest_memfd=fd)
    mapping = kvm.mmap_guest_memfd(vm, fd, SLOT_SIZE).id
    kvm.touch_host_mapping(vm, mapping, 0, 0x4000, write=True)
    pin = kvm.pin_host_mapping(vm, mapping, 0x2000, 0x1000)
    s.say(f"  vm {vm}: guest_memfd {fd} at gpa {GPA:#x}, mmapped by the host, page 0x2 pinned (pin #{pin.id})")
    r = kvm.fault(vm, GPA, private=True)
    if isinstance(r.exit, MemoryFaultExit):
        s.say(
            f"  the guest accepts gpa {GPA:#x} as private: {r.outcome}, flags={r.exit.flags:#x} (PRIVATE), size {r.exit.size:#x}"
        )
    offset, size = 0, 0x4000  # the slot's guest_memfd_offset + (gpa - its base): what the VMM computes
    try:
        kvm.set_guest_memfd_memory_attributes(vm, fd, offset, size, attributes=8)
    except KvmMemattrError as e:
        s.say(
            f"  KVM_SET_MEMORY_ATTRIBUTES2(fd {fd}, {offset:#x}+{size:#x}, PRIVATE) -> {e.errno}, "
            f"error_offset={e.problem.get('error_offset', 0):#x}"
        )
    kvm.unpin_host_pin(vm, pin.id)
    s.say(f"  the VMM has the device drop its pin (#{pin.id}) and retries")
    up = kvm.set_guest_memfd_memory_attributes(vm, fd, offset, size, attributes=8)
    s.say(f"  -> converted: invalidated={up.invalidated}, seq {up.mmu.mmu_invalidate_seq}")
    r = kvm.fault(vm, GPA, private=True)
    s.say(f"  the guest's access again: {r.outcome}, private={r.private}")
    s.attributes(vm=vm)
    try:
        kvm.touch_host_mapping(vm, mapping, 0, 0x1000)
    except KvmMemattrError as e:
        s.say(f"  the host reads the page now: {e.errno} {e.problem.get('signal')} (the file says private)")
