"""The Responses API (POST /v1/responses) through the official openai SDK: every streamed event
parsed by the SDK's own types, in order, with strictly increasing sequence numbers and an SSE
`event:` line naming each; the final response equal to the non-streaming one."""

from __future__ import annotations

import json

import httpx
import jsonschema
import pytest
from openai import OpenAI

from tests.live_server import wait_until_idle
from tests.server.test_errors import assert_error
from tests.server.test_reasoning_and_tools import MODEL, THINK, WEATHER

FUNCTION = {"type": "function", **WEATHER["function"]}
PERSON = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 20},
                                           "age": {"type": "integer"}},
          "required": ["name", "age"], "additionalProperties": False}


@pytest.fixture(scope="module")
def client(reasoning_server):
    return OpenAI(api_key="EMPTY", base_url=reasoning_server.v1)


def same(streamed, whole) -> None:
    """Two responses equal but for their ids and times."""
    def strip(response) -> dict:
        data = response.model_dump()
        for key in ("id", "created_at"):
            data.pop(key)
        for item in data["output"]:
            item.pop("id", None)
            if item["type"] == "function_call":
                item.pop("call_id")
        data["usage"]["input_tokens_details"].pop("cached_tokens")
        return data

    assert strip(streamed) == strip(whole)


def events_of(stream) -> list:
    events = list(stream)
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert [e.type for e in events[:2]] == ["response.created", "response.in_progress"]
    assert events[-1].type in ("response.completed", "response.incomplete")
    return events


def check_item_events(events) -> None:
    """Each output item opens, fills and closes in order, one at a time."""
    open_index = None
    for event in events[2:-1]:
        if event.type == "response.output_item.added":
            assert open_index is None
            open_index = event.output_index
        elif event.type == "response.output_item.done":
            assert event.output_index == open_index
            open_index = None
        else:
            assert event.output_index == open_index, event.type
    assert open_index is None


def test_text_streams_as_typed_events_ending_in_the_whole_response(client):
    kwargs = dict(model=MODEL, input="Say hello to Ada.", instructions="Be brief.",
                  temperature=0, max_output_tokens=40, metadata={"user": "ada"})
    whole = client.responses.create(**kwargs)
    assert whole.output_text and whole.status in ("completed", "incomplete")
    events = events_of(client.responses.create(**kwargs, stream=True))
    check_item_events(events)
    kinds = [e.type for e in events]
    deltas = [e.delta for e in events if e.type == "response.output_text.delta"]
    assert kinds[2:5] == ["response.output_item.added", "response.content_part.added",
                          "response.output_text.delta"]
    assert kinds[-4:-1] == ["response.output_text.done", "response.content_part.done",
                            "response.output_item.done"]
    (done,) = [e for e in events if e.type == "response.output_text.done"]
    assert "".join(deltas) == done.text == whole.output_text
    same(events[-1].response, whole)
    assert whole.metadata == {"user": "ada"}
    assert whole.usage.output_tokens > 0
    assert whole.usage.total_tokens == whole.usage.input_tokens + whole.usage.output_tokens


def test_max_output_tokens_ends_incomplete(client):
    kwargs = dict(model=MODEL, input="Tell a long story.", max_output_tokens=5,
                  temperature=0, extra_body={"ignore_eos": True})
    whole = client.responses.create(**kwargs)
    assert whole.status == "incomplete" and whole.incomplete_details.reason == "max_output_tokens"
    assert whole.usage.output_tokens == 5 and whole.output[0].status == "incomplete"
    events = events_of(client.responses.create(**kwargs, stream=True))
    assert events[-1].type == "response.incomplete"
    same(events[-1].response, whole)


def test_the_stream_helper_gives_the_final_response(client):
    # Constrained so that it completes (the helper wants response.completed).
    kwargs = dict(model=MODEL, input="Name two colours.", temperature=0, max_output_tokens=30,
                  extra_body={"structured_outputs": {"regex": "(red|green|blue) and (red|blue)"}})
    whole = client.responses.create(**kwargs)
    with client.responses.stream(**kwargs) as stream:
        texts = [e.delta for e in stream if e.type == "response.output_text.delta"]
        final = stream.get_final_response()
    assert "".join(texts) == final.output_text == whole.output_text


def test_the_wire_names_each_event(reasoning_server):
    with httpx.stream("POST", f"{reasoning_server.v1}/responses", timeout=60, json={
            "input": "Hi", "max_output_tokens": 4, "stream": True}) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in response.iter_lines() if line]
    names = [line.removeprefix("event: ") for line in lines if line.startswith("event: ")]
    data = [json.loads(line.removeprefix("data: ")) for line in lines
            if line.startswith("data: ")]
    assert names == [d["type"] for d in data] and "[DONE]" not in "".join(lines)


