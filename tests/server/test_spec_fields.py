"""OpenAI's whole request spec: every field of the openai SDK's chat and completions create
params is accepted with a valid value (honoured, mapped, or ignored), names outside it are a
400 naming them, and the legacy and mapped fields do what they stand for."""

from __future__ import annotations

import json

import httpx
import pytest
from openai.types import completion_create_params
from openai.types.chat import completion_create_params as chat_create_params

from tests.server.test_errors import assert_error
from tests.server.test_reasoning_and_tools import WEATHER

ASK = [{"role": "user", "content": "Hi"}]
CHAT_FIELDS = {
    "messages": ASK, "model": "SmolLM2-135M-Instruct", "audio": None, "modalities": ["text"],
    "frequency_penalty": 0.1, "logit_bias": {"1": 1}, "logprobs": True, "top_logprobs": 2,
    "max_completion_tokens": 3, "max_tokens": 3, "metadata": {"team": "a"},
    "moderation": None, "n": 1, "parallel_tool_calls": True,
    "prediction": {"type": "content", "content": "Hello"}, "presence_penalty": 0.1,
    "prompt_cache_key": "k", "prompt_cache_options": None, "prompt_cache_retention": "in_memory",
    "reasoning_effort": "low", "response_format": {"type": "text"}, "safety_identifier": "u1",
    "seed": 1, "service_tier": "auto", "stop": ["\n\n\n"], "store": False, "stream": True,
    "stream_options": {"include_usage": True, "include_obfuscation": False},
    "temperature": 0.5, "tool_choice": "none", "tools": [WEATHER], "top_p": 0.9, "user": "u1",
    "verbosity": "low", "web_search_options": {},
}
LEGACY = {"functions": [WEATHER["function"]], "function_call": "none"}
"""The legacy pair, which cannot come with tools / tool_choice."""
COMPLETION_FIELDS = {
    "model": "SmolLM2-135M-Instruct", "prompt": "Hi", "best_of": 1, "echo": True,
    "frequency_penalty": 0.1, "logit_bias": {"1": 1}, "logprobs": 2, "max_tokens": 3, "n": 1,
    "presence_penalty": 0.1, "seed": 1, "stop": ["\n\n\n"], "stream": True,
    "stream_options": {"include_usage": True, "include_obfuscation": True},
    "temperature": 0.5, "top_p": 0.9, "user": "u1",
}
NOT_SUPPORTED = {"suffix": "!"}
"""Completions' insertion suffix: a 400 saying so (there is no fill-in-the-middle here)."""


def spec(params_module) -> set[str]:
    keys: set[str] = set()
    for cls in params_module.CompletionCreateParamsBase.__mro__:
        keys |= set(getattr(cls, "__annotations__", {}))
    return keys | {"stream"}


def post(server, path, body) -> httpx.Response:
    return httpx.post(f"{server.v1}{path}", json=body, timeout=60)


def test_every_chat_field_of_the_spec_is_accepted(server):
    assert spec(chat_create_params) == set(CHAT_FIELDS) | set(LEGACY)
    response = post(server, "/chat/completions", CHAT_FIELDS)
    assert response.status_code == 200, response.text
    assert response.text.rstrip().endswith("data: [DONE]")
    legacy = {**{k: v for k, v in CHAT_FIELDS.items() if k not in ("tools", "tool_choice")},
              **LEGACY, "stream": False, "stream_options": None}
    assert post(server, "/chat/completions", legacy).status_code == 200


def test_every_completions_field_of_the_spec_is_accepted(server):
    assert spec(completion_create_params) == set(COMPLETION_FIELDS) | set(NOT_SUPPORTED)
    response = post(server, "/completions", COMPLETION_FIELDS)
    assert response.status_code == 200, response.text
    assert_error(post(server, "/completions", {**COMPLETION_FIELDS, **NOT_SUPPORTED}), 400,
                 param="suffix")


@pytest.mark.parametrize("path, base", [("/chat/completions", {"messages": ASK}),
                                        ("/completions", {"prompt": "Hi"})])
def test_a_name_outside_the_spec_is_a_400_naming_it(server, path, base):
    assert_error(post(server, path, {**base, "max_tokens": 1, "temprature": 0.5}), 400,
                 param="temprature", code="unknown_parameter")


