"""GET /metrics: the engine's load in Prometheus' text format, read at scrape time."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector


class EngineCollector(Collector):
    def __init__(self, state: Any) -> None:
        self.state = state

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        state = self.state
        yield GaugeMetricFamily("rillm:num_http_requests_active",
                                "Generation requests accepted and not finished",
                                value=state.num_active)
        if state.engine is None:
            return
        stats = state.engine.stats()
        yield GaugeMetricFamily("rillm:num_requests_running", "Sequences in the running batch",
                                value=stats.num_running)
        yield GaugeMetricFamily("rillm:num_requests_waiting", "Sequences waiting to be admitted",
                                value=stats.num_waiting)
        in_use = stats.num_blocks - stats.num_free_blocks
        yield GaugeMetricFamily("rillm:kv_cache_blocks_in_use", "KV-cache blocks held by "
                                "requests", value=in_use)
        yield GaugeMetricFamily("rillm:kv_cache_usage_perc", "Fraction of KV-cache blocks in use",
                                value=in_use / stats.num_blocks)
        yield CounterMetricFamily("rillm:num_preemptions", "Sequences preempted (recomputed)",
                                  value=stats.num_preemptions)


def metrics_text(registry: CollectorRegistry) -> bytes:
    return generate_latest(registry)


def make_registry(state: Any) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(EngineCollector(state))
    return registry
