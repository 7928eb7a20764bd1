"""api.md, memory map: GET /v1/vms/{vm_id}/memory-map."""

from __future__ import annotations

from tests.api.conftest import GIB4, MakeVm, assert_problem, gmem_slot
from tests.inprocess import TestClient

GFN = GIB4 >> 12


def test_memory_map_counts_per_bucket(client: TestClient, make_vm: MakeVm) -> None:
    vm = make_vm("sw_protected", "linux")
    gmem_slot(client, vm, slot=10, size=0x400000)  # gfns [GFN, GFN + 0x400)
    client.put(f"/v1/vms/{vm}/memory-attributes", json={"address": hex(GIB4), "size": "0x2000", "attributes": 8})
    for page in range(4):
        client.post(f"/v1/vms/{vm}/faults", json={"gpa": hex(GIB4 + page * 0x1000)})
    mm = client.get(
        f"/v1/vms/{vm}/memory-map", params={"start_gfn": hex(GFN), "end_gfn": hex(GFN + 0x800), "buckets": 4}
    ).json()
    assert (mm["start_gfn"], mm["end_gfn"]) == (GFN, GFN + 0x800)
    assert [(b["start_gfn"], b["end_gfn"]) for b in mm["buckets"]] == [
        (GFN + i * 0x200, GFN + (i + 1) * 0x200) for i in range(4)
    ]
    first = mm["buckets"][0]
    assert (first["private_pages"], first["memslot_pages"], first["mapped_pages"]) == (2, 0x200, [4])
    assert [b["memslot_pages"] for b in mm["buckets"]] == [0x200, 0x200, 0, 0]
    assert [m["slot"] for m in mm["memslots"]] == [10]
    assert mm["invalidation"] is None
    inv = client.post(
        f"/v1/vms/{vm}/mmu-notifier/invalidations", json={"hva_start": "0x7f0000000000", "hva_end": "0x7f0000001000"}
    ).json()
    mm = client.get(f"/v1/vms/{vm}/memory-map", params={"start_gfn": hex(GFN), "end_gfn": hex(GFN + 16)}).json()
    assert mm["invalidation"] == {"start_gfn": GFN, "end_gfn": GFN + 1}
    assert len(mm["buckets"]) == 16, "never narrower than one gfn"
    client.delete(f"/v1/vms/{vm}/mmu-notifier/invalidations/{inv['id']}")
    whole = client.get(f"/v1/vms/{vm}/memory-map").json()
    assert len(whole["buckets"]) == 1024 and whole["end_gfn"] == (1 << 40)
    assert sum(b["private_pages"] for b in whole["buckets"]) == 2


def test_memory_map_bad_bounds(client: TestClient, make_vm: MakeVm) -> None:
    vm = make_vm()
    for params in (
        {"buckets": 0},
        {"buckets": 4097},
        {"start_gfn": 10, "end_gfn": 10},
        {"end_gfn": (1 << 52) + 1},
        {"start_gfn": "4G"},
    ):
        assert_problem(client.get(f"/v1/vms/{vm}/memory-map", params=params), 422, "EINVAL")
    assert_problem(client.get("/v1/vms/nope/memory-map"), 404, "ENOENT")


def test_memory_map_counts_the_allocated_guest_memfd_pages_behind_each_bucket(
    client: TestClient, make_vm: MakeVm
) -> None:
    """Per address space, the pages whose file page is allocated, through each slot's binding: slot
    10 of AS 0 binds the file from page 0x100, slot 10 of AS 1 (SMM) from page 0x600, at the same gpa."""
    vm = make_vm("default", "linux")
    fd = client.post(f"/v1/vms/{vm}/guest-memfds", json={"size": "0x800000", "flags": 1}).json()["fd"]
    slot = {"flags": 4, "guest_phys_addr": hex(GIB4), "memory_size": "0x100000", "userspace_addr": "0x7f0000000000"}
    for raw, offset in ((10, "0x100000"), (1 << 16 | 10, "0x600000")):
        r = client.put(f"/v1/vms/{vm}/memslots/{raw}", json={**slot, "guest_memfd": fd, "guest_memfd_offset": offset})
        assert r.status_code == 200, r.text
    fallocate = {"mode": 1, "offset": "0x100000", "len": "0x4000"}  # pages [0x100, 0x104): AS 0's first four
    assert client.post(f"/v1/vms/{vm}/guest-memfds/{fd}/fallocate", json=fallocate).status_code == 200
    fallocate = {"mode": 1, "offset": "0x601000", "len": "0x2000"}  # pages [0x601, 0x603): AS 1's second and third
    assert client.post(f"/v1/vms/{vm}/guest-memfds/{fd}/fallocate", json=fallocate).status_code == 200
    window = {"start_gfn": hex(GFN - 4), "end_gfn": hex(GFN + 12), "buckets": 4}
    mm = client.get(f"/v1/vms/{vm}/memory-map", params=window).json()
    assert [b["gmem_allocated_pages"] for b in mm["buckets"]] == [[0, 0], [4, 2], [0, 0], [0, 0]]
    whole = client.get(f"/v1/vms/{vm}/memory-map").json()
    assert [sum(b["gmem_allocated_pages"][a] for b in whole["buckets"]) for a in (0, 1)] == [4, 2]
    assert [(m["slot"], m["gmem_only"], m["guest_memfd"], m["guest_memfd_offset"]) for m in mm["memslots"]] == [
        (10, True, fd, 0x100000),
        (1 << 16 | 10, True, fd, 0x600000),
    ]
    info = client.get(f"/v1/vms/{vm}/gfns/{hex(GFN + 3)}").json()["memslots"]
    assert [(m["as_id"], m["gmem_only"], m["guest_memfd"], m["gmem_pgoff"], m["gmem_allocated"]) for m in info] == [
        (0, True, fd, 0x103, True),
        (1, True, fd, 0x603, False),
    ]
    # A slot whose file is gone names none.
    assert client.delete(f"/v1/vms/{vm}/guest-memfds/{fd}").status_code == 200
    info = client.get(f"/v1/vms/{vm}/gfns/{hex(GFN)}").json()["memslots"][0]
    assert (info["gmem_only"], info["guest_memfd"], info["gmem_pgoff"], info["gmem_allocated"]) == (
        True,
        None,
        None,
        None,
    )
    mm = client.get(f"/v1/vms/{vm}/memory-map", params=window).json()
    assert [b["gmem_allocated_pages"] for b in mm["buckets"]] == [[0, 0]] * 4
