"""The bad-input catalogue: every malformed request is a 4xx problem and changes nothing."""

from __future__ import annotations

from typing import Any

import pytest

from tests.api.conftest import MakeVm, assert_problem, gmem_slot, snapshot
from tests.inprocess import TestClient

U64_OVER = str(2**64)
HUGE = "9" * 5000

# (method, path under the VM, request kwargs, status, errno)
CASES: list[tuple[str, str, dict[str, Any], int, str]] = [
    # malformed JSON
    ("PUT", "/memory-attributes", {"content": b"{", "headers": {"content-type": "application/json"}}, 422, "EINVAL"),
    ("POST", "/faults", {"content": b"[1,2", "headers": {"content-type": "application/json"}}, 422, "EINVAL"),
    ("POST", "/prefault", {"content": b"\xff\xfe", "headers": {"content-type": "application/json"}}, 422, "EINVAL"),
    ("PUT", "/memslots/1", {"content": b"null", "headers": {"content-type": "application/json"}}, 422, "EINVAL"),
    ("PUT", "/memory-attributes", {"content": b"", "headers": {"content-type": "application/json"}}, 422, "EINVAL"),
    (
        "PUT",
        "/memory-attributes",
        {"content": b"[" * 30000 + b"]" * 30000, "headers": {"content-type": "application/json"}},
        422,
        "EINVAL",
    ),
    (
        "PUT",
        "/memory-attributes",
        {
            "content": b'{"address": NaN, "size": 4096, "attributes": 8}',
            "headers": {"content-type": "application/json"},
        },
        422,
        "EINVAL",
    ),
    (
        "PUT",
        "/memory-attributes",
        {"content": b'{"address": 0}', "headers": {"content-type": "text/plain"}},
        422,
        "EINVAL",
    ),
    # huge numbers
    ("PUT", "/memory-attributes", {"json": {"address": 2**64, "size": 4096, "attributes": 8}}, 422, "EINVAL"),
    ("PUT", "/memory-attributes", {"json": {"address": U64_OVER, "size": 4096, "attributes": 8}}, 422, "EINVAL"),
    ("PUT", "/memory-attributes", {"json": {"address": HUGE, "size": 4096, "attributes": 8}}, 422, "EINVAL"),
    (
        "PUT",
        "/memory-attributes",
        {"json": {"address": "0x1" + "0" * 16, "size": 4096, "attributes": 8}},
        422,
        "EINVAL",
    ),
    ("PUT", "/memory-attributes", {"json": {"address": 10**400, "size": 4096, "attributes": 8}}, 422, "EINVAL"),
    (
        "PUT",
        "/memslots/1",
        {"json": {"flags": 2**32, "guest_phys_addr": 0, "memory_size": 4096, "userspace_addr": 0}},
        422,
        "EINVAL",
    ),
    # negative numbers
    ("PUT", "/memory-attributes", {"json": {"address": -4096, "size": 4096, "attributes": 8}}, 422, "EINVAL"),
    ("POST", "/faults", {"json": {"gpa": -1}}, 422, "EINVAL"),
    ("POST", "/faults", {"json": {"gpa": 0, "as_id": -1}}, 422, "EINVAL"),
    ("PUT", "/fault-injection", {"json": {"fail_nth": -3}}, 422, "EINVAL"),
    # wrong types
    ("PUT", "/memory-attributes", {"json": {"address": True, "size": 4096, "attributes": 8}}, 422, "EINVAL"),
    ("PUT", "/memory-attributes", {"json": {"address": 0.0, "size": 4096, "attributes": 8}}, 422, "EINVAL"),
    ("PUT", "/memory-attributes", {"json": {"address": [0], "size": 4096, "attributes": 8}}, 422, "EINVAL"),
    ("PUT", "/memory-attributes", {"json": {"address": "-0x10", "size": 4096, "attributes": 8}}, 422, "EINVAL"),
    ("PUT", "/memory-attributes", {"json": {"address": "1_000", "size": 4096, "attributes": 8}}, 422, "EINVAL"),
    ("PUT", "/memory-attributes", {"json": {"address": "0o17", "size": 4096, "attributes": 8}}, 422, "EINVAL"),
    ("PUT", "/memory-attributes", {"json": {"address": "1.5", "size": 4096, "attributes": 8}}, 422, "EINVAL"),
    ("PUT", "/memory-attributes", {"json": {"address": "", "size": 4096, "attributes": 8}}, 422, "EINVAL"),
    ("PUT", "/memory-attributes", {"json": {"address": "٣", "size": 4096, "attributes": 8}}, 422, "EINVAL"),
    ("POST", "/faults", {"json": {"gpa": 0, "write": "true"}}, 422, "EINVAL"),
    ("POST", "/faults", {"json": {"gpa": 0, "private": 1}}, 422, "EINVAL"),
    ("PUT", "/fault-injection", {"json": {"fail_nth": "3"}}, 422, "EINVAL"),
    ("PUT", "/memslots/1", {"json": []}, 422, "EINVAL"),
    # unknown fields
    ("PUT", "/memory-attributes", {"json": {"adress": 0, "size": 4096, "attributes": 8}}, 422, "EINVAL"),
    ("PUT", "/memory-attributes", {"json": {"address": 0, "size": 4096, "attributes": 8, "extra": 1}}, 422, "EINVAL"),
    ("POST", "/memory-encrypt/reg-region", {"json": {"addr": 0, "size": 4096, "flags": 0}}, 422, "EINVAL"),
    (
        "PUT",
        "/memslots/1",
        {"json": {"slot": 1, "guest_phys_addr": 0, "memory_size": 4096, "userspace_addr": 0}},
        422,
        "EINVAL",
    ),
    # oversized bodies
    ("PUT", "/memory-attributes", {"json": {"address": "0" * 70_000, "size": 4096, "attributes": 8}}, 413, "E2BIG"),
    # unknown ids
    ("GET", "/memslots/7", {}, 404, "ENOENT"),
    ("DELETE", "/memslots/7", {}, 404, "ENOENT"),
    ("GET", "/guest-memfds/99", {}, 404, "ENOENT"),
    ("DELETE", "/guest-memfds/99", {}, 404, "ENOENT"),
    ("DELETE", "/mmu-notifier/invalidations/99", {}, 404, "ENOENT"),
    # path and query parameters out of range
    ("GET", "/memslots/4294967296", {}, 422, "EINVAL"),
    ("GET", "/memslots/-1", {}, 422, "EINVAL"),
    ("GET", "/memslots/0x", {}, 422, "EINVAL"),
    ("GET", "/guest-memfds/-1", {}, 422, "EINVAL"),
    ("GET", "/guest-memfds/abc", {}, 422, "EINVAL"),
    ("GET", f"/gfns/{2**52}", {}, 422, "EINVAL"),
    ("GET", f"/gfns/{U64_OVER}", {}, 422, "EINVAL"),
    ("DELETE", f"/mmu-notifier/invalidations/{2**63}", {}, 422, "EINVAL"),
    ("GET", "/mappings?as_id=2", {}, 422, "EINVAL"),
    ("GET", "/mappings?as_id=x", {}, 422, "EINVAL"),
    ("GET", "/events?limit=0", {}, 422, "EINVAL"),
    ("GET", "/events?after=-1", {}, 422, "EINVAL"),
    ("GET", "/memory-attributes?start_gfn=9&end_gfn=8", {}, 422, "EINVAL"),
]


@pytest.mark.parametrize(
    ("method", "path", "kwargs", "status", "errno"), CASES, ids=[f"{c[0]} {c[1]} {i}" for i, c in enumerate(CASES)]
)
def test_bad_input_is_a_4xx_problem_and_changes_nothing(
    client: TestClient, make_vm: MakeVm, method: str, path: str, kwargs: dict[str, Any], status: int, errno: str
) -> None:
    vm = make_vm("sw_protected", "linux")
    gmem_slot(client, vm)
    client.post(f"/v1/vms/{vm}/faults", json={"gpa": 0x100000000})
    before = snapshot(client, vm)
    assert_problem(client.request(method, f"/v1/vms/{vm}{path}", **kwargs), status, errno)
    assert snapshot(client, vm) == before


@pytest.mark.parametrize("vm_id", ["does-not-exist", "x" * 65, "%00"])
def test_unknown_or_malformed_vm_ids(client: TestClient, vm_id: str) -> None:
    r = client.get(f"/v1/vms/{vm_id}/mmu")
    assert 400 <= r.status_code < 500 and r.headers["content-type"] == "application/problem+json"
    assert client.get("/v1/vms").json()["vms"] == []
