from __future__ import annotations

import pytest

from tests.api.conftest import GIB4, HVA, MakeVm, assert_problem, gmem_slot, snapshot
from tests.inprocess import TestClient

MIB2 = 0x200000


def slot_body(gpa: int = GIB4, size: int = MIB2, hva: int = HVA, flags: int = 0, **extra: object) -> dict[str, object]:
    return {"flags": flags, "guest_phys_addr": gpa, "memory_size": size, "userspace_addr": hva, **extra}


def test_memslot_lifecycle(client: TestClient, make_vm: MakeVm) -> None:
    vm = make_vm("default", "rfc-v9")
    r = client.put(f"/v1/vms/{vm}/memslots/0x10001", json=slot_body(gpa="0x100000000", size="2097152"))
    assert r.status_code == 200
    body = r.json()
    assert body["change"] == "create" and body["pages_zapped"] == 0
    assert body["memslot"] == {
        "slot": 0x10001,
        "as_id": 1,
        "id": 1,
        "flags": 0,
        "guest_phys_addr": GIB4,
        "memory_size": MIB2,
        "userspace_addr": HVA,
        "base_gfn": GIB4 >> 12,
        "npages": 512,
        "guest_memfd": None,
        "guest_memfd_offset": 0,
        "gmem_only": False,
    }
    assert client.put(f"/v1/vms/{vm}/memslots/65537", json=slot_body()).json()["change"] == "none"
    assert client.put(f"/v1/vms/{vm}/memslots/65537", json=slot_body(flags=1)).json()["change"] == "flags_only"
    client.post(f"/v1/vms/{vm}/faults", json={"gpa": GIB4, "as_id": 1})
    moved = client.put(f"/v1/vms/{vm}/memslots/65537", json=slot_body(gpa=2 * GIB4, flags=1)).json()
    assert (moved["change"], moved["pages_zapped"]) == ("move", 1)
    assert client.get(f"/v1/vms/{vm}/memslots/65537").json()["base_gfn"] == (2 * GIB4) >> 12
    assert client.get(f"/v1/vms/{vm}").json()["memslot_count"] == 1
    assert client.delete(f"/v1/vms/{vm}/memslots/65537").status_code == 204
    assert_problem(client.delete(f"/v1/vms/{vm}/memslots/65537"), 404, "ENOENT")
    assert_problem(client.get(f"/v1/vms/{vm}/memslots/65537"), 404, "ENOENT")
    # Delete through the ioctl of a missing slot is the kernel's EINVAL.
    assert_problem(client.put(f"/v1/vms/{vm}/memslots/3", json=slot_body(size=0)), 422, "EINVAL")