def test_legacy_functions_are_tools(server):
    """`functions` + `function_call: {"name": ...}` force the call as tools + tool_choice do."""
    reply = post(server, "/chat/completions", {
        "messages": [{"role": "user", "content": "Weather in Rome?"}], "max_tokens": 60,
        "functions": [WEATHER["function"]], "function_call": {"name": "get_weather"},
        "temperature": 1.0, "seed": 2}).json()
    (call,) = reply["choices"][0]["message"]["tool_calls"]
    assert call["function"]["name"] == "get_weather"
    history = [{"role": "user", "content": "Weather in Rome?"},
               {"role": "assistant", "content": None, "function_call": {
                   "name": "get_weather", "arguments": '{"city": "Rome"}'}},
               {"role": "function", "name": "get_weather", "content": "21 C"}]
    assert post(server, "/chat/completions", {"messages": history, "max_tokens": 1,
                                              "functions": [WEATHER["function"]]}
                ).status_code == 200


@pytest.mark.parametrize("body, param", [
    ({"modalities": ["text", "audio"]}, "modalities"),
    ({"audio": {"voice": "alloy", "format": "wav"}}, "audio"),
    ({"messages": [{"role": "user", "content": [
        {"type": "input_audio", "input_audio": {"data": "AA==", "format": "wav"}}]}]},
     "messages.0.content.0.type"),
    ({"functions": [WEATHER["function"]], "tools": [WEATHER]}, "functions"),
])
def test_what_a_text_model_cannot_do_is_a_400_that_says_so(server, body, param):
    error = assert_error(post(server, "/chat/completions", {"messages": ASK, "max_tokens": 1,
                                                            **body}), 400, param=param)
    assert "text only" in error["message"] or "not both" in error["message"]


def test_reasoning_effort_none_is_the_templates_thinking_switch(reasoning_server):
    """reasoning_effort "none" turns thinking off as chat_template_kwargs enable_thinking false
    does (the qwen3 parser then leaves the text alone); another effort leaves it on."""
    think = r"<think>[a-z ]{10,60}</think>\n\n[A-Za-z ]{3,40}"
    base = {"messages": ASK, "temperature": 0, "max_tokens": 80,
            "structured_outputs": {"regex": think}}
    off = post(reasoning_server, "/chat/completions", {**base, "reasoning_effort": "none"})
    assert off.json()["choices"][0]["message"]["content"].startswith("<think>")
    on = post(reasoning_server, "/chat/completions", {**base, "reasoning_effort": "high"})
    assert on.json()["choices"][0]["message"]["reasoning"]


@pytest.fixture(scope="module")
def both_fields_server():
    from tests.live_server import start_server

    yield from start_server("--reasoning-parser", "qwen3", "--reasoning-field", "both")


def test_the_reasoning_field_is_named_by_the_operator(reasoning_server, both_fields_server):
    """--reasoning-field both: llama.cpp's and DeepSeek's `reasoning_content` beside vLLM's
    `reasoning`, streamed and not; the default sends only `reasoning`."""
    think = r"<think>[a-z ]{10,60}</think>\n\n[A-Za-z ]{3,40}"
    body = {"messages": ASK, "temperature": 0, "max_tokens": 80,
            "structured_outputs": {"regex": think}}
    message = post(both_fields_server, "/chat/completions", body).json()["choices"][0]["message"]
    assert message["reasoning"] and message["reasoning_content"] == message["reasoning"]
    with httpx.stream("POST", f"{both_fields_server.v1}/chat/completions", timeout=60,
                      json={**body, "stream": True}) as stream:
        deltas = [json.loads(line[6:])["choices"][0]["delta"] for line in stream.iter_lines()
                  if line.startswith("data: {")]
    assert "".join(d.get("reasoning_content", "") for d in deltas) == message["reasoning"]
    assert "".join(d.get("reasoning", "") for d in deltas) == message["reasoning"]
    default = post(reasoning_server, "/chat/completions", body).json()["choices"][0]["message"]
    assert default["reasoning"] == message["reasoning"] and "reasoning_content" not in default
