"""``KVM_CREATE_VM``'s arguments, and what kvm-memattr adds to them: the semantics and the host."""

from __future__ import annotations

from pydantic import ConfigDict, Field

from .host import HostProfile
from .kvm import Struct
from .names import DEFAULT_SEMANTICS, DEFAULT_VM_TYPE, Semantics, VmType


class VmCreate(Struct):
    """Arguments of ``KVM_CREATE_VM``, plus the semantics to follow and the host to behave as."""

    # Enum values arrive as JSON strings; strict mode would want enum instances.
    type: VmType = Field(DEFAULT_VM_TYPE, strict=False)
    semantics: Semantics = Field(DEFAULT_SEMANTICS, strict=False)
    name: str | None = Field(default=None, max_length=200)
    profile: str | HostProfile | None = Field(
        default=None,
        description="the host to behave as: a name from GET /v1/host-profiles, or a whole profile document "
        "(kvm-memattr host-profile --json); null: the service's default profile",
    )

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {"type": "sw_protected", "semantics": "rfc-v9", "name": "demo"},
                {"type": "default", "semantics": "linux", "name": "ci-host", "profile": "pvm-6.18"},
            ]
        },
    )
