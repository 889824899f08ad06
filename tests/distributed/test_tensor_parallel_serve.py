"""`rillm serve --tensor-parallel-size 2`: the default model (GGUF Q4_1 blocks, split on block
boundaries) over two processes, streaming through the openai SDK."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from openai import OpenAI

from tests.live_server import Server, read_metrics, start_server, wait_until_idle
from tests.server.test_openai_sdk import MESSAGES


@pytest.fixture(scope="module")
def tp_server() -> Iterator[Server]:
    yield from start_server("--tensor-parallel-size", "2")


def test_the_default_model_streams_split_over_two_ranks(tp_server):
    client = OpenAI(api_key="EMPTY", base_url=tp_server.v1)
    stream = client.chat.completions.create(model="SmolLM2-135M-Instruct", messages=MESSAGES,
                                            temperature=0, max_tokens=24, stream=True)
    pieces = [c.choices[0].delta.content or "" for c in stream if c.choices]
    assert len([p for p in pieces if p]) > 3  # streamed, not one block
    assert "Paris" in "".join(pieces)
    # Two streams at once, one cut short: the ranks stay in step and nothing stays held.
    long = client.chat.completions.create(
        model="SmolLM2-135M-Instruct", stream=True, max_tokens=200,
        messages=[{"role": "user", "content": "Tell me a long story."}])
    next(iter(long))
    short = client.completions.create(model="SmolLM2-135M-Instruct", prompt="One, two,",
                                      max_tokens=8, temperature=0)
    long.close()
    assert short.choices[0].text
    metrics = wait_until_idle(tp_server)
    assert metrics["rillm:kv_cache_blocks_in_use"] == 0
    assert read_metrics(tp_server)["rillm:num_requests_running"] == 0
