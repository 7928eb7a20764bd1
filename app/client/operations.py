"""One request builder per API operation (sans I/O): the sync and async clients share them.

Each builder returns an :class:`Op` naming the HTTP call and the pydantic model of its answer;
the clients only send it. Integers may be given as ints or as decimal/hex strings.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from ..models.names import VariantName
from ..models.scenario import Scenario

if TYPE_CHECKING:  # the models (and pydantic) load on the first answer parsed: see _model
    from ..models import explorer, state
    from ..models.host import HostProfile
    from ..models.snapshot import VmSnapshot

T = TypeVar("T")
Int = int | str


@dataclass(frozen=True)
class Op(Generic[T]):
    """An HTTP call and how to read its answer (None: no body, e.g. 204)."""

    method: str
    path: str
    parse: Callable[[Any], T] | None
    json: Any = None
    params: dict[str, Any] | None = None


def _model(module: str, name: str) -> Callable[[Any], Any]:
    """``<name>.model_validate`` of the sibling package ``models`` (``app.models`` in the server,
    ``kvm_memattr_client.models`` in the client alone), imported on first use: a caller that only
    moves JSON (the CLI, ``Client.send_json``) never loads pydantic."""

    def parse(data: Any) -> Any:
        return getattr(importlib.import_module(f"..models.{module}", __package__), name).model_validate(data)

    return parse


def _body(**fields: Any) -> dict[str, Any]:
    return {k: v for k, v in fields.items() if v is not None}


def _vm(vm_id: str, tail: str = "") -> str:
    return f"/v1/vms/{vm_id}{tail}"


# -- service and capabilities
def healthz() -> Op[state.Health]:
    """GET /healthz."""
    return Op("GET", "/healthz", _model("state", "Health"))


def capabilities() -> Op[state.Capabilities]:
    """KVM_CHECK_EXTENSION on /dev/kvm."""
    return Op("GET", "/v1/capabilities", _model("state", "Capabilities"))


def list_host_profiles() -> Op[state.HostProfileList]:
    """The host profiles a VM can behave as, and the default one."""
    return Op("GET", "/v1/host-profiles", _model("state", "HostProfileList"))


def get_host_profile(name: str) -> Op[HostProfile]:
    """One host profile by name."""
    return Op("GET", f"/v1/host-profiles/{name}", _model("host", "HostProfile"))


# -- VMs
def create_vm(
    type: str = "sw_protected", semantics: str = "rfc-v9", name: str | None = None, profile: str | Any = None
) -> Op[state.Vm]:
    """KVM_CREATE_VM; ``profile``: a profile name, or a whole profile document (a dict)."""
    if hasattr(profile, "model_dump"):
        profile = profile.model_dump(mode="json")
    body = _body(type=type, semantics=semantics, name=name, profile=profile)
    return Op("POST", "/v1/vms", _model("state", "Vm"), json=body)


def list_vms() -> Op[state.VmList]:
    return Op("GET", "/v1/vms", _model("state", "VmList"))


def get_vm(vm_id: str) -> Op[state.Vm]:
    return Op("GET", _vm(vm_id), _model("state", "Vm"))


def delete_vm(vm_id: str) -> Op[None]:
    """kvm_destroy_vm()."""
    return Op("DELETE", _vm(vm_id), None)


def get_vm_snapshot(vm_id: str) -> Op[VmSnapshot]:
    """The VM's whole state as one versioned document."""
    return Op("GET", _vm(vm_id, "/snapshot"), _model("snapshot", "VmSnapshot"))


def import_vm(snapshot: VmSnapshot | dict[str, Any], name: str | None = None) -> Op[state.Vm]:
    """A new VM from a snapshot (``name``: give it another name)."""
    doc = dict(snapshot) if isinstance(snapshot, dict) else snapshot.model_dump(mode="json")
    if name is not None:
        doc["name"] = name
    return Op("POST", "/v1/vms/import", _model("state", "Vm"), json=doc)


def delete_all_vms() -> Op[None]:
    """Destroy every VM: a reset between tests."""
    return Op("DELETE", "/v1/vms", None)


def vm_capabilities(vm_id: str) -> Op[state.Capabilities]:
    """KVM_CHECK_EXTENSION on a VM fd."""
    return Op("GET", _vm(vm_id, "/capabilities"), _model("state", "Capabilities"))