@pytest.mark.parametrize(
    ("slot", "body", "status", "errno"),
    [
        ("32764", slot_body(), 422, "EINVAL"),
        ("0", slot_body(flags=8), 422, "EINVAL"),
        ("0", slot_body(gpa=GIB4 + 1), 422, "EINVAL"),
        ("0", slot_body(gpa=GIB4 + MIB2 // 2), 409, "EEXIST"),
        ("0", slot_body(gpa=2 * GIB4, flags=4, guest_memfd=77), 422, "EBADF"),
        ("0", slot_body(gpa=1 << 52), 422, "EINVAL"),
        ("0x100000000", slot_body(), 422, "EINVAL"),  # slot is a u32
        ("-1", slot_body(), 422, "EINVAL"),
        ("0", slot_body(guest_phys_addr=1), 422, "EINVAL"),  # unaligned gpa
        ("0", {**slot_body(), "slott": 1}, 422, "EINVAL"),
        ("0", {**slot_body(), "flags": 2**32}, 422, "EINVAL"),
        ("0", {**slot_body(), "memory_size": -4096}, 422, "EINVAL"),
        ("0", {**slot_body(), "memory_size": True}, 422, "EINVAL"),
        ("0", {**slot_body(), "memory_size": 4096.0}, 422, "EINVAL"),
        ("0", {**slot_body(), "memory_size": "0b1000"}, 422, "EINVAL"),
        ("0", {**slot_body(), "memory_size": " 4096"}, 422, "EINVAL"),
        ("0", {**slot_body(), "memory_size": "0x1_000"}, 422, "EINVAL"),
        ("0", {**slot_body(), "userspace_addr": str(2**64)}, 422, "EINVAL"),
    ],
)
def test_memslot_errors_change_nothing(
    client: TestClient, make_vm: MakeVm, slot: str, body: dict[str, object], status: int, errno: str
) -> None:
    vm = make_vm("sw_protected", "linux")
    client.put(
        f"/v1/vms/{vm}/memslots/1", json=slot_body(gpa=GIB4 + MIB2 // 2 + MIB2 // 4, size=0x1000, hva=HVA + 0x100000)
    )
    before = snapshot(client, vm)
    problem = assert_problem(client.put(f"/v1/vms/{vm}/memslots/{slot}", json=body), status, errno)
    if status == 422 and errno == "EINVAL" and "errors" in problem:
        assert problem["errors"] and {"loc", "msg", "type"} <= problem["errors"][0].keys()
    assert snapshot(client, vm) == before


def test_long_leading_zero_strings(client: TestClient, make_vm: MakeVm) -> None:
    """Leading zeros are allowed at any length (schemathesis caught a maxLength in the schema)."""
    vm = make_vm("default", "linux")
    r = client.post(f"/v1/vms/{vm}/faults", json={"gpa": "0" * 40 + "4096", "mmu_seq": "0x" + "0" * 30 + "0"})
    assert r.status_code == 200 and r.json()["gfn"] == 1
    schema = client.get("/openapi.json").json()["components"]["schemas"]["FaultRequest"]["properties"]["gpa"]
    assert all("maxLength" not in alt for alt in schema["anyOf"])


def test_hex_and_leading_zeros(client: TestClient, make_vm: MakeVm) -> None:
    vm = make_vm("default", "linux")
    r = client.put(
        f"/v1/vms/{vm}/memslots/0X0a", json=slot_body(gpa="0X000100000000", size="0002097152", hva="0x7f0000000000")
    )
    assert r.json()["memslot"]["slot"] == 10 and r.json()["memslot"]["guest_phys_addr"] == GIB4


def test_ebusy_while_notifier_open(client: TestClient, make_vm: MakeVm) -> None:
    vm = make_vm("default", "linux")
    inv = client.post(f"/v1/vms/{vm}/mmu-notifier/invalidations", json={"hva_start": 0, "hva_end": 4096}).json()
    assert_problem(client.put(f"/v1/vms/{vm}/memslots/0", json=slot_body()), 409, "EBUSY")
    client.delete(f"/v1/vms/{vm}/mmu-notifier/invalidations/{inv['id']}")
    assert client.put(f"/v1/vms/{vm}/memslots/0", json=slot_body()).status_code == 200


def test_guest_memfds(client: TestClient, make_vm: MakeVm) -> None:
    vm = make_vm("sw_protected", "linux")
    fd = gmem_slot(client, vm, slot=10, size=MIB2)
    gm = client.get(f"/v1/vms/{vm}/guest-memfds/{fd}").json()
    assert gm == {
        "fd": fd,
        "size": MIB2,
        "flags": 0,
        "bindings": [{"slot": 10, "offset": 0, "size": MIB2}],
        "allocated_pages": 0,
        "mappings": [],
    }
    assert client.get(f"/v1/vms/{vm}/memslots/10").json()["guest_memfd"] == fd
    assert_problem(client.post(f"/v1/vms/{vm}/guest-memfds", json={"size": 4095}), 422, "EINVAL")
    assert_problem(client.post(f"/v1/vms/{vm}/guest-memfds", json={"size": 4096, "flags": 4}), 422, "EINVAL")
    # INIT_SHARED (2) only on VMs without private memory; size is a signed loff_t.
    assert_problem(client.post(f"/v1/vms/{vm}/guest-memfds", json={"size": 4096, "flags": "0x3"}), 422, "EINVAL")
    assert_problem(client.post(f"/v1/vms/{vm}/guest-memfds", json={"size": "0x8000000000000000"}), 422, "EINVAL")
    assert client.post(f"/v1/vms/{vm}/guest-memfds", json={"size": 4096, "flags": "0x1"}).status_code == 201
    client.put(f"/v1/vms/{vm}/memory-attributes", json={"address": hex(GIB4), "size": 4096, "attributes": 8})
    assert client.post(f"/v1/vms/{vm}/faults", json={"gpa": hex(GIB4)}).json()["outcome"] == "mapped"
    closed = client.delete(f"/v1/vms/{vm}/guest-memfds/{fd}")
    assert closed.status_code == 200
    body = closed.json()
    assert (body["pages_zapped"], body["invalidated"], body["mmu"]["mmu_invalidate_seq"]) == (1, True, 2)
    assert_problem(client.get(f"/v1/vms/{vm}/guest-memfds/{fd}"), 404, "ENOENT")
    assert_problem(client.delete(f"/v1/vms/{vm}/guest-memfds/{fd}"), 404, "ENOENT")
    assert [g["fd"] for g in client.get(f"/v1/vms/{vm}/guest-memfds").json()["guest_memfds"]] == [fd + 1]
    slot = client.get(f"/v1/vms/{vm}/memslots").json()["memslots"][0]
    assert (slot["guest_memfd"], slot["flags"]) == (None, 4), "the slot lost its file, not its flag"
    fault = client.post(f"/v1/vms/{vm}/faults", json={"gpa": hex(GIB4)}).json()
    assert fault["outcome"] == "memory_fault_exit" and fault["exit"]["errno"] == "EFAULT"


def test_rfc_v9_guest_memfd_close_keeps_the_file(client: TestClient, make_vm: MakeVm) -> None:
    vm = make_vm("sw_protected", "rfc-v9")
    fd = gmem_slot(client, vm, slot=10, size=MIB2)
    assert client.delete(f"/v1/vms/{vm}/guest-memfds/{fd}").json()["invalidated"] is False
    assert client.get(f"/v1/vms/{vm}/memslots/10").json()["guest_memfd"] == fd
