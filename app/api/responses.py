"""Serialize response models once, in Rust, instead of letting FastAPI re-validate them."""

from __future__ import annotations

from fastapi import Response
from pydantic import BaseModel


def model_response(model: BaseModel, status_code: int = 200) -> Response:
    """A JSON response straight from pydantic-core; the route's ``response_model`` still documents it."""
    return Response(
        model.__pydantic_serializer__.to_json(model), status_code=status_code, media_type="application/json"
    )
