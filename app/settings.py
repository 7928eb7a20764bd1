"""Service configuration, from the environment (prefix ``KVM_MEMATTR_``)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from app.core.limits import EngineLimits


class Settings(BaseSettings, EngineLimits):
    """Every knob of the service; each is also an environment variable ``KVM_MEMATTR_<NAME>``.

    The engine's bounds (``max_gfn``, ``max_vms``, run budgets, ``max_events``) are
    ``EngineLimits``' fields, inherited here and declared nowhere else.
    """

    model_config = SettingsConfigDict(env_prefix="KVM_MEMATTR_", extra="ignore", frozen=False)

    host: str = Field("127.0.0.1", description="bind address (the container sets 0.0.0.0)")
    port: int = Field(8000, ge=0, le=65535, description="TCP port")
    log_level: Literal["critical", "error", "warning", "info", "debug"] = Field(
        "info", description="info logs one line per request"
    )
    log_json: bool = Field(False, description="one JSON object per log line")
    max_body_bytes: int = Field(65_536, ge=1024, description="larger request bodies get 413")
    max_import_bytes: int = Field(
        256 << 20, ge=1024, description="the body limit of POST /v1/vms/import (a snapshot holds every run)"
    )
    api_token: str | None = Field(None, description="when set, /v1 needs 'Authorization: Bearer <token>'")
    state_file: str | None = Field(None, description="SQLite journal: state survives restarts (default: in memory)")
    journal_compact_after: int = Field(
        10_000, ge=1, description="calls journaled for one VM before it is compacted to a snapshot"
    )
    fast_path: bool = Field(
        True,
        description="answer simple routes without FastAPI's per-request machinery (same answers; false to compare)",
    )

    def engine_limits(self) -> EngineLimits:
        return EngineLimits.model_validate(self.model_dump(include=set(EngineLimits.model_fields)))
