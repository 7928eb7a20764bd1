"""Many concurrent clients against a real uvicorn server: nothing lost, nothing half-applied."""

from __future__ import annotations

import asyncio
import random
import sqlite3
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import pytest

from app.core import Engine
from app.core.journal import SqliteJournal
from harness.live import live_server

GIB4 = 0x1_0000_0000
HVA = 0x7F00_0000_0000
SLOT = 0x100000  # 1 MiB: 256 pages
CLIENTS = 16
SECONDS = 6.0


class Tally:
    """What the responses say happened, per VM."""

    def __init__(self) -> None:
        self.invalidations: Counter[str] = Counter()
        self.statuses: Counter[int] = Counter()
        self.mutations = 0


async def worker(n: int, http: httpx.AsyncClient, vms: dict[str, str], tally: Tally, deadline: float) -> None:
    rng = random.Random(n)
    open_invs: list[tuple[str, int, bool]] = []

    async def call(method: str, path: str, body: Any = None) -> httpx.Response:
        r = await http.request(method, path, json=body)
        tally.statuses[r.status_code] += 1
        tally.mutations += method != "GET"
        return r

    while time.monotonic() < deadline:
        vm, sem = rng.choice(list(vms.items()))
        page = rng.randrange(256)
        gpa = GIB4 + page * 0x1000
        size = 0x1000 * rng.randrange(1, 16)
        kind = rng.randrange(9)
        if kind == 0 and sem == "rfc-v9":
            op = rng.choice(["reg-region", "unreg-region"])
            r = await call("POST", f"/v1/vms/{vm}/memory-encrypt/{op}", {"addr": gpa, "size": size})
            # rfc-v9 always invalidates, failed stores included.
            if r.status_code in (200, 507):
                tally.invalidations[vm] += 1
        elif kind == 0:
            body = {"address": gpa, "size": size, "attributes": rng.choice([0, 8])}
            r = await call("PUT", f"/v1/vms/{vm}/memory-attributes", body)
            if r.status_code == 200 and r.json()["invalidated"]:
                tally.invalidations[vm] += 1
        elif kind == 1:
            await call("PUT", f"/v1/vms/{vm}/fault-injection", {"fail_nth": rng.randrange(1, 20)})
        elif kind in (2, 3):
            mmu = (await http.get(f"/v1/vms/{vm}/mmu")).json()
            seq = mmu["mmu_invalidate_seq"] - rng.choice([0, 0, 1])
            await call(
                "POST", f"/v1/vms/{vm}/faults", {"gpa": gpa, "write": rng.random() < 0.5, "mmu_seq": max(seq, 0)}
            )
        elif kind == 4:
            await call("POST", f"/v1/vms/{vm}/prefault", {"gpa": gpa, "size": size})
        elif kind == 5:
            hva = HVA + page * 0x1000
            r = await call(
                "POST", f"/v1/vms/{vm}/mmu-notifier/invalidations", {"hva_start": hva, "hva_end": hva + size}
            )
            if r.status_code == 201:
                open_invs.append((vm, r.json()["id"], bool(r.json()["gfn_ranges"])))
        elif kind == 6 and open_invs:
            inv_vm, inv_id, matched = open_invs.pop(0)
            r = await call("DELETE", f"/v1/vms/{inv_vm}/mmu-notifier/invalidations/{inv_id}")
            assert r.status_code == 200
            tally.invalidations[inv_vm] += matched
        elif kind == 7:
            # Memslot churn above the main slot; EBUSY while any notifier invalidation is open.
            slot = 20 + rng.randrange(4)
            base = 2 * GIB4 + (slot - 20) * 0x10000 + rng.choice([0, 0x8000])
            size = rng.choice([0, 0x8000])
            await call(
                "PUT",
                f"/v1/vms/{vm}/memslots/{slot}",
                {
                    "guest_phys_addr": base,
                    "memory_size": size,
                    "userspace_addr": HVA + 0x10000000 + (slot - 20) * 0x10000,
                },
            )
        else:
            await http.get(
                f"/v1/vms/{vm}/memory-attributes", params={"start_gfn": GIB4 >> 12, "end_gfn": (GIB4 >> 12) + 256}
            )
    for inv_vm, inv_id, matched in open_invs:
        r = await call("DELETE", f"/v1/vms/{inv_vm}/mmu-notifier/invalidations/{inv_id}")
        assert r.status_code == 200
        tally.invalidations[inv_vm] += matched


