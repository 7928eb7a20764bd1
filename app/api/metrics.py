"""Prometheus metrics from a per-app registry (tests build many apps)."""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from app.core import Engine


class EngineCollector(Collector):
    """Reads engine state at scrape time, summed over VMs, so nothing is counted twice."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        usage = [vm.usage() for vm in self.engine.vms()]

        def total(key: str) -> int:
            return sum(u[key] for u in usage)

        yield GaugeMetricFamily("kvm_memattr_vms", "VMs", value=len(usage))
        budget = self.engine.budget
        yield GaugeMetricFamily(
            "kvm_memattr_service_items", "runs, events and stored objects, all VMs", value=budget.used
        )
        yield GaugeMetricFamily("kvm_memattr_service_items_limit", "max_service_items", value=budget.limit)
        gauges = {
            "memslots": "memslots, all address spaces",
            "attribute_runs": "maximal attribute runs",
            "mapping_runs": "mapping runs (present and absent)",
            "mapped_pages": "present SPTEs",
            "open_notifier_invalidations": "open MMU-notifier invalidations",
            "mmu_invalidate_in_progress": "sum of mmu_invalidate_in_progress",
        }
        for key, doc in gauges.items():
            yield GaugeMetricFamily(f"kvm_memattr_{key}", doc, value=total(key))
        counters = {
            "attribute_updates": "successful attribute updates",
            "tlb_flushes": "kvm_flush_remote_tlbs() calls",
            "pages_zapped": "SPTEs zapped",
            "fault_retries": "faults that retried",
            "memory_fault_exits": "KVM_EXIT_MEMORY_FAULT exits",
            "mmio_exits": "KVM_EXIT_MMIO exits",
        }
        for key, doc in counters.items():
            yield CounterMetricFamily(f"kvm_memattr_{key}", doc, value=total(key))
        yield CounterMetricFamily(
            "kvm_memattr_invalidations",
            "completed invalidations (mmu_invalidate_seq)",
            value=total("mmu_invalidate_seq"),
        )
        faults = CounterMetricFamily("kvm_memattr_faults", "vCPU faults by outcome", labels=["outcome"])
        exits = total("fault_retries") + total("memory_fault_exits") + total("mmio_exits")
        faults.add_metric(["mapped"], total("faults") - exits)
        faults.add_metric(["retry"], total("fault_retries"))
        faults.add_metric(["memory_fault_exit"], total("memory_fault_exits"))
        faults.add_metric(["mmio_exit"], total("mmio_exits"))
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
        # labels() takes a lock and builds a key on every call: bind each series' children once.
        self._children: dict[tuple[str, str, int], tuple[Counter, Histogram]] = {}

    def observe(self, method: str, route: str, status: int, seconds: float) -> None:
        children = self._children.get((method, route, status))
        if children is None:
            children = (self.requests.labels(method, route, str(status)), self.latency.labels(method, route))
            self._children[method, route, status] = children
        children[0].inc()
        children[1].observe(seconds)
