"""How a pydantic validation error reads when it must be one line (a start-up failure, a state file)."""

from __future__ import annotations

from pydantic import ValidationError


def one_line(e: ValidationError) -> str:
    """The first problem with its place, and how many more there are."""
    first = e.errors()[0]
    where = ".".join(str(p) for p in first["loc"]) or "the document"
    more = f" (and {e.error_count() - 1} more)" if e.error_count() > 1 else ""
    return f"{where}: {first['msg']}{more}"
