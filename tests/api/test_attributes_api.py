from __future__ import annotations

import pytest

from tests.api.conftest import GIB4, HVA, MakeVm, assert_problem, gmem_slot, snapshot
from tests.inprocess import TestClient

MIB2 = 0x200000
GFN = GIB4 >> 12


def test_linux_conversion_story(client: TestClient, make_vm: MakeVm) -> None:
    vm = make_vm("sw_protected", "linux")
    gmem_slot(client, vm)
    assert client.post(f"/v1/vms/{vm}/faults", json={"gpa": hex(GIB4), "write": True}).json()["outcome"] == "mapped"
    r = client.put(f"/v1/vms/{vm}/memory-attributes", json={"address": hex(GIB4), "size": hex(MIB2), "attributes": 8})
    up = r.json()
    assert r.status_code == 200
    assert (up["start_gfn"], up["end_gfn"], up["attributes"], up["noop"], up["invalidated"]) == (
        GFN,
        GFN + 512,
        8,
        False,
        True,
    )
    assert (up["pages_zapped"], up["tlb_flushed"], up["mmu"]["mmu_invalidate_seq"]) == (1, True, 1)
    again = client.put(
        f"/v1/vms/{vm}/memory-attributes", json={"address": GIB4, "size": MIB2, "attributes": "8"}
    ).json()
    assert again["noop"] and not again["invalidated"] and again["mmu"]["mmu_invalidate_seq"] == 1
    runs = client.get(
        f"/v1/vms/{vm}/memory-attributes", params={"start_gfn": hex(GFN - 1), "end_gfn": GFN + 1024}
    ).json()
    assert runs == {
        "runs": [
            {"start_gfn": GFN - 1, "end_gfn": GFN, "attributes": 0, "private": False},
            {"start_gfn": GFN, "end_gfn": GFN + 512, "attributes": 8, "private": True},
            {"start_gfn": GFN + 512, "end_gfn": GFN + 1024, "attributes": 0, "private": False},
        ],
        "next_gfn": None,
    }
    page = client.get(f"/v1/vms/{vm}/memory-attributes", params={"limit": 1}).json()
    assert (
        page["runs"] == [{"start_gfn": 0, "end_gfn": GFN, "attributes": 0, "private": False}]
        and page["next_gfn"] == GFN
    )
    rest = client.get(f"/v1/vms/{vm}/memory-attributes", params={"start_gfn": GFN, "limit": 2}).json()
    assert rest["next_gfn"] is None and rest["runs"][-1]["end_gfn"] == 2**40
    whole = client.get(f"/v1/vms/{vm}/memory-attributes", params={"end_gfn": 2**52}).json()
    assert whole["runs"][-1]["end_gfn"] == 2**52
    info = client.get(f"/v1/vms/{vm}/gfns/{GFN}").json()
    assert info == {
        "gfn": GFN,
        "gpa": GIB4,
        "attributes": 8,
        "private": True,
        "memslots": [
            {
                "as_id": 0,
                "slot": 10,
                "id": 10,
                "gmem_only": False,
                "guest_memfd": 3,
                "gmem_pgoff": 0,
                "gmem_allocated": False,  # the fault was shared: its page came from the host, not the file
            }
        ],
        "mappings": [],
    }


@pytest.mark.parametrize(
    ("vm_type", "semantics", "body", "status", "errno"),
    [
        ("sw_protected", "rfc-v9", {"address": 0, "size": 4096, "attributes": 8}, 400, "ENOTTY"),
        ("sw_protected", "linux", {"address": 0, "size": 4096, "attributes": 8, "flags": 1}, 422, "EINVAL"),
        ("default", "linux", {"address": 0, "size": 4096, "attributes": 8}, 422, "EINVAL"),
        ("sw_protected", "linux", {"address": 0, "size": 0, "attributes": 8}, 422, "EINVAL"),
        ("sw_protected", "linux", {"address": "0xfffffffffffff000", "size": 4096, "attributes": 8}, 422, "EINVAL"),
        ("sw_protected", "linux", {"address": 1, "size": 4096, "attributes": 8}, 422, "EINVAL"),
        ("sw_protected", "linux", {"adress": 0, "size": 4096, "attributes": 8}, 422, "EINVAL"),
        ("sw_protected", "linux", {"address": 0, "size": 4096}, 422, "EINVAL"),
        ("sw_protected", "linux", {"address": 0, "size": "4k", "attributes": 8}, 422, "EINVAL"),
    ],
)
def test_set_memory_attributes_errors(
    client: TestClient, make_vm: MakeVm, vm_type: str, semantics: str, body: dict[str, object], status: int, errno: str
) -> None:
    vm = make_vm(vm_type, semantics)
    before = snapshot(client, vm)
    assert_problem(client.put(f"/v1/vms/{vm}/memory-attributes", json=body), status, errno)
    assert snapshot(client, vm) == before