pytestmark = pytest.mark.slow


def server_state(http: httpx.Client, vm: str) -> dict[str, Any]:
    out: dict[str, Any] = {"mmu": http.get(f"/v1/vms/{vm}/mmu").json()}
    out["attrs"] = http.get(f"/v1/vms/{vm}/memory-attributes", params={"end_gfn": 2**52, "limit": 10000}).json()["runs"]
    nr_as = http.get(f"/v1/vms/{vm}").json()["address_spaces"]
    out["maps"] = [
        http.get(f"/v1/vms/{vm}/mappings", params={"as_id": a, "end_gfn": 2**52, "limit": 10000}).json()["runs"]
        for a in range(nr_as)
    ]
    out["slots"] = http.get(f"/v1/vms/{vm}/memslots").json()["memslots"]
    return out


def engine_state(engine: Engine, vm_id: str) -> dict[str, Any]:
    vm = engine.vm(vm_id)
    mmu = vm.mmu_model().model_dump()
    return {
        "mmu": mmu,
        "attrs": [r.model_dump() for r in vm.attribute_runs(0, 2**52, 10000)[0]],
        "maps": [[r.model_dump() for r in vm.mapping_runs(a, 0, 2**52, 10000)[0]] for a in range(vm.nr_as)],
        "slots": [m.model_dump() for m in vm.memslots()],
    }


def test_concurrent_clients_on_shared_vms(tmp_path: Path) -> None:
    db = tmp_path / "journal.sqlite3"
    with live_server({"KVM_MEMATTR_STATE_FILE": str(db)}) as (url, _):
        with httpx.Client(base_url=url) as http:
            vms = {}
            for sem in ("rfc-v9", "linux"):
                vm = http.post("/v1/vms", json={"type": "sw_protected", "semantics": sem}).json()["id"]
                fd = http.post(f"/v1/vms/{vm}/guest-memfds", json={"size": SLOT}).json()["fd"]
                r = http.put(
                    f"/v1/vms/{vm}/memslots/0",
                    json={
                        "flags": 4,
                        "guest_phys_addr": GIB4,
                        "memory_size": SLOT,
                        "userspace_addr": HVA,
                        "guest_memfd": fd,
                    },
                )
                assert r.status_code == 200
                vms[vm] = sem
        setup_rows = 2 * 3  # per VM: KVM_CREATE_VM, KVM_CREATE_GUEST_MEMFD, the slot
        tally = Tally()

        async def run() -> None:
            limits = httpx.Limits(max_connections=CLIENTS)
            async with httpx.AsyncClient(base_url=url, limits=limits, timeout=30) as http:
                deadline = time.monotonic() + SECONDS
                await asyncio.gather(*(worker(n, http, vms, tally, deadline) for n in range(CLIENTS)))

        asyncio.run(run())
        assert sum(tally.statuses.values()) > 500, tally.statuses
        assert not [s for s in tally.statuses if s >= 500 and s != 507], tally.statuses
        assert tally.statuses[409] > 0, "memslot churn met open notifier invalidations (EBUSY)"

        with httpx.Client(base_url=url) as http:
            got = {vm: server_state(http, vm) for vm in vms}
        for vm, state in got.items():
            mmu = state["mmu"]
            assert mmu["mmu_invalidate_in_progress"] == 0 and mmu["open_notifier_invalidations"] == 0
            assert mmu["mmu_invalidate_seq"] == tally.invalidations[vm], vm
            # At rest no mapping disagrees with the attribute of its gfn.
            for as_maps in state["maps"]:
                for m in as_maps:
                    attrs = [
                        a for a in state["attrs"] if a["start_gfn"] < m["end_gfn"] and m["start_gfn"] < a["end_gfn"]
                    ]
                    assert attrs and all(a["private"] == m["private"] for a in attrs), m

        # Every acknowledged call is in the journal once, and replaying it in order rebuilds the state.
        rows = sqlite3.connect(db).execute("SELECT COUNT(*) FROM journal").fetchone()[0]
        assert rows == tally.mutations + setup_rows
        fresh = Engine()
        fresh.restore(SqliteJournal(db))
        for vm in vms:
            assert engine_state(fresh, vm) == got[vm]
