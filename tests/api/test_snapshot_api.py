"""api.md, VMs: GET /v1/vms/{vm_id}/snapshot and POST /v1/vms/import."""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from typing import Any

import pytest

from app.main import create_app
from app.settings import Settings
from tests.api.conftest import GIB4, HVA, MakeVm, assert_problem, gmem_slot, snapshot
from tests.inprocess import TestClient


def busy_vm(client: TestClient, make_vm: MakeVm, semantics: str) -> str:
    vm = make_vm("sw_protected", semantics)
    fd = gmem_slot(client, vm, slot=10, size=0x400000)
    client.put(f"/v1/vms/{vm}/memslots/0x1", json={"guest_phys_addr": 0, "memory_size": "0x10000", "userspace_addr": 0})
    for page in range(3):
        client.post(f"/v1/vms/{vm}/faults", json={"gpa": hex(GIB4 + page * 0x1000), "write": True})
    if semantics == "linux":
        client.put(f"/v1/vms/{vm}/memory-attributes", json={"address": hex(GIB4), "size": "0x2000", "attributes": 8})
    else:
        client.post(f"/v1/vms/{vm}/memory-encrypt/unreg-region", json={"addr": hex(GIB4 + 0x1000), "size": 4096})
    client.delete(f"/v1/vms/{vm}/guest-memfds/{fd}")
    client.post(f"/v1/vms/{vm}/mmu-notifier/invalidations", json={"hva_start": hex(HVA), "hva_end": hex(HVA + 4096)})
    client.put(f"/v1/vms/{vm}/fault-injection", json={"fail_nth": 7})
    return vm


@pytest.mark.parametrize("semantics", ["linux", "rfc-v9"])
def test_export_import_round_trip(client: TestClient, make_vm: MakeVm, semantics: str) -> None:
    vm = busy_vm(client, make_vm, semantics)
    doc = client.get(f"/v1/vms/{vm}/snapshot").json()
    assert (doc["format"], doc["version"], doc["semantics"]) == ("kvm-memattr/vm-snapshot", 4, semantics)
    r = client.post("/v1/vms/import", json={**doc, "name": "copy"})
    assert r.status_code == 201, r.text
    new = r.json()
    assert new["id"] != vm and new["name"] == "copy"
    assert client.get(f"/v1/vms/{new['id']}/snapshot").json() == {**doc, "name": "copy"}

    def without_ids(state: dict[str, Any]) -> dict[str, Any]:
        state["vm"] = {k: v for k, v in state["vm"].items() if k not in ("id", "name")}
        return state

    assert without_ids(snapshot(client, new["id"])) == without_ids(snapshot(client, vm))
    # The copy behaves as the original would: the next event id, the open invalidation, the armed injection.
    events = client.get(f"/v1/vms/{vm}/events").json()["events"]
    client.post(f"/v1/vms/{new['id']}/faults", json={"gpa": hex(GIB4)})
    first = client.get(f"/v1/vms/{new['id']}/events").json()["events"][0]
    assert first["id"] == events[-1]["id"] + 1
    assert client.get(f"/v1/vms/{new['id']}/fault-injection").json()["fail_nth"] == 7


def _overlap(doc: dict[str, Any]) -> None:
    doc["memslots"][1]["base_gfn"] = doc["memslots"][0]["base_gfn"] + 1


def _past_file(doc: dict[str, Any]) -> None:
    gmem = next(s for s in doc["memslots"] if s["file"] is not None)
    gmem["guest_memfd_offset"] = 0x1000


def _out_of_order(doc: dict[str, Any]) -> None:
    doc["attributes"] = list(reversed(doc["attributes"]))


def _hole(doc: dict[str, Any]) -> None:
    doc["attributes"][1][0] += 1


def _in_progress(doc: dict[str, Any]) -> None:
    doc["invalidation"]["mmu_invalidate_in_progress"] = 3


def _version(doc: dict[str, Any]) -> None:
    doc["version"] = 5


def _unknown_field(doc: dict[str, Any]) -> None:
    doc["mappings_v2"] = []


def _private_on_plain_vm(doc: dict[str, Any]) -> None:
    doc["type"] = "default"


def _huge_counter(doc: dict[str, Any]) -> None:
    doc["stats"]["faults"] = 10**400  # was stored, and every GET /metrics after it was a 500


