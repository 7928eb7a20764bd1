"""Durable state: the SQLite journal rebuilds exactly what was acknowledged."""

from __future__ import annotations

import contextlib
import random
import signal
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from app.client import Client, KvmMemattrError
from app.client import operations as ops
from app.client.operations import Op
from app.core import Engine
from app.core.errors import EBUSY, ENOMEM, ENOTTY
from app.core.journal import SqliteJournal
from app.core.limits import EngineLimits
from app.main import create_app
from app.models.kvm import (
    FaultRequest,
    KvmCreateGuestMemfd,
    KvmEncRegion,
    KvmMemoryAttributes,
    KvmUserspaceMemoryRegion2,
    NotifierRequest,
    PrefaultRequest,
)
from app.models.vm import VmCreate
from harness.live import free_port, live_server, start_server

GIB4 = 0x1_0000_0000


def engine_state(engine: Engine) -> dict[str, Any]:
    out = {}
    for vm in engine.vms():
        events, _ = vm.events_page(0, 100_000)
        out[vm.id] = {
            "vm": vm.model().model_dump(),
            "attrs": vm.attribute_runs(0, 1 << 52, 100_000)[0],
            "maps": [vm.mapping_runs(a, 0, 1 << 52, 100_000)[0] for a in range(vm.nr_as)],
            "slots": vm.memslots(),
            "gmem": vm.guest_memfds(),
            "inv": vm.open_notifiers(),
            "inj": vm.fault_injection(),
            "events": [{k: v for k, v in e.items() if k != "time"} for e in events],
            "next_event_id": vm.snapshot().next_event_id,
        }
    return out


def test_replay_rebuilds_engine_state_exactly(tmp_path: Path) -> None:
    db = tmp_path / "state.sqlite3"
    engine = Engine()
    engine.attach_journal(SqliteJournal(db))
    vm = engine.create_vm(VmCreate(semantics="rfc-v9"))
    linux = engine.create_vm(VmCreate(semantics="linux"))
    gone = engine.create_vm(VmCreate())
    gone.memory_encrypt_unreg_region(KvmEncRegion(addr=0, size=0x1000))
    engine.destroy_vm(gone.id)
    for v in (vm, linux):
        fd = v.create_guest_memfd(KvmCreateGuestMemfd(size=0x400000)).fd
        v.set_user_memory_region(
            10,
            KvmUserspaceMemoryRegion2(
                flags=4, guest_phys_addr=GIB4, memory_size=0x400000, userspace_addr=0x7F0000000000, guest_memfd=fd
            ),
        )
        v.fault(FaultRequest(gpa=GIB4 + 0x3000))
        v.close_guest_memfd(fd)
        if v is linux:
            v.prefault(PrefaultRequest(gpa=GIB4, size=0x10000))
        else:
            with pytest.raises(ENOTTY):  # a failed call is journaled and replayed too
                v.prefault(PrefaultRequest(gpa=GIB4, size=0x10000))
    vm.memory_encrypt_unreg_region(KvmEncRegion(addr=GIB4, size=0x4000))
    vm.set_fault_injection(2)
    with pytest.raises(ENOMEM):
        vm.memory_encrypt_reg_region(KvmEncRegion(addr=GIB4, size=0x4000))  # ENOMEM, seq still bumped
    vm.fault(FaultRequest(gpa=GIB4 + 0x1000, mmu_seq=0))
    linux.set_memory_attributes(KvmMemoryAttributes(address=GIB4, size=0x2000, attributes=0))
    linux.set_fault_injection(1)
    inv = linux.notifier_start(NotifierRequest(hva_start=0x7F0000000000, hva_end=0x7F0000002000))
    linux.notifier_start(NotifierRequest(hva_start=0x7F0000003000, hva_end=0x7F0000004000))
    linux.notifier_end(inv.id)
    with pytest.raises(EBUSY):
        linux.delete_memslot(10)  # a notifier invalidation is still open
    copy = engine.import_vm(linux.snapshot())  # journaled as one call carrying the snapshot
    copy.fault(FaultRequest(gpa=GIB4 + 0x5000))
    before = engine_state(engine)
    fresh = Engine()
    fresh.restore(SqliteJournal(db))
    assert engine_state(fresh) == before
    assert gone.id not in before


def _script(rng: random.Random, vms: list[str]) -> Op[Any]:
    vm = rng.choice(vms)
    page = rng.randrange(64)
    choice = rng.randrange(7)
    if choice == 0:
        return ops.fault(vm, GIB4 + page * 0x1000, write=rng.random() < 0.5)
    if choice == 1:
        return ops.set_memory_attributes(vm, GIB4 + page * 0x1000, 0x1000 * rng.randrange(1, 8), rng.choice([0, 8]))
    if choice == 2:
        return ops.prefault(vm, GIB4 + page * 0x1000, 0x1000 * rng.randrange(1, 16))
    if choice == 3:
        return ops.set_fault_injection(vm, rng.randrange(1, 8))
    if choice == 4:
        hva = 0x7F0000000000 + page * 0x1000
        return ops.start_invalidation(vm, hva, hva + 0x2000)
    if choice == 5:
        return ops.end_invalidation(vm, rng.randrange(1, 6))
    return ops.fault(vm, GIB4 + page * 0x1000, mmu_seq=0)


