"""The bounds of one simulated ``/dev/kvm``, declared once (what the host is, its ``max_gfn`` and
capabilities, is a host profile: ``app/models/host.py``): ``Settings`` inherits these fields
(so each is also an environment variable) and hands them to the engine."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class EngineLimits(BaseModel):
    """Bounds that keep one client from exhausting the server; past one, a call fails with ENOMEM."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    max_vms: int = Field(1024, ge=1, description="VMs per server; beyond it KVM_CREATE_VM fails with ENOMEM")
    max_attribute_runs: int = Field(1_000_000, ge=1, description="per VM; beyond it an update fails with ENOMEM")
    max_mapping_runs: int = Field(1_000_000, ge=1, description="per VM; beyond it a fault fails with ENOMEM")
    max_events: int = Field(10_000, ge=1, description="events kept per VM")
    max_service_items: int = Field(
        4_000_000,
        ge=1,
        description="attribute and mapping runs, stored events, memslots, guest_memfds, open invalidations and pinned regions "
        "across all VMs (about 1.3 GiB at most, bench/service_bound.py); "
        "past it, calls fail with ENOMEM",
    )
