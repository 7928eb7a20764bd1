"""One lock per VM: concurrent callers never see or leave a half-applied update."""

from __future__ import annotations

import threading
from collections.abc import Callable

import pytest

from app.core import Engine
from app.core.errors import KvmError
from app.models.kvm import FaultRequest, KvmMemoryAttributes, NotifierRequest
from app.models.vm import VmCreate
from tests.core.conftest import GIB4, HVA, add_gmem_slot


def run_workers(worker: Callable[[int], None], n: int) -> None:
    """Run ``worker(0..n-1)`` in threads at once; the first exception of any worker fails the test
    (an exception in a plain Thread is only printed, and the test went on to pass)."""
    errors: list[BaseException] = []

    def guarded(i: int) -> None:
        try:
            worker(i)
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=guarded, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]


def test_a_failing_worker_fails_the_test() -> None:
    def worker(n: int) -> None:
        for i in range(10):
            if n == 3 and i == 5:
                raise KvmError("injected at iteration 5")

    with pytest.raises(KvmError, match="injected"):
        run_workers(worker, 8)


def test_concurrent_conversions_faults_and_notifiers() -> None:
    vm = Engine().create_vm(VmCreate(semantics="linux"))
    add_gmem_slot(vm, size=0x100000)
    invalidations = [0] * 8

    def worker(n: int) -> None:
        for i in range(300):
            page = (n * 7 + i) % 256
            try:
                up = vm.set_memory_attributes(
                    KvmMemoryAttributes(address=GIB4 + page * 4096, size=4096 * (1 + i % 3), attributes=8 * (i % 2))
                )
                invalidations[n] += up.invalidated
                vm.fault(FaultRequest(gpa=GIB4 + page * 4096, mmu_seq=vm.mmu_model().mmu_invalidate_seq))
                if i % 10 == 0:
                    inv = vm.notifier_start(
                        NotifierRequest(hva_start=HVA + page * 4096, hva_end=HVA + page * 4096 + 8192)
                    )
                    vm.notifier_end(inv.id)
                    invalidations[n] += 1
            except KvmError as e:  # pragma: no cover - would be a bug
                raise AssertionError(e.detail) from e

    run_workers(worker, 8)
    mmu = vm.mmu_model()
    assert mmu.mmu_invalidate_in_progress == 0
    assert mmu.mmu_invalidate_seq == sum(invalidations)
    # At rest no mapping disagrees with the attribute of its gfn.
    for run in vm.mapping_runs(0, 0, 1 << 52, 10_000)[0]:
        for attr in vm.attribute_runs(run.start_gfn, run.end_gfn, 10_000)[0]:
            assert attr.private == run.private
