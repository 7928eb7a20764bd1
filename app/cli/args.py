"""Argument types of the ``kvm-memattr`` command: sizes, integers, flags, a profile file."""

from __future__ import annotations

import argparse
import json
import re
from typing import Any

from app.models.uint import parse_uint

_SIZE = re.compile(r"(?i)(0x[0-9a-f]+|[0-9]+)([kmgt]i?b?)?")
_SUFFIX = {"k": 10, "m": 20, "g": 30, "t": 40}


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


def tristate(args: argparse.Namespace) -> bool | None:
    return True if args.private else False if args.shared else None


def attributes(args: argparse.Namespace) -> int:
    if args.attributes is not None:
        return int(args.attributes)
    return 8 if args.private else 0


def int_list(text: str) -> list[int]:
    try:
        return [int(t) for t in text.split(",") if t.strip()]
    except ValueError as e:
        raise SystemExit(f"kvm-memattr: --initial-private takes comma-separated offsets: {e}") from e


def profile_arg(value: str | None) -> Any:
    """A profile name as it is; a path (it has a ``/`` or ends in ``.json``): the document in it."""
    if value is None or ("/" not in value and not value.endswith(".json")):
        return value
    try:
        with open(value, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise SystemExit(f"kvm-memattr: --profile {value}: {e}") from None
