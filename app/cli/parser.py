"""The ``kvm-memattr`` command line: every command, its options and their help."""

from __future__ import annotations

import argparse
import difflib
import re
from collections.abc import Callable, Sequence
from dataclasses import fields
from typing import Any, NoReturn

from app.cli.args import attributes, integer, number, profile_arg, tristate
from app.cli.commands import SCENARIO_OPTIONS, delete_vm, export_vm, import_vm, inject
from app.client import DEFAULT_URL
from app.client import operations as ops
from app.models.names import DEFAULT_SEMANTICS, DEFAULT_VM_TYPE, VARIANT_NAMES, Semantics, VmType
from app.models.scenario import Scenario

DESCRIPTION = """\
A virtual KVM memory-attribute controller: serve the HTTP API, drive it from a
terminal, explore interleavings, check the engine against this host's KVM.

Addresses and sizes (gpa, hva, --size) are bytes: decimal, 0x hex, or a size
with a binary suffix (4K, 2M, 1G). gfns (--start-gfn, --end-gfn, GFN) and
counts are plain integers, decimal or 0x hex. Output is a table, --json for
scripts, -q for nothing. Global options go anywhere on the line.
Exit status: 0 ok, 1 the kernel refused (the errno is printed), 2 bad usage,
3 the server cannot be reached."""


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the description's lines and shows a default wherever there is a meaningful one."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if "default" in text or default is None or default is False or default is argparse.SUPPRESS:
            return text
        if action.option_strings == []:
            return text
        return f"{text} (default: {default})" if text else f"(default: {default})"


