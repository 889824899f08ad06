"""GET /metrics: Prometheus series under vLLM's names (what its dashboards and Kubernetes'
inference gateway read) and rillm's own gauges.

Gauges of the engine's load are read at scrape time (`EngineCollector`); counters and
histograms are observed as each request finishes (`RequestMetricsRecorder`), from the
timestamps the engine attaches to a finished request (`RequestMetrics`). Every `vllm:` series
carries a `model_name` label, the served model's first name.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from rillm.outputs import RequestOutput

# vLLM's bucket edges, so that its dashboards' quantiles read the same.
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5,
                5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0,
               7.5, 10.0, 20.0, 40.0, 80.0)
LATENCY_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0,
                   60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)


def token_buckets(max_model_len: int) -> tuple[float, ...]:
    """1, 2, 5, 10, 20, 50, ... up to the context length."""
    edges: list[float] = []
    scale = 1
    while True:
        for step in (1, 2, 5):
            if step * scale > max_model_len:
                return tuple(edges)
            edges.append(float(step * scale))
        scale *= 10


class EngineCollector(Collector):
    """The engine's load, read at scrape time."""

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
        in_use = stats.num_blocks - stats.num_free_blocks
        yield GaugeMetricFamily("rillm:num_requests_running", "Sequences in the running batch",
                                value=stats.num_running)
        yield GaugeMetricFamily("rillm:num_requests_waiting", "Sequences waiting to be admitted",
                                value=stats.num_waiting)
        yield GaugeMetricFamily("rillm:kv_cache_blocks_in_use", "KV-cache blocks held by "
                                "requests", value=in_use)
        yield GaugeMetricFamily("rillm:kv_cache_usage_perc", "Fraction of KV-cache blocks in use",
                                value=in_use / stats.num_blocks)
        yield CounterMetricFamily("rillm:num_preemptions", "Sequences preempted (recomputed)",
                                  value=stats.num_preemptions)
        model = [state.model_name]
        for name, doc, value in (
                ("vllm:num_requests_running", "Requests in the running batch", stats.num_running),
                ("vllm:num_requests_waiting", "Requests waiting to be scheduled",
                 stats.num_waiting),
                ("vllm:kv_cache_usage_perc", "KV-cache usage, 1 means 100 percent",
                 in_use / stats.num_blocks)):
            gauge = GaugeMetricFamily(name, doc, labels=["model_name"])
            gauge.add_metric(model, value)
            yield gauge
        preemptions = CounterMetricFamily("vllm:num_preemptions", "Cumulative preemptions",
                                          labels=["model_name"])
        preemptions.add_metric(model, stats.num_preemptions)
        yield preemptions
        reports = getattr(state.engine, "replica_reports", None)
        if reports is not None:
            yield from _replica_metrics(state.engine, reports())


def _replica_metrics(engine: Any, reports: dict[str, dict[str, Any]]
                     ) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
    """Data parallelism: each replica's last load report (rillm.distributed.replicas)."""
    yield GaugeMetricFamily("rillm:replicas", "Engine replicas serving", value=len(reports))
    yield CounterMetricFamily("rillm:replica_deaths", "Engine replicas lost while serving "
                              "(Ray Serve replaces them)", value=engine.board.deaths)
    families = [
        (GaugeMetricFamily, "rillm:replica_num_requests_running", "running", "Sequences in "
         "the replica's running batch"),
        (GaugeMetricFamily, "rillm:replica_num_requests_waiting", "waiting", "Sequences "
         "waiting in the replica"),
        (GaugeMetricFamily, "rillm:replica_kv_cache_blocks_in_use", None, "KV-cache blocks "
         "held by requests on the replica"),
        (CounterMetricFamily, "rillm:replica_requests", "requests", "Requests the replica "
         "has started"),
        (CounterMetricFamily, "rillm:replica_prefix_cache_queries", "prefix_query_tokens",
         "Prompt tokens the replica looked up in its prefix cache"),
        (CounterMetricFamily, "rillm:replica_prefix_cache_hits", "prefix_hit_tokens",
         "Prompt tokens the replica found in its prefix cache"),
        (GaugeMetricFamily, "rillm:replica_in_flight", "in_flight", "Requests the router "
         "sent to the replica that have not ended"),
        (GaugeMetricFamily, "rillm:replica_pid", "pid", "The replica's process id on its "
         "node"),
    ]
    for kind, name, key, doc in families:
        family = kind(name, doc, labels=["replica"])
        for replica, report in sorted(reports.items()):
            value = (report.get("num_blocks", 0) - report.get("free_blocks", 0) if key is None
                     else report.get(key, 0))
            family.add_metric([replica], float(value))
        yield family


