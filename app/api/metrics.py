"""Prometheus metrics from a per-app registry (tests build many apps)."""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from app.core import Engine
from app.core.vm import VirtualMachine


class EngineCollector(Collector):
    """Reads engine state at scrape time, summed over VMs, so nothing is counted twice."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        vms = self.engine.vms()
        gauges: dict[str, tuple[str, Callable[[VirtualMachine], int]]] = {
            "kvm_memattr_vms": ("VMs", lambda vm: 1),
            "kvm_memattr_memslots": ("memslots, all address spaces", lambda vm: sum(len(s) for s in vm.spaces)),
            "kvm_memattr_attribute_runs": ("maximal attribute runs", lambda vm: len(vm.attributes)),
            "kvm_memattr_mapping_runs": ("mapping runs (present and absent)", lambda vm: vm.mmu.runs()),
            "kvm_memattr_mapped_pages": ("present SPTEs", lambda vm: vm.mmu.mapped_pages),
            "kvm_memattr_open_notifier_invalidations": (
                "open MMU-notifier invalidations",
                lambda vm: len(vm.notifiers),
            ),
            "kvm_memattr_mmu_invalidate_in_progress": (
                "sum of mmu_invalidate_in_progress",
                lambda vm: vm.inval.in_progress,
            ),
        }
        for name, (doc, get) in gauges.items():
            yield GaugeMetricFamily(name, doc, value=sum(get(vm) for vm in vms))
        counters = {
            "kvm_memattr_attribute_updates": ("successful attribute updates", "attribute_updates"),
            "kvm_memattr_tlb_flushes": ("kvm_flush_remote_tlbs() calls", "tlb_flushes"),
            "kvm_memattr_pages_zapped": ("SPTEs zapped", "pages_zapped"),
            "kvm_memattr_fault_retries": ("faults that retried", "fault_retries"),
            "kvm_memattr_memory_fault_exits": ("KVM_EXIT_MEMORY_FAULT exits", "memory_fault_exits"),
            "kvm_memattr_mmio_exits": ("KVM_EXIT_MMIO exits", "mmio_exits"),
        }
        for name, (doc, field) in counters.items():
            yield CounterMetricFamily(name, doc, value=sum(getattr(vm.stats, field) for vm in vms))
        yield CounterMetricFamily(
            "kvm_memattr_invalidations",
            "completed invalidations (mmu_invalidate_seq)",
            value=sum(vm.inval.seq for vm in vms),
        )
        faults = CounterMetricFamily("kvm_memattr_faults", "vCPU faults by outcome", labels=["outcome"])
        total = {o: 0 for o in ("mapped", "retry", "memory_fault_exit", "mmio_exit")}
        for vm in vms:
            s = vm.stats
            total["retry"] += s.fault_retries
            total["memory_fault_exit"] += s.memory_fault_exits
            total["mmio_exit"] += s.mmio_exits
            total["mapped"] += s.faults - s.fault_retries - s.memory_fault_exits - s.mmio_exits
        for outcome, n in total.items():
            faults.add_metric([outcome], n)
        yield faults


class Metrics:
    """The HTTP and engine metrics of one app."""

    def __init__(self, engine: Engine) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter(
            "kvm_memattr_http_requests", "HTTP requests", ["method", "route", "status"], registry=self.registry
        )
        self.latency = Histogram(
            "kvm_memattr_http_request_duration_seconds",
            "HTTP request latency",
            ["method", "route"],
            registry=self.registry,
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0, 5.0),
        )
        self.registry.register(EngineCollector(engine))

    def observe(self, method: str, route: str, status: int, seconds: float) -> None:
        self.requests.labels(method, route, str(status)).inc()
        self.latency.labels(method, route).observe(seconds)