def test_a_json_schema_format_is_always_met(client):
    kwargs = dict(model=MODEL, input="Invent a person.", temperature=1.0, top_p=0.9,
                  max_output_tokens=60, text={"format": {
                      "type": "json_schema", "name": "person", "schema": PERSON,
                      "strict": True}}, extra_body={"seed": 3})
    whole = client.responses.create(**kwargs)
    jsonschema.validate(json.loads(whole.output_text), PERSON)
    assert whole.text.format.type == "json_schema"
    events = events_of(client.responses.create(**kwargs, stream=True))
    same(events[-1].response, whole)


def test_a_named_function_is_called(client):
    kwargs = dict(model=MODEL, input="What's the weather in Paris?", tools=[FUNCTION],
                  tool_choice={"type": "function", "name": "get_weather"}, temperature=1.0,
                  max_output_tokens=60, extra_body={"seed": 5})
    whole = client.responses.create(**kwargs)
    (call,) = whole.output
    assert call.type == "function_call" and call.name == "get_weather"
    assert call.call_id.startswith("call_") and call.status == "completed"
    jsonschema.validate(json.loads(call.arguments), WEATHER["function"]["parameters"])
    events = events_of(client.responses.create(**kwargs, stream=True))
    check_item_events(events)
    arguments = "".join(e.delta for e in events
                        if e.type == "response.function_call_arguments.delta")
    (done,) = [e for e in events if e.type == "response.function_call_arguments.done"]
    assert arguments == done.arguments == call.arguments
    same(events[-1].response, whole)


def test_reasoning_is_a_reasoning_item(client):
    kwargs = dict(model=MODEL, input="Think first, then greet me.", temperature=0,
                  max_output_tokens=80, extra_body={"structured_outputs": {"regex": THINK}})
    whole = client.responses.create(**kwargs)
    reasoning, message = whole.output
    assert reasoning.type == "reasoning" and message.type == "message"
    thought = reasoning.content[0].text
    assert thought and "<think>" not in thought + whole.output_text
    assert 0 < whole.usage.output_tokens_details.reasoning_tokens < whole.usage.output_tokens
    events = events_of(client.responses.create(**kwargs, stream=True))
    check_item_events(events)
    assert "".join(e.delta for e in events
                   if e.type == "response.reasoning_text.delta") == thought
    same(events[-1].response, whole)


def test_a_function_call_round_trip_is_rendered(client, reasoning_server):
    """The call and its output, sent back as input items, reach the template as chat's tool
    messages do: the same prompt length as the chat request."""
    arguments = '{"city": "Oslo", "unit": "celsius"}'
    items = [{"role": "user", "content": "Weather in Oslo?"},
             {"type": "function_call", "call_id": "call_1", "name": "get_weather",
              "arguments": arguments},
             {"type": "function_call_output", "call_id": "call_1", "output": "-3 C"}]
    response = client.responses.create(model=MODEL, input=items, tools=[FUNCTION],
                                       tool_choice="none", max_output_tokens=1)
    chat = client.chat.completions.create(model=MODEL, max_tokens=1, messages=[
        {"role": "user", "content": "Weather in Oslo?"},
        {"role": "assistant", "content": None, "tool_calls": [{
            "id": "call_1", "type": "function",
            "function": {"name": "get_weather", "arguments": arguments}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "-3 C"}],
        tools=[WEATHER], tool_choice="none")
    assert response.usage.input_tokens == chat.usage.prompt_tokens


@pytest.mark.parametrize("body, param", [
    ({"input": "hi", "store": True}, "store"),
    ({"input": "hi", "previous_response_id": "resp_1"}, "previous_response_id"),
    ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]},
     "input.0.content.0.type"),
    ({"input": "hi", "frobnicate": 1}, "frobnicate"),
    ({"input": "hi", "max_output_tokens": 0}, "max_output_tokens"),
    ({"input": "hi", "text": {"format": {"type": "json_schema", "name": "x"}}},
     "text.format.schema"),
    ({"input": [{"type": "teleport"}]}, "input.0"),
])
def test_bad_requests_name_the_parameter(reasoning_server, body, param):
    response = httpx.post(f"{reasoning_server.v1}/responses", json=body, timeout=30)
    assert_error(response, 400, param=param)


def test_a_disconnect_frees_every_block(reasoning_server):
    with httpx.stream("POST", f"{reasoning_server.v1}/responses", timeout=60, json={
            "input": "Count forever.", "max_output_tokens": 2000, "stream": True,
            "ignore_eos": True}) as response:
        deltas = 0
        for line in response.iter_lines():
            deltas += line == "event: response.output_text.delta"
            if deltas == 5:
                break
    metrics = wait_until_idle(reasoning_server)
    assert metrics["rillm:kv_cache_blocks_in_use"] == 0
    assert metrics["rillm:num_requests_running"] == 0
