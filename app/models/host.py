"""Host profiles: which host a VM behaves as.

A real ``/dev/kvm`` differs by kernel version, build options (``CONFIG_KVM_GUEST_MEMFD``,
``CONFIG_KVM_SW_PROTECTED_VM``, ``CONFIG_KVM_SMM``), vendor module (TDX, SEV-SNP) and hardware
(the usable physical address width). A profile records what userspace can observe of that: the
``KVM_CHECK_EXTENSION`` answers on ``/dev/kvm``, ``kvm_mmu_max_gfn()`` and the kernel version
whose behaviour a ``linux`` VM follows. The engine reads every host-dependent rule from the
VM's profile (``app/core/host.py`` says which rule reads which field).

The shipped profiles are below; ``kvm-memattr host-profile --json`` measures the host it runs
on into the same document, so a production host can be recorded once and simulated anywhere.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from .kvm import DEFAULT_MAX_GFN, GFN_LIMIT, KVM_USER_MEM_SLOTS
from .names import KVM_CAP_VM_TYPES_MASK, VmType

KVM_CAP_NR_MEMSLOTS = 10
KVM_CAP_READONLY_MEM = 81
KVM_CAP_MULTI_ADDRESS_SPACE = 118
KVM_CAP_USER_MEMORY2 = 231
KVM_CAP_MEMORY_FAULT_INFO = 232
KVM_CAP_MEMORY_ATTRIBUTES = 233
KVM_CAP_GUEST_MEMFD = 234
KVM_CAP_VM_TYPES = 235
KVM_CAP_PRE_FAULT_MEMORY = 236
KVM_CAP_GUEST_MEMFD_FLAGS = 244
KVM_CAP_GUEST_MEMFD_MEMORY_ATTRIBUTES = 250
"""250 in v8 of the in-place conversion series (245 and 246 in earlier versions): not final."""

CAP_NUMBERS: dict[str, int] = {
    "KVM_CAP_NR_MEMSLOTS": KVM_CAP_NR_MEMSLOTS,
    "KVM_CAP_READONLY_MEM": KVM_CAP_READONLY_MEM,
    "KVM_CAP_MULTI_ADDRESS_SPACE": KVM_CAP_MULTI_ADDRESS_SPACE,
    "KVM_CAP_USER_MEMORY2": KVM_CAP_USER_MEMORY2,
    "KVM_CAP_MEMORY_FAULT_INFO": KVM_CAP_MEMORY_FAULT_INFO,
    "KVM_CAP_MEMORY_ATTRIBUTES": KVM_CAP_MEMORY_ATTRIBUTES,
    "KVM_CAP_GUEST_MEMFD": KVM_CAP_GUEST_MEMFD,
    "KVM_CAP_VM_TYPES": KVM_CAP_VM_TYPES,
    "KVM_CAP_PRE_FAULT_MEMORY": KVM_CAP_PRE_FAULT_MEMORY,
    "KVM_CAP_GUEST_MEMFD_FLAGS": KVM_CAP_GUEST_MEMFD_FLAGS,
    "KVM_CAP_GUEST_MEMFD_MEMORY_ATTRIBUTES": KVM_CAP_GUEST_MEMFD_MEMORY_ATTRIBUTES,
}
"""The capabilities a profile records, by uapi name (``include/uapi/linux/kvm.h``)."""

Kernel = Literal["6.12", "6.18", "7.3", "7.4"]
KERNELS: tuple[Kernel, ...] = ("6.12", "6.18", "7.3", "7.4")
"""Kernel versions whose ``linux`` behaviour the engine models, oldest first. What differs:
6.12 is Debian's 6.12.118 (``linux-source-6.12``, whose KVM selftests run under ``kvm-memattr
exec``): guest_memfd takes no flags and binds only into VMs with private memory
(``check_memory_region_flags()``), a binding's offset + size is compared unsigned (stable 6.12.114,
"Treat memslot binding offset+size as unsigned values"), and a binding that overlaps another in
the file is ``EEXIST`` (stable 6.12.118, "Split bind() into prepare()+commit() phases":
``kvm_gmem_commit_memory_region()``, after the arch checks) where the 6.18.44 host measured
answered ``EINVAL``;
7.2 made an overlapping guest_memfd binding ``EEXIST`` (7ea987a90585);
7.3 stopped reserving xarray entries for to-shared conversions (119e9db233ad), so those can no
longer fail with ``ENOMEM``; 7.4 (queued in linux-next, not yet released) can move private/shared
into guest_memfd (``gmem_in_place_conversion``); without that parameter it behaves as 7.3."""

_Flag = Annotated[int, Field(ge=0, le=1)]
_Attributes = Annotated[int, Field(ge=0, le=8, multiple_of=8)]
"""0 or KVM_MEMORY_ATTRIBUTE_PRIVATE (8): an int, so a strict model refuses false (Literal[0, 8] let
it through as 0, found by schemathesis)."""


class HostCaps(BaseModel):
    """``KVM_CHECK_EXTENSION`` on ``/dev/kvm`` (system scope); 0 where the host lacks the capability."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    KVM_CAP_NR_MEMSLOTS: int = Field(KVM_USER_MEM_SLOTS, ge=1, le=KVM_USER_MEM_SLOTS, description="slot ids per AS")
    KVM_CAP_MULTI_ADDRESS_SPACE: int = Field(
        2, ge=0, le=2, description="2 with CONFIG_KVM_SMM; 0 (the capability is absent) without: one address space"
    )
    KVM_CAP_VM_TYPES: int = Field(
        KVM_CAP_VM_TYPES_MASK,
        ge=1,
        le=KVM_CAP_VM_TYPES_MASK,
        description="bit n: KVM_CREATE_VM accepts type n (bit 0 always)",
    )
    KVM_CAP_MEMORY_ATTRIBUTES: _Attributes = Field(
        8, description="8 with CONFIG_KVM_GENERIC_MEMORY_ATTRIBUTES, else 0 (no ioctl)"
    )
    KVM_CAP_GUEST_MEMFD: _Flag = Field(1, description="1 with CONFIG_KVM_GUEST_MEMFD, else 0 (no ioctl)")
    KVM_CAP_GUEST_MEMFD_FLAGS: int = Field(
        3, ge=0, le=3, description="GUEST_MEMFD_FLAG_MMAP (1) | GUEST_MEMFD_FLAG_INIT_SHARED (2) the host knows"
    )
    KVM_CAP_READONLY_MEM: _Flag = 1
    KVM_CAP_USER_MEMORY2: _Flag = 1
    KVM_CAP_MEMORY_FAULT_INFO: _Flag = 1
    KVM_CAP_PRE_FAULT_MEMORY: _Flag = Field(1, description="1 with two-dimensional paging (TDP), else 0")
    KVM_CAP_GUEST_MEMFD_MEMORY_ATTRIBUTES: _Attributes = Field(
        0, description="8 where KVM_SET_MEMORY_ATTRIBUTES2 on a guest_memfd converts in place (7.4), else 0"
    )

    @model_validator(mode="after")
    def _kconfig(self) -> HostCaps:
        # What Kconfig makes impossible: private-memory VM types select guest_memfd and memory
        # attributes (KVM_SW_PROTECTED_VM, KVM_INTEL_TDX and KVM_AMD_SEV select them), guest_memfd
        # flags need guest_memfd, and guest_memfd needs KVM_SET_USER_MEMORY_REGION2.
        if not self.KVM_CAP_VM_TYPES & 1:
            raise ValueError("KVM_CAP_VM_TYPES must include the default VM (bit 0)")
        private = sum(1 << t.value_code for t in VmType if t.has_private_mem)
        attributes = self.KVM_CAP_MEMORY_ATTRIBUTES or self.KVM_CAP_GUEST_MEMFD_MEMORY_ATTRIBUTES
        if self.KVM_CAP_VM_TYPES & private and not (self.KVM_CAP_GUEST_MEMFD and attributes):
            raise ValueError(
                "private-memory VM types need KVM_CAP_GUEST_MEMFD and KVM_CAP_MEMORY_ATTRIBUTES "
                "(or, in place, KVM_CAP_GUEST_MEMFD_MEMORY_ATTRIBUTES)"
            )
        if self.KVM_CAP_MEMORY_ATTRIBUTES and self.KVM_CAP_GUEST_MEMFD_MEMORY_ATTRIBUTES:
            raise ValueError("private/shared lives either in the VM or in guest_memfd: not both capabilities")
        if self.KVM_CAP_GUEST_MEMFD_FLAGS and not self.KVM_CAP_GUEST_MEMFD:
            raise ValueError("KVM_CAP_GUEST_MEMFD_FLAGS without KVM_CAP_GUEST_MEMFD")
        if self.KVM_CAP_GUEST_MEMFD and not self.KVM_CAP_USER_MEMORY2:
            raise ValueError("KVM_CAP_GUEST_MEMFD without KVM_CAP_USER_MEMORY2")
        return self