def test_rfc_v9_reg_unreg_and_injected_rollback(client: TestClient, make_vm: MakeVm) -> None:
    vm = make_vm("sw_protected", "rfc-v9")
    r = client.post(
        f"/v1/vms/{vm}/memory-encrypt/unreg-region", json={"addr": "0x100000000", "size": "0x200000"}
    ).json()
    assert (r["attributes"], r["noop"], r["invalidated"], r["mmu"]["mmu_invalidate_seq"]) == (0, False, True, 1)
    r = client.post(f"/v1/vms/{vm}/memory-encrypt/reg-region", json={"addr": GIB4, "size": 4096}).json()
    assert r["attributes"] == 8
    before = snapshot(client, vm)
    assert client.put(f"/v1/vms/{vm}/fault-injection", json={"fail_nth": 2}).json() == {
        "fail_nth": 2,
        "errno": "ENOMEM",
    }
    assert_problem(
        client.post(f"/v1/vms/{vm}/memory-encrypt/reg-region", json={"addr": GIB4, "size": MIB2}), 507, "ENOMEM"
    )
    after = snapshot(client, vm)
    assert after["attrs"] == before["attrs"]
    assert after["vm"]["mmu"]["mmu_invalidate_seq"] == before["vm"]["mmu"]["mmu_invalidate_seq"] + 1
    assert after["inj"] == {"fail_nth": None, "errno": "ENOMEM"}
    assert_problem(client.put(f"/v1/vms/{vm}/fault-injection", json={"fail_nth": 0}), 422, "EINVAL")
    assert_problem(client.put(f"/v1/vms/{vm}/fault-injection", json={"fail_nth": 1, "errno": "EIO"}), 422, "EINVAL")
    assert client.get(f"/v1/vms/{vm}/memory-encrypt/regions").json() == {"regions": []}


def test_linux_injected_failure_changes_nothing(client: TestClient, make_vm: MakeVm) -> None:
    vm = make_vm("sw_protected", "linux")
    gmem_slot(client, vm)
    client.put(f"/v1/vms/{vm}/fault-injection", json={"fail_nth": 1})
    before = snapshot(client, vm)
    assert_problem(
        client.put(f"/v1/vms/{vm}/memory-attributes", json={"address": GIB4, "size": 4096, "attributes": 8}),
        507,
        "ENOMEM",
    )
    after = snapshot(client, vm)
    assert after["inj"]["fail_nth"] is None
    after["inj"] = before["inj"]
    assert after == before


@pytest.mark.parametrize(("vm_type", "semantics"), [("sev", "rfc-v9"), ("snp", "linux")])
def test_sev_hva_path(client: TestClient, make_vm: MakeVm, vm_type: str, semantics: str) -> None:
    vm = make_vm(vm_type, semantics)
    region = {"addr": hex(HVA), "size": "0x1000"}
    r = client.post(f"/v1/vms/{vm}/memory-encrypt/reg-region", json=region).json()
    assert r == {"region": {"addr": HVA, "size": 4096}, "pinned_regions": 1}
    assert client.get(f"/v1/vms/{vm}/memory-encrypt/regions").json() == {"regions": [{"addr": HVA, "size": 4096}]}
    assert_problem(
        client.post(f"/v1/vms/{vm}/memory-encrypt/unreg-region", json={"addr": HVA, "size": 8192}), 422, "EINVAL"
    )
    assert client.post(f"/v1/vms/{vm}/memory-encrypt/unreg-region", json=region).json()["pinned_regions"] == 0


@pytest.mark.parametrize(("vm_type", "semantics"), [("default", "rfc-v9"), ("sw_protected", "linux"), ("tdx", "linux")])
def test_enc_region_enotty(client: TestClient, make_vm: MakeVm, vm_type: str, semantics: str) -> None:
    vm = make_vm(vm_type, semantics)
    for op in ("reg-region", "unreg-region"):
        assert_problem(client.post(f"/v1/vms/{vm}/memory-encrypt/{op}", json={"addr": 0, "size": 4096}), 400, "ENOTTY")


@pytest.mark.parametrize(
    "params",
    [
        {"start_gfn": 5, "end_gfn": 5},
        {"start_gfn": 2**52},
        {"end_gfn": 2**52 + 1},
        {"limit": 0},
        {"limit": 10001},
        {"start_gfn": "-1"},
        {"start_gfn": "0x"},
        {"end_gfn": "1e3"},
    ],
)
def test_run_listing_bad_params(client: TestClient, make_vm: MakeVm, params: dict[str, object]) -> None:
    vm = make_vm()
    assert_problem(client.get(f"/v1/vms/{vm}/memory-attributes", params=params), 422, "EINVAL")
    assert_problem(client.get(f"/v1/vms/{vm}/mappings", params=params), 422, "EINVAL")


def test_gfn_path_bounds(client: TestClient, make_vm: MakeVm) -> None:
    vm = make_vm("sw_protected", "rfc-v9")
    assert client.get(f"/v1/vms/{vm}/gfns/{2**52 - 1}").json()["private"] is True
    assert_problem(client.get(f"/v1/vms/{vm}/gfns/{2**52}"), 422, "EINVAL")
    assert_problem(client.get(f"/v1/vms/{vm}/gfns/abc"), 422, "EINVAL")