@pytest.mark.parametrize(
    ("seed", "compact_after", "service_items"),
    [(1, None, None), (2, None, None), (3, None, None), (4, 3, None), (5, 7, None), (6, 2, None), (7, 3, 60)],
)
@pytest.mark.slow
def test_sigkill_at_a_random_point_keeps_exactly_the_acknowledged_changes(
    tmp_path: Path, seed: int, compact_after: int | None, service_items: int | None
) -> None:
    """With a low compaction threshold the kill lands during compactions too: nothing acknowledged
    may be lost (a compacted VM's trace restarts empty, so only its next event id is compared).
    With a small service-wide budget, calls it refused must stay refused after the restart."""
    rng = random.Random(seed)
    db = tmp_path / "state.sqlite3"
    env = {"KVM_MEMATTR_STATE_FILE": str(db)}
    if compact_after is not None:
        env["KVM_MEMATTR_JOURNAL_COMPACT_AFTER"] = str(compact_after)
    limits = EngineLimits()
    if service_items is not None:
        env["KVM_MEMATTR_MAX_SERVICE_ITEMS"] = str(service_items)
        limits = EngineLimits(max_service_items=service_items)
    refused = 0
    port = free_port()
    proc = start_server(port, env)
    url = f"http://127.0.0.1:{port}"
    acked: list[Op[Any]] = []
    in_flight: Op[Any] | None = None
    try:
        with Client(url) as kvm:
            setup = [ops.create_vm(semantics="linux"), ops.create_vm(semantics="linux")]
            vms = []
            for op in setup:
                vms.append(kvm.send(op).id)  # type: ignore[attr-defined]
                acked.append(op)
            for vm in vms:
                for op in (
                    ops.create_guest_memfd(vm, 0x400000),
                    ops.set_memslot(vm, 0, GIB4, 0x40000, 0x7F0000000000, flags=4, guest_memfd=3),
                ):
                    kvm.send(op)
                    acked.append(op)
            killer = threading.Timer(rng.uniform(0.3, 1.5), lambda: proc.send_signal(signal.SIGKILL))
            killer.start()
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                in_flight = _script(rng, vms)
                try:
                    kvm.send(in_flight)
                except KvmMemattrError as e:  # a kernel error is an acknowledged answer too
                    refused += e.status == 507
                except httpx.TransportError:
                    break
                acked.append(in_flight)
                in_flight = None
            killer.join()
    finally:
        proc.kill()
        proc.wait()
    assert len(acked) > 10, "the server was killed before the test did anything"

    if service_items is not None:
        assert refused, "the service-wide budget never refused a call"

    def expected(ops_done: list[Op[Any]]) -> dict[str, Any]:
        engine = Engine(limits)
        ids: list[str] = []
        with Client.in_process(create_app(engine=engine)) as local:
            for op in ops_done:
                try:
                    result = local.send(op if not ids else _rebind(op, vms, ids))
                except KvmMemattrError:
                    continue
                if op.path == "/v1/vms":
                    ids.append(result.id)  # type: ignore[attr-defined]
        return _rename(engine_state(engine), dict(zip(ids, vms, strict=False)))

    with live_server(env) as (url2, _):
        restarted = Engine(limits)
        restarted.restore(SqliteJournal(db))
        got = engine_state(restarted)
        with Client(url2) as kvm:
            assert {v.id for v in kvm.list_vms().vms} == set(vms)
            for vm in vms:
                assert kvm.get_vm(vm).mmu.model_dump() == got[vm]["vm"]["mmu"]
    allowed = [expected(acked)]
    if in_flight is not None:
        allowed.append(expected([*acked, in_flight]))
    if compact_after is not None:
        with contextlib.closing(sqlite3.connect(db)) as conn:
            assert conn.execute("SELECT COUNT(*) FROM snapshots").fetchone()[0] > 0, "compactions ran"
        for state_ in (got, *allowed):
            for vm_state in state_.values():
                vm_state.pop("events")
    assert got in allowed


def _rebind(op: Op[Any], server_ids: list[str], local_ids: list[str]) -> Op[Any]:
    path = op.path
    for s, loc in zip(server_ids, local_ids, strict=False):
        path = path.replace(s, loc)
    return Op(op.method, path, op.parse, op.json, op.params)


def _rename(state_: dict[str, Any], mapping: dict[str, str]) -> dict[str, Any]:
    out = {}
    for local, value in state_.items():
        value["vm"]["id"] = mapping[local]
        out[mapping[local]] = value
    return out


def test_sigterm_is_graceful(tmp_path: Path) -> None:
    log = tmp_path / "server.log"
    env = {"KVM_MEMATTR_STATE_FILE": str(tmp_path / "s.sqlite3"), "KVM_MEMATTR_LOG_LEVEL": "info"}
    with log.open("wb") as err, live_server(env, stderr=err) as (url, proc):
        httpx.post(f"{url}/v1/vms", json={})
        proc.send_signal(signal.SIGTERM)
        # uvicorn finishes in-flight requests and the lifespan, then re-raises the signal.
        assert proc.wait(timeout=15) in (0, -signal.SIGTERM)
    text = log.read_text()
    assert "shutting down with 1 VM(s)" in text and "Finished server process" in text