def _private_mapping_over_shared(doc: dict[str, Any]) -> None:
    doc["attributes"] = [[0, 1 << 52, 0]]  # the mapped gfn at 4 GiB is no longer private


def _mapping_outside_slots(doc: dict[str, Any]) -> None:
    doc["mappings"][0].append({"start_gfn": 1 << 40, "end_gfn": (1 << 40) + 1, "private": False, "writable": True})


def _negative_pin(doc: dict[str, Any]) -> None:
    doc["type"] = "sev"
    doc["attributes"] = [[0, 1 << 52, 8]]
    doc["pinned_regions"] = [[-4096, 4096]]


def _negative_fd(doc: dict[str, Any]) -> None:
    doc["memslots"][0]["guest_memfd"] = -7


def _notifier_that_matched_nothing(doc: dict[str, Any]) -> None:
    doc["notifiers"][0]["gfn_ranges"] = [[0, -3, 5]]


def _notifier_range_not_its_hva(doc: dict[str, Any]) -> None:
    doc["notifiers"][0]["gfn_ranges"] = [[0, 5, 9]]


def _closed_file_held_by_nothing(doc: dict[str, Any]) -> None:
    doc["files"].append({"id": 7, "fd": None, "size": 4096, "flags": 0})


BAD: dict[str, tuple[Callable[[dict[str, Any]], None], str]] = {
    "a counter past u64": (_huge_counter, "less than or equal to 18446744073709551615"),
    "a private mapping over a shared gfn": (_private_mapping_over_shared, "a private mapping over a shared gfn"),
    "a mapping outside every memslot": (_mapping_outside_slots, "is in no memslot"),
    "a negative pinned region": (_negative_pin, "greater than or equal to 0"),
    "a negative guest_memfd": (_negative_fd, "greater than or equal to 0"),
    "a negative notifier range": (_notifier_that_matched_nothing, "greater than or equal to 0"),
    "a notifier range its hva does not cover": (_notifier_range_not_its_hva, "not what its hva range covers"),
    "a closed file no slot holds": (_closed_file_held_by_nothing, "neither open nor held"),
    "overlapping slots": (_overlap, "overlaps another slot"),
    "binding past its file": (_past_file, "beyond the file"),
    "runs out of order": (_out_of_order, "attribute runs"),
    "a hole in the runs": (_hole, "not contiguous"),
    "counters that disagree": (_in_progress, "mmu_invalidate_in_progress"),
    "unknown version": (_version, "version 5"),
    "unknown field": (_unknown_field, "mappings_v2"),
    "private attributes on a default VM": (_private_on_plain_vm, "not supported"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_snapshots_are_refused_and_create_nothing(client: TestClient, make_vm: MakeVm, case: str) -> None:
    vm = make_vm("sw_protected", "rfc-v9")
    gmem_slot(client, vm, slot=10, size=0x200000)
    client.put(f"/v1/vms/{vm}/memslots/1", json={"guest_phys_addr": 0, "memory_size": "0x10000", "userspace_addr": 0})
    client.post(f"/v1/vms/{vm}/memory-encrypt/unreg-region", json={"addr": 0, "size": 4096})
    client.post(f"/v1/vms/{vm}/mmu-notifier/invalidations", json={"hva_start": 0, "hva_end": 4096})
    client.post(f"/v1/vms/{vm}/faults", json={"gpa": hex(GIB4 + 0x3000)})  # a private mapping
    doc = client.get(f"/v1/vms/{vm}/snapshot").json()
    assert client.post("/v1/vms/import", json=doc).status_code == 201, "the untouched document loads"
    before = client.get("/v1/vms").json()
    bad = copy.deepcopy(doc)
    tamper, needle = BAD[case]
    tamper(bad)
    problem = assert_problem(client.post("/v1/vms/import", json=bad), 422, "EINVAL")
    assert needle in problem["detail"] or needle in str(problem.get("errors")), problem
    assert client.get("/v1/vms").json() == before


@pytest.mark.parametrize("vm_type", ["sev_es", "snp", "tdx"])
def test_import_refuses_what_the_ioctl_refuses(client: TestClient, make_vm: MakeVm, vm_type: str) -> None:
    """One set of rules: a READONLY slot on a linux VM whose guest state is protected is refused by
    KVM_SET_USER_MEMORY_REGION2, and so by an import (an import used to accept it)."""
    vm = make_vm(vm_type, "linux")
    slot = {"flags": 2, "guest_phys_addr": 0, "memory_size": "0x10000", "userspace_addr": hex(HVA)}
    assert_problem(client.put(f"/v1/vms/{vm}/memslots/1", json=slot), 422, "EINVAL")
    assert client.put(f"/v1/vms/{vm}/memslots/1", json={**slot, "flags": 0}).status_code == 200
    doc = client.get(f"/v1/vms/{vm}/snapshot").json()
    doc["memslots"][0]["flags"] = 2
    problem = assert_problem(client.post("/v1/vms/import", json=doc), 422, "EINVAL")
    assert "the ioctl refuses it" in problem["detail"] and "flags" in problem["detail"]


def test_what_the_ioctl_accepts_round_trips_near_2_63(client: TestClient, make_vm: MakeVm) -> None:
    """kvm_gmem_bind()'s loff_t overflow: an offset + size past 2^63 is accepted by the ioctl (and
    by a real 6.18 host), so an export of that VM must import (the loader used to refuse it, and a
    state file holding it then refused to start)."""
    vm = make_vm("sw_protected", "linux")
    fd = client.post(f"/v1/vms/{vm}/guest-memfds", json={"size": "0x200000"}).json()["fd"]
    offset = (1 << 63) - 0x1000
    slot = {"flags": 4, "guest_phys_addr": 0, "memory_size": "0x2000", "userspace_addr": hex(HVA)}
    r = client.put(f"/v1/vms/{vm}/memslots/3", json={**slot, "guest_memfd": fd, "guest_memfd_offset": hex(offset)})
    assert r.status_code == 200, r.text
    doc = client.get(f"/v1/vms/{vm}/snapshot").json()
    r = client.post("/v1/vms/import", json=doc)
    assert r.status_code == 201, r.text
    assert client.get(f"/v1/vms/{r.json()['id']}/snapshot").json() == doc
    client.delete(f"/v1/vms/{vm}/guest-memfds/{fd}")  # closed: the slot keeps its offset, not its file
    doc = client.get(f"/v1/vms/{vm}/snapshot").json()
    r = client.post("/v1/vms/import", json=doc)
    assert r.status_code == 201, r.text
    assert client.get(f"/v1/vms/{r.json()['id']}/snapshot").json() == doc
    doc["memslots"][0]["guest_memfd_offset"] = 1 << 63  # negative as a loff_t: refused by the ioctl
    assert_problem(client.post("/v1/vms/import", json=doc), 422, "EINVAL")


def test_import_budgets_and_large_documents() -> None:
    settings = Settings(log_level="warning", max_attribute_runs=7000, max_vms=3)
    with TestClient(create_app(settings)) as client:
        vm = client.post("/v1/vms", json={"semantics": "linux"}).json()["id"]
        for i in range(3000):  # 6000 runs: the document is past the 64 KiB body limit of other calls
            client.put(f"/v1/vms/{vm}/memory-attributes", json={"address": i * 0x2000, "size": 4096, "attributes": 8})
        doc = client.get(f"/v1/vms/{vm}/snapshot").json()
        assert len(doc["attributes"]) == 6000 and len(json.dumps(doc)) > 65_536
        assert client.post("/v1/vms/import", json=doc).status_code == 201
        doc["attributes"] = [[i, i + 1, 8 * (i % 2)] for i in range(7001)] + [[7001, 1 << 52, 0]]
        assert_problem(client.post("/v1/vms/import", json=doc), 507, "ENOMEM")
        client.post("/v1/vms", json={})
        assert_problem(client.post("/v1/vms/import", json=client.get(f"/v1/vms/{vm}/snapshot").json()), 507, "ENOMEM")
        assert len(client.get("/v1/vms").json()["vms"]) == 3


def test_import_path_allows_only_post(client: TestClient) -> None:
    """A concrete path wins over /v1/vms/{vm_id} (found by schemathesis)."""
    r = client.options("/v1/vms/import")
    assert_problem(r, 405, "EINVAL")
    assert r.headers["allow"] == "POST"
