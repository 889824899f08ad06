"""Reasoning and tool calls in the stream, through the official openai SDK on real weights.

The default model neither thinks nor calls tools on its own, so these tests make it: decoding
is constrained to `<think>…</think>answer` (or to a hermes `<tool_call>` block), and the server
(`--reasoning-parser qwen3 --enable-auto-tool-choice --tool-call-parser hermes`) must split
what the model wrote exactly as a reasoning model's output would be split.
"""

from __future__ import annotations

import json

import httpx
import jsonschema
import pytest
from openai import OpenAI

from tests.server.test_examples import run_example

THINK = r"<think>[a-z ]{10,60}</think>\n\n[A-Za-z ]{3,40}"
MODEL = "SmolLM2-135M-Instruct"
ASK = [{"role": "user", "content": "Think first, then greet me."}]
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 30},
                           "unit": {"enum": ["celsius", "fahrenheit"]}},
            "required": ["city", "unit"],
            "additionalProperties": False,
        },
    },
}
SEARCH = {"type": "function", "function": {
    "name": "search", "parameters": {"type": "object", "properties": {
        "query": {"type": "string", "maxLength": 40}}, "required": ["query"]}}}


@pytest.fixture(scope="module")
def client(reasoning_server):
    return OpenAI(api_key="EMPTY", base_url=reasoning_server.v1)


def collect(stream) -> tuple[str, str, list, object]:
    reasoning, content, finishes, usage = "", "", [], None
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            reasoning += getattr(choice.delta, "reasoning", None) or ""
            content += choice.delta.content or ""
            if choice.finish_reason:
                finishes.append(choice.finish_reason)
    return reasoning, content, finishes, usage


@pytest.mark.parametrize("interval", [1, 4])
def test_thinking_streams_in_reasoning_and_the_answer_in_content(client, reasoning_server,
                                                                 interval):
    kwargs = dict(model=MODEL, messages=ASK, temperature=0, max_tokens=80,
                  extra_body={"structured_outputs": {"regex": THINK}})
    whole = client.chat.completions.create(**kwargs)
    # The same prompt through /v1/completions: the raw text, tags and all.
    prompt_ids = httpx.post(reasoning_server.base_url + "/tokenize",
                            json={"messages": ASK}).json()["tokens"]
    raw = client.completions.create(
        model=MODEL, prompt=prompt_ids, temperature=0, max_tokens=80,
        extra_body={"structured_outputs": {"regex": THINK}}).choices[0].text
    thought, answer = raw.removeprefix("<think>").split("</think>")
    message = whole.choices[0].message

    streamed = {**kwargs, "extra_body": {**kwargs["extra_body"], "stream_interval": interval}}
    reasoning, content, finishes, usage = collect(client.chat.completions.create(
        **streamed, stream=True, stream_options={"include_usage": True}))
    assert (reasoning, content) == (thought, answer.lstrip())
    assert (message.reasoning, message.content) == (thought, answer.lstrip())
    assert "<think>" not in reasoning + content and "</think>" not in reasoning + content
    assert finishes == ["stop"]
    details = usage.completion_tokens_details
    assert 0 < details.reasoning_tokens < usage.completion_tokens
    assert details.reasoning_tokens == whole.usage.completion_tokens_details.reasoning_tokens


def test_include_reasoning_false_drops_it_and_enable_thinking_false_turns_parsing_off(client):
    base = dict(model=MODEL, messages=ASK, temperature=0, max_tokens=80)
    hidden = client.chat.completions.create(**base, extra_body={
        "structured_outputs": {"regex": THINK}, "include_reasoning": False})
    assert getattr(hidden.choices[0].message, "reasoning", None) is None
    assert hidden.choices[0].message.content and "<think>" not in hidden.choices[0].message.content
    assert hidden.usage.completion_tokens_details.reasoning_tokens > 0

    plain = client.chat.completions.create(**base, extra_body={
        "structured_outputs": {"regex": THINK},
        "chat_template_kwargs": {"enable_thinking": False}})
    assert plain.choices[0].message.content.startswith("<think>")
    assert getattr(plain.choices[0].message, "reasoning", None) is None


def test_chat_template_kwargs_reach_the_template_over_the_server_default(reasoning_server):
    template = "{% for m in messages %}{{ m.content }}{% endfor %}|{{ flavor }}"
    url = reasoning_server.base_url + "/tokenize"

    def rendered(**extra) -> str:
        ids = httpx.post(url, json={"messages": ASK, "chat_template": template, **extra}
                         ).json()["tokens"]
        return httpx.post(reasoning_server.base_url + "/detokenize", json={"tokens": ids}
                          ).json()["prompt"]

    assert rendered().endswith("|vanilla")
    assert rendered(chat_template_kwargs={"flavor": "mint"}).endswith("|mint")
    bad = httpx.post(reasoning_server.v1 + "/chat/completions", json={
        "messages": ASK, "chat_template_kwargs": {"tokenize": True}})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "chat_template_kwargs"


