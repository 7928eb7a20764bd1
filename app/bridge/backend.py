"""The engine behind the simulated device: in this process (``EngineBackend``, the default, ~10 us a
call) or a running service through the typed client (``ServiceBackend``: the program's VMs appear
live in its memory-map page, event trace and API). Both take the uapi's plain integers and fail
with ``BridgeError``: the errno the ioctl returns, and the engine's words for why."""

from __future__ import annotations

import contextlib
import errno as errnos
from typing import Any, Protocol

from app.core.engine import Engine
from app.core.errors import KvmError
from app.core.vm import VirtualMachine
from app.models.host import CAP_NUMBERS, DEFAULT_PROFILE, PROFILES, HostProfile
from app.models.kvm import (
    FallocateRequest,
    KvmCreateGuestMemfd,
    KvmEncRegion,
    KvmMemoryAttributes,
    KvmMemoryAttributes2,
    KvmUserspaceMemoryRegion2,
    PrefaultRequest,
    Semantics,
    VmType,
)
from app.models.vm import VmCreate

KVM_CAP_USER_MEMORY = 3
_CAP_NUMBERS = {**CAP_NUMBERS, "KVM_CAP_USER_MEMORY": KVM_CAP_USER_MEMORY}
_VM_TYPES = {t.value_code: t for t in VmType}


class BridgeError(Exception):
    """A call fails with ``errno`` (positive); ``error_offset`` where the kernel writes one back."""

    def __init__(self, errno: int, detail: str = "", error_offset: int | None = None) -> None:
        super().__init__(detail)
        self.errno, self.detail, self.error_offset = errno, detail, error_offset

    @property
    def name(self) -> str:
        return errnos.errorcode.get(self.errno, str(self.errno))


def caps_by_number(caps: dict[str, int]) -> dict[int, int]:
    """The engine's capabilities by uapi name -> by ``KVM_CAP_*`` number."""
    return {_CAP_NUMBERS[name]: value for name, value in caps.items() if name in _CAP_NUMBERS}


def vm_type(code: int) -> VmType:
    """``KVM_CREATE_VM``'s type argument; an unknown one fails as ``kvm_arch_init_vm()`` does."""
    t = _VM_TYPES.get(code)
    if t is None:
        raise BridgeError(errnos.EINVAL, f"KVM_CREATE_VM: no VM type {code}")
    return t


class Backend(Protocol):
    """What the device asks of the engine: one method per engine operation, VMs by id, guest_memfds
    by the engine's fd for them."""

    profile: HostProfile

    def system_caps(self) -> dict[int, int]: ...
    def vm_caps(self, vm: str) -> dict[int, int]: ...
    def create_vm(self, type_code: int, name: str) -> str: ...
    def destroy_vm(self, vm: str) -> None: ...
    def set_memory_region(self, vm: str, slot: int, req: KvmUserspaceMemoryRegion2) -> None: ...
    def create_guest_memfd(self, vm: str, size: int, flags: int) -> int: ...
    def close_guest_memfd(self, vm: str, fd: int) -> None: ...
    def fallocate(self, vm: str, fd: int, mode: int, offset: int, length: int) -> None: ...
    def set_memory_attributes(self, vm: str, req: KvmMemoryAttributes) -> None: ...
    def set_gmem_attributes(self, vm: str, fd: int, req: KvmMemoryAttributes2) -> None: ...
    def enc_region(self, vm: str, register: bool, addr: int, size: int) -> None: ...
    def prefault(self, vm: str, gpa: int, size: int) -> tuple[int, int]: ...
    def close(self) -> None: ...


class EngineBackend:
    """An engine of its own, in this process: its VMs live as long as the program's fds."""

    def __init__(self, profile: str | dict[str, Any] | None = None) -> None:
        if isinstance(profile, dict):
            self.profile = HostProfile.model_validate(profile)
        elif (profile or DEFAULT_PROFILE) in PROFILES:
            self.profile = PROFILES[profile or DEFAULT_PROFILE]
        else:
            raise SystemExit(f"kvm-memattr exec: no host profile {profile!r} (kvm-memattr profiles lists them)")
        self.engine = Engine(host=self.profile)
        self._vms: dict[str, VirtualMachine] = {}

    def _call(self, vm: str, method: Any, *args: Any) -> Any:
        try:
            return method(self._vms[vm], *args)
        except KvmError as e:
            raise BridgeError(e.errno_value, e.detail, e.members.get("error_offset")) from None  # type: ignore[arg-type]

    def system_caps(self) -> dict[int, int]:
        return caps_by_number(self.engine.capabilities()["caps"])

    def vm_caps(self, vm: str) -> dict[int, int]:
        return caps_by_number(self.engine.vm_capabilities(vm)["caps"])

    def create_vm(self, type_code: int, name: str) -> str:
        req = VmCreate(type=vm_type(type_code), semantics=Semantics.linux, name=name)
        try:
            created = self.engine.create_vm(req)
        except KvmError as e:
            raise BridgeError(e.errno_value, e.detail) from None
        self._vms[created.id] = created
        return created.id

    def destroy_vm(self, vm: str) -> None:
        self._vms.pop(vm)
        self.engine.destroy_vm(vm)

    def set_memory_region(self, vm: str, slot: int, req: KvmUserspaceMemoryRegion2) -> None:
        self._call(vm, VirtualMachine.set_user_memory_region, slot, req)

    def create_guest_memfd(self, vm: str, size: int, flags: int) -> int:
        req = KvmCreateGuestMemfd.model_validate({"size": size, "flags": flags})
        fd: int = self._call(vm, VirtualMachine.create_guest_memfd, req).fd
        return fd

    def close_guest_memfd(self, vm: str, fd: int) -> None:
        self._call(vm, VirtualMachine.close_guest_memfd, fd)

    def fallocate(self, vm: str, fd: int, mode: int, offset: int, length: int) -> None:
        req = FallocateRequest.model_validate({"mode": mode, "offset": offset, "len": length})
        self._call(vm, VirtualMachine.fallocate, fd, req)

    def set_memory_attributes(self, vm: str, req: KvmMemoryAttributes) -> None:
        self._call(vm, VirtualMachine.set_memory_attributes, req)

    def set_gmem_attributes(self, vm: str, fd: int, req: KvmMemoryAttributes2) -> None:
        self._call(vm, VirtualMachine.set_gmem_attributes, fd, req)

    def enc_region(self, vm: str, register: bool, addr: int, size: int) -> None:
        method = VirtualMachine.memory_encrypt_reg_region if register else VirtualMachine.memory_encrypt_unreg_region
        self._call(vm, method, KvmEncRegion.model_validate({"addr": addr, "size": size}))

    def prefault(self, vm: str, gpa: int, size: int) -> tuple[int, int]:
        req = PrefaultRequest.model_validate({"gpa": gpa, "size": size, "as_id": 0})
        left = self._call(vm, VirtualMachine.prefault, req).remaining
        return left.gpa, left.size

    def close(self) -> None:
        for vm in list(self._vms):
            self.destroy_vm(vm)


