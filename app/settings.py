"""Service configuration, from the environment (prefix ``KVM_MEMATTR_``)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from app.core import EngineLimits
from app.models.kvm import DEFAULT_MAX_GFN


class Settings(BaseSettings):
    """Every knob of the service; each is also an environment variable ``KVM_MEMATTR_<NAME>``."""

    model_config = SettingsConfigDict(env_prefix="KVM_MEMATTR_", extra="ignore")

    host: str = Field("127.0.0.1", description="bind address (the container sets 0.0.0.0)")
    port: int = Field(8000, ge=0, le=65535, description="TCP port")
    log_level: Literal["critical", "error", "warning", "info", "debug"] = Field(
        "info", description="info logs one line per request"
    )
    log_json: bool = Field(False, description="one JSON object per log line")
    max_gfn: int = Field(DEFAULT_MAX_GFN, gt=0, lt=1 << 52, description="kvm_mmu_max_gfn(): bounds memslots only")
    max_vms: int = Field(1024, ge=1, description="VMs per server; beyond it KVM_CREATE_VM fails with ENOMEM")
    max_attribute_runs: int = Field(1_000_000, ge=1, description="per VM; beyond it an update fails with ENOMEM")
    max_mapping_runs: int = Field(1_000_000, ge=1, description="per VM; beyond it a fault fails with ENOMEM")
    max_events: int = Field(10_000, ge=1, description="events kept per VM")
    max_body_bytes: int = Field(65_536, ge=1024, description="larger request bodies get 413")
    api_token: str | None = Field(None, description="when set, /v1 needs 'Authorization: Bearer <token>'")
    state_file: str | None = Field(None, description="SQLite journal: state survives restarts (default: in memory)")

    def engine_limits(self) -> EngineLimits:
        return EngineLimits(
            max_gfn=self.max_gfn,
            max_vms=self.max_vms,
            max_attribute_runs=self.max_attribute_runs,
            max_mapping_runs=self.max_mapping_runs,
            max_events=self.max_events,
        )
