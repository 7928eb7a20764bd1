"""Prometheus metrics from a per-app registry (tests build many apps)."""

from __future__ import annotations

import bisect
import itertools
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
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


_BOUNDS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0, 5.0, math.inf)
"""Upper bounds of the latency buckets, in seconds."""
_LE = [repr(b) for b in _BOUNDS[:-1]] + ["+Inf"]  # as prometheus_client writes them


@dataclass(slots=True)
class _Count:
    value: int = 0
    created: float = field(default_factory=time.time)


@dataclass(slots=True)
class _Latency:
    buckets: list[int] = field(default_factory=lambda: [0] * len(_BOUNDS))  # each alone, not cumulative
    total: float = 0.0
    created: float = field(default_factory=time.time)


def _created_series() -> bool:
    """Whether prometheus_client writes ``_created`` series (``PROMETHEUS_DISABLE_CREATED_SERIES``)."""
    (probe,) = Counter("probe", "", registry=None).collect()
    return any(sample.name.endswith("_created") for sample in probe.samples)


class Metrics(Collector):
    """The HTTP and engine metrics of one app.

    The HTTP series are plain numbers that ``observe`` adds to (on the event loop), written at
    scrape time as a prometheus_client ``Counter`` and ``Histogram`` would write them, line for
    line: their children take a lock per increment, four a request, on the hot path."""

    def __init__(self, engine: Engine) -> None:
        self._series: dict[tuple[str, str, int], tuple[_Count, _Latency]] = {}
        self._latency: dict[tuple[str, str], _Latency] = {}
        self._created = _created_series()
        self.registry = CollectorRegistry(auto_describe=True)
        self.registry.register(self)
        self.registry.register(EngineCollector(engine))

    def observe(self, method: str, route: str, status: int, seconds: float) -> None:
        series = self._series.get((method, route, status))
        if series is None:
            latency = self._latency.setdefault((method, route), _Latency())
            series = self._series[method, route, status] = (_Count(), latency)
        count, latency = series
        count.value += 1
        latency.buckets[bisect.bisect_left(_BOUNDS, seconds)] += 1
        latency.total += seconds

    def collect(self) -> Iterator[CounterMetricFamily | HistogramMetricFamily]:
        requests = CounterMetricFamily(
            "kvm_memattr_http_requests", "HTTP requests", labels=["method", "route", "status"]
        )
        for (method, route, status), (count, _) in list(self._series.items()):
            requests.add_metric([method, route, str(status)], count.value, count.created if self._created else None)
        yield requests
        latency = HistogramMetricFamily(
            "kvm_memattr_http_request_duration_seconds", "HTTP request latency", labels=["method", "route"]
        )
        for (method, route), h in list(self._latency.items()):
            latency.add_metric([method, route], list(zip(_LE, itertools.accumulate(h.buckets), strict=True)), h.total)
            if self._created:
                latency.add_sample(f"{latency.name}_created", {"method": method, "route": route}, h.created)
        yield latency
