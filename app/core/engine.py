"""The VM table: ``KVM_CREATE_VM`` / ``kvm_destroy_vm()`` and system-scope capabilities."""

from __future__ import annotations

import contextlib
import threading
import uuid
from typing import Any

from pydantic import BaseModel

from app.core import snapshot
from app.core.budget import ServiceBudget
from app.core.errors import EINVAL, ENOENT, ENOMEM, KvmError
from app.core.journal import Journal, SqliteJournal
from app.core.limits import EngineLimits
from app.core.vm import OPERATIONS, VirtualMachine
from app.models.host import DEFAULT_PROFILE, PROFILES, HostProfile
from app.models.kvm import KVM_API_VERSION, PAGE_SIZE, Semantics, VmType
from app.models.snapshot import VmSnapshot
from app.models.vm import VmCreate


class Engine:
    """All VMs of one simulated ``/dev/kvm``. Each VM behaves as the host of its profile; ``host``
    is the default one, whose answers ``/dev/kvm`` itself gives."""

    def __init__(self, limits: EngineLimits | None = None, host: HostProfile | None = None) -> None:
        self.limits = limits or EngineLimits()
        self.host = host or PROFILES[DEFAULT_PROFILE]
        self.budget = ServiceBudget(self.limits.max_service_items)
        self._vms: dict[str, VirtualMachine] = {}
        self._lock = threading.Lock()
        self.journal: Journal | None = None

    def attach_journal(self, journal: Journal) -> None:
        """From now on every mutation is journaled (attach after replaying the journal)."""
        with self._lock:
            self.journal = journal
            for vm in self._vms.values():
                vm.journal = journal

    def profiles(self) -> list[HostProfile]:
        """The shipped host profiles, and the default one if it is not among them."""
        shipped = list(PROFILES.values())
        return shipped if self.host in shipped else [*shipped, self.host]

    def profile(self, name: str | HostProfile | None) -> HostProfile:
        """A profile by name (the default's name included), a whole document as given, or the default."""
        if name is None:
            return self.host
        if isinstance(name, HostProfile):
            return name
        for p in self.profiles():
            if p.name == name:
                return p
        raise EINVAL(f"no host profile {name!r} (GET /v1/host-profiles lists them)")

    def capabilities(self, host: HostProfile | None = None) -> dict[str, Any]:
        """``KVM_CHECK_EXTENSION`` on ``/dev/kvm`` (system scope) of a host, by default the service's."""
        host = host or self.host
        return {
            "api_version": KVM_API_VERSION,
            "page_size": PAGE_SIZE,
            "max_gfn": host.max_gfn,
            "profile": host,
            "vm_types": [
                {"name": t.value, "value": t.value_code, "has_private_mem": t.has_private_mem}
                for t in VmType
                if host.supports_vm_type(t)
            ],
            "semantics": [s.value for s in Semantics],
            "caps": {"KVM_CAP_USER_MEMORY": 1, **host.caps.model_dump()},
        }

    def vm_capabilities(self, vm_id: str) -> dict[str, Any]:
        """``KVM_CHECK_EXTENSION`` on a VM fd."""
        vm = self.vm(vm_id)
        caps = self.capabilities(vm.kvm.host)
        caps["caps"] |= vm.capabilities()
        return caps

    def create_vm(self, req: VmCreate, vm_id: str | None = None) -> VirtualMachine:
        """``KVM_CREATE_VM`` (``vm_id`` only when replaying a journal)."""
        host = self.profile(req.profile)
        if req.semantics is Semantics.linux and not host.supports_vm_type(req.type):
            # kvm_arch_init_vm(): !kvm_is_vm_type_supported(type)
            raise EINVAL(f"VM type {req.type.value} is not in KVM_CAP_VM_TYPES of host profile {host.name}")
        vm_id = vm_id or uuid.uuid4().hex
        vm = VirtualMachine.create(vm_id, req.name, req.type, req.semantics, self.limits, host, self.budget)
        # Journaled with the whole profile, so a restart rebuilds the VM as the same host.
        return self._add(vm, "create_vm", req.model_copy(update={"profile": host}))

    def import_vm(self, doc: VmSnapshot, vm_id: str | None = None) -> VirtualMachine:
        """A new VM with exactly the state of a snapshot (``vm_id`` only when replaying a journal)."""
        host = doc.profile or self.host
        vm = VirtualMachine(snapshot.load(doc, vm_id or uuid.uuid4().hex, self.limits, host, self.budget))
        return self._add(vm, "import_vm", doc)

    def _add(self, vm: VirtualMachine, op: str, arg: BaseModel) -> VirtualMachine:
        lim = self.limits
        with self._lock:
            refused = None
            if len(self._vms) >= lim.max_vms:
                refused = f"server already holds the maximum of {lim.max_vms} VMs"
            elif not self.budget.room(0):
                refused = f"the service-wide budget ({lim.max_service_items} items) is used up"
            if refused:
                vm.kvm.release()
                raise ENOMEM(refused)
            if self.journal is not None:
                self.journal.record(vm.id, op, (arg,))
                vm.journal = self.journal
            self._vms[vm.id] = vm
        return vm

    def find(self, vm_id: str) -> VirtualMachine | None:
        """The VM, or None (``vm()`` raises ENOENT instead)."""
        return self._vms.get(vm_id)

    def vm(self, vm_id: str) -> VirtualMachine:
        vm = self._vms.get(vm_id)
        if vm is None:
            raise ENOENT(f"no VM {vm_id!r}")
        return vm

    def vms(self) -> list[VirtualMachine]:
        with self._lock:
            return list(self._vms.values())

    def destroy_vm(self, vm_id: str) -> None:
        """``kvm_destroy_vm()``: frees attributes, slots, mappings, guest_memfds, pinned regions."""
        with self._lock:
            vm = self._vms.pop(vm_id, None)
            if vm is None:
                raise ENOENT(f"no VM {vm_id!r}")
            with vm.lock:  # after any call in flight on it (and its journal row)
                vm.kvm.release()
                if self.journal is not None:
                    self.journal.forget_vm(vm_id)

    def compact_all(self) -> None:
        """Write every VM's snapshot to the journal, dropping the calls it covers (graceful shutdown)."""
        if self.journal is None:
            return
        for vm in self.vms():
            with vm.lock:
                if vm.id in self._vms:  # not destroyed meanwhile
                    self.journal.compact(vm.id, vm.snapshot())

    def destroy_all(self) -> int:
        """Destroy every VM (a reset for test suites); returns how many there were."""
        with self._lock:
            ids = list(self._vms)
        for vm_id in ids:
            with contextlib.suppress(ENOENT):  # destroyed meanwhile by another request
                self.destroy_vm(vm_id)
        return len(ids)

    def restore(self, journal: SqliteJournal) -> tuple[int, int]:
        """Start-up: load every snapshot of the state file, then re-run the calls after them, in
        order (before ``attach_journal()``). Returns (snapshots, calls); what cannot be loaded or
        replayed stops start-up with one line naming it."""
        snapshots = calls = 0
        for vm_id, doc in journal.snapshots():
            try:
                self.import_vm(doc, vm_id=vm_id)
            except KvmError as e:
                raise journal.error(f"the snapshot of VM {vm_id} does not load: {e}") from None
            snapshots += 1
        for seq, vm_id, op, args, budget_refused in journal.calls():
            if vm_id not in self._vms and op not in ("create_vm", "import_vm"):
                # Destroying a VM deletes its rows: such a row means the file lost some.
                raise journal.error(
                    f"journal row {seq} ({op}) names VM {vm_id}, which no snapshot or earlier row creates"
                )
            # The service-wide budget answers as it did then: that depended on every other VM.
            self.budget.replaying = not budget_refused
            try:
                with contextlib.suppress(KvmError):  # it failed the same way when it was recorded
                    self.replay(vm_id, op, args)
            except (ValueError, TypeError) as e:
                raise journal.error(f"journal row {seq} (VM {vm_id}, {op}) cannot be replayed: {e}") from None
            finally:
                self.budget.replaying = None
            calls += 1
        return snapshots, calls

    def replay(self, vm_id: str, op: str, args: list[Any]) -> None:
        """Re-run one journaled call (``create_vm`` or an entry of ``vm.OPERATIONS``)."""
        if op == "create_vm":
            self.create_vm(args[0], vm_id=vm_id)
            return
        if op == "import_vm":
            self.import_vm(args[0], vm_id=vm_id)
            return
        method = OPERATIONS.get(op)
        if method is None:  # not a KvmError: replay must stop, not skip it
            raise ValueError(f"journal names an unknown operation {op!r}")
        method(self.vm(vm_id), *args)

    def __len__(self) -> int:
        return len(self._vms)
