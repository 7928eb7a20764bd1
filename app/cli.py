"""The ``kvm-memattr`` command: ``serve`` the API, drive it from a terminal, or run the ``demo``."""

from __future__ import annotations

import argparse
import functools
import json
import os
import re
import sys
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import httpx

from app.client import DEFAULT_URL, Client, KvmMemattrError
from app.client import operations as ops
from app.client.operations import Op
from app.client.transport import StdlibTransport
from app.models.uint import parse_uint

if TYPE_CHECKING:
    from rich.console import Console
    from rich.table import Table

_SIZE = re.compile(r"(?i)(0x[0-9a-f]+|[0-9]+)([kmgt]i?b?)?")
_SUFFIX = {"k": 10, "m": 20, "g": 30, "t": 40}


DESCRIPTION = """\
A virtual KVM memory-attribute controller: serve the HTTP API, drive it from a
terminal, explore interleavings, check the engine against this host's KVM.

Addresses and sizes (gpa, hva, --size) are bytes: decimal, 0x hex, or a size
with a binary suffix (4K, 2M, 1G). gfns (--start-gfn, --end-gfn, GFN) and
counts are plain integers, decimal or 0x hex. Output is a table, --json for
scripts, -q for nothing. Global options go anywhere on the line.
Exit status: 0 ok, 1 the kernel refused (the errno is printed), 2 bad usage,
3 the server cannot be reached."""


def number(text: str) -> int:
    """``0x1000``, ``4096``, ``4K``, ``2M``, ``1G``: the argparse type for addresses and sizes."""
    m = _SIZE.fullmatch(text.strip())
    if not m:
        raise argparse.ArgumentTypeError(f"{text!r}: expected bytes as decimal, 0x hex, or a size like 2M")
    value = int(m.group(1), 0) if m.group(1).lower().startswith("0x") else int(m.group(1))
    return value << _SUFFIX[m.group(2)[0].lower()] if m.group(2) else value


def integer(text: str) -> int:
    """``4096`` or ``0x1000``, no size suffix: the argparse type for gfns, seqs and counts, read as
    the API reads its integer strings."""
    try:
        return parse_uint(text.strip(), 64)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected an integer, decimal or 0x hex") from None


