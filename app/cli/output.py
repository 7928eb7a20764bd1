"""What the ``kvm-memattr`` command prints: 80-column tables per result kind, or JSON."""

from __future__ import annotations

import functools
import json
import re
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from app.models.names import HEX_KEYS, KVM_CAP_VM_TYPES_MASK, VmType

if TYPE_CHECKING:
    from rich.console import Console
    from rich.table import Table


# One base per meaning, on every surface: addresses, gfns, sizes, offsets and slot ids in hex;
# counts, ids, fds and counters in decimal (the value's size decides nothing).
_HEX = re.compile(HEX_KEYS)


def _fmt(value: Any, key: str = "") -> str:
    if isinstance(value, bool) or value is None:
        return "-" if value is None else str(value).lower()
    if isinstance(value, int):
        return hex(value) if _HEX.search(key.rsplit(".", 1)[-1]) else str(value)
    if isinstance(value, list):  # a list of scalars (KVM_CAP_VM_TYPES names, a schedule): one line
        return ", ".join(_fmt(v, key) for v in value) or "-"
    return str(value)


def _as(key: str, keys: Any) -> str:
    """The name a value is formatted by: a memslot's ``id`` (beside its ``slot``) is a slot id."""
    head, _, last = key.rpartition(".")
    return f"{head}.slot_id" if last == "id" and (f"{head}.slot" if head else "slot") in keys else key


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
    return " ".join(f"{k}={_fmt(v, k)}" for k, v in event.items() if k not in ("id", "time", "type"))


def _fits(spec: list[tuple[str, Callable[[dict[str, Any]], str]]], row: dict[str, Any]) -> bool:
    """Whether a known table's columns read this row (a gfn's "memslots" are not memslot objects)."""
    try:
        for _, get in spec:
            get(row)
    except (KeyError, TypeError):
        return False
    return True


def _field(key: str) -> Callable[[dict[str, Any]], str]:
    return lambda row: _fmt(row.get(key), _as(key, row))


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


def _vm_types(mask: int) -> str:
    """The types beside ``default`` (every host has that one)."""
    if mask == KVM_CAP_VM_TYPES_MASK:
        return "all"
    return ",".join(t.value for t in VmType if t.value_code and mask >> t.value_code & 1) or "-"


def _attributes(r: dict[str, Any]) -> str:
    """Where private/shared is set: the VM's attributes, or in place the files' (7.4)."""
    caps = r["caps"]
    if r.get("gmem_in_place_conversion"):
        return f"{caps['KVM_CAP_GUEST_MEMFD_MEMORY_ATTRIBUTES']} in file"
    return str(caps["KVM_CAP_MEMORY_ATTRIBUTES"])


_COLUMNS["profiles"] = [
    ("name", lambda r: r["name"]),
    ("kernel", lambda r: r["kernel"]),
    ("+types", lambda r: _vm_types(r["caps"]["KVM_CAP_VM_TYPES"])),
    ("as", lambda r: str(max(1, r["caps"]["KVM_CAP_MULTI_ADDRESS_SPACE"]))),
    ("attrs", _attributes),
    ("gmem", lambda r: f"{r['caps']['KVM_CAP_GUEST_MEMFD']} ({r['caps']['KVM_CAP_GUEST_MEMFD_FLAGS']:#x})"),
    ("max_gfn", lambda r: hex(r["max_gfn"])),
]

_WHOLE = {"vms": {"id", "type", "semantics"}, "profiles": {"name"}}
"""Columns that never wrap, per table (an id must stay copyable; sw_protected and a profile's name
are one word; a VM's host may fold at 80 columns, where id, type and semantics leave no room)."""

PRINTED = object()
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
        if self.quiet or result is PRINTED:
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
            table.add_column(no_wrap=True)  # a key is one word (KVM_CAP_GUEST_MEMFD_MEMORY_ATTRIBUTES)
            table.add_column(overflow="fold")
            for key, value in flat.items():
                table.add_row(f"[bold]{key}[/]", _fmt(value, _as(key, flat)))
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
            table.add_column(name, overflow="fold", no_wrap=name in _WHOLE.get(title, set()))
        for r in rows:
            table.add_row(*(get(r) for _, get in spec))
        return table
