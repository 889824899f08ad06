"""/metrics under vLLM's names, as its dashboards and Kubernetes' inference gateway read them:
parsed with prometheus_client's own parser after a known set of requests."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest
from openai import OpenAI
from prometheus_client.parser import text_string_to_metric_families

from tests.live_server import Server, start_server, wait_until_idle

MODEL = "metered"


@pytest.fixture(scope="module")
def fresh_server() -> Iterator[Server]:
    """A server of its own, so that its counters start at zero."""
    yield from start_server("--served-model-name", MODEL)


def scrape(server: Server) -> dict[tuple[str, tuple], float]:
    samples = {}
    for family in text_string_to_metric_families(
            httpx.get(f"{server.base_url}/metrics", timeout=10).text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def value(samples: dict, name: str, **labels: str) -> float:
    return samples[(name, tuple(sorted({"model_name": MODEL, **labels}.items())))]


def test_counts_and_latencies_after_known_requests(fresh_server):
    client = OpenAI(api_key="EMPTY", base_url=fresh_server.v1)
    extra = {"ignore_eos": True}
    usages = [client.chat.completions.create(model=MODEL, max_tokens=8, extra_body=extra,
                                             messages=[{"role": "user", "content": "Hi"}]).usage,
              client.completions.create(model=MODEL, prompt="Once upon", max_tokens=5,
                                        extra_body=extra).usage]
    for chunk in client.chat.completions.create(
            model=MODEL, max_tokens=6, stream=True, extra_body=extra,
            stream_options={"include_usage": True},
            messages=[{"role": "user", "content": "Count"}]):
        if chunk.usage is not None:
            usages.append(chunk.usage)
    usages.append(client.completions.create(model=MODEL, prompt="Once upon", max_tokens=1,
                                            extra_body=extra).usage)  # a prefix-cache hit
    n = len(usages)
    generated = sum(u.completion_tokens for u in usages)
    wait_until_idle(fresh_server)
    samples = scrape(fresh_server)

    assert value(samples, "vllm:time_to_first_token_seconds_count") == n
    assert value(samples, "vllm:generation_tokens_total") == generated
    assert value(samples, "vllm:prompt_tokens_total") == sum(u.prompt_tokens for u in usages)
    assert value(samples, "vllm:request_success_total", finished_reason="length") == n
    # One token a step per request: a gap between each two of a request's tokens.
    assert value(samples, "vllm:inter_token_latency_seconds_count") == generated - n
    for name in ("e2e_request_latency", "request_queue_time", "request_prefill_time",
                 "request_decode_time"):
        assert value(samples, f"vllm:{name}_seconds_count") == n
        assert value(samples, f"vllm:{name}_seconds_sum") >= 0
    assert value(samples, "vllm:request_generation_tokens_sum") == generated
    assert value(samples, "vllm:request_prompt_tokens_count") == n
    e2e = value(samples, "vllm:e2e_request_latency_seconds_sum")
    assert value(samples, "vllm:time_to_first_token_seconds_sum") <= e2e
    assert 0 < value(samples, "vllm:prefix_cache_hits_total") \
        <= value(samples, "vllm:prefix_cache_queries_total")
    assert value(samples, "vllm:num_requests_running") == 0
    assert value(samples, "vllm:num_requests_waiting") == 0
    assert value(samples, "vllm:kv_cache_usage_perc") == 0


def test_a_request_left_mid_stream_counts_as_aborted(fresh_server):
    before = scrape(fresh_server)
    key = ("vllm:request_success_total",
           tuple(sorted({"model_name": MODEL, "finished_reason": "abort"}.items())))
    with httpx.stream("POST", f"{fresh_server.v1}/completions", timeout=60, json={
            "prompt": "Count:", "max_tokens": 2000, "ignore_eos": True,
            "stream": True}) as response:
        for index, _ in enumerate(response.iter_lines()):
            if index == 10:
                break
    wait_until_idle(fresh_server)
    after = scrape(fresh_server)
    assert after[key] == before.get(key, 0) + 1
    generated = ("vllm:generation_tokens_total", (("model_name", MODEL),))
    assert after[generated] > before[generated]
