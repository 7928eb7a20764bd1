from __future__ import annotations

import asyncio
import inspect

import pytest

from app.client import AsyncClient, Client, KvmMemattrError
from app.client import operations as ops
from app.models import state

GIB4 = 0x1_0000_0000


def test_every_operation_is_on_both_clients() -> None:
    builders = {
        n
        for n, f in vars(ops).items()
        if inspect.isfunction(f) and not n.startswith("_") and f.__module__ == ops.__name__
    }
    spec_ops = {
        op["operationId"]
        for item in Client.in_process().http.get("/openapi.json").json()["paths"].values()
        for op in item.values()
    }
    aliases = {
        "memory_encrypt_reg_region": "reg_region",
        "memory_encrypt_unreg_region": "unreg_region",
        "fault": "fault",
        "start_notifier_invalidation": "start_invalidation",
        "end_notifier_invalidation": "end_invalidation",
        "list_notifier_invalidations": "list_invalidations",
        "metrics": None,
        "get_capabilities": "capabilities",
        "get_vm_capabilities": "vm_capabilities",
    }
    assert {aliases.get(o, o) for o in spec_ops} - {None} == builders
    for name in builders:
        assert callable(getattr(Client, name)) and callable(getattr(AsyncClient, name))


def test_sync_client_story() -> None:
    with Client.in_process() as kvm:
        assert kvm.healthz().status == "ok"
        vm = kvm.create_vm(type="sw_protected", semantics="linux", name="ci")
        assert isinstance(vm, state.Vm) and vm.name == "ci"
        fd = kvm.create_guest_memfd(vm.id, size="0x400000").fd
        kvm.set_memslot(vm.id, 10, GIB4, 0x400000, 0x7F0000000000, flags=4, guest_memfd=fd)
        assert kvm.fault(vm.id, gpa=GIB4, write=True).outcome == "mapped"
        up = kvm.set_memory_attributes(vm.id, address=GIB4, size=0x200000, attributes=8)
        assert (up.pages_zapped, up.tlb_flushed, up.mmu.mmu_invalidate_seq) == (1, True, 1)
        assert kvm.fault(vm.id, gpa=GIB4, mmu_seq=0).retry_reason == "mmu_seq_changed"
        inv = kvm.start_invalidation(vm.id, 0x7F0000200000, 0x7F0000201000)
        assert kvm.list_invalidations(vm.id).invalidations[0].id == inv.id
        assert kvm.end_invalidation(vm.id, inv.id).mmu.mmu_invalidate_seq == 2
        assert [
            r.private for r in kvm.get_memory_attributes(vm.id, start_gfn=GIB4 >> 12, end_gfn=(GIB4 >> 12) + 1024).runs
        ] == [True, False]
        assert kvm.get_gfn(vm.id, GIB4 >> 12).private
        assert kvm.get_events(vm.id, limit=2).next_after == 2
        kvm.delete_memslot(vm.id, 10)
        kvm.delete_vm(vm.id)
        with pytest.raises(KvmMemattrError) as err:
            kvm.get_vm(vm.id)
        assert (err.value.status, err.value.errno) == (404, "ENOENT")


def test_errors_carry_errno_and_problem() -> None:
    with Client.in_process() as kvm:
        vm = kvm.create_vm()  # rfc-v9
        with pytest.raises(KvmMemattrError) as err:
            kvm.set_memory_attributes(vm.id, address=0, size=4096, attributes=8)
        assert (err.value.status, err.value.errno) == (400, "ENOTTY")
        assert err.value.problem["instance"].endswith("/memory-attributes")
        with pytest.raises(KvmMemattrError) as err:
            kvm.reg_region(vm.id, addr=1, size=4096)
        assert err.value.errno == "EINVAL"
        sev = kvm.create_vm(type="sev")
        assert isinstance(kvm.reg_region(sev.id, addr=0x1000, size=0x1000), state.SevRegionUpdate)
        assert isinstance(kvm.unreg_region(vm.id, addr=0, size=0x1000), state.AttributeUpdate)


def test_async_client() -> None:
    async def story() -> None:
        async with AsyncClient.in_process() as kvm:
            vm = await kvm.create_vm(type="default", semantics="linux")
            await kvm.set_memslot(vm.id, 0, 0, 0x10000, 0x10000000)
            r = await kvm.prefault(vm.id, gpa=0, size=0x10000)
            assert r.mapped_pages == 16
            assert (await kvm.get_mappings(vm.id)).runs[0].end_gfn == 16
            priv = await kvm.create_vm(semantics="linux")
            await kvm.set_fault_injection(priv.id, 1)
            with pytest.raises(KvmMemattrError) as err:
                await kvm.set_memory_attributes(priv.id, 0, 0x1000, 8)
            assert (err.value.status, err.value.errno) == (507, "ENOMEM")
            assert (await kvm.get_fault_injection(priv.id)).fail_nth is None

    asyncio.run(story())


def test_reset_destroys_every_vm() -> None:
    with Client.in_process() as kvm:
        kvm.create_vm()
        kvm.create_vm(type="default", semantics="linux")
        assert len(kvm.list_vms().vms) == 2
        kvm.reset()
        assert kvm.list_vms().vms == []


def test_methods_show_their_parameters() -> None:
    """help() and inspect.signature show each operation's parameters, not (*args, **kwargs)."""
    for cls in (Client, AsyncClient):
        sig = inspect.signature(cls.set_memslot)
        assert list(sig.parameters)[:4] == ["self", "vm_id", "slot", "guest_phys_addr"], sig
        assert sig.parameters["flags"].default == 0
        assert sig.return_annotation == "state.MemslotUpdate"
        assert "KVM_SET_USER_MEMORY_REGION" in (cls.set_memslot.__doc__ or "")
    assert AsyncClient.health is AsyncClient.healthz and Client.health is Client.healthz
