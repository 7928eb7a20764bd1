"""Integer types that mirror the kernel's ``__u64`` / ``__u32``.

Browsers lose precision above 2^53, so every such field accepts a JSON integer
or a string in decimal or ``0x`` hex. Booleans, floats, signs, spaces and
other bases are rejected.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Annotated, Any

from pydantic import BeforeValidator, WithJsonSchema

_DEC = re.compile(r"[0-9]+", re.ASCII)
_HEX = re.compile(r"0[xX][0-9a-fA-F]+", re.ASCII)
_STRING_PATTERN = r"^([0-9]+|0[xX][0-9a-fA-F]+)$"


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


def _validator(bits: int) -> Callable[[Any], int]:
    def validate(value: Any) -> int:
        return parse_uint(value, bits)

    return validate


def _schema(bits: int) -> dict[str, Any]:
    return {
        "anyOf": [
            {"type": "integer", "minimum": 0, "maximum": (1 << bits) - 1},
            {"type": "string", "pattern": _STRING_PATTERN},
        ],
        "title": f"u{bits}",
        "description": f"__u{bits}: a JSON integer, or a decimal or 0x-hex string",
    }


U64 = Annotated[int, BeforeValidator(_validator(64)), WithJsonSchema(_schema(64))]
U32 = Annotated[int, BeforeValidator(_validator(32)), WithJsonSchema(_schema(32))]