# -- memslots and guest_memfds
def set_memslot(
    vm_id: str,
    slot: Int,
    guest_phys_addr: Int,
    memory_size: Int,
    userspace_addr: Int,
    flags: Int = 0,
    guest_memfd: Int | None = None,
    guest_memfd_offset: Int = 0,
) -> Op[state.MemslotUpdate]:
    """KVM_SET_USER_MEMORY_REGION2 (``memory_size`` 0 deletes)."""
    body = _body(
        flags=flags,
        guest_phys_addr=guest_phys_addr,
        memory_size=memory_size,
        userspace_addr=userspace_addr,
        guest_memfd=guest_memfd,
        guest_memfd_offset=guest_memfd_offset,
    )
    return Op("PUT", _vm(vm_id, f"/memslots/{slot}"), _model("state", "MemslotUpdate"), json=body)


def list_memslots(vm_id: str) -> Op[state.MemslotList]:
    return Op("GET", _vm(vm_id, "/memslots"), _model("state", "MemslotList"))


def get_memslot(vm_id: str, slot: Int) -> Op[state.Memslot]:
    return Op("GET", _vm(vm_id, f"/memslots/{slot}"), _model("state", "Memslot"))


def delete_memslot(vm_id: str, slot: Int) -> Op[None]:
    return Op("DELETE", _vm(vm_id, f"/memslots/{slot}"), None)


def create_guest_memfd(vm_id: str, size: Int, flags: Int = 0) -> Op[state.GuestMemfd]:
    """KVM_CREATE_GUEST_MEMFD."""
    return Op("POST", _vm(vm_id, "/guest-memfds"), _model("state", "GuestMemfd"), json={"size": size, "flags": flags})


def list_guest_memfds(vm_id: str) -> Op[state.GuestMemfdList]:
    return Op("GET", _vm(vm_id, "/guest-memfds"), _model("state", "GuestMemfdList"))


def get_guest_memfd(vm_id: str, fd: int) -> Op[state.GuestMemfd]:
    return Op("GET", _vm(vm_id, f"/guest-memfds/{fd}"), _model("state", "GuestMemfd"))


def close_guest_memfd(vm_id: str, fd: int) -> Op[state.GuestMemfdClose]:
    """close() on a guest_memfd (kvm_gmem_release())."""
    return Op("DELETE", _vm(vm_id, f"/guest-memfds/{fd}"), _model("state", "GuestMemfdClose"))


def fallocate_guest_memfd(vm_id: str, fd: int, offset: Int, len: Int, mode: Int = 1) -> Op[state.FallocateResult]:
    """fallocate() on a guest_memfd: mode 1 (KEEP_SIZE) allocates, 3 (KEEP_SIZE | PUNCH_HOLE) punches a hole."""
    body = {"mode": mode, "offset": offset, "len": len}
    return Op("POST", _vm(vm_id, f"/guest-memfds/{fd}/fallocate"), _model("state", "FallocateResult"), json=body)


def get_guest_memfd_pages(
    vm_id: str, fd: int, start: Int = 0, end: Int | None = None, limit: int = 1000
) -> Op[state.FileRuns]:
    """Allocated and unallocated runs of a guest_memfd's pages (byte offsets)."""
    params = _body(start=start, end=end, limit=limit)
    return Op("GET", _vm(vm_id, f"/guest-memfds/{fd}/pages"), _model("state", "FileRuns"), params=params)


def mmap_guest_memfd(vm_id: str, fd: int, length: Int, offset: Int = 0, shared: bool = True) -> Op[state.HostMapping]:
    """mmap() of a guest_memfd by the host process (kvm_gmem_mmap())."""
    body = {"offset": offset, "length": length, "shared": shared}
    return Op("POST", _vm(vm_id, f"/guest-memfds/{fd}/mmap"), _model("state", "HostMapping"), json=body)


def list_host_mappings(vm_id: str) -> Op[state.HostMappingList]:
    return Op("GET", _vm(vm_id, "/host-mappings"), _model("state", "HostMappingList"))


def get_host_mapping(vm_id: str, mapping: int) -> Op[state.HostMapping]:
    return Op("GET", _vm(vm_id, f"/host-mappings/{mapping}"), _model("state", "HostMapping"))


def touch_host_mapping(
    vm_id: str, mapping: int, offset: Int = 0, size: Int = 4096, write: bool = False
) -> Op[state.HostTouch]:
    """A host read or write through a mapping (kvm_gmem_fault_user_mapping(): SIGBUS is EFAULT)."""
    body = {"offset": offset, "size": size, "write": write}
    return Op("POST", _vm(vm_id, f"/host-mappings/{mapping}/touch"), _model("state", "HostTouch"), json=body)


