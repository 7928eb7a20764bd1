"""Optional bearer-token access control for ``/v1``."""

from __future__ import annotations

import hmac
from typing import Annotated

from fastapi import Depends, HTTPException, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

_bearer = HTTPBearer(auto_error=False, description="Needed only when KVM_MEMATTR_API_TOKEN is set")


def require_token(
    request: Request, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]
) -> None:
    """401 without a token, 403 with a wrong one (constant-time compare); open when no token is configured."""
    expected: str | None = request.app.state.settings.api_token
    if not expected:
        return
    if credentials is None:
        raise HTTPException(401, "missing 'Authorization: Bearer <token>'", headers={"WWW-Authenticate": "Bearer"})
    if not hmac.compare_digest(credentials.credentials.encode(), expected.encode()):
        raise HTTPException(403, "wrong API token")
