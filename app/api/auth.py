"""Optional bearer-token access control for ``/v1`` (checked in the service middleware)."""

from __future__ import annotations

import hmac


def check_bearer(authorization: bytes | None, token: str) -> tuple[int, str] | None:
    """None when allowed; else (401, why) without a bearer token, (403, why) with a wrong one.

    The compare is constant-time so the token cannot be guessed byte by byte from timings.
    """
    if not authorization:
        return 401, "missing 'Authorization: Bearer <token>'"
    scheme, _, credentials = authorization.decode("latin-1").partition(" ")
    if scheme.lower() != "bearer" or not credentials.strip():
        return 401, "the Authorization header must be 'Bearer <token>'"
    if not hmac.compare_digest(credentials.strip().encode(), token.encode()):
        return 403, "wrong API token"
    return None
