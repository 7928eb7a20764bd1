"""What a new user meets first, over HTTP: messages that say what is wrong, an exact OpenAPI."""

from __future__ import annotations

from typing import Any

from tests.api.conftest import MakeVm, assert_problem
from tests.inprocess import TestClient


def _walk(node: Any) -> Any:
    if isinstance(node, dict):
        yield node
        for child in node.values():
            yield from _walk(child)
    elif isinstance(node, list):
        for child in node:
            yield from _walk(child)


def test_openapi_bounds_are_exact_integers_and_every_operation_is_described(client: TestClient) -> None:
    spec = client.get("/openapi.json").json()
    bounds = [n[k] for n in _walk(spec) for k in ("minimum", "maximum") if k in n]
    assert bounds and all(isinstance(b, int) for b in bounds)
    assert (1 << 64) - 1 in bounds and float(1 << 64) not in bounds
    for path, item in spec["paths"].items():
        for method, op in item.items():
            assert op.get("description"), (method, path)
            body = op.get("requestBody", {}).get("content", {}).get("application/json", {})
            if body and path != "/v1/vms/import":
                assert len(body.get("examples", {})) >= 1, (method, path)


def test_body_problems_say_what_is_wrong(client: TestClient, make_vm: MakeVm) -> None:
    vm = make_vm()
    r = client.put(
        f"/v1/vms/{vm}/memslots/0", content=b'{"guest_phys_addr": 0}', headers={"content-type": "text/plain"}
    )
    assert "Content-Type: application/json" in assert_problem(r, 422, "EINVAL")["detail"]
    r = client.put(
        f"/v1/vms/{vm}/memory-attributes",
        content=b'{"address": 0, "size": 4096,',
        headers={"content-type": "application/json"},
    )
    detail = assert_problem(r, 422, "EINVAL")["detail"]
    assert detail.startswith("body: the body is not valid JSON:") and "at character" in detail
    r = client.put(
        f"/v1/vms/{vm}/memslots/0", json={"flags": 4, "guest_phys_addr": 0, "memory_size": 4096, "userspace_addr": 0}
    )
    assert assert_problem(r, 422, "EBADF")["detail"] == "KVM_MEM_GUEST_MEMFD needs a guest_memfd fd (none given)"


def test_a_trailing_slash_is_a_404_that_says_so(client: TestClient) -> None:
    problem = assert_problem(client.get("/v1/vms/"), 404, "ENOENT")
    assert "no trailing slash: /v1/vms" in problem["detail"]


def test_rfc_region_calls_on_linux_suggest_set_memory_attributes(client: TestClient, make_vm: MakeVm) -> None:
    vm = make_vm("sw_protected", "linux")
    r = client.post(f"/v1/vms/{vm}/memory-encrypt/reg-region", json={"addr": 0, "size": 4096})
    assert "KVM_SET_MEMORY_ATTRIBUTES" in assert_problem(r, 400, "ENOTTY")["detail"]
