from __future__ import annotations

from tests.api.conftest import GIB4, HVA, MakeVm, assert_problem, gmem_slot, snapshot
from tests.inprocess import TestClient

GFN = GIB4 >> 12


def test_faults(client: TestClient, make_vm: MakeVm) -> None:
    vm = make_vm("sw_protected", "linux")
    mmio = client.post(f"/v1/vms/{vm}/faults", json={"gpa": "0x1234", "write": True}).json()
    assert mmio["outcome"] == "mmio_exit"
    assert mmio["exit"] == {"reason": "KVM_EXIT_MMIO", "reason_code": 6, "gpa": 0x1234, "is_write": True}
    gmem_slot(client, vm)
    mf = client.post(f"/v1/vms/{vm}/faults", json={"gpa": GIB4 + 5, "private": True}).json()
    assert mf["outcome"] == "memory_fault_exit"
    assert mf["exit"] == {
        "reason": "KVM_EXIT_MEMORY_FAULT",
        "reason_code": 39,
        "flags": 8,
        "gpa": GIB4,
        "size": 4096,
        "errno": "EFAULT",
    }
    client.put(f"/v1/vms/{vm}/memory-attributes", json={"address": GIB4, "size": 4096, "attributes": 8})
    stale = client.post(f"/v1/vms/{vm}/faults", json={"gpa": GIB4, "mmu_seq": 0}).json()
    assert (stale["outcome"], stale["retry_reason"], stale["mmu_seq"], stale["private"]) == (
        "retry",
        "mmu_seq_changed",
        0,
        True,
    )
    ok = client.post(f"/v1/vms/{vm}/faults", json={"gpa": GIB4, "mmu_seq": "1", "write": True}).json()
    assert ok["outcome"] == "mapped" and ok["exit"] is None
    maps = client.get(f"/v1/vms/{vm}/mappings").json()
    assert maps == {
        "runs": [{"as_id": 0, "start_gfn": GFN, "end_gfn": GFN + 1, "private": True, "writable": True}],
        "next_gfn": None,
    }
    stats = client.get(f"/v1/vms/{vm}/mmu").json()["stats"]
    assert (stats["faults"], stats["fault_retries"], stats["memory_fault_exits"], stats["mmio_exits"]) == (4, 1, 1, 1)
    assert_problem(client.post(f"/v1/vms/{vm}/faults", json={"gpa": 0, "as_id": 1}), 422, "EINVAL")
    assert_problem(client.post(f"/v1/vms/{vm}/faults", json={"gpa": 0, "as_id": 2}), 422, "EINVAL")
    assert_problem(client.post(f"/v1/vms/{vm}/faults", json={"gpa": 0, "write": "yes"}), 422, "EINVAL")


def test_prefault_and_mapping_pages(client: TestClient, make_vm: MakeVm) -> None:
    vm = make_vm("default", "linux")
    client.put(f"/v1/vms/{vm}/memslots/0", json={"guest_phys_addr": 0, "memory_size": "0x10000", "userspace_addr": HVA})
    r = client.post(f"/v1/vms/{vm}/prefault", json={"gpa": 0, "size": "0x20000"}).json()
    assert r == {
        "mapped_pages": 16,
        "already_mapped_pages": 0,
        "remaining": {"gpa": 0x10000, "size": 0x10000},
        "stopped": "ENOENT",
    }
    assert client.get(f"/v1/vms/{vm}/mmu").json()["stats"]["faults"] == 0
    before = snapshot(client, vm)
    for bad in (
        {"gpa": 0, "size": 0},
        {"gpa": 1, "size": 4096},
        {"gpa": "0xfffffffffffff000", "size": 4096},
        {"gpa": 0},
    ):
        assert_problem(client.post(f"/v1/vms/{vm}/prefault", json=bad), 422, "EINVAL")
    assert snapshot(client, vm) == before
    # Split the mapping into runs and page through them.
    client.post(f"/v1/vms/{vm}/mmu-notifier/invalidations", json={"hva_start": HVA + 0x1000, "hva_end": HVA + 0x2000})
    client.post(f"/v1/vms/{vm}/mmu-notifier/invalidations", json={"hva_start": HVA + 0x3000, "hva_end": HVA + 0x4000})
    page = client.get(f"/v1/vms/{vm}/mappings", params={"limit": 2}).json()
    assert [(x["start_gfn"], x["end_gfn"]) for x in page["runs"]] == [(0, 1), (2, 3)] and page["next_gfn"] == 3
    rest = client.get(f"/v1/vms/{vm}/mappings", params={"start_gfn": 3, "limit": 2}).json()
    assert [(x["start_gfn"], x["end_gfn"]) for x in rest["runs"]] == [(4, 16)] and rest["next_gfn"] is None


