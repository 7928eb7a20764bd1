"""The names every surface shares: VM types, semantics, explorer variants, and the defaults.

Pydantic-free, so the CLI can offer them as choices without loading the models (start-up time).
"""

from __future__ import annotations

from enum import StrEnum
from typing import Literal, get_args


class VmType(StrEnum):
    """``KVM_X86_*_VM``: the ``type`` argument of ``KVM_CREATE_VM``."""

    default = "default"
    sw_protected = "sw_protected"
    sev = "sev"
    sev_es = "sev_es"
    snp = "snp"
    tdx = "tdx"

    @property
    def value_code(self) -> int:
        return _VM_TYPE_VALUES[self]

    @property
    def has_private_mem(self) -> bool:
        """``kvm_arch_has_private_mem()``."""
        return self in (VmType.sw_protected, VmType.snp, VmType.tdx)


_VM_TYPE_VALUES = {
    VmType.default: 0,
    VmType.sw_protected: 1,
    VmType.sev: 2,
    VmType.sev_es: 3,
    VmType.snp: 4,
    VmType.tdx: 5,
}
KVM_CAP_VM_TYPES_MASK = sum(1 << v for v in _VM_TYPE_VALUES.values())


class Semantics(StrEnum):
    """Which kernel design a VM follows."""

    rfc_v9 = "rfc-v9"
    linux = "linux"


DEFAULT_VM_TYPE = VmType.sw_protected
DEFAULT_SEMANTICS = Semantics.rfc_v9
"""What ``KVM_CREATE_VM`` makes when nothing is said (contract v2), on every surface."""

VariantName = Literal[
    "rfc-v9",
    "linux",
    "v9-as-posted",
    "v9-naive-unwind",
    "reviewer-reorder",
    "punch-hole",
    "punch-hole-free-first",
    "punch-hole-no-seq-bump",
    "in-place",
    "in-place-store-first",
    "in-place-no-pin-check",
    "in-place-no-seq-bump",
]
VARIANT_NAMES: tuple[VariantName, ...] = get_args(VariantName)

HEX_KEYS = (
    r"(^|_)(gfn|gpa|hva|addr|address|size|offset|slot|start|end|length|pgoff)$|^(userspace_addr|max_gfn|slot_id)$"
)
"""The fields every surface prints in hex (addresses, sizes, offsets, page indexes, slot ids);
counts and other ids stay decimal. The CLI matches it, the page gets it from its template."""
