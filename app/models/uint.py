"""Parsing a kernel ``__u64``/``__u32`` from JSON or the command line, without pydantic (the CLI
imports this alone)."""

from __future__ import annotations

import re

_DEC = re.compile(r"[0-9]+", re.ASCII)
_HEX = re.compile(r"0[xX][0-9a-fA-F]+", re.ASCII)


def parse_uint(value: object, bits: int) -> int:
    """Parse a u``bits`` from a JSON integer or a decimal/hex string."""
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise ValueError(f"expected a u{bits} as an integer or a decimal/0x-hex string")
    if isinstance(value, str):
        if _DEC.fullmatch(value):
            digits, base = value, 10
        elif _HEX.fullmatch(value):
            digits, base = value[2:], 16
        else:
            raise ValueError(f"{value[:40]!r} is not a decimal or 0x-hex integer string")
        digits = digits.lstrip("0") or "0"
        # Longer than any u64 can be: refuse before int() does big-number work.
        if len(digits) > 20:
            raise ValueError(f"out of range for u{bits}")
        value = int(digits, base)
    if not 0 <= value < 1 << bits:
        raise ValueError(f"{value} is out of range for u{bits} (0..{(1 << bits) - 1})")
    return value
