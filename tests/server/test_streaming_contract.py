"""The SSE framing and chunk contract, read as raw HTTP (what every client library parses)."""

from __future__ import annotations

import json
import time

import httpx
import pytest

from tests.live_server import Server, read_metrics, wait_until_idle


def stream_events(server: Server, path: str, body: dict) -> tuple[httpx.Response, list[str]]:
    """The raw lines of a streamed response (comments included), and the response."""
    with httpx.stream("POST", f"{server.v1}{path}", json=body, headers=server.headers(),
                      timeout=120) as response:
        raw = response.read().decode()
    return response, raw.split("\n\n")


def data_events(blocks: list[str]) -> list[str]:
    """Payloads of `data:` events, in order; comment blocks (keep-alive) dropped."""
    payloads = []
    for block in blocks:
        lines = [line for line in block.split("\n") if line and not line.startswith(":")]
        if lines:
            assert len(lines) == 1 and lines[0].startswith("data: "), block
            payloads.append(lines[0][len("data: "):])
    return payloads


CHAT = {"messages": [{"role": "user", "content": "Name three rivers."}], "stream": True,
        "max_tokens": 20, "temperature": 0}


def test_chat_stream_follows_the_contract(server):
    response, blocks = stream_events(server, "/chat/completions",
                                     {**CHAT, "stream_options": {"include_usage": True}})
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    assert not any(line.startswith("event:") for b in blocks for line in b.split("\n"))
    payloads = data_events(blocks)
    assert payloads[-1] == "[DONE]"
    chunks = [json.loads(p) for p in payloads[:-1]]
    ids = {c["id"] for c in chunks}
    assert len(ids) == 1 and ids.pop().startswith("chatcmpl-")
    assert {c["object"] for c in chunks} == {"chat.completion.chunk"}
    assert len({(c["created"], c["model"]) for c in chunks}) == 1
    first, *middle, final, usage = chunks
    assert first["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert all("role" not in c["choices"][0]["delta"] for c in middle + [final])
    assert all(set(c["choices"][0]["delta"]) == {"content"} for c in middle)
    assert all(c["choices"][0]["finish_reason"] is None for c in [first, *middle])
    assert final["choices"][0]["delta"] == {} and final["choices"][0]["finish_reason"] == "length"
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == 20
    assert usage["usage"]["total_tokens"] == usage["usage"]["prompt_tokens"] + 20


def test_stream_interval_groups_tokens_but_never_holds_the_first(server):
    body = {**CHAT, "max_tokens": 24, "logprobs": True}
    _, one = stream_events(server, "/chat/completions", body)
    _, four = stream_events(server, "/chat/completions", {**body, "stream_interval": 4})
    texts, tokens = [], []
    for blocks in (one, four):
        chunks = [json.loads(p) for p in data_events(blocks)[:-1]][1:-1]
        texts.append([c["choices"][0]["delta"].get("content") for c in chunks])
        tokens.append([len(c["choices"][0]["logprobs"]["content"]) for c in chunks])
    assert "".join(texts[0]) == "".join(texts[1])
    assert sum(tokens[1]) == sum(tokens[0]) == 24
    assert len(texts[1]) <= 1 + 24 // 4 + 1 < len(texts[0])
    # The first piece went out as soon as it came, not after 4 tokens. It can hold two: tokens
    # that reach the HTTP side together (a decode step is ~5 ms here) are sent together.
    assert tokens[1][0] < 4


def test_n_choices_stream_with_their_index(server):
    _, blocks = stream_events(server, "/chat/completions",
                              {**CHAT, "n": 2, "temperature": 1.0, "seed": 3})
    chunks = [json.loads(p) for p in data_events(blocks)[:-1]]
    by_index: dict[int, list[dict]] = {0: [], 1: []}
    for c in chunks:
        assert len(c["choices"]) == 1
        by_index[c["choices"][0]["index"]].append(c["choices"][0])
    for choices in by_index.values():
        assert choices[0]["delta"] == {"role": "assistant", "content": ""}
        assert choices[-1]["delta"] == {} and choices[-1]["finish_reason"] is not None
        assert sum("role" in c["delta"] for c in choices) == 1


def test_completions_stream_and_continuous_usage(server):
    response, blocks = stream_events(server, "/completions", {
        "prompt": "Once upon a time", "max_tokens": 8, "stream": True, "temperature": 0,
        "stream_options": {"include_usage": True, "continuous_usage_stats": True}})
    chunks = [json.loads(p) for p in data_events(blocks)[:-1]]
    assert {c["object"] for c in chunks} == {"text_completion"}
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 8
    counts = [c["usage"]["completion_tokens"] for c in chunks[:-1]]
    assert counts == sorted(counts) and counts[-1] == 8
    assert chunks[-2]["choices"][0]["finish_reason"] == "length"


def test_keep_alive_comments_while_waiting_in_the_queue(guarded_server):
    import threading

    # Long enough to keep the only sequence slot for several keep-alive intervals (0.3 s) at
    # any decode speed this machine reaches (~6 ms a token).
    long_body = {"model": "house-model", "prompt": "Count:", "max_tokens": 400,
                 "ignore_eos": True}
    blocker = threading.Thread(target=lambda: httpx.post(
        f"{guarded_server.v1}/completions", json=long_body, headers=guarded_server.headers(),
        timeout=120))
    blocker.start()
    try:
        deadline = time.monotonic() + 30
        while read_metrics(guarded_server).get("rillm:num_requests_running") != 1:
            assert time.monotonic() < deadline, "the blocking request never started"
            time.sleep(0.05)
        _, blocks = stream_events(guarded_server, "/chat/completions", {
            "model": "house-model", "messages": [{"role": "user", "content": "Hi"}],
            "max_tokens": 3, "stream": True})
    finally:
        blocker.join()
    assert any(b.strip() == ": keep-alive" for b in blocks)
    assert data_events(blocks)[-1] == "[DONE]"
    wait_until_idle(guarded_server)


@pytest.mark.parametrize("path", ["/chat/completions", "/completions"])
def test_disconnect_storm_frees_everything_and_serving_continues(server, path):
    body = ({"messages": [{"role": "user", "content": "Write a long essay."}]}
            if path == "/chat/completions" else {"prompt": "A long essay:"})
    body |= {"max_tokens": 400, "ignore_eos": True, "stream": True}
    streams = []
    client = httpx.Client(timeout=60)
    for _ in range(12):
        stream = client.stream("POST", f"{server.v1}{path}", json=body)
        response = stream.__enter__()
        next(response.iter_lines())  # the role chunk: the request is in
        streams.append(stream)
    for stream in streams:
        stream.__exit__(None, None, None)
    client.close()
    metrics = wait_until_idle(server)
    assert metrics["rillm:kv_cache_blocks_in_use"] == 0
    assert metrics["rillm:num_requests_running"] == 0
    after = httpx.post(f"{server.v1}/completions", json={"prompt": "Hi", "max_tokens": 2},
                       timeout=30)
    assert after.status_code == 200
    assert after.json()["usage"]["completion_tokens"] == 2


def test_non_streaming_disconnect_aborts_the_request(server):
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{server.v1}/completions",
                   json={"prompt": "Essay:", "max_tokens": 2000, "ignore_eos": True},
                   timeout=1.5)
    metrics = wait_until_idle(server)
    assert metrics["rillm:num_requests_running"] == 0
    assert metrics["rillm:kv_cache_blocks_in_use"] == 0


def test_streamed_text_offsets_count_the_echo_once(server):
    _, blocks = stream_events(server, "/completions", {
        "prompt": "One, two, three,", "max_tokens": 6, "stream": True, "temperature": 0,
        "echo": True, "logprobs": 1})
    chunks = [json.loads(p) for p in data_events(blocks)[:-1]]
    sent = ""
    for chunk in chunks:
        choice = chunk["choices"][0]
        if choice["logprobs"]:
            offsets = choice["logprobs"]["text_offset"]
            tokens = choice["logprobs"]["tokens"]
            echo = len(choice["text"]) - len("".join(tokens))
            assert offsets[0] == len(sent) + echo
        sent += choice["text"]
    assert sent.startswith("One, two, three,")
