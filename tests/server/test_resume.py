"""Resumable streams (--stream-resume-window): a stream cut mid-way and resumed with
Last-Event-ID is byte for byte the stream; one left alone past its window is aborted."""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator

import httpx
import pytest
from openai import OpenAI

from tests.live_server import Server, read_metrics, start_server, wait_until_idle

WINDOW = 2.0
CHAT = {"messages": [{"role": "user", "content": "Tell me about the sea."}], "max_tokens": 60,
        "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}


@pytest.fixture(scope="module")
def resumable_server() -> Iterator[Server]:
    yield from start_server("--stream-resume-window", str(WINDOW), "--keepalive-interval", "1")


def events(raw: bytes) -> list[bytes]:
    """The SSE events of a body (keep-alive comments left out), each with its blank line."""
    return [e + b"\n\n" for e in raw.split(b"\n\n") if e and not e.startswith(b":")]


def cut_after(server: Server, body: dict, count: int) -> list[bytes]:
    """Start a stream, read `count` events, then break the connection."""
    got: list[bytes] = []
    buffer = b""
    with httpx.stream("POST", f"{server.v1}/chat/completions", json=body, timeout=60) as r:
        assert r.status_code == 200
        for chunk in r.iter_raw():
            buffer += chunk
            *complete, buffer = buffer.split(b"\n\n")
            got += [e + b"\n\n" for e in complete if e and not e.startswith(b":")]
            if len(got) >= count:
                break
    return got[:count]


def last_id(event: bytes) -> str:
    match = re.match(rb"id: (\S+)\n", event)
    assert match, event
    return match.group(1).decode()


def resume(server: Server, body: dict, event_id: str) -> httpx.Response:
    return httpx.post(f"{server.v1}/chat/completions", json=body, timeout=60,
                      headers={"Last-Event-ID": event_id})


def test_a_cut_stream_resumes_byte_exact(resumable_server):
    first = cut_after(resumable_server, CHAT, 5)
    ids = [last_id(e) for e in first]
    stream_id = ids[0].rpartition("/")[0]
    assert ids == [f"{stream_id}/{i}" for i in range(5)]
    time.sleep(0.5)  # the connection is gone; the stream goes on without it

    rest = resume(resumable_server, CHAT, ids[-1])
    assert rest.status_code == 200 and rest.headers["content-type"].startswith(
        "text/event-stream")
    whole = first + events(rest.content)
    assert whole[-1].endswith(b"data: [DONE]\n\n")
    # Every event once, numbered without a gap ...
    assert [last_id(e) for e in whole] == [f"{stream_id}/{i}" for i in range(len(whole))]
    # ... and byte for byte what a reader that never left gets: a replay from the start.
    replay = resume(resumable_server, CHAT, f"{stream_id}/-1")
    assert events(replay.content) == whole
    # The answer is the one an uncut, unresumable request gives (greedy).
    chunks = [json.loads(e.partition(b"data: ")[2]) for e in whole[:-1]]
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    plain = httpx.post(f"{resumable_server.v1}/chat/completions", timeout=60,
                       json={**CHAT, "stream": False, "stream_options": None}).json()
    assert text == plain["choices"][0]["message"]["content"]
    assert wait_until_idle(resumable_server)["rillm:kv_cache_blocks_in_use"] == 0


def test_a_stream_left_past_its_window_is_aborted_and_freed(resumable_server):
    long = {**CHAT, "max_tokens": 4000, "ignore_eos": True}
    first = cut_after(resumable_server, long, 3)
    assert read_metrics(resumable_server)["rillm:num_requests_running"] == 1  # still going
    deadline = time.monotonic() + WINDOW + 5
    while read_metrics(resumable_server)["rillm:num_requests_running"]:
        assert time.monotonic() < deadline, "the abandoned stream was not aborted"
        time.sleep(0.2)
    metrics = wait_until_idle(resumable_server)
    assert metrics["rillm:kv_cache_blocks_in_use"] == 0
    assert metrics["rillm:num_http_requests_active"] == 0
    late = resume(resumable_server, long, last_id(first[-1]))
    assert late.status_code == 404 and late.json()["error"]["code"] == "stream_not_found"


def test_without_the_flag_streams_carry_no_ids_and_a_resume_is_a_new_request(server):
    body = {**CHAT, "max_tokens": 3}
    raw = httpx.post(f"{server.v1}/chat/completions", json=body, timeout=60).content
    assert b"\nid: " not in raw and not raw.startswith(b"id: ")
    again = httpx.post(f"{server.v1}/chat/completions", json=body, timeout=60,
                       headers={"Last-Event-ID": "chatcmpl-x/3"})
    assert again.status_code == 200 and again.content.endswith(b"data: [DONE]\n\n")


def test_the_openai_sdk_reads_a_resumable_stream(resumable_server):
    """The `id:` lines are plain SSE: the SDK's parser takes them in its stride."""
    client = OpenAI(api_key="EMPTY", base_url=resumable_server.v1)
    model = client.models.list().data[0].id
    stream = client.chat.completions.create(model=model, messages=CHAT["messages"],
                                            max_tokens=8, temperature=0, stream=True)
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    plain = client.chat.completions.create(model=model, messages=CHAT["messages"],
                                           max_tokens=8, temperature=0)
    assert text == plain.choices[0].message.content