def munmap_host_mapping(vm_id: str, mapping: int) -> Op[state.GuestMemfdClose]:
    """munmap(): the last reference to a closed guest_memfd releases it."""
    return Op("DELETE", _vm(vm_id, f"/host-mappings/{mapping}"), _model("state", "GuestMemfdClose"))


def set_guest_memfd_memory_attributes(
    vm_id: str, fd: int, offset: Int, size: Int, attributes: Int, flags: Int = 0
) -> Op[state.GmemAttributeUpdate]:
    """KVM_SET_MEMORY_ATTRIBUTES2 on a guest_memfd (in place, 7.4); EAGAIN and ENOMEM carry error_offset."""
    body = {"offset": offset, "size": size, "attributes": attributes, "flags": flags}
    path = _vm(vm_id, f"/guest-memfds/{fd}/memory-attributes")
    return Op("POST", path, _model("state", "GmemAttributeUpdate"), json=body)


def pin_host_mapping(vm_id: str, mapping: int, offset: Int = 0, size: Int = 4096) -> Op[state.HostPin]:
    """pin_user_pages() through a host mapping (GUP, an IOMMU mapping): held until unpinned."""
    body = {"offset": offset, "size": size}
    return Op("POST", _vm(vm_id, f"/host-mappings/{mapping}/pin"), _model("state", "HostPin"), json=body)


def list_host_pins(vm_id: str) -> Op[state.HostPinList]:
    return Op("GET", _vm(vm_id, "/host-pins"), _model("state", "HostPinList"))


def get_host_pin(vm_id: str, pin: int) -> Op[state.HostPin]:
    return Op("GET", _vm(vm_id, f"/host-pins/{pin}"), _model("state", "HostPin"))


def unpin_host_pin(vm_id: str, pin: int) -> Op[state.GuestMemfdClose]:
    """unpin_user_pages(): the last reference to a closed, unmapped guest_memfd releases it."""
    return Op("DELETE", _vm(vm_id, f"/host-pins/{pin}"), _model("state", "GuestMemfdClose"))


# -- memory attributes
def reg_region(vm_id: str, addr: Int, size: Int) -> Op[state.AttributeUpdate | state.SevRegionUpdate]:
    """KVM_MEMORY_ENCRYPT_REG_REGION (rfc-v9 GPA: make private; SEV: pin an HVA range)."""
    return Op("POST", _vm(vm_id, "/memory-encrypt/reg-region"), _enc_result, json={"addr": addr, "size": size})


def unreg_region(vm_id: str, addr: Int, size: Int) -> Op[state.AttributeUpdate | state.SevRegionUpdate]:
    """KVM_MEMORY_ENCRYPT_UNREG_REGION (rfc-v9 GPA: make shared; SEV: unpin)."""
    return Op("POST", _vm(vm_id, "/memory-encrypt/unreg-region"), _enc_result, json={"addr": addr, "size": size})


def list_enc_regions(vm_id: str) -> Op[state.EncRegionList]:
    return Op("GET", _vm(vm_id, "/memory-encrypt/regions"), _model("state", "EncRegionList"))


def set_memory_attributes(
    vm_id: str, address: Int, size: Int, attributes: Int, flags: Int = 0
) -> Op[state.AttributeUpdate]:
    """KVM_SET_MEMORY_ATTRIBUTES (8 = private, 0 = shared)."""
    body = {"address": address, "size": size, "attributes": attributes, "flags": flags}
    return Op("PUT", _vm(vm_id, "/memory-attributes"), _model("state", "AttributeUpdate"), json=body)


def get_memory_attributes(
    vm_id: str, start_gfn: Int | None = None, end_gfn: Int | None = None, limit: int = 1000
) -> Op[state.AttributeRuns]:
    params = _body(start_gfn=start_gfn, end_gfn=end_gfn, limit=limit)
    return Op("GET", _vm(vm_id, "/memory-attributes"), _model("state", "AttributeRuns"), params=params)


# -- state
def get_gfn(vm_id: str, gfn: Int) -> Op[state.GfnInfo]:
    return Op("GET", _vm(vm_id, f"/gfns/{gfn}"), _model("state", "GfnInfo"))


def get_mmu(vm_id: str) -> Op[state.Mmu]:
    return Op("GET", _vm(vm_id, "/mmu"), _model("state", "Mmu"))


