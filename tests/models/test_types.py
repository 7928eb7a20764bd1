"""u64/u32 inputs: JSON integers or decimal/0x-hex strings, nothing else (api.md conventions)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import BaseModel, ValidationError

from app.models.types import U32, U64


class M(BaseModel):
    a: U64 = 0
    b: U32 = 0


def accepts(value: object, field: str = "a") -> int | None:
    try:
        return getattr(M.model_validate({field: value}), field)  # type: ignore[no-any-return]
    except ValidationError:
        return None


@given(st.integers(min_value=-(2**70), max_value=2**70))
def test_integers_in_range_only(n: int) -> None:
    assert accepts(n) == (n if 0 <= n < 2**64 else None)
    assert accepts(n, "b") == (n if 0 <= n < 2**32 else None)


@given(st.integers(0, 2**64 - 1), st.integers(0, 30), st.booleans(), st.booleans())
def test_decimal_and_hex_strings(n: int, zeros: int, upper_x: bool, upper_digits: bool) -> None:
    assert accepts("0" * zeros + str(n)) == n
    digits = format(n, "X" if upper_digits else "x")
    assert accepts(("0X" if upper_x else "0x") + "0" * zeros + digits) == n


@given(st.integers(2**64, 2**80))
def test_strings_out_of_range(n: int) -> None:
    assert accepts(str(n)) is None and accepts(hex(n)) is None


@pytest.mark.parametrize(
    "bad",
    [
        "",
        "0x",
        "x10",
        "+1",
        "-1",
        " 1",
        "1 ",
        "1_000",
        "0b101",
        "0o17",
        "1.0",
        "1e3",
        "٣",
        "0x-1",
        "0xg",
        "ten",
        True,
        False,
        1.0,
        4096.0,
        None,
        [],
        {},
        "1\n",
    ],
)
def test_everything_else_is_rejected(bad: object) -> None:
    assert accepts(bad) is None