class RequestMetricsRecorder:
    """vLLM's per-request counters and histograms, observed once a request has ended."""

    def __init__(self, registry: CollectorRegistry, model_name: str, max_model_len: int
                 ) -> None:
        label = ["model_name"]

        def counter(name: str, doc: str, labels: Sequence[str] = ()) -> Counter:
            return Counter(name, doc, [*label, *labels], registry=registry)

        def histogram(name: str, doc: str, buckets: Sequence[float]) -> Histogram:
            return Histogram(name, doc, label, buckets=buckets, registry=registry)

        tokens = token_buckets(max_model_len)
        self._model = model_name
        self.prompt_tokens = counter("vllm:prompt_tokens", "Prefill tokens processed")
        self.generation_tokens = counter("vllm:generation_tokens", "Generation tokens produced")
        self.success = counter("vllm:request_success", "Requests finished, by reason",
                               ["finished_reason"])
        self.cache_queries = counter("vllm:prefix_cache_queries",
                                     "Prompt tokens looked up in the prefix cache")
        self.cache_hits = counter("vllm:prefix_cache_hits",
                                  "Prompt tokens found in the prefix cache")
        self.ttft = histogram("vllm:time_to_first_token_seconds",
                              "Time to the first token", TTFT_BUCKETS)
        self.itl = histogram("vllm:inter_token_latency_seconds",
                             "Time between consecutive token steps", ITL_BUCKETS)
        self.e2e = histogram("vllm:e2e_request_latency_seconds",
                             "Arrival to last token", LATENCY_BUCKETS)
        self.queue = histogram("vllm:request_queue_time_seconds",
                               "Time waiting before first scheduled", LATENCY_BUCKETS)
        self.prefill = histogram("vllm:request_prefill_time_seconds",
                                 "First scheduled to first token", LATENCY_BUCKETS)
        self.decode = histogram("vllm:request_decode_time_seconds",
                                "First token to last token", LATENCY_BUCKETS)
        self.prompt_length = histogram("vllm:request_prompt_tokens",
                                       "Prompt length of finished requests", tokens)
        self.output_length = histogram("vllm:request_generation_tokens",
                                       "Tokens generated by finished requests", tokens)

    def finished(self, output: RequestOutput, num_generated: int) -> None:
        """A request's last output (finished, or the last one seen before an abort), with
        the tokens it generated in all."""
        model = self._model
        prompt = len(output.prompt_token_ids)
        self.prompt_tokens.labels(model).inc(prompt)
        self.generation_tokens.labels(model).inc(num_generated)
        self.cache_queries.labels(model).inc(prompt)
        self.cache_hits.labels(model).inc(max(output.num_cached_tokens, 0))
        reasons = [c.finish_reason or "abort" for c in output.outputs] if output.finished \
            else ["abort"]
        for reason in reasons:
            self.success.labels(model, reason).inc()
        self.prompt_length.labels(model).observe(prompt)
        self.output_length.labels(model).observe(num_generated)
        timing = output.metrics
        if timing is None:
            return
        self.ttft.labels(model).observe(timing.first_token)
        for gap in timing.inter_token:
            self.itl.labels(model).observe(gap)
        self.e2e.labels(model).observe(timing.finished)
        self.queue.labels(model).observe(timing.queued)
        self.prefill.labels(model).observe(timing.first_token - timing.queued)
        self.decode.labels(model).observe(timing.finished - timing.first_token)


def metrics_text(registry: CollectorRegistry) -> bytes:
    return generate_latest(registry)