class _Help(argparse.RawDescriptionHelpFormatter):
    """Keeps the description's lines and shows a default wherever there is a meaningful one."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if "default" in text or default is None or default is False or default is argparse.SUPPRESS:
            return text
        if action.option_strings == []:
            return text
        return f"{text} (default: {default})" if text else f"(default: {default})"


def _fmt(value: Any) -> str:
    if isinstance(value, bool) or value is None:
        return "-" if value is None else str(value).lower()
    if isinstance(value, int):
        return hex(value) if value >= 0x10000 else str(value)
    return str(value)


def _flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in data.items():
        if (isinstance(value, dict) and key != "caps") or (isinstance(value, dict) and prefix):
            out.update(_flatten(value, f"{prefix}{key}."))
        elif isinstance(value, dict):
            out.update(_flatten(value, f"{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _hex(value: Any) -> str:
    return "-" if value is None else hex(value)


def _clock(ts: float) -> str:
    return time.strftime("%H:%M:%S", time.localtime(ts)) + f".{int(ts * 1000) % 1000:03d}"


def _detail(event: dict[str, Any]) -> str:
    return " ".join(f"{k}={_fmt(v)}" for k, v in event.items() if k not in ("id", "time", "type"))


def _fits(spec: list[tuple[str, Callable[[dict[str, Any]], str]]], row: dict[str, Any]) -> bool:
    """Whether a known table's columns read this row (a gfn's "memslots" are not memslot objects)."""
    try:
        for _, get in spec:
            get(row)
    except (KeyError, TypeError):
        return False
    return True


def _field(key: str) -> Callable[[dict[str, Any]], str]:
    return lambda row: _fmt(row.get(key))


def _bindings(g: dict[str, Any]) -> str:
    return ", ".join(f"slot {b['slot']:#x} @{b['offset']:#x}+{b['size']:#x}" for b in g["bindings"]) or "-"


_Column = tuple[str, Callable[[dict[str, Any]], str]]
_COLUMNS: dict[str, list[_Column]] = {
    "vms": [
        ("id", lambda r: r["id"]),
        ("name", lambda r: r["name"] or "-"),
        ("type", lambda r: r["type"]),
        ("semantics", lambda r: r["semantics"]),
        ("host", lambda r: r["profile"]),
    ],
    "events": [
        ("id", lambda r: str(r["id"])),
        ("time", lambda r: _clock(r["time"])),
        ("type", lambda r: r["type"]),
        ("detail", _detail),
    ],
    "memslots": [
        ("slot", lambda r: hex(r["slot"])),
        ("flags", lambda r: str(r["flags"])),
        ("gpa", lambda r: hex(r["guest_phys_addr"])),
        ("size", lambda r: hex(r["memory_size"])),
        ("hva", lambda r: hex(r["userspace_addr"])),
        ("gmem", lambda r: "-" if r["guest_memfd"] is None else f"{r['guest_memfd']}@{r['guest_memfd_offset']:#x}"),
    ],
    "guest_memfds": [
        ("fd", lambda r: str(r["fd"])),
        ("size", lambda r: hex(r["size"])),
        ("flags", lambda r: str(r["flags"])),
        ("bindings", _bindings),
    ],
    "runs": [
        ("start_gfn", lambda r: hex(r["start_gfn"])),
        ("end_gfn", lambda r: hex(r["end_gfn"])),
        ("what", lambda r: ("private" if r["private"] else "shared") + ("" if r.get("writable", True) else " ro")),
    ],
    "invalidations": [
        ("id", lambda r: str(r["id"])),
        ("hva_start", lambda r: hex(r["hva_start"])),
        ("hva_end", lambda r: hex(r["hva_end"])),
        (
            "gfn ranges",
            lambda r: ", ".join(f"as{g['as_id']} [{g['start_gfn']:#x}, {g['end_gfn']:#x})" for g in r["gfn_ranges"]),
        ),
    ],
}

_VM_TYPE_NAMES = ["default", "sw_protected", "sev", "sev_es", "snp", "tdx"]


def _vm_types(mask: int) -> str:
    """The types beside ``default`` (every host has that one)."""
    return "all" if mask == 0x3F else ",".join(n for i, n in enumerate(_VM_TYPE_NAMES) if i and mask >> i & 1) or "-"


_COLUMNS["profiles"] = [
    ("name", lambda r: r["name"]),
    ("kernel", lambda r: r["kernel"]),
    ("+types", lambda r: _vm_types(r["caps"]["KVM_CAP_VM_TYPES"])),
    ("as", lambda r: str(max(1, r["caps"]["KVM_CAP_MULTI_ADDRESS_SPACE"]))),
    ("attrs", lambda r: str(r["caps"]["KVM_CAP_MEMORY_ATTRIBUTES"])),
    ("gmem", lambda r: f"{r['caps']['KVM_CAP_GUEST_MEMFD']} ({r['caps']['KVM_CAP_GUEST_MEMFD_FLAGS']:#x})"),
    ("max_gfn", lambda r: hex(r["max_gfn"])),
]

_PRINTED = object()
"""A command that printed its own output (``vm export``)."""


class Output:
    """Human tables or JSON; colours only on a terminal (rich decides), nothing with --quiet."""

    def __init__(self, as_json: bool, quiet: bool) -> None:
        self.as_json, self.quiet = as_json, quiet

    # rich loads only for a table: --json, -q and the exit paths never pay for it.
    @functools.cached_property
    def console(self) -> Console:
        from rich.console import Console

        return Console(highlight=False)

    @functools.cached_property
    def errors(self) -> Console:
        from rich.console import Console

        return Console(stderr=True, highlight=False)

    def show(self, result: Any, title: str | None = None) -> None:
        if self.quiet or result is _PRINTED:
            return
        data = result.model_dump(mode="json") if hasattr(result, "model_dump") else result
        if self.as_json:
            print(json.dumps(data, indent=2))
            return
        if data is None:
            self.console.print("ok")
            return
        lists = {k: v for k, v in data.items() if isinstance(v, list) and v and isinstance(v[0], dict)}
        scalars = {k: v for k, v in data.items() if k not in lists and not (isinstance(v, list) and not v)}
        for key, rows in lists.items():
            self.console.print(self._table(key, rows))
        if scalars:
            from rich.table import Table

            flat = _flatten(scalars)
            table = Table(title=title, show_header=False, box=None, pad_edge=False)
            for key, value in flat.items():
                table.add_row(f"[bold]{key}[/]", _fmt(value))
            self.console.print(table)
        for key in data:
            if isinstance(data[key], list) and not data[key]:
                self.console.print(f"{key}: (none)")

    @staticmethod
    def _table(title: str, rows: list[dict[str, Any]]) -> Table:
        """A table for 80 columns: the key columns of a known list, never a truncated id."""
        from rich import box
        from rich.table import Table

        table = Table(title=title, title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False, collapse_padding=True)
        spec = _COLUMNS.get(title)
        if spec is None or not all(_fits(spec, r) for r in rows):
            rows = [_flatten(r) for r in rows]
            columns = list(dict.fromkeys(k for r in rows for k in r))
            spec = [(c, _field(c)) for c in columns]
        for name, _ in spec:
            # An id must stay copyable: it never wraps; other columns fold.
            table.add_column(name, overflow="fold", no_wrap=name == "id" and title == "vms")
        for r in rows:
            table.add_row(*(get(r) for _, get in spec))
        return table


def _tristate(args: argparse.Namespace) -> bool | None:
    return True if args.private else False if args.shared else None


def _attributes(args: argparse.Namespace) -> int:
    if args.attributes is not None:
        return int(args.attributes)
    return 8 if args.private else 0


def _global_options(parser: argparse.ArgumentParser, defaults: bool) -> None:
    """The options every command takes; below the top level they default to SUPPRESS, so one given
    after the subcommand overrides and one given before it survives."""

    def d(value: Any) -> Any:
        return value if defaults else argparse.SUPPRESS

    parser.add_argument("--url", default=d(None), help=f"server URL (default: $KVM_MEMATTR_URL, else {DEFAULT_URL})")
    parser.add_argument("--token", default=d(None), help="API token (default: $KVM_MEMATTR_API_TOKEN)")
    parser.add_argument("--json", action="store_true", default=d(False), help="print JSON instead of tables")
    parser.add_argument("-q", "--quiet", action="store_true", default=d(False), help="print nothing on success")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="kvm-memattr", description=DESCRIPTION, formatter_class=_Help)
    p.add_argument("--version", action=_Version, help="show program's version number and exit")
    _global_options(p, defaults=True)
    common = argparse.ArgumentParser(add_help=False)
    _global_options(common, defaults=False)
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    def cmd(name: str, help_: str, run: Callable[..., Any] | None, *, parent: Any = sub) -> argparse.ArgumentParser:
        """``run(client, args)`` returns the operation to send (its JSON is shown) or a result it made."""
        sp: argparse.ArgumentParser = parent.add_parser(
            name, help=help_, description=help_, parents=[common], formatter_class=_Help
        )
        sp.set_defaults(run=run)
        return sp

    def group(name: str, help_: str) -> Any:
        g = sub.add_parser(name, help=help_, description=help_, parents=[common], formatter_class=_Help)
        return g.add_subparsers(dest="sub", required=True, metavar="ACTION")

    s = cmd("serve", "run the HTTP service (one worker: state is in-process)", None)
    s.add_argument("--host", help="bind address (default 127.0.0.1, or KVM_MEMATTR_HOST)")
    s.add_argument("--port", type=int, help="port (default 8000, or KVM_MEMATTR_PORT)")
    s.add_argument(
        "--log-level",
        choices=["critical", "error", "warning", "info", "debug"],
        help="default: info, or KVM_MEMATTR_LOG_LEVEL",
    )
    s.add_argument("--workers", type=int, default=1, help="must be 1")
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
        lambda c, a: ops.create_vm(type=a.type, semantics=a.semantics, name=a.name, profile=_profile_arg(a.profile)),
        parent=vm,
    )
    x.add_argument(
        "--type",
        default="sw_protected",
        choices=["default", "sw_protected", "sev", "sev_es", "snp", "tdx"],
        help="KVM_X86_*_VM type",
    )
    x.add_argument("--semantics", default="rfc-v9", choices=["rfc-v9", "linux"], help="which kernel design")
    x.add_argument("--name", help="a name to show with the id")
    x.add_argument(
        "--profile", help="host to behave as: a name (kvm-memattr profiles) or a file from host-profile --json"
    )
    cmd("list", "list VMs", lambda c, a: ops.list_vms(), parent=vm)
    cmd("get", "show a VM", lambda c, a: ops.get_vm(a.vm), parent=vm).add_argument("vm")
    x = cmd("export", "print the VM's snapshot (JSON) to stdout", _export_vm, parent=vm)
    x.add_argument("vm")
    x = cmd("import", "create a VM from a snapshot file ('-': stdin)", _import_vm, parent=vm)
    x.add_argument("file", help="a snapshot written by vm export, or - for stdin")
    x.add_argument("--name", help="name of the new VM (default: the snapshot's)")
    x = cmd("delete", "destroy a VM (--all: every VM)", _delete_vm, parent=vm)
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
        lambda c, a: ops.set_memory_attributes(a.vm, a.addr, a.size, _attributes(a), a.flags),
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
    _gfn_window(x)

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
    _gfn_window(x)
    x = cmd("events", "the VM's event trace", lambda c, a: ops.get_events(a.vm, a.after, a.limit))
    x.add_argument("vm")
    x.add_argument("--after", type=integer, default=0, help="only events with a larger id")
    x.add_argument("--limit", type=integer, default=1000, help="most events to show")

    x = cmd(
        "fault", "one vCPU page fault", lambda c, a: ops.fault(a.vm, a.gpa, a.as_id, a.write, _tristate(a), a.mmu_seq)
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

    x = cmd("inject", "fail the nth allocation of the next update (no N: show; 'off': disarm)", _inject)
    x.add_argument("vm")
    x.add_argument("nth", nargs="?", help="a number, or 'off'")

    x = cmd("explore", "race a vCPU fault against a conversion: every interleaving, checked", None)
    x.set_defaults(explore=True)
    which = x.add_mutually_exclusive_group(required=True)
    which.add_argument("--variant", choices=VARIANT_NAMES, help="the conversion to race")
    which.add_argument("--all", action="store_true", help="every variant on the review's scenario, one table")
    x.add_argument("--start-gfn", type=number, default=0, help="first gfn of the range (default 0)")
    x.add_argument("--npages", type=int, default=2, help="gfns in the range, 1..8 (default 2)")
    x.add_argument("--to", choices=["private", "shared"], default="private", help="default: private")
    x.add_argument("--fail-nth", type=int, help="the nth per-gfn store (linux: reservation) fails")
    x.add_argument("--initial-private", help="comma-separated offsets private before (default: opposite of --to)")
    x.add_argument("--fault-offset", type=int, default=0, help="which gfn of the range the vCPU faults on")
    x.add_argument(
        "--access", choices=["attribute", "private", "shared"], default="attribute", help="the vCPU's access"
    )
    x.add_argument("--schedule", help="comma-separated step labels: replay exactly this interleaving")
    return p


VARIANT_NAMES = ["rfc-v9", "linux", "v9-as-posted", "v9-naive-unwind", "reviewer-reorder"]


def _explore(client: Client, args: argparse.Namespace, out: Output) -> None:
    from app.timeline import REVIEW_SCENARIO, show_run, summary

    if args.all:
        runs = [client.run_explorer(v, **REVIEW_SCENARIO) for v in VARIANT_NAMES]  # type: ignore[arg-type]
        if out.as_json:
            print(json.dumps([r.model_dump(mode="json") for r in runs], indent=2))
        elif not out.quiet:
            out.console.print(summary(runs))
        return
    scenario: dict[str, Any] = {
        "start_gfn": args.start_gfn,
        "npages": args.npages,
        "to": args.to,
        "fail_nth": args.fail_nth,
        "initial_private": None if args.initial_private is None else _int_list(args.initial_private),
        "fault_gfn_offset": args.fault_offset,
        "fault_access": args.access,
    }
    schedule = None if args.schedule is None else [s.strip() for s in args.schedule.split(",") if s.strip()]
    run = client.run_explorer(args.variant, schedule=schedule, **scenario)
    if out.as_json:
        print(json.dumps(run.model_dump(mode="json"), indent=2))
    elif not out.quiet:
        defaults = {
            "start_gfn": 0,
            "npages": 2,
            "to": "private",
            "fail_nth": None,
            "initial_private": None,
            "fault_gfn_offset": 0,
            "fault_access": "attribute",
        }
        flags = {
            "start_gfn": "--start-gfn",
            "npages": "--npages",
            "to": "--to",
            "fail_nth": "--fail-nth",
            "initial_private": "--initial-private",
            "fault_gfn_offset": "--fault-offset",
            "fault_access": "--access",
        }
        replay = "".join(
            f" {flags[k]} {','.join(map(str, v)) if isinstance(v, list) else hex(v) if k == 'start_gfn' else v}"
            for k, v in scenario.items()
            if v != defaults[k]
        )
        show_run(out.console, run, replay)


def _int_list(text: str) -> list[int]:
    try:
        return [int(t) for t in text.split(",") if t.strip()]
    except ValueError as e:
        raise SystemExit(f"kvm-memattr: --initial-private takes comma-separated offsets: {e}") from e


def _export_vm(client: Client, args: argparse.Namespace) -> Any:
    print(client.get_vm_snapshot(args.vm).model_dump_json(indent=2))
    return _PRINTED


def _import_vm(client: Client, args: argparse.Namespace) -> Any:
    try:
        text = sys.stdin.read() if args.file == "-" else open(args.file, encoding="utf-8").read()  # noqa: SIM115
        doc = json.loads(text)
    except (OSError, ValueError) as e:
        raise SystemExit(f"kvm-memattr: cannot read a snapshot from {args.file}: {e}") from e
    return ops.import_vm(doc, name=args.name)


def _delete_vm(client: Client, args: argparse.Namespace) -> Any:
    if args.all == (args.vm is not None):
        raise SystemExit("kvm-memattr: vm delete takes a VM id or --all")
    return ops.delete_all_vms() if args.all else ops.delete_vm(args.vm)


def _cannot_listen(host: str, port: int) -> str | None:
    """Why the server could not bind, said before start-up logs "ready" (uvicorn binds after it)."""
    import errno
    import socket

    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError as e:
        return f"{e.strerror or e} (is the host name right?)"
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(address)
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                return "the address is already in use (another kvm-memattr? pick one with --port)"
            return e.strerror or str(e)
    return None


def _gfn_window(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--start-gfn", type=integer, help="first gfn (default: 0)")
    parser.add_argument("--end-gfn", type=integer, help="end gfn, exclusive (default: max_gfn + 1)")
    parser.add_argument("--limit", type=integer, default=1000, help="most runs to show")


class _Version(argparse.Action):
    """``--version``, looked up only when asked: importlib.metadata costs every call otherwise."""

    def __init__(self, option_strings: Sequence[str], dest: str, help: str | None = None) -> None:
        super().__init__(option_strings, argparse.SUPPRESS, nargs=0, default=argparse.SUPPRESS, help=help)

    def __call__(self, parser: argparse.ArgumentParser, *_: Any) -> None:
        print(f"kvm-memattr {_version()}")
        parser.exit()


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("kvm-memattr")
    except PackageNotFoundError:
        return "0.0.0"


def _inject(client: Client, args: argparse.Namespace) -> Any:
    if args.nth is None:
        return ops.get_fault_injection(args.vm)
    return ops.set_fault_injection(args.vm, None if args.nth == "off" else int(args.nth))


def _serve(args: argparse.Namespace) -> int:
    import uvicorn
    from pydantic import ValidationError

    from app.connections import bounded_protocol
    from app.core.journal import StateFileError
    from app.main import create_app
    from app.settings import ProfileError, Settings

    if args.workers != 1:
        # State lives in this process: a second worker would be a second, diverging "kernel".
        print("kvm-memattr: refusing --workers != 1: VM state lives in one process", file=sys.stderr)
        return 2
    overrides = {
        k: v for k, v in (("host", args.host), ("port", args.port), ("log_level", args.log_level)) if v is not None
    }
    try:
        settings = Settings(**overrides)
    except ValidationError as e:
        first = e.errors()[0]
        print(f"kvm-memattr: KVM_MEMATTR_{str(first['loc'][0]).upper()}: {first['msg']}", file=sys.stderr)
        return 2
    problem = _cannot_listen(settings.host, settings.port)
    if problem:
        print(f"kvm-memattr: cannot listen on {settings.host}:{settings.port}: {problem}", file=sys.stderr)
        return 3
    try:
        app = create_app(settings)
    except (StateFileError, ProfileError) as e:
        print(f"kvm-memattr: {e}", file=sys.stderr)
        return 2
    uvicorn.run(
        app,
        host=settings.host,
        port=settings.port,
        http=bounded_protocol(settings.max_connections, settings.first_byte_timeout),
        workers=1,
        log_level=settings.log_level,
        access_log=False,  # the app logs one line per request, with its request id
        timeout_graceful_shutdown=5,  # then open streams are cut: SIGTERM ends well inside Docker's 10 s
    )
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    try:
        return _main(argv)
    except BrokenPipeError:  # `kvm-memattr ... | head`: the reader left, which is not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


def _profile_arg(value: str | None) -> Any:
    """A profile name as it is; a path (it has a ``/`` or ends in ``.json``): the document in it."""
    if value is None or ("/" not in value and not value.endswith(".json")):
        return value
    try:
        with open(value, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise SystemExit(f"kvm-memattr: --profile {value}: {e}") from None


def _main(argv: Sequence[str] | None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    if getattr(args, "serve", False):
        return _serve(args)
    out = Output(args.json, args.quiet)
    if getattr(args, "verify_host", False):
        from app.hostkvm.report import run

        return run(args.steps, args.seed, args.json, out.console, args.device)
    if getattr(args, "host_profile", False):
        from app.hostkvm.report import host_profile

        return host_profile(args.json, out.console, args.device)
    if getattr(args, "demo", False):
        from app.demo import run_demo

        return run_demo(args.url, args.token, in_process=args.in_process, quiet=args.quiet)
    url = args.url or os.environ.get("KVM_MEMATTR_URL") or DEFAULT_URL
    try:
        # A CLI call is one short process: plain http goes over the standard library (no httpcore).
        transport = StdlibTransport() if url.lower().startswith("http://") else None
        with Client(url, token=args.token, transport=transport) as client:
            if getattr(args, "explore", False):
                _explore(client, args, out)
            else:
                result = args.run(client, args)
                # A command builds its operation; its answer is shown as the JSON it is (no models).
                out.show(client.send_json(result) if isinstance(result, Op) else result)
    except KvmMemattrError as e:
        out.errors.print(f"kvm-memattr: {e.errno} (HTTP {e.status}): {e.detail}", markup=False)
        return 1
    except httpx.TransportError as e:
        out.errors.print(f"kvm-memattr: cannot reach {url}: {e}", markup=False)
        return 3
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
