from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest

from app.main import create_app
from app.settings import Settings
from tests.inprocess import TestClient

GIB4 = 0x1_0000_0000
HVA = 0x7F00_0000_0000


@pytest.fixture
def settings() -> Settings:
    return Settings(log_level="warning")


@pytest.fixture
def client(settings: Settings) -> Iterator[TestClient]:
    with TestClient(create_app(settings)) as c:  # runs the lifespan
        yield c


def assert_problem(response: Any, status: int, errno: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/problem+json"
    body: dict[str, Any] = response.json()
    assert body["errno"] == errno and body["status"] == status
    assert {"type", "title", "detail", "instance"} <= body.keys()
    assert body["instance"] == response.request.url.path
    return body


MakeVm = Callable[..., str]


@pytest.fixture
def make_vm(client: TestClient) -> MakeVm:
    def make(vm_type: str = "sw_protected", semantics: str = "linux") -> str:
        r = client.post("/v1/vms", json={"type": vm_type, "semantics": semantics})
        assert r.status_code == 201, r.text
        vm_id: str = r.json()["id"]
        return vm_id

    return make


def gmem_slot(client: TestClient, vm: str, slot: int = 10, gpa: int = GIB4, size: int = 0x400000) -> int:
    fd: int = client.post(f"/v1/vms/{vm}/guest-memfds", json={"size": hex(size)}).json()["fd"]
    r = client.put(
        f"/v1/vms/{vm}/memslots/{slot}",
        json={
            "flags": 4,
            "guest_phys_addr": hex(gpa),
            "memory_size": hex(size),
            "userspace_addr": hex(HVA),
            "guest_memfd": fd,
        },
    )
    assert r.status_code == 200, r.text
    return fd


def snapshot(client: TestClient, vm: str) -> dict[str, Any]:
    """Everything observable about a VM except the event trace."""
    return {
        "vm": client.get(f"/v1/vms/{vm}").json(),
        "memslots": client.get(f"/v1/vms/{vm}/memslots").json(),
        "gmem": client.get(f"/v1/vms/{vm}/guest-memfds").json(),
        "attrs": client.get(f"/v1/vms/{vm}/memory-attributes", params={"end_gfn": 2**52}).json(),
        "maps": [client.get(f"/v1/vms/{vm}/mappings", params={"as_id": a}).json() for a in (0,)],
        "regions": client.get(f"/v1/vms/{vm}/memory-encrypt/regions").json(),
        "inj": client.get(f"/v1/vms/{vm}/fault-injection").json(),
        "inv": client.get(f"/v1/vms/{vm}/mmu-notifier/invalidations").json(),
    }
