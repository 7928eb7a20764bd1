"""Replay after a crash reproduces the acknowledged state even where the service-wide budget
decided an outcome (issue: a conversion answered 507 "nothing changed" came back applied)."""

from __future__ import annotations

from pathlib import Path

import pytest

from app.core.engine import Engine
from app.core.errors import ENOMEM
from app.core.journal import SqliteJournal
from app.core.limits import EngineLimits
from app.models.kvm import KvmEncRegion, KvmMemoryAttributes
from app.models.vm import VmCreate

LIMITS = EngineLimits(max_service_items=120, max_events=20)


def _fill_until_refused(engine: Engine, semantics: str) -> int:
    """Three VMs convert one page after another until the service budget refuses one."""
    vms = [engine.create_vm(VmCreate(semantics=semantics)) for _ in range(3)]
    refused = 0
    for i in range(400):
        vm, page = vms[i % 3], i // 3
        try:
            if semantics == "linux":
                vm.set_memory_attributes(KvmMemoryAttributes(address=page * 0x2000, size=4096, attributes=8))
            else:
                vm.memory_encrypt_unreg_region(KvmEncRegion(addr=page * 0x2000, size=4096))
        except ENOMEM:
            refused += 1
        if refused == 3:
            break
    return refused


@pytest.mark.parametrize("semantics", ["linux", "rfc-v9"])
@pytest.mark.parametrize("compact_after", [4, 10_000])
def test_a_restart_keeps_what_the_budget_refused_refused(tmp_path: Path, semantics: str, compact_after: int) -> None:
    db = tmp_path / "state.sqlite3"
    engine = Engine(LIMITS)
    engine.attach_journal(SqliteJournal(db, compact_after=compact_after))
    assert _fill_until_refused(engine, semantics) == 3, "the budget was never reached"
    acknowledged = {vm.id: vm.snapshot() for vm in engine.vms()}
    # SIGKILL: nothing more is written. A new process starts from the file.
    restarted = Engine(LIMITS)
    restarted.restore(SqliteJournal(db, compact_after=compact_after))
    assert {vm.id: vm.snapshot() for vm in restarted.vms()} == acknowledged
    assert restarted.budget.used == sum(vm.kvm.items() for vm in restarted.vms())