class HostProfile(BaseModel):
    """Which host a VM behaves as: its capabilities, ``max_gfn`` and kernel version."""

    model_config = ConfigDict(
        extra="forbid",
        frozen=True,
        strict=True,
        json_schema_extra={"examples": [{"name": "pvm-6.18", "kernel": "6.18", "caps": {"KVM_CAP_GUEST_MEMFD": 0}}]},
    )

    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9][A-Za-z0-9._+-]*$")
    description: str = Field("", max_length=500)
    kernel: Kernel = Field("6.18", description="the kernel version whose behaviour a linux VM follows")
    release: str | None = Field(None, max_length=200, description="uname -r of a measured host (informational)")
    max_gfn: int = Field(DEFAULT_MAX_GFN, gt=0, lt=GFN_LIMIT, description="kvm_mmu_max_gfn(): bounds memslots")
    caps: HostCaps = Field(default_factory=HostCaps)
    gmem_in_place_conversion: bool = Field(
        False,
        description="the kvm module parameter of v8 of the in-place conversion series (7.4; its final name is "
        "unverified): private/shared lives in each guest_memfd, set by KVM_SET_MEMORY_ATTRIBUTES2 on the file",
    )

    @model_validator(mode="after")
    def _in_place(self) -> HostProfile:
        # What the parameter makes the host answer: the VM's attributes support nothing, the
        # file's PRIVATE (kvm_supported_vm_mem_attributes() / kvm_supported_gmem_attributes()).
        caps = self.caps
        if self.gmem_in_place_conversion:
            if not self.at_least("7.4") or not caps.KVM_CAP_GUEST_MEMFD:
                raise ValueError("gmem_in_place_conversion needs kernel 7.4 and KVM_CAP_GUEST_MEMFD")
            if caps.KVM_CAP_MEMORY_ATTRIBUTES or not caps.KVM_CAP_GUEST_MEMFD_MEMORY_ATTRIBUTES:
                raise ValueError(
                    "gmem_in_place_conversion: KVM_CAP_MEMORY_ATTRIBUTES is 0 and KVM_CAP_GUEST_MEMFD_MEMORY_ATTRIBUTES 8"
                )
        elif caps.KVM_CAP_GUEST_MEMFD_MEMORY_ATTRIBUTES:
            raise ValueError("KVM_CAP_GUEST_MEMFD_MEMORY_ATTRIBUTES without gmem_in_place_conversion")
        return self

    def at_least(self, kernel: Kernel) -> bool:
        """Whether this host's kernel is ``kernel`` or newer."""
        return KERNELS.index(self.kernel) >= KERNELS.index(kernel)

    @property
    def gmem_bind_split(self) -> bool:
        """6.12.118's ``kvm_gmem_bind()`` split in two: ``kvm_gmem_prepare_memory_region()``
        compares offset + size in u64 (6.12.114), ``kvm_gmem_commit_memory_region()`` finds an
        overlap in the file last, after the arch checks, and fails with ``EEXIST``."""
        return self.kernel == "6.12"

    @property
    def gmem_binding_overlap_eexist(self) -> bool:
        """Whether a guest_memfd binding that overlaps another in the file fails with ``EEXIST``
        (6.12.118, 7.2's 7ea987a90585), not ``EINVAL`` (6.18)."""
        return self.gmem_bind_split or self.at_least("7.3")

    @property
    def address_spaces(self) -> int:
        """``KVM_MAX_NR_ADDRESS_SPACES``: 2 with SMM, else 1 (and the capability is absent)."""
        return max(1, self.caps.KVM_CAP_MULTI_ADDRESS_SPACE)

    def supports_vm_type(self, vm_type: VmType) -> bool:
        """``kvm_is_vm_type_supported()``."""
        return bool(self.caps.KVM_CAP_VM_TYPES >> vm_type.value_code & 1)


