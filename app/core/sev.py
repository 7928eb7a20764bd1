"""The legacy SEV path: ``sev_mem_enc_register_region()`` / ``sev_mem_enc_unregister_region()``."""

from __future__ import annotations

from app.core.errors import EINVAL
from app.core.kvm import Kvm
from app.models.kvm import U64_MAX


def check_region(addr: int, size: int) -> None:
    """``sev_mem_enc_register_region()``'s range check (the snapshot loader's too)."""
    if size == 0 or addr + size > U64_MAX:
        raise EINVAL("size 0 or addr + size wraps")


def register_region(kvm: Kvm, addr: int, size: int) -> None:
    """Pin an HVA range (duplicates and overlaps allowed, each recorded)."""
    check_region(addr, size)
    kvm.take("a pinned region")
    kvm.pinned.append((addr, size))
    kvm.events.emit("sev_region", op="reg", addr=addr, size=size)


def unregister_region(kvm: Kvm, addr: int, size: int) -> None:
    """Unpin a region registered with exactly this addr and size."""
    if (addr, size) not in kvm.pinned:
        raise EINVAL("no pinned region with exactly this addr and size")
    kvm.pinned.remove((addr, size))
    kvm.budget.add(-1)
    kvm.events.emit("sev_region", op="unreg", addr=addr, size=size)