class ServiceBackend:
    """A running kvm-memattr service, through the typed client: one HTTP call an ioctl."""

    def __init__(self, url: str, token: str | None, profile: str | dict[str, Any] | None) -> None:
        from app.client import Client, KvmMemattrError

        self._error = KvmMemattrError
        self.client = Client(url, token=token)
        self._profile_arg = profile  # what each KVM_CREATE_VM names: the service knows it, or gets it whole
        self._vms: set[str] = set()
        if isinstance(profile, dict):
            self.profile = HostProfile.model_validate(profile)
        elif profile:
            self.profile = self._send(self.client.get_host_profile, profile)
        else:
            self.profile = self._send(self.client.capabilities).profile

    def _send(self, method: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return method(*args, **kwargs)
        except self._error as e:
            number = getattr(errnos, e.errno, errnos.EIO)
            raise BridgeError(number, e.detail, e.problem.get("error_offset")) from None

    def system_caps(self) -> dict[int, int]:
        # The chosen profile's /dev/kvm, which the service's own (GET /v1/capabilities) may not be.
        return caps_by_number(Engine(host=self.profile).capabilities()["caps"])

    def vm_caps(self, vm: str) -> dict[int, int]:
        return caps_by_number(self._send(self.client.vm_capabilities, vm).caps)

    def create_vm(self, type_code: int, name: str) -> str:
        t = vm_type(type_code).value
        vm = self._send(self.client.create_vm, type=t, semantics="linux", name=name, profile=self._profile_arg)
        self._vms.add(vm.id)
        return str(vm.id)

    def destroy_vm(self, vm: str) -> None:
        self._vms.discard(vm)
        self._send(self.client.delete_vm, vm)

    def set_memory_region(self, vm: str, slot: int, req: KvmUserspaceMemoryRegion2) -> None:
        self._send(
            self.client.set_memslot,
            vm,
            slot,
            req.guest_phys_addr,
            req.memory_size,
            req.userspace_addr,
            flags=req.flags,
            guest_memfd=req.guest_memfd,
            guest_memfd_offset=req.guest_memfd_offset,
        )

    def create_guest_memfd(self, vm: str, size: int, flags: int) -> int:
        return int(self._send(self.client.create_guest_memfd, vm, size=size, flags=flags).fd)

    def close_guest_memfd(self, vm: str, fd: int) -> None:
        self._send(self.client.close_guest_memfd, vm, fd)

    def fallocate(self, vm: str, fd: int, mode: int, offset: int, length: int) -> None:
        self._send(self.client.fallocate_guest_memfd, vm, fd, offset, length, mode=mode)

    def set_memory_attributes(self, vm: str, req: KvmMemoryAttributes) -> None:
        self._send(self.client.set_memory_attributes, vm, req.address, req.size, req.attributes, req.flags)

    def set_gmem_attributes(self, vm: str, fd: int, req: KvmMemoryAttributes2) -> None:
        if any(req.reserved):  # the API has no reserved[]: the kernel's answer, in its order
            code = errnos.ENOTTY if not self.profile.gmem_in_place_conversion else errnos.EINVAL
            raise BridgeError(code, "KVM_SET_MEMORY_ATTRIBUTES2: reserved must be all 0")
        self._send(
            self.client.set_guest_memfd_memory_attributes, vm, fd, req.offset, req.size, req.attributes, req.flags
        )

    def enc_region(self, vm: str, register: bool, addr: int, size: int) -> None:
        self._send(self.client.reg_region if register else self.client.unreg_region, vm, addr, size)

    def prefault(self, vm: str, gpa: int, size: int) -> tuple[int, int]:
        left = self._send(self.client.prefault, vm, gpa, size).remaining
        return int(left.gpa), int(left.size)

    def close(self) -> None:
        for vm in list(self._vms):  # whatever the program left (the engine's own VMs die with it)
            with contextlib.suppress(BridgeError):
                self.destroy_vm(vm)
        self.client.close()