def test_notifier_api(client: TestClient, make_vm: MakeVm) -> None:
    vm = make_vm("sw_protected", "linux")
    gmem_slot(client, vm)
    client.post(f"/v1/vms/{vm}/faults", json={"gpa": GIB4})
    r = client.post(
        f"/v1/vms/{vm}/mmu-notifier/invalidations", json={"hva_start": hex(HVA), "hva_end": hex(HVA + 0x2000)}
    )
    assert r.status_code == 201
    inv = r.json()
    assert inv["gfn_ranges"] == [{"as_id": 0, "start_gfn": GFN, "end_gfn": GFN + 2}] and inv["pages_zapped"] == 1
    assert inv["mmu"]["mmu_invalidate_in_progress"] == 1
    listed = client.get(f"/v1/vms/{vm}/mmu-notifier/invalidations").json()["invalidations"]
    assert listed == [{"id": inv["id"], "hva_start": HVA, "hva_end": HVA + 0x2000, "gfn_ranges": inv["gfn_ranges"]}]
    retry = client.post(f"/v1/vms/{vm}/faults", json={"gpa": GIB4}).json()
    assert retry["retry_reason"] == "invalidation_in_progress"
    end = client.delete(f"/v1/vms/{vm}/mmu-notifier/invalidations/{inv['id']}").json()
    assert (end["mmu"]["mmu_invalidate_seq"], end["mmu"]["mmu_invalidate_in_progress"]) == (1, 0)
    assert_problem(client.delete(f"/v1/vms/{vm}/mmu-notifier/invalidations/{inv['id']}"), 404, "ENOENT")
    assert_problem(
        client.post(f"/v1/vms/{vm}/mmu-notifier/invalidations", json={"hva_start": 5, "hva_end": 5}), 422, "EINVAL"
    )


def test_events_api(client: TestClient, make_vm: MakeVm) -> None:
    vm = make_vm("sw_protected", "rfc-v9")
    client.post(f"/v1/vms/{vm}/memory-encrypt/unreg-region", json={"addr": 0, "size": 4096})
    events = client.get(f"/v1/vms/{vm}/events").json()
    assert [e["type"] for e in events["events"]] == [
        "vm_create",
        "invalidate_begin",
        "attributes_store",
        "invalidate_end",
    ]
    assert events["next_after"] is None
    first = client.get(f"/v1/vms/{vm}/events", params={"limit": 1}).json()
    assert first["next_after"] == 1
    assert client.get(f"/v1/vms/{vm}/events", params={"after": 3}).json()["events"][0]["type"] == "invalidate_end"
    assert_problem(client.get(f"/v1/vms/{vm}/events", params={"after": -1}), 422, "EINVAL")


def test_prefault_errnos(client: TestClient, make_vm: MakeVm) -> None:
    """semantics.md section 8: errno of the first page, and the VMs that cannot prefault."""
    vm = make_vm("default", "linux")
    client.put(f"/v1/vms/{vm}/memslots/0", json={"guest_phys_addr": 0, "memory_size": "0x10000", "userspace_addr": HVA})
    before = snapshot(client, vm)
    assert_problem(client.post(f"/v1/vms/{vm}/prefault", json={"gpa": "0x10000", "size": 4096}), 404, "ENOENT")
    inv = client.post(f"/v1/vms/{vm}/mmu-notifier/invalidations", json={"hva_start": HVA, "hva_end": HVA + 4096})
    assert_problem(client.post(f"/v1/vms/{vm}/prefault", json={"gpa": 0, "size": 4096}), 409, "EAGAIN")
    client.delete(f"/v1/vms/{vm}/mmu-notifier/invalidations/{inv.json()['id']}")
    assert snapshot(client, vm)["maps"] == before["maps"]
    private = make_vm("sw_protected", "linux")
    client.put(
        f"/v1/vms/{private}/memslots/0", json={"guest_phys_addr": 0, "memory_size": "0x10000", "userspace_addr": HVA}
    )
    client.put(f"/v1/vms/{private}/memory-attributes", json={"address": 0, "size": 4096, "attributes": 8})
    assert_problem(client.post(f"/v1/vms/{private}/prefault", json={"gpa": 0, "size": 4096}), 422, "EFAULT")
    for vm_type, semantics, status, errno in (("snp", "linux", 400, "EOPNOTSUPP"), ("tdx", "rfc-v9", 400, "ENOTTY")):
        other = make_vm(vm_type, semantics)
        assert_problem(client.post(f"/v1/vms/{other}/prefault", json={"gpa": 0, "size": 4096}), status, errno)


def test_rfc_v9_memory_fault_exit_abi(client: TestClient, make_vm: MakeVm) -> None:
    vm = make_vm("sw_protected", "rfc-v9")
    client.put(f"/v1/vms/{vm}/memslots/0", json={"guest_phys_addr": 0, "memory_size": "0x10000", "userspace_addr": HVA})
    r = client.post(f"/v1/vms/{vm}/faults", json={"gpa": "0x1000"}).json()
    assert r["exit"] == {
        "reason": "KVM_EXIT_MEMORY_FAULT",
        "reason_code": 38,
        "flags": 1,
        "gpa": 0x1000,
        "size": 4096,
        "errno": None,
    }
