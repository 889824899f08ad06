"""Anthropic's Messages API (POST /v1/messages) through the official anthropic SDK: text, a tool
call and thinking, streamed and not, errors in Anthropic's shape, the key as x-api-key."""

from __future__ import annotations

import json

import anthropic
import httpx
import jsonschema
import pytest

from tests.live_server import wait_until_idle
from tests.server.test_reasoning_and_tools import MODEL, THINK, WEATHER

TOOL = {"name": "get_weather", "description": WEATHER["function"]["description"],
        "input_schema": WEATHER["function"]["parameters"]}
HI = [{"role": "user", "content": "Say hello to Ada."}]


@pytest.fixture(scope="module")
def client(reasoning_server):
    return anthropic.Anthropic(api_key="unused", base_url=reasoning_server.base_url)


def streamed(client, **kwargs) -> tuple[list, anthropic.types.Message]:
    with client.messages.stream(**kwargs) as stream:
        events = list(stream)
        final = stream.get_final_message()
    return events, final


def same(streamed_message, whole) -> None:
    def strip(message) -> dict:
        data = message.model_dump()
        data.pop("id")
        data["usage"].pop("cache_read_input_tokens")
        for block in data["content"]:
            block.pop("id", None)
            block.pop("parsed_output", None)
        return data

    assert strip(streamed_message) == strip(whole)


def test_text_streams_as_content_blocks_ending_in_the_whole_message(client):
    kwargs = dict(model=MODEL, max_tokens=30, messages=HI, system="Be brief.",
                  extra_body={"temperature": 0})
    whole = client.messages.create(**kwargs)
    assert whole.role == "assistant" and whole.stop_reason in ("end_turn", "max_tokens")
    (block,) = whole.content
    assert block.type == "text" and block.text
    events, final = streamed(client, **kwargs)
    kinds = [e.type for e in events]
    assert kinds[0] == "message_start" and kinds[1] == "content_block_start"
    assert kinds[-3:] == ["content_block_stop", "message_delta", "message_stop"]
    assert "".join(e.delta.text for e in events if e.type == "content_block_delta") == block.text
    same(final, whole)
    assert whole.usage.output_tokens > 0
    # The raw stream, every event parsed by the SDK's own types.
    raw = list(client.messages.create(**kwargs, stream=True))
    assert isinstance(raw[0], anthropic.types.RawMessageStartEvent)
    assert isinstance(raw[-1], anthropic.types.RawMessageStopEvent)
    deltas = [e for e in raw if isinstance(e, anthropic.types.RawContentBlockDeltaEvent)]
    assert "".join(e.delta.text for e in deltas) == block.text
    (stop,) = [e for e in raw if isinstance(e, anthropic.types.RawMessageDeltaEvent)]
    assert stop.delta.stop_reason == whole.stop_reason
    assert stop.usage.output_tokens == whole.usage.output_tokens
    assert client.messages.count_tokens(model=MODEL, messages=HI, system="Be brief."
                                        ).input_tokens == whole.usage.input_tokens


def test_the_wire_has_event_lines_and_pings(reasoning_server):
    with httpx.stream("POST", f"{reasoning_server.v1}/messages", timeout=60, json={
            "model": MODEL, "max_tokens": 3, "messages": HI, "stream": True}) as response:
        lines = [line for line in response.iter_lines() if line]
    names = [line.removeprefix("event: ") for line in lines if line.startswith("event: ")]
    data = [json.loads(line.removeprefix("data: ")) for line in lines
            if line.startswith("data: ")]
    assert names == [d["type"] for d in data]
    assert names[:2] == ["message_start", "ping"] and names[-1] == "message_stop"


def test_a_stop_sequence_is_named(client):
    whole = client.messages.create(model=MODEL, max_tokens=40, messages=HI,
                                   stop_sequences=[" "], extra_body={"temperature": 0})
    assert whole.stop_reason == "stop_sequence" and whole.stop_sequence == " "
    _, final = streamed(client, model=MODEL, max_tokens=40, messages=HI, stop_sequences=[" "],
                        extra_body={"temperature": 0})
    same(final, whole)


def test_a_forced_tool_call_is_a_tool_use_block(client):
    kwargs = dict(model=MODEL, max_tokens=60, tools=[TOOL],
                  tool_choice={"type": "tool", "name": "get_weather"},
                  messages=[{"role": "user", "content": "Weather in Paris?"}],
                  extra_body={"temperature": 1.0, "seed": 5})
    whole = client.messages.create(**kwargs)
    (call,) = whole.content
    assert call.type == "tool_use" and call.name == "get_weather"
    assert whole.stop_reason == "tool_use"
    jsonschema.validate(call.input, TOOL["input_schema"])
    events, final = streamed(client, **kwargs)
    partial = "".join(e.delta.partial_json for e in events if e.type == "content_block_delta")
    assert json.loads(partial) == call.input
    same(final, whole)
    raw = list(client.messages.create(**kwargs, stream=True))
    (start,) = [e for e in raw if isinstance(e, anthropic.types.RawContentBlockStartEvent)]
    assert start.content_block.type == "tool_use" and start.content_block.name == "get_weather"
    assert json.loads("".join(e.delta.partial_json for e in raw if isinstance(
        e, anthropic.types.RawContentBlockDeltaEvent))) == call.input


