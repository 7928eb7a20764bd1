"""Integer types that mirror the kernel's ``__u64`` / ``__u32``.

Browsers lose precision above 2^53, so every such field accepts a JSON integer
or a string in decimal or ``0x`` hex. Booleans, floats, signs, spaces and
other bases are rejected.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import GetCoreSchemaHandler, WithJsonSchema
from pydantic_core import CoreSchema, core_schema

from .uint import UINT_PATTERN, uint_from_text


class _UIntCore:
    """Core schema: a strict int in range (validated in Rust, no Python call) or a string of the
    documented pattern (matched in Rust) converted here."""

    def __init__(self, bits: int) -> None:
        self.bits = bits

    def __get_pydantic_core_schema__(self, source: Any, handler: GetCoreSchemaHandler) -> CoreSchema:
        bits = self.bits
        return core_schema.union_schema(
            [
                core_schema.int_schema(strict=True, ge=0, le=(1 << bits) - 1),
                core_schema.no_info_after_validator_function(
                    lambda text: uint_from_text(text, bits), core_schema.str_schema(strict=True, pattern=UINT_PATTERN)
                ),
            ],
            custom_error_type=f"u{bits}",
            custom_error_message=f"expected a u{bits}: an integer 0..2^{bits}-1, or a decimal or 0x-hex string of one",
        )


def uint_json_schema(minimum: int, maximum: int, **annotations: str) -> WithJsonSchema:
    """What the API documents for an integer field: a bounded JSON integer or an integer string."""
    return WithJsonSchema(
        {
            "anyOf": [
                {"type": "integer", "minimum": minimum, "maximum": maximum},
                {"type": "string", "pattern": UINT_PATTERN},
            ],
            **annotations,
        }
    )


def _doc(bits: int) -> WithJsonSchema:
    description = f"__u{bits}: a JSON integer, or a decimal or 0x-hex string"
    return uint_json_schema(0, (1 << bits) - 1, title=f"u{bits}", description=description)


U64 = Annotated[int, _UIntCore(64), _doc(64)]
U32 = Annotated[int, _UIntCore(32), _doc(32)]
