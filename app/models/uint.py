"""Parsing a kernel ``__u64``/``__u32`` from JSON or the command line, without pydantic (the CLI
imports this alone)."""

from __future__ import annotations

import re

UINT_PATTERN = r"^([0-9]+|0[xX][0-9a-fA-F]+)$"
"""An integer string: decimal, or ``0x`` hex (what the API documents, and pydantic-core checks)."""
_UINT = re.compile(UINT_PATTERN, re.ASCII)


def parse_uint(value: object, bits: int) -> int:
    """Parse a u``bits`` from a JSON integer or a decimal/hex string."""
    if isinstance(value, str):
        if _UINT.fullmatch(value) is None:
            raise ValueError(f"{value[:40]!r} is not a decimal or 0x-hex integer string")
        return uint_from_text(value, bits)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"expected a u{bits} as an integer or a decimal/0x-hex string")
    if not 0 <= value < 1 << bits:
        raise _out_of_range(value, bits)
    return value


def uint_from_text(text: str, bits: int) -> int:
    """A string ``UINT_PATTERN`` matched, as a u``bits``."""
    is_hex = text[1:2] in ("x", "X")
    # Longer than any u64 can be: refuse before int() does big-number work.
    if len(text) > 20 and len((text[2:] if is_hex else text).lstrip("0")) > 20:
        raise ValueError(f"out of range for u{bits}")
    value = int(text, 16 if is_hex else 10)
    if value >> bits:  # never negative: the pattern has no sign
        raise _out_of_range(value, bits)
    return value


def _out_of_range(value: int, bits: int) -> ValueError:
    return ValueError(f"{value} is out of range for u{bits} (0..{(1 << bits) - 1})")