class Parser(argparse.ArgumentParser):
    """No abbreviations (``--privat`` is not silently ``--private``), and an error first names an
    option the command does not have (argparse reports a missing required option before it)."""

    argv: Sequence[str] = ()
    """The command line being parsed (set by ``main()``), for ``error()``."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        known = set(re.findall(r"--[\w-]+", self.format_help()))
        for option, value in zip(self.argv, self.argv[1:], strict=False):
            if "expected one argument" in message and option in known and re.fullmatch(r"-[0-9].*", value):
                super().error(f"{option} {value}: a negative number (addresses and sizes are unsigned)")
        for token in self.argv:
            option = token.split("=", 1)[0]
            if option.startswith("--") and option != "--" and option not in known:
                close = difflib.get_close_matches(option, sorted(known), n=1)
                message = f"no option {option}" + (f" (did you mean {close[0]}?)" if close else "")
                break
        super().error(message)


def global_options(parser: argparse.ArgumentParser, defaults: bool) -> None:
    """The options every command takes; below the top level they default to SUPPRESS, so one given
    after the subcommand overrides and one given before it survives."""

    def d(value: Any) -> Any:
        return value if defaults else argparse.SUPPRESS

    parser.add_argument("--url", default=d(None), help=f"server URL (default: $KVM_MEMATTR_URL, else {DEFAULT_URL})")
    parser.add_argument("--token", default=d(None), help="API token (default: $KVM_MEMATTR_API_TOKEN)")
    parser.add_argument("--json", action="store_true", default=d(False), help="print JSON instead of tables")
    parser.add_argument("-q", "--quiet", action="store_true", default=d(False), help="print nothing on success")


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="kvm-memattr", description=DESCRIPTION, formatter_class=HelpFormatter)
    p.add_argument("--version", action=VersionAction, help="show program's version number and exit")
    global_options(p, defaults=True)
    common = Parser(add_help=False)
    global_options(common, defaults=False)
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    def cmd(name: str, help_: str, run: Callable[..., Any] | None, *, parent: Any = sub) -> argparse.ArgumentParser:
        """``run(client, args)`` returns the operation to send (its JSON is shown) or a result it made."""
        sp: argparse.ArgumentParser = parent.add_parser(
            name, help=help_, description=help_, parents=[common], formatter_class=HelpFormatter
        )
        sp.set_defaults(run=run)
        return sp

    def group(name: str, help_: str) -> Any:
        g = sub.add_parser(name, help=help_, description=help_, parents=[common], formatter_class=HelpFormatter)
        return g.add_subparsers(dest="sub", required=True, metavar="ACTION")

    # serve is the server, not a client of one: none of the client options (--url, --token, --json).
    help_ = "run the HTTP service (one worker: state is in-process)"
    s = sub.add_parser("serve", help=help_, description=help_, formatter_class=HelpFormatter)
    s.add_argument("--host", help="bind address (default 127.0.0.1, or KVM_MEMATTR_HOST)")
    s.add_argument("--port", type=int, help="port (default 8000, or KVM_MEMATTR_PORT)")
    s.add_argument(
        "--log-level",
        choices=["critical", "error", "warning", "info", "debug"],
        help="default: info, or KVM_MEMATTR_LOG_LEVEL",
    )
    s.add_argument("--workers", type=int, default=1, help=argparse.SUPPRESS)  # refused unless 1: state is in-process
    s.set_defaults(serve=True)

    d = cmd("demo", "walk through the invalidation protocol step by step", None)
    d.add_argument("--in-process", action="store_true", help="do not look for a server; run in this process")
    d.set_defaults(demo=True)

    v = cmd("verify-host", "check the engine against this host's /dev/kvm, step by step", None)
    v.add_argument("--steps", type=int, default=20_000, help="about this many steps (default 20000)")
    v.add_argument("--seed", type=int, default=1, help="seed of the random sequences (default 1)")
    v.add_argument("--device", default="/dev/kvm", help="the KVM device (default /dev/kvm)")
    v.set_defaults(verify_host=True)

    hp = cmd("host-profile", "measure this host's /dev/kvm as a host profile (--json: the document)", None)
    hp.add_argument("--device", default="/dev/kvm", help="the KVM device (default /dev/kvm)")
    hp.set_defaults(host_profile=True)
    cmd("profiles", "list the host profiles a VM can behave as", lambda c, a: ops.list_host_profiles())

    help_ = "run PROGRAM with /dev/kvm served by the engine: in process, or the --url service's"
    x = cmd("exec", help_, None)
    x.description = (
        f"{help_}. Its KVM ioctls (VMs, memslots, guest_memfd, attributes, prefault) are answered as"
        " the profile's host would; no guest code runs (KVM_RUN fails with EOPNOTSUPP). Its exit status"
        " is the program's. Needs Linux 5.9+ on x86-64 (seccomp user notification)."
    )
    x.add_argument(
        "--profile", help="host to behave as: a name (kvm-memattr profiles) or a file from host-profile --json"
    )
    x.add_argument("--trace", action="store_true", help="log every trapped call and its answer to stderr")
    x.add_argument(
        "program", nargs=argparse.REMAINDER, metavar="-- PROGRAM [ARGS...]", help="the program and its arguments"
    )
    x.set_defaults(bridge=True)

    cmd("health", "GET /healthz", lambda c, a: ops.healthz())
    caps = cmd(
        "caps",
        "KVM_CHECK_EXTENSION (system, or a VM's with --vm)",
        lambda c, a: ops.vm_capabilities(a.vm) if a.vm else ops.capabilities(),
    )
    caps.add_argument("--vm", help="a VM id: its KVM_CHECK_EXTENSION answers")

    vm = group("vm", "VMs: KVM_CREATE_VM / kvm_destroy_vm")
    x = cmd(
        "create",
        "create a VM",
        lambda c, a: ops.create_vm(type=a.type, semantics=a.semantics, name=a.name, profile=profile_arg(a.profile)),
        parent=vm,
    )
    x.add_argument(
        "--type",
        default=DEFAULT_VM_TYPE.value,
        choices=[t.value for t in VmType],
        help="KVM_X86_*_VM type",
    )
    x.add_argument(
        "--semantics", default=DEFAULT_SEMANTICS.value, choices=[s.value for s in Semantics], help="which kernel design"
    )
    x.add_argument("--name", help="a name to show with the id")
    x.add_argument(
        "--profile", help="host to behave as: a name (kvm-memattr profiles) or a file from host-profile --json"
    )
    cmd("list", "list VMs", lambda c, a: ops.list_vms(), parent=vm)
    cmd("get", "show a VM", lambda c, a: ops.get_vm(a.vm), parent=vm).add_argument("vm")
    x = cmd("export", "print the VM's snapshot (JSON) to stdout", export_vm, parent=vm)
    x.add_argument("vm")
    x = cmd("import", "create a VM from a snapshot file ('-': stdin)", import_vm, parent=vm)
    x.add_argument("file", help="a snapshot written by vm export, or - for stdin")
    x.add_argument("--name", help="name of the new VM (default: the snapshot's)")
    x = cmd("delete", "destroy a VM (--all: every VM)", delete_vm, parent=vm)
    x.add_argument("vm", nargs="?")
    x.add_argument("--all", action="store_true", help="destroy every VM (a reset between tests)")

    ms = group("memslot", "memslots: KVM_SET_USER_MEMORY_REGION2")
    x = cmd(
        "set",
        "create, move, change flags of, or (--size 0) delete a slot",
        lambda c, a: ops.set_memslot(
            a.vm, a.slot, a.gpa, a.size, a.hva, flags=a.flags, guest_memfd=a.gmem, guest_memfd_offset=a.gmem_offset
        ),
        parent=ms,
    )
    x.add_argument("vm")
    x.add_argument("slot", type=number, help="raw slot: as_id << 16 | id")
    x.add_argument("--gpa", type=number, required=True, help="guest_phys_addr, bytes")
    x.add_argument("--size", type=number, required=True, help="memory_size, bytes (0 deletes the slot)")
    x.add_argument("--hva", type=number, required=True, help="userspace_addr, bytes")
    x.add_argument("--flags", type=number, default=0, help="1 LOG_DIRTY_PAGES, 2 READONLY, 4 GUEST_MEMFD")
    x.add_argument("--gmem", type=int, help="guest_memfd fd")
    x.add_argument("--gmem-offset", type=number, default=0, help="guest_memfd_offset, bytes")
    cmd("list", "list slots", lambda c, a: ops.list_memslots(a.vm), parent=ms).add_argument("vm")
    x = cmd("get", "show a slot", lambda c, a: ops.get_memslot(a.vm, a.slot), parent=ms)
    x.add_argument("vm")
    x.add_argument("slot", type=number)
    x = cmd("delete", "delete a slot", lambda c, a: ops.delete_memslot(a.vm, a.slot), parent=ms)
    x.add_argument("vm")
    x.add_argument("slot", type=number)

    gm = group("gmem", "guest_memfd files: KVM_CREATE_GUEST_MEMFD")
    x = cmd("create", "create a guest_memfd", lambda c, a: ops.create_guest_memfd(a.vm, a.size, a.flags), parent=gm)
    x.add_argument("vm")
    x.add_argument("--size", type=number, required=True, help="bytes, a multiple of 4K")
    x.add_argument("--flags", type=number, default=0, help="linux: 1 MMAP, 2 INIT_SHARED")
    cmd("list", "list open guest_memfds", lambda c, a: ops.list_guest_memfds(a.vm), parent=gm).add_argument("vm")
    x = cmd("close", "close a guest_memfd", lambda c, a: ops.close_guest_memfd(a.vm, a.fd), parent=gm)
    x.add_argument("vm")
    x.add_argument("fd", type=int)
    x = cmd(
        "fallocate",
        "allocate pages, or (--punch-hole) free them and invalidate every binding",
        lambda c, a: ops.fallocate_guest_memfd(a.vm, a.fd, a.offset, a.len, mode=3 if a.punch_hole else 1),
        parent=gm,
    )
    x.add_argument("vm")
    x.add_argument("fd", type=int)
    x.add_argument("offset", type=number, help="bytes")
    x.add_argument("len", type=number, help="bytes")
    x.add_argument("--punch-hole", action="store_true", help="FALLOC_FL_PUNCH_HOLE (with KEEP_SIZE)")
    x = cmd(
        "pages",
        "allocated and private pages of a guest_memfd",
        lambda c, a: ops.get_guest_memfd_pages(a.vm, a.fd),
        parent=gm,
    )
    x.add_argument("vm")
    x.add_argument("fd", type=int)
    x = cmd(
        "mmap",
        "map a guest_memfd into the host process (needs GUEST_MEMFD_FLAG_MMAP)",
        lambda c, a: ops.mmap_guest_memfd(a.vm, a.fd, a.length, offset=a.offset, shared=not a.private),
        parent=gm,
    )
    x.add_argument("vm")
    x.add_argument("fd", type=int)
    x.add_argument("length", type=number, help="bytes")
    x.add_argument("--offset", type=number, default=0, help="bytes into the file")
    x.add_argument("--private", action="store_true", help="MAP_PRIVATE (guest_memfd refuses it: EINVAL)")
    x = cmd(
        "touch",
        "host read/write through a mapping (SIGBUS on a private page or past the file)",
        lambda c, a: ops.touch_host_mapping(a.vm, a.mapping, offset=a.offset, size=a.size, write=a.write),
        parent=gm,
    )
    x.add_argument("vm")
    x.add_argument("mapping", type=int, help="id that mmap returned")
    x.add_argument("--offset", type=number, default=0, help="bytes into the mapping")
    x.add_argument("--size", type=number, default=4096, help="bytes")
    x.add_argument("--write", action="store_true")
    x = cmd("munmap", "unmap a host mapping", lambda c, a: ops.munmap_host_mapping(a.vm, a.mapping), parent=gm)
    x.add_argument("vm")
    x.add_argument("mapping", type=int)
    x = cmd(
        "pin",
        "pin pages through a mapping (GUP, IOMMU): converting them to private is EAGAIN",
        lambda c, a: ops.pin_host_mapping(a.vm, a.mapping, offset=a.offset, size=a.size),
        parent=gm,
    )
    x.add_argument("vm")
    x.add_argument("mapping", type=int, help="id that mmap returned")
    x.add_argument("--offset", type=number, default=0, help="bytes into the mapping")
    x.add_argument("--size", type=number, default=4096, help="bytes")
    x = cmd("unpin", "drop a pin", lambda c, a: ops.unpin_host_pin(a.vm, a.pin), parent=gm)
    x.add_argument("vm")
    x.add_argument("pin", type=int, help="id that pin returned")
    cmd("pins", "the host's pins of guest_memfd pages", lambda c, a: ops.list_host_pins(a.vm), parent=gm).add_argument(
        "vm"
    )
    x = cmd(
        "attrs",
        "KVM_SET_MEMORY_ATTRIBUTES2 on the file: convert in place (linux-7.4-in-place)",
        lambda c, a: ops.set_guest_memfd_memory_attributes(a.vm, a.fd, a.offset, a.size, attributes(a), a.flags),
        parent=gm,
    )
    x.add_argument("vm")
    x.add_argument("fd", type=int)
    x.add_argument("offset", type=number, help="bytes into the file")
    x.add_argument("size", type=number, help="bytes")
    kind = x.add_mutually_exclusive_group(required=True)
    kind.add_argument("--private", action="store_true", help="attributes 8 (KVM_MEMORY_ATTRIBUTE_PRIVATE)")
    kind.add_argument("--shared", action="store_true", help="attributes 0")
    kind.add_argument("--attributes", type=integer, help="the raw attributes value")
    x.add_argument("--flags", type=integer, default=0, help="kvm_memory_attributes2.flags (must be 0)")

    for name, call, what in (
        ("reg-region", "reg_region", "private / pin"),
        ("unreg-region", "unreg_region", "shared / unpin"),
    ):
        x = cmd(
            name,
            f"KVM_MEMORY_ENCRYPT_{name.split('-')[0].upper()}_REGION: make {what}",
            lambda c, a, call=call: getattr(c, call)(a.vm, a.addr, a.size),
        )
        x.add_argument("vm")
        x.add_argument("addr", type=number)
        x.add_argument("size", type=number)
    cmd("regions", "pinned SEV regions", lambda c, a: ops.list_enc_regions(a.vm)).add_argument("vm")

    at = group("attrs", "memory attributes: KVM_SET_MEMORY_ATTRIBUTES and reads")
    x = cmd(
        "set",
        "set attributes of a range",
        lambda c, a: ops.set_memory_attributes(a.vm, a.addr, a.size, attributes(a), a.flags),
        parent=at,
    )
    x.add_argument("vm")
    x.add_argument("addr", type=number)
    x.add_argument("size", type=number)
    kind = x.add_mutually_exclusive_group(required=True)
    kind.add_argument("--private", action="store_true", help="attributes 8 (KVM_MEMORY_ATTRIBUTE_PRIVATE)")
    kind.add_argument("--shared", action="store_true", help="attributes 0")
    kind.add_argument("--attributes", type=integer, help="the raw attributes value")
    x.add_argument("--flags", type=integer, default=0, help="kvm_memory_attributes.flags (must be 0)")
    x = cmd(
        "get",
        "attributes as runs",
        lambda c, a: ops.get_memory_attributes(a.vm, a.start_gfn, a.end_gfn, a.limit),
        parent=at,
    )
    x.add_argument("vm")
    gfn_window(x)

    x = cmd("gfn", "everything about one gfn", lambda c, a: ops.get_gfn(a.vm, a.gfn))
    x.add_argument("vm")
    x.add_argument("gfn", type=integer, help="a gfn (gpa >> 12), decimal or 0x hex")
    cmd("mmu", "MMU invalidation state and statistics", lambda c, a: ops.get_mmu(a.vm)).add_argument("vm")
    x = cmd(
        "mappings",
        "mappings (SPTEs) as runs",
        lambda c, a: ops.get_mappings(a.vm, a.as_id, a.start_gfn, a.end_gfn, a.limit),
    )
    x.add_argument("vm")
    x.add_argument("--as-id", type=integer, default=0, help="address space (1 = SMM)")
    gfn_window(x)
    x = cmd("events", "the VM's event trace", lambda c, a: ops.get_events(a.vm, a.after, a.limit))
    x.add_argument("vm")
    x.add_argument("--after", type=integer, default=0, help="only events with a larger id")
    x.add_argument("--limit", type=integer, default=1000, help="most events to show")

    x = cmd(
        "fault", "one vCPU page fault", lambda c, a: ops.fault(a.vm, a.gpa, a.as_id, a.write, tristate(a), a.mmu_seq)
    )
    x.add_argument("vm")
    x.add_argument("gpa", type=number)
    x.add_argument("--as-id", type=integer, default=0, help="address space (1 = SMM)")
    x.add_argument("--write", action="store_true", help="a write fault (default: a read)")
    acc = x.add_mutually_exclusive_group()
    acc.add_argument("--private", action="store_true", help="a private access (default: as the attribute)")
    acc.add_argument("--shared", action="store_true", help="a shared access")
    x.add_argument("--mmu-seq", type=integer, help="the seq the vCPU snapshotted (default: now)")
    x = cmd("prefault", "KVM_PRE_FAULT_MEMORY", lambda c, a: ops.prefault(a.vm, a.gpa, a.size, a.as_id))
    x.add_argument("vm")
    x.add_argument("gpa", type=number)
    x.add_argument("size", type=number)
    x.add_argument("--as-id", type=integer, default=0, help="address space (1 = SMM)")

    nt = group("notifier", "host MMU-notifier invalidations")
    x = cmd(
        "start", "invalidate_range_start", lambda c, a: ops.start_invalidation(a.vm, a.hva_start, a.hva_end), parent=nt
    )
    x.add_argument("vm")
    x.add_argument("hva_start", type=number)
    x.add_argument("hva_end", type=number)
    x = cmd("end", "invalidate_range_end", lambda c, a: ops.end_invalidation(a.vm, a.id), parent=nt)
    x.add_argument("vm")
    x.add_argument("id", type=int)
    cmd("list", "open invalidations", lambda c, a: ops.list_invalidations(a.vm), parent=nt).add_argument("vm")

    x = cmd("inject", "fail the nth allocation of the next update (no N: show; 'off': disarm)", inject)
    x.add_argument("vm")
    x.add_argument("nth", nargs="?", help="a number, or 'off'")

    x = cmd("explore", "race a vCPU fault against a conversion: every interleaving, checked", None)
    x.set_defaults(explore=True)
    which = x.add_mutually_exclusive_group(required=True)
    which.add_argument("--variant", choices=VARIANT_NAMES, help="the conversion to race")
    which.add_argument("--all", action="store_true", help="every variant on the review's scenario, one table")
    for field in fields(Scenario)[1:]:  # the variant is --variant, above
        o = SCENARIO_OPTIONS[field.name]
        x.add_argument(
            o.flag,
            dest=field.name,
            type=o.type,
            choices=o.choices,
            default=field.default,
            metavar=o.metavar,
            help=o.help,
        )
    x.add_argument("--schedule", help="comma-separated step labels: replay exactly this interleaving")
    return p


def gfn_window(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--start-gfn", type=integer, help="first gfn (default: 0)")
    parser.add_argument("--end-gfn", type=integer, help="end gfn, exclusive (default: max_gfn + 1)")
    parser.add_argument("--limit", type=integer, default=1000, help="most runs to show")


class VersionAction(argparse.Action):
    """``--version``, looked up only when asked: importlib.metadata costs every call otherwise."""

    def __init__(self, option_strings: Sequence[str], dest: str, help: str | None = None) -> None:
        super().__init__(option_strings, argparse.SUPPRESS, nargs=0, default=argparse.SUPPRESS, help=help)

    def __call__(self, parser: argparse.ArgumentParser, *_: Any) -> None:
        print(f"kvm-memattr {version()}")
        parser.exit()


def version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("kvm-memattr")
    except PackageNotFoundError:
        return "0.0.0"
