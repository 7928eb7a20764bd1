"""Service configuration, from the environment (prefix ``KVM_MEMATTR_``)."""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Literal

from pydantic import Field, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from app.core.limits import EngineLimits
from app.models.host import DEFAULT_PROFILE, PROFILES, HostProfile
from app.models.kvm import GFN_LIMIT
from app.models.validation import one_line

LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1"})


class ProfileError(Exception):
    """``KVM_MEMATTR_PROFILE`` names no profile, or its file is not one (one line for the operator)."""


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
    api_token: str | None = Field(
        None, description="when set, /v1 needs 'Authorization: Bearer <token>' (an empty value is refused)"
    )
    allowed_hosts: str | None = Field(
        None,
        description="comma-separated Host names the service answers to, * for any (default: the loopback names when "
        "bound to loopback, against DNS rebinding; any when bound elsewhere)",
    )
    max_connections: int = Field(
        4096, ge=1, description="open client connections at once; past it new ones are closed (the fd limit holds)"
    )
    first_byte_timeout: float = Field(
        30, gt=0, le=3600, description="seconds a new connection may stay silent before it is closed"
    )
    max_event_streams: int = Field(
        64, ge=1, description="live-trace streams open at once (each holds a connection); past it EAGAIN"
    )
    state_file: str | None = Field(None, description="SQLite journal: state survives restarts (default: in memory)")
    journal_compact_after: int = Field(
        10_000, ge=1, description="calls journaled for one VM before it is compacted to a snapshot"
    )
    fast_path: bool = Field(
        True,
        description="answer simple routes without FastAPI's per-request machinery (same answers; false to compare)",
    )

    profile: str = Field(
        DEFAULT_PROFILE,
        description="the default host profile of new VMs: a shipped name (GET /v1/host-profiles) or the path of a "
        "profile document (kvm-memattr host-profile --json > host.json)",
    )
    max_gfn: int | None = Field(None, gt=0, lt=GFN_LIMIT, description="overrides the default profile's max_gfn")
    address_spaces: int | None = Field(
        None, ge=1, le=2, description="overrides the default profile's address spaces: 1 drops the SMM space"
    )

    @field_validator("api_token")
    @classmethod
    def _token_not_empty(cls, value: str | None) -> str | None:
        # An empty token used to turn auth off without a word: unset the variable to mean that.
        if value is not None and not value.strip():
            raise ValueError("is empty: unset KVM_MEMATTR_API_TOKEN for no token, or give one")
        return value

    def host_names(self) -> frozenset[str] | None:
        """The Host names to answer to, None for any."""
        if self.allowed_hosts is not None:
            names = frozenset(n.strip().lower() for n in self.allowed_hosts.split(",") if n.strip())
            return None if "*" in names else names
        if self.host in LOOPBACK_NAMES or self.host.startswith("127."):
            # This machine's own names too: a rebinding page cannot make a browser send them.
            # (0.0.0.0 as a Host reaches loopback on Linux.)
            return LOOPBACK_NAMES | {self.host, "0.0.0.0", socket.gethostname().lower()}
        return None

    def host_profile(self) -> HostProfile:
        """The default profile: ``profile`` with the two overrides applied (then named ``<name>-custom``)."""
        if self.profile in PROFILES:
            host = PROFILES[self.profile]
        else:
            try:
                host = HostProfile.model_validate_json(Path(self.profile).read_bytes())
            except OSError as e:
                known = ", ".join(PROFILES)
                raise ProfileError(
                    f"KVM_MEMATTR_PROFILE={self.profile}: not a profile ({known}) nor a file: {e.strerror}"
                ) from None
            except ValidationError as e:
                raise ProfileError(f"KVM_MEMATTR_PROFILE={self.profile}: not a host profile: {one_line(e)}") from None
        if self.max_gfn is None and self.address_spaces is None:
            return host
        caps = host.caps
        if self.address_spaces is not None:  # a host without SMM does not have the capability: 0
            caps = caps.model_copy(update={"KVM_CAP_MULTI_ADDRESS_SPACE": 2 if self.address_spaces == 2 else 0})
        return host.model_copy(
            update={
                "name": f"{host.name}-custom",
                "description": f"{host.description} Changed by KVM_MEMATTR_MAX_GFN / KVM_MEMATTR_ADDRESS_SPACES.",
                "max_gfn": host.max_gfn if self.max_gfn is None else self.max_gfn,
                "caps": caps,
            }
        )

    def engine_limits(self) -> EngineLimits:
        return EngineLimits.model_validate(self.model_dump(include=set(EngineLimits.model_fields)))