def test_thinking_is_a_thinking_block(client):
    kwargs = dict(model=MODEL, max_tokens=80, messages=[
        {"role": "user", "content": "Think first, then greet me."}],
        extra_body={"temperature": 0, "structured_outputs": {"regex": THINK}})
    whole = client.messages.create(**kwargs)
    thinking, text = whole.content
    assert thinking.type == "thinking" and thinking.thinking and text.type == "text"
    assert "<think>" not in thinking.thinking + text.text
    events, final = streamed(client, **kwargs)
    assert "".join(e.delta.thinking for e in events if e.type == "content_block_delta"
                   and e.delta.type == "thinking_delta") == thinking.thinking
    same(final, whole)
    raw = list(client.messages.create(**kwargs, stream=True))
    starts = [e.content_block.type for e in raw
              if isinstance(e, anthropic.types.RawContentBlockStartEvent)]
    assert starts == ["thinking", "text"]


def test_a_tool_round_trip_is_rendered_like_chat(client, reasoning_server):
    arguments = {"city": "Oslo", "unit": "celsius"}
    messages = [
        {"role": "user", "content": "Weather in Oslo?"},
        {"role": "assistant", "content": [{"type": "tool_use", "id": "call_1",
                                           "name": "get_weather", "input": arguments}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "call_1",
                                      "content": "-3 C"}]},
    ]
    tokens = client.messages.count_tokens(model=MODEL, messages=messages, tools=[TOOL],
                                          tool_choice={"type": "none"}).input_tokens
    chat = httpx.post(f"{reasoning_server.base_url}/tokenize", json={"messages": [
        {"role": "user", "content": "Weather in Oslo?"},
        {"role": "assistant", "content": None, "tool_calls": [{
            "id": "call_1", "type": "function",
            "function": {"name": "get_weather", "arguments": json.dumps(arguments)}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "-3 C"}],
        "tools": [WEATHER]}).json()
    assert tokens == chat["count"]


@pytest.mark.parametrize("body, kind", [
    ({"model": MODEL, "messages": HI}, "invalid_request_error"),  # max_tokens is required
    ({"model": MODEL, "max_tokens": 0, "messages": HI}, "invalid_request_error"),
    ({"model": MODEL, "max_tokens": 5, "messages": [{"role": "user", "content": [
        {"type": "image", "source": {"type": "base64", "media_type": "image/png",
                                     "data": "AA=="}}]}]}, "invalid_request_error"),
    ({"model": "claude-nonesuch", "max_tokens": 5, "messages": HI}, "not_found_error"),
])
def test_errors_are_in_anthropics_shape(reasoning_server, body, kind):
    response = httpx.post(f"{reasoning_server.v1}/messages", json=body, timeout=30)
    assert 400 <= response.status_code < 500
    error = response.json()
    assert error["type"] == "error" and error["error"]["type"] == kind
    assert error["error"]["message"]


def test_the_sdk_raises_its_own_errors(client):
    with pytest.raises(anthropic.BadRequestError) as raised:
        client.messages.create(model=MODEL, max_tokens=5, messages=HI,
                               extra_body={"frobnicate": 1})
    assert "frobnicate" in raised.value.message


def test_the_key_is_accepted_as_x_api_key(guarded_server):
    for key in ("sesame", "open-sesame"):  # the server takes either of its two keys
        good = anthropic.Anthropic(api_key=key, base_url=guarded_server.base_url)
        reply = good.messages.create(model="smol", max_tokens=2, messages=HI)
        assert reply.usage.output_tokens == 2
    with pytest.raises(anthropic.AuthenticationError):
        anthropic.Anthropic(api_key="wrong", base_url=guarded_server.base_url
                            ).messages.create(model="smol", max_tokens=2, messages=HI)


def test_a_disconnect_frees_every_block(reasoning_server):
    with httpx.stream("POST", f"{reasoning_server.v1}/messages", timeout=60, json={
            "model": MODEL, "max_tokens": 2000, "messages": HI, "stream": True,
            "ignore_eos": True}) as response:
        deltas = 0
        for line in response.iter_lines():
            deltas += line == "event: content_block_delta"
            if deltas == 5:
                break
    metrics = wait_until_idle(reasoning_server)
    assert metrics["rillm:kv_cache_blocks_in_use"] == 0
    assert metrics["rillm:num_requests_running"] == 0


@pytest.mark.parametrize("path", ["/messages", "/messages/count_tokens"])
def test_nothing_to_answer_is_a_400(reasoning_server, path):
    """Found by the schema fuzzer: a conversation of thinking blocks alone renders to no
    message at all."""
    body = {"model": MODEL, "messages": [
        {"role": "user", "content": [{"type": "thinking", "thinking": "hm"}]}]}
    if path == "/messages":
        body["max_tokens"] = 5
    response = httpx.post(f"{reasoning_server.v1}{path}", timeout=30, json=body)
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error" and "nothing to answer" in error["message"]
