"""A bound on the whole service: attribute runs + mapping runs + stored events across all VMs."""

from __future__ import annotations

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