def _profile(
    name: str,
    description: str,
    max_gfn: int = DEFAULT_MAX_GFN,
    *,
    kernel: Kernel = "6.18",
    in_place: bool = False,
    **caps: int,
) -> HostProfile:
    return HostProfile(
        name=name,
        description=description,
        kernel=kernel,
        max_gfn=max_gfn,
        caps=HostCaps.model_validate(caps),
        gmem_in_place_conversion=in_place,
    )


_NO_GMEM: dict[str, Any] = {  # Any: mypy would match a dict[str, int] against kernel and in_place
    "KVM_CAP_MULTI_ADDRESS_SPACE": 0,
    "KVM_CAP_VM_TYPES": 1,
    "KVM_CAP_MEMORY_ATTRIBUTES": 0,
    "KVM_CAP_PRE_FAULT_MEMORY": 0,
}
# 46 usable physical address bits: 52 less the bits a TDX key id or the SEV C-bit take. An
# assumption (docs/host-profiles.md says so): record your own host for its real max_gfn.
_MAX_GFN_46_BITS = (1 << (46 - 12)) - 1

PROFILES: dict[str, HostProfile] = {
    p.name: p
    for p in (
        _profile(
            "linux-6.12",
            "Linux 6.12 as Debian's 6.12.118 on x86 with everything built in (KVM_SW_PROTECTED_VM too, which "
            "Debian's config leaves out): SMM, the VM types of 6.12 (no TDX), memory attributes, guest_memfd "
            "without flags (no MMAP, no INIT_SHARED, no KVM_CAP_GUEST_MEMFD_FLAGS) and only for VMs with private "
            "memory, TDP (prefault); an overlapping guest_memfd binding is EEXIST (stable 6.12.118).",
            kernel="6.12",
            KVM_CAP_VM_TYPES=sum(1 << t.value_code for t in VmType if t is not VmType.tdx),
            KVM_CAP_GUEST_MEMFD_FLAGS=0,
        ),
        _profile(
            "linux-6.18",
            "Linux 6.18 on x86 with everything built in: SMM (two address spaces), all six VM types "
            "(KVM_SW_PROTECTED_VM, TDX and SEV-SNP), memory attributes, guest_memfd with MMAP and INIT_SHARED, "
            "TDP (prefault). The default.",
        ),
        _profile(
            "linux-7.3",
            "Linux 7.3 on x86 with everything built in, as linux-6.18, with what changed since: an overlapping "
            "guest_memfd binding is EEXIST (7.2), a to-shared KVM_SET_MEMORY_ATTRIBUTES reserves nothing and so "
            "never fails with ENOMEM (7.3).",
            kernel="7.3",
        ),
        _profile(
            "linux-7.4-in-place",
            "Linux 7.4 (as queued in linux-next, not yet released) on x86 with everything built in and the kvm "
            "module loaded with gmem_in_place_conversion=1: private/shared lives in each guest_memfd and changes "
            "with KVM_SET_MEMORY_ATTRIBUTES2 on the file; the VM ioctl supports no attributes.",
            kernel="7.4",
            in_place=True,
            KVM_CAP_MEMORY_ATTRIBUTES=0,
            KVM_CAP_GUEST_MEMFD_MEMORY_ATTRIBUTES=8,
        ),
        _profile(
            "pvm-6.18",
            "Linux 6.18.44 with kvm_pvm and no guest_memfd, as measured on the CI machines of 2026-12: one "
            "address space, the default VM type only, no memory attributes, no guest_memfd, no prefault.",
            KVM_CAP_GUEST_MEMFD=0,
            KVM_CAP_GUEST_MEMFD_FLAGS=0,
            **_NO_GMEM,
        ),
        _profile(
            "pvm-6.18-gmem",
            "Linux 6.18.44 with kvm_pvm and guest_memfd, as measured on the CI machines until 2026-11: one address "
            "space, the default VM type only, no memory attributes, guest_memfd with MMAP and INIT_SHARED, no "
            "prefault.",
            **_NO_GMEM,
        ),
        _profile(
            "tdx-6.18",
            "Linux 6.18 on an Intel TDX host (kvm_intel with TDX): default and TDX VM types, SMM, memory "
            "attributes, guest_memfd, TDP. max_gfn assumes 46 usable physical address bits.",
            _MAX_GFN_46_BITS,
            KVM_CAP_VM_TYPES=1 << VmType.default.value_code | 1 << VmType.tdx.value_code,
        ),
        _profile(
            "snp-6.18",
            "Linux 6.18 on an AMD SEV-SNP host (kvm_amd with SEV): default, SEV, SEV-ES and SNP VM types, SMM, "
            "memory attributes, guest_memfd, TDP. max_gfn assumes 46 usable physical address bits.",
            _MAX_GFN_46_BITS,
            KVM_CAP_VM_TYPES=sum(1 << t.value_code for t in (VmType.default, VmType.sev, VmType.sev_es, VmType.snp)),
        ),
    )
}
DEFAULT_PROFILE = "linux-6.18"
