"""A bound on the whole service: runs, events and every stored object across all VMs."""

from __future__ import annotations

import json
import time

import pytest

from app.main import create_app
from app.settings import Settings
from tests.api.conftest import assert_problem
from tests.inprocess import TestClient


def _metric(client: TestClient, name: str) -> float:
    for line in client.get("/metrics").text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(name)


@pytest.mark.parametrize("semantics", ["linux", "rfc-v9"])
def test_the_service_budget_fails_calls_cleanly(semantics: str) -> None:
    settings = Settings(log_level="warning", max_service_items=400, max_events=50)
    with TestClient(create_app(settings)) as client:
        vms = [client.post("/v1/vms", json={"semantics": semantics}).json()["id"] for _ in range(3)]
        path = "memory-attributes" if semantics == "linux" else "memory-encrypt/unreg-region"
        refused = None
        for i in range(1000):
            vm = vms[i % 3]
            body = (
                {"address": (i // 3) * 0x2000, "size": 4096, "attributes": 8}
                if semantics == "linux"
                else {"addr": (i // 3) * 0x2000, "size": 4096}
            )
            before = client.get(f"/v1/vms/{vm}/snapshot").json()
            r = client.request("PUT" if semantics == "linux" else "POST", f"/v1/vms/{vm}/{path}", json=body)
            if r.status_code != 200:
                refused = r
                break
        assert refused is not None, "the budget was never reached"
        assert_problem(refused, 507, "ENOMEM")
        after = client.get(f"/v1/vms/{vm}/snapshot").json()
        # Nothing half-applied: only what the kernel also changes on the error path (rfc-v9 bumps the seq).
        assert after["attributes"] == before["attributes"] and after["mappings"] == before["mappings"]
        seq_bump = 1 if semantics == "rfc-v9" else 0
        assert after["invalidation"]["mmu_invalidate_seq"] == before["invalidation"]["mmu_invalidate_seq"] + seq_bump
        assert client.get("/healthz").json()["status"] == "ok"
        used, limit = _metric(client, "kvm_memattr_service_items"), _metric(client, "kvm_memattr_service_items_limit")
        assert limit == 400 and 390 <= used <= 400
        # A full service keeps logging: each VM drops its oldest events instead of growing.
        client.post(f"/v1/vms/{vm}/faults", json={"gpa": 0})
        assert _metric(client, "kvm_memattr_service_items") <= 400
        assert_problem(client.post("/v1/vms", json={}), 507, "ENOMEM")
        # Destroying a VM gives its share back, and calls succeed again.
        client.delete(f"/v1/vms/{vms[0]}")
        assert _metric(client, "kvm_memattr_service_items") < used - 50
        assert (
            client.request("PUT" if semantics == "linux" else "POST", f"/v1/vms/{vm}/{path}", json=body).status_code
            == 200
        )


@pytest.mark.parametrize("kind", ["memslot", "guest_memfd", "notifier", "pinned region"])
def test_every_stored_object_counts(kind: str) -> None:
    """Memslots, guest_memfds, open invalidations and pinned regions count against the service
    budget like runs and events (two imports once stored 4,000,000 notifiers while it read 6)."""
    settings = Settings(log_level="warning", max_service_items=60)
    with TestClient(create_app(settings)) as client:
        vm = client.post("/v1/vms", json={"type": "sev", "semantics": "linux"}).json()["id"]
        client.put(
            f"/v1/vms/{vm}/memslots/0", json={"guest_phys_addr": 0, "memory_size": "0x1000", "userspace_addr": 0}
        )
        refused = None
        for i in range(1, 200):
            if kind == "memslot":
                body = {"guest_phys_addr": hex(i << 12), "memory_size": "0x1000", "userspace_addr": hex(i << 12)}
                r = client.put(f"/v1/vms/{vm}/memslots/{i}", json=body)
            elif kind == "guest_memfd":
                r = client.post(f"/v1/vms/{vm}/guest-memfds", json={"size": "0x1000"})
            elif kind == "notifier":
                r = client.post(f"/v1/vms/{vm}/mmu-notifier/invalidations", json={"hva_start": 0, "hva_end": 4096})
            else:
                r = client.post(f"/v1/vms/{vm}/memory-encrypt/reg-region", json={"addr": hex(i << 12), "size": 4096})
            if r.status_code >= 400:
                refused = r
                break
        assert refused is not None, f"{kind}s were never refused"
        assert_problem(refused, 507, "ENOMEM")
        assert _metric(client, "kvm_memattr_service_items") <= 60
        # An import of the full VM does not fit beside it: refused before it is built.
        doc = client.get(f"/v1/vms/{vm}/snapshot").json()
        assert_problem(client.post("/v1/vms/import", json=doc), 507, "ENOMEM")
        client.delete(f"/v1/vms/{vm}")
        assert _metric(client, "kvm_memattr_service_items") == 0


def test_an_import_too_big_for_the_service_is_refused_before_it_is_parsed() -> None:
    """A 251 MiB import once peaked at 4.7 GiB and stalled /healthz for 27 s before it was refused."""
    settings = Settings(log_level="warning", max_service_items=5000)
    with TestClient(create_app(settings)) as client:
        vm = client.post("/v1/vms", json={"type": "sw_protected", "semantics": "linux"}).json()["id"]
        doc = client.get(f"/v1/vms/{vm}/snapshot").json()
        doc["attributes"] = [[i, i + 1, 8 * (i % 2)] for i in range(1_500_000)] + [[1_500_000, 1 << 52, 0]]
        body = json.dumps(doc).encode()
        assert len(body) > 30 << 20
        started = time.perf_counter()
        r = client.post("/v1/vms/import", content=body, headers={"content-type": "application/json"})
        elapsed = time.perf_counter() - started
        problem = assert_problem(r, 507, "ENOMEM")
        assert "do not fit the service-wide budget" in problem["detail"]
        assert elapsed < 0.3, f"{elapsed:.2f} s: the document was parsed before it was refused"
        assert len(client.get("/v1/vms").json()["vms"]) == 1
        # A document that fits is still parsed and checked as before.
        doc["attributes"] = [[0, 1 << 52, 0]]
        assert client.post("/v1/vms/import", json=doc).status_code == 201
