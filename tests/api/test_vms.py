from __future__ import annotations

import pytest

from tests.api.conftest import MakeVm, assert_problem
from tests.inprocess import TestClient


def test_create_defaults_get_list_delete(client: TestClient) -> None:
    r = client.post("/v1/vms")
    assert r.status_code == 201
    vm = r.json()
    assert (vm["type"], vm["type_value"], vm["semantics"], vm["has_private_mem"], vm["address_spaces"]) == (
        "sw_protected",
        1,
        "rfc-v9",
        True,
        2,
    )
    assert vm["mmu"]["mmu_invalidate_range_start"] is None and vm["memslot_count"] == 0
    assert client.get(f"/v1/vms/{vm['id']}").json() == vm
    assert [v["id"] for v in client.get("/v1/vms").json()["vms"]] == [vm["id"]]
    assert client.delete(f"/v1/vms/{vm['id']}").status_code == 204
    assert_problem(client.get(f"/v1/vms/{vm['id']}"), 404, "ENOENT")
    assert_problem(client.delete(f"/v1/vms/{vm['id']}"), 404, "ENOENT")


@pytest.mark.parametrize(
    ("vm_type", "semantics", "value", "nr_as"),
    [
        ("default", "linux", 0, 2),
        ("sw_protected", "linux", 1, 1),
        ("sev", "rfc-v9", 2, 2),
        ("sev_es", "linux", 3, 2),
        ("snp", "linux", 4, 1),
        ("tdx", "rfc-v9", 5, 2),
    ],
)
def test_vm_types(client: TestClient, vm_type: str, semantics: str, value: int, nr_as: int) -> None:
    vm = client.post("/v1/vms", json={"type": vm_type, "semantics": semantics, "name": "x"}).json()
    assert (vm["type_value"], vm["address_spaces"], vm["name"]) == (value, nr_as, "x")


@pytest.mark.parametrize("body", [{"type": "kvm"}, {"semantics": "v10"}, {"typo": 1}, {"name": 5}, [], "x"])
def test_create_rejects_bad_bodies(client: TestClient, body: object) -> None:
    assert_problem(client.post("/v1/vms", json=body), 422, "EINVAL")
    assert client.get("/v1/vms").json()["vms"] == []


def test_capabilities(client: TestClient, make_vm: MakeVm) -> None:
    system = client.get("/v1/capabilities").json()
    assert (system["api_version"], system["page_size"], system["max_gfn"]) == (12, 4096, 2**40 - 1)
    assert system["semantics"] == ["rfc-v9", "linux"]
    assert [t["value"] for t in system["vm_types"]] == [0, 1, 2, 3, 4, 5]
    assert system["caps"] == {
        "KVM_CAP_USER_MEMORY": 1,
        "KVM_CAP_NR_MEMSLOTS": 32764,
        "KVM_CAP_MULTI_ADDRESS_SPACE": 2,
        "KVM_CAP_USER_MEMORY2": 1,
        "KVM_CAP_MEMORY_FAULT_INFO": 1,
        "KVM_CAP_MEMORY_ATTRIBUTES": 8,
        "KVM_CAP_GUEST_MEMFD": 1,
        "KVM_CAP_VM_TYPES": 0x3F,
        "KVM_CAP_GUEST_MEMFD_FLAGS": 3,
        "KVM_CAP_READONLY_MEM": 1,
        "KVM_CAP_PRE_FAULT_MEMORY": 1,
        "KVM_CAP_GUEST_MEMFD_MEMORY_ATTRIBUTES": 0,
    }
    assert system["profile"]["name"] == "linux-6.18" and system["profile"]["kernel"] == "6.18"
    linux = client.get(f"/v1/vms/{make_vm('sw_protected', 'linux')}/capabilities").json()["caps"]
    assert (linux["KVM_CAP_MEMORY_ATTRIBUTES"], linux["KVM_CAP_MULTI_ADDRESS_SPACE"]) == (8, 1)
    rfc = client.get(f"/v1/vms/{make_vm('sw_protected', 'rfc-v9')}/capabilities").json()["caps"]
    assert (rfc["KVM_CAP_MEMORY_ATTRIBUTES"], rfc["KVM_CAP_MULTI_ADDRESS_SPACE"]) == (0, 2)
    assert_problem(client.get("/v1/vms/missing/capabilities"), 404, "ENOENT")


def test_service_endpoints(client: TestClient) -> None:
    health = client.get("/healthz").json()
    assert health["status"] == "ok" and health["vms"] == 0 and health["pid"] > 0
    r = client.get("/healthz", headers={"X-Request-ID": "abc-123"})
    assert r.headers["x-request-id"] == "abc-123"
    assert len(client.get("/healthz").headers["x-request-id"]) == 16
    docs = client.get("/docs")
    assert docs.status_code == 200 and "swagger-ui-bundle.js" in docs.text and "cdn" not in docs.text.lower()
    assert client.get("/static-offline-docs/swagger-ui-bundle.js").status_code == 200
    assert_problem(client.get("/no/such/path"), 404, "ENOENT")
    wrong_method = client.patch("/v1/vms")
    assert_problem(wrong_method, 405, "EINVAL")
    assert wrong_method.headers["allow"] == "DELETE, GET, POST"
    # Starlette named only the first route's methods; the path has three (found by schemathesis).
    assert client.options("/v1/vms/x/memslots/0").headers["allow"] == "DELETE, GET, PUT"


def test_openapi_documents_problems(client: TestClient) -> None:
    spec = client.get("/openapi.json").json()
    assert "HTTPValidationError" not in spec["components"]["schemas"]
    ops = [op for item in spec["paths"].values() for op in item.values()]
    assert len({op["operationId"] for op in ops}) == len(ops)
    for op in ops:
        assert op.get("summary"), op["operationId"]
        for code, resp in op["responses"].items():
            if int(code) >= 400:
                assert list(resp["content"]) == ["application/problem+json"]
    put_attrs = spec["paths"]["/v1/vms/{vm_id}/memory-attributes"]["put"]
    assert {"400", "404", "422", "507"} <= put_attrs["responses"].keys()
    assert "KVM_SET_MEMORY_ATTRIBUTES" in put_attrs["summary"]


def test_delete_all_vms_resets_the_service(client: TestClient, make_vm: MakeVm) -> None:
    """DELETE /v1/vms: a reset for test suites."""
    first, second = make_vm(), make_vm("default", "rfc-v9")
    client.put(f"/v1/vms/{first}/memslots/0", json={"guest_phys_addr": 0, "memory_size": 4096, "userspace_addr": 0})
    r = client.delete("/v1/vms")
    assert r.status_code == 204 and r.content == b""
    assert client.get("/v1/vms").json() == {"vms": []}
    assert client.get("/healthz").json()["vms"] == 0
    for vm in (first, second):
        assert_problem(client.get(f"/v1/vms/{vm}"), 404, "ENOENT")
    assert client.delete("/v1/vms").status_code == 204, "idempotent"
    assert client.post("/v1/vms", json={}).status_code == 201
