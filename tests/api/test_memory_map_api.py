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