def get_mappings(
    vm_id: str, as_id: int = 0, start_gfn: Int | None = None, end_gfn: Int | None = None, limit: int = 1000
) -> Op[state.MappingRuns]:
    params = _body(as_id=as_id, start_gfn=start_gfn, end_gfn=end_gfn, limit=limit)
    return Op("GET", _vm(vm_id, "/mappings"), _model("state", "MappingRuns"), params=params)


def get_events(vm_id: str, after: int = 0, limit: int = 1000) -> Op[state.EventPage]:
    return Op("GET", _vm(vm_id, "/events"), _model("state", "EventPage"), params={"after": after, "limit": limit})


# -- guest and host activity
def fault(
    vm_id: str, gpa: Int, as_id: int = 0, write: bool = False, private: bool | None = None, mmu_seq: Int | None = None
) -> Op[state.FaultResult]:
    """One vCPU page fault."""
    body = _body(gpa=gpa, as_id=as_id, write=write, private=private, mmu_seq=mmu_seq)
    return Op("POST", _vm(vm_id, "/faults"), _model("state", "FaultResult"), json=body)


def prefault(vm_id: str, gpa: Int, size: Int, as_id: int = 0) -> Op[state.PrefaultResult]:
    """KVM_PRE_FAULT_MEMORY."""
    return Op(
        "POST",
        _vm(vm_id, "/prefault"),
        _model("state", "PrefaultResult"),
        json={"gpa": gpa, "size": size, "as_id": as_id},
    )


def start_invalidation(vm_id: str, hva_start: Int, hva_end: Int) -> Op[state.NotifierStart]:
    """mmu_notifier invalidate_range_start."""
    body = {"hva_start": hva_start, "hva_end": hva_end}
    return Op("POST", _vm(vm_id, "/mmu-notifier/invalidations"), _model("state", "NotifierStart"), json=body)


def end_invalidation(vm_id: str, inv_id: int) -> Op[state.NotifierEnd]:
    """mmu_notifier invalidate_range_end."""
    return Op("DELETE", _vm(vm_id, f"/mmu-notifier/invalidations/{inv_id}"), _model("state", "NotifierEnd"))


def list_invalidations(vm_id: str) -> Op[state.NotifierList]:
    return Op("GET", _vm(vm_id, "/mmu-notifier/invalidations"), _model("state", "NotifierList"))


# -- test support
def set_fault_injection(vm_id: str, fail_nth: int | None) -> Op[state.FaultInjectionState]:
    body = {"fail_nth": fail_nth, "errno": "ENOMEM"}
    return Op("PUT", _vm(vm_id, "/fault-injection"), _model("state", "FaultInjectionState"), json=body)


def get_fault_injection(vm_id: str) -> Op[state.FaultInjectionState]:
    return Op("GET", _vm(vm_id, "/fault-injection"), _model("state", "FaultInjectionState"))


# -- the interleaving explorer
def list_explorer_variants() -> Op[explorer.ExplorerVariants]:
    return Op("GET", "/v1/explorer/variants", _model("explorer", "ExplorerVariants"))


def run_explorer(
    variant: VariantName, *, schedule: list[str] | None = None, **scenario: Any
) -> Op[explorer.ExplorerRun]:
    """Race a vCPU fault against a conversion: every schedule, or exactly ``schedule``. ``scenario``:
    the other fields of ``models.scenario.Scenario`` (start_gfn, npages, to, ...), each its
    default where not given."""
    body = _body(**asdict(Scenario(variant, **scenario)), schedule=schedule)
    return Op("POST", "/v1/explorer/runs", _model("explorer", "ExplorerRun"), json=body)


def get_memory_map(
    vm_id: str, start_gfn: Int | None = None, end_gfn: Int | None = None, buckets: int = 1024
) -> Op[state.MemoryMap]:
    """Per-bucket counts of private, memslot-backed, mapped and allocated guest_memfd pages."""
    params = _body(start_gfn=start_gfn, end_gfn=end_gfn, buckets=buckets)
    return Op("GET", _vm(vm_id, "/memory-map"), _model("state", "MemoryMap"), params=params)


def _enc_result(data: Any) -> state.AttributeUpdate | state.SevRegionUpdate:
    """The REG/UNREG answer: an AttributeUpdate on the GPA path, a SevRegionUpdate on SEV."""
    from ..models import state

    if "pinned_regions" in data:
        return state.SevRegionUpdate.model_validate(data)
    return state.AttributeUpdate.model_validate(data)