def test_a_named_tool_streams_arguments_that_concatenate_to_valid_json(client):
    stream = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "What's the weather in Paris?"}],
        tools=[WEATHER, SEARCH], temperature=1.0, seed=5, max_tokens=60, stream=True,
        tool_choice={"type": "function", "function": {"name": "get_weather"}})
    calls: dict[int, dict] = {}
    finishes = []
    for chunk in stream:
        choice = chunk.choices[0]
        assert not choice.delta.content
        for call in choice.delta.tool_calls or []:
            if call.index not in calls:
                assert call.id and call.type == "function" and call.function.name
                calls[call.index] = {"name": call.function.name, "arguments": ""}
            else:
                assert call.id is None and call.function.name is None
            calls[call.index]["arguments"] += call.function.arguments or ""
        if choice.finish_reason:
            finishes.append(choice.finish_reason)
    assert list(calls) == [0] and calls[0]["name"] == "get_weather"
    jsonschema.validate(json.loads(calls[0]["arguments"]), WEATHER["function"]["parameters"])
    assert finishes == ["tool_calls"]


def test_required_tool_choice_calls_one_of_the_tools(client):
    for parallel in (False, True):
        response = client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "Find cheap flights."}],
            tools=[WEATHER, SEARCH], tool_choice="required", parallel_tool_calls=parallel,
            temperature=1.0, seed=9, max_tokens=120)
        choice = response.choices[0]
        assert choice.finish_reason == "tool_calls" and choice.message.content is None
        calls = choice.message.tool_calls
        assert calls and (parallel or len(calls) == 1)
        schemas = {t["function"]["name"]: t["function"]["parameters"] for t in (WEATHER, SEARCH)}
        for call in calls:
            jsonschema.validate(json.loads(call.function.arguments), schemas[call.function.name])
        assert len({call.id for call in calls}) == len(calls)


def test_auto_finds_hermes_calls_after_a_thinking_block(client):
    hermes = (r'<think>[a-z ]{5,30}</think>'
              r'<tool_call>\n\{"name": "get_weather", "arguments": \{"city": "[A-Z][a-z]{2,12}", '
              r'"unit": "(celsius|fahrenheit)"\}\}\n</tool_call>')
    kwargs = dict(model=MODEL, messages=[{"role": "user", "content": "Weather in Rome?"}],
                  tools=[WEATHER], temperature=0, max_tokens=100,
                  extra_body={"structured_outputs": {"regex": hermes}})
    whole = client.chat.completions.create(**kwargs)
    message = whole.choices[0].message
    assert whole.choices[0].finish_reason == "tool_calls"
    assert message.reasoning and message.content is None
    (call,) = message.tool_calls
    assert call.function.name == "get_weather"
    jsonschema.validate(json.loads(call.function.arguments), WEATHER["function"]["parameters"])

    stream = client.chat.completions.create(**kwargs, stream=True)
    names, arguments, reasoning = [], "", ""
    for chunk in stream:
        delta = chunk.choices[0].delta
        reasoning += getattr(delta, "reasoning", None) or ""
        assert not delta.content
        for streamed in delta.tool_calls or []:
            if streamed.function.name:
                names.append(streamed.function.name)
            arguments += streamed.function.arguments or ""
    assert names == ["get_weather"] and arguments == call.function.arguments
    assert reasoning == message.reasoning


def test_tool_history_is_rendered_through_the_chat_template(reasoning_server):
    template = ("{% for m in messages %}[{{ m.role }}]"
                "{% for c in m.tool_calls or [] %}call {{ c.function.name }}"
                "({{ c.function.arguments.city }}){% endfor %}{{ m.content }}{% endfor %}")
    messages = [
        {"role": "user", "content": "Weather in Oslo?"},
        {"role": "assistant", "content": None, "tool_calls": [{
            "id": "call_1", "type": "function",
            "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "-3 C"},
    ]
    ids = httpx.post(reasoning_server.base_url + "/tokenize", json={
        "messages": messages, "chat_template": template}).json()["tokens"]
    text = httpx.post(reasoning_server.base_url + "/detokenize",
                      json={"tokens": ids}).json()["prompt"]
    assert text == "[user]Weather in Oslo?[assistant]call get_weather(Oslo)[tool]-3 C"
    # And the model's own template accepts the same history.
    client = OpenAI(api_key="EMPTY", base_url=reasoning_server.v1)
    reply = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=5,
                                           tools=[WEATHER], tool_choice="none")
    assert reply.choices[0].message.tool_calls is None


@pytest.mark.parametrize(("body", "param"), [
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}},
     "tool_choice"),
    ({"tools": [WEATHER], "tool_choice": "required", "response_format": {"type": "json_object"}},
     "tool_choice"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "objec"}}}],
      "tool_choice": "required"}, "tools"),
])
def test_tool_settings_that_cannot_work_are_a_400(reasoning_server, body, param):
    response = httpx.post(reasoning_server.v1 + "/chat/completions",
                          json={"messages": ASK, "max_tokens": 5, **body})
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == param


def test_auto_tool_choice_needs_the_server_flag(server):
    response = httpx.post(server.v1 + "/chat/completions", json={
        "messages": ASK, "tools": [WEATHER], "tool_choice": "auto", "max_tokens": 5})
    assert response.status_code == 400
    assert "--enable-auto-tool-choice" in response.json()["error"]["message"]
    # Without tool_choice, tools on such a server are rendered but never parsed.
    plain = httpx.post(server.v1 + "/chat/completions", json={
        "messages": ASK, "tools": [WEATHER], "max_tokens": 5})
    assert plain.status_code == 200 and "tool_calls" not in plain.json()["choices"][0]["message"]


def test_the_reasoning_example_shows_both_parts(reasoning_server):
    out = run_example(reasoning_server, "stream_reasoning.py", "Is 97 a prime number?", "--demo")
    assert out.startswith("[reasoning] ")
    thinking, _, answer = out.partition("\n[answer] ")
    assert len(thinking) > len("[reasoning] ") and answer.strip()
