"""api.md, the interleaving explorer: /v1/explorer/variants and /v1/explorer/runs."""

from __future__ import annotations

from typing import Any

import pytest

from tests.api.conftest import assert_problem
from tests.inprocess import TestClient


def test_variants(client: TestClient) -> None:
    variants = client.get("/v1/explorer/variants").json()["variants"]
    assert [(v["name"], v["historical"]) for v in variants] == [
        ("rfc-v9", False),
        ("linux", False),
        ("v9-as-posted", True),
        ("v9-naive-unwind", True),
        ("reviewer-reorder", True),
        ("punch-hole", False),
        ("punch-hole-free-first", True),
        ("punch-hole-no-seq-bump", True),
        ("in-place", False),
        ("in-place-store-first", True),
        ("in-place-no-pin-check", True),
        ("in-place-no-seq-bump", True),
    ]
    assert all(v["description"] for v in variants)


def test_a_run_and_its_replay(client: TestClient) -> None:
    body = {"variant": "reviewer-reorder", "npages": 2, "to": "private", "fail_nth": 2}
    r = client.post("/v1/explorer/runs", json=body)
    assert r.status_code == 200, r.text
    run = r.json()
    assert (run["variant"], run["schedules"], run["violations"]) == ("reviewer-reorder", 19, 7)
    assert set(run["outcomes"]) == {"mapped", "retry", "memory_fault_exit"}
    ce = run["counterexample"]
    assert ce["violated"] == "stale_mapping" and "mapped private" in ce["detail"]
    assert [t["actor"] for t in ce["trace"]].count("vcpu") == 3
    assert set(ce["trace"][0]) == {"step", "actor", "seq", "in_progress", "attributes", "mapping", "allocated"}
    assert ce["trace"][0]["allocated"] is None  # a conversion: the file's pages are not the point
    assert ce["trace"][-1]["mapping"] == {"private": True}
    replay = client.post("/v1/explorer/runs", json={**body, "schedule": ce["schedule"]}).json()
    assert (replay["schedules"], replay["violations"], replay["counterexample"]) == (1, 1, ce)


def test_the_engine_variants_are_safe(client: TestClient) -> None:
    for variant in ("rfc-v9", "linux"):
        run = client.post("/v1/explorer/runs", json={"variant": variant, "npages": 3, "fail_nth": 2}).json()
        assert (run["violations"], run["counterexample"]) == (0, None)


@pytest.mark.parametrize(
    "body",
    [
        {"variant": "rfc-v10"},
        {"variant": "rfc-v9", "npages": 0},
        {"variant": "rfc-v9", "npages": 9},
        {"variant": "rfc-v9", "npages": 2, "fault_gfn_offset": 2},
        {"variant": "rfc-v9", "npages": 2, "initial_private": [0, 2]},
        {"variant": "rfc-v9", "schedule": ["install_spte"]},
        {"variant": "rfc-v9", "fail_nth": 0},
        {"variant": "rfc-v9", "to": "encrypted"},
        {"variant": "rfc-v9", "start_gfn": "0xfffffffffffff"},
        {"variant": "rfc-v9", "speed": "fast"},
    ],
)
def test_bad_runs_are_problems(client: TestClient, body: dict[str, Any]) -> None:
    assert_problem(client.post("/v1/explorer/runs", json=body), 422, "EINVAL")
