"""Structured outputs through the official openai SDK on the default model's real weights:
whatever the model would say at temperature 1, what comes back matches the constraint."""

from __future__ import annotations

import json
import re

import httpx
import jsonschema
import pytest
from openai import OpenAI

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 24},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "hobbies": {"type": "array", "items": {"enum": ["chess", "music", "hiking"]},
                    "maxItems": 3},
    },
    "required": ["name", "age", "hobbies"],
    "additionalProperties": False,
}
MODEL = "SmolLM2-135M-Instruct"
ASK = [{"role": "user", "content": "Invent a person and describe them."}]


@pytest.fixture(scope="module")
def client(server):
    return OpenAI(api_key="EMPTY", base_url=server.v1)


def test_twenty_sampled_json_schema_answers_all_validate(client):
    response = client.chat.completions.create(
        model=MODEL, messages=ASK, n=20, temperature=1.0, seed=7, max_tokens=120,
        response_format={"type": "json_schema",
                         "json_schema": {"name": "person", "schema": PERSON, "strict": True}},
    )
    assert len(response.choices) == 20
    for choice in response.choices:
        assert choice.finish_reason == "stop", choice.message.content
        jsonschema.validate(json.loads(choice.message.content), PERSON)
    assert len({c.message.content for c in response.choices}) > 1


def test_streamed_json_object_parses(client):
    stream = client.chat.completions.create(
        model=MODEL, messages=ASK, temperature=1.0, seed=3, max_tokens=200, stream=True,
        response_format={"type": "json_object"})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    if chunks[-1].choices[0].finish_reason == "stop":
        assert isinstance(json.loads(text), dict)
    else:  # an object that does not close within max_tokens is cut, not invalid
        assert text.startswith("{")


def test_regex_and_choice_always_match(client):
    pattern = r"\+1-\d{3}-\d{3}-\d{4}"
    phones = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Give me a phone number."}],
        n=8, temperature=1.0, seed=11, max_tokens=30,
        extra_body={"structured_outputs": {"regex": pattern}})
    for choice in phones.choices:
        assert re.fullmatch(pattern, choice.message.content)

    options = ["positive", "negative", "neutral"]
    stream = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Sentiment of: I love it!"}],
        n=8, temperature=1.0, seed=12, max_tokens=10, stream=True,
        extra_body={"structured_outputs": {"choice": options}})
    texts = [""] * 8
    for chunk in stream:
        for choice in chunk.choices:
            texts[choice.index] += choice.delta.content or ""
    assert all(text in options for text in texts), texts


def test_completions_accept_a_constraint_too(client):
    out = client.completions.create(
        model=MODEL, prompt="The answer is", max_tokens=10, temperature=1.0,
        extra_body={"structured_outputs": {"regex": " (yes|no)"}})
    assert out.choices[0].text in (" yes", " no")


@pytest.mark.parametrize(("body", "param"), [
    ({"structured_outputs": {"regex": "(unclosed"}}, "structured_outputs.regex"),
    ({"structured_outputs": {"grammar": "root ::= missing"}}, "structured_outputs.grammar"),
    ({"structured_outputs": {"json": {"type": "objec"}}}, "structured_outputs.json"),
    ({"structured_outputs": {"regex": "a", "choice": ["a"]}}, "structured_outputs"),
    ({"structured_outputs": {"choice": []}}, "structured_outputs.choice"),
    ({"structured_outputs": {"pattern": "a"}}, "structured_outputs.pattern"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {
        "type": "objec"}}}}, "response_format"),
    ({"response_format": {"type": "json_schema"}}, "response_format.json_schema"),
    ({"response_format": {"type": "json_object"}, "structured_outputs": {"regex": "a"}},
     "response_format"),
])
def test_constraints_that_cannot_work_are_a_400_naming_the_field(server, body, param):
    response = httpx.post(f"{server.v1}/chat/completions", json={
        "messages": ASK, "max_tokens": 5, **body})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param and error["type"] == "invalid_request_error"
    assert ".cc:" not in error["message"]
