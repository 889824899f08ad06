"""`rillm serve gemma3-270m`: a known model found by name in its installed wheel, a base model
without a chat template. Completions stream; chat answers a clear 400 naming --chat-template
until a template is given (per request, or with the flag)."""

from __future__ import annotations

import openai
import pytest

from tests.live_server import start_server

# Gemma's own turn format (what its instruct models' templates write).
TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<start_of_turn>"
    "{{ 'model' if m['role'] == 'assistant' else m['role'] }}\n{{ m['content'] }}<end_of_turn>\n"
    "{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)
MESSAGES = [{"role": "user", "content": "Say hello."}]


@pytest.fixture(scope="module")
def gemma(tmp_path_factory):
    yield from start_server("gemma3-270m", "--max-model-len", "2048",
                            "--trust-request-chat-template")


@pytest.fixture(scope="module")
def gemma_with_template(tmp_path_factory):
    path = tmp_path_factory.mktemp("template") / "gemma.jinja"
    path.write_text(TEMPLATE)
    yield from start_server("gemma3-270m", "--chat-template", str(path),
                            "--max-model-len", "2048")


def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.v1, api_key="none", max_retries=0)


def test_completions_stream_from_the_known_model(gemma):
    models = client(gemma).models.list().data
    assert [m.id for m in models] == ["gemma3-270m"]
    params = dict(model="gemma3-270m", prompt="The capital of France is", max_tokens=16,
                  temperature=0)
    chunks = list(client(gemma).completions.create(
        **params, stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert "France" in text  # a base model continues the sentence: " the capital of ..."
    assert text == client(gemma).completions.create(**params).choices[0].text
    assert chunks[-1].usage.completion_tokens == 16


def test_chat_without_a_template_is_a_clear_400(gemma):
    with pytest.raises(openai.BadRequestError) as error:
        client(gemma).chat.completions.create(model="gemma3-270m", messages=MESSAGES)
    assert error.value.status_code == 400
    assert "--chat-template" in error.value.body["message"]
    # A template in the request itself (vLLM's chat_template field) is enough.
    reply = client(gemma).chat.completions.create(
        model="gemma3-270m", messages=MESSAGES, max_tokens=8,
        extra_body={"chat_template": TEMPLATE},
    )
    assert reply.usage.prompt_tokens > 5 and reply.choices[0].message.content


def test_chat_streams_with_chat_template_flag(gemma_with_template):
    stream = client(gemma_with_template).chat.completions.create(
        model="gemma3-270m", messages=MESSAGES, max_tokens=24, stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finish = [c.choices[0].finish_reason for c in chunks
              if c.choices and c.choices[0].finish_reason]
    assert text and "<end_of_turn>" not in text
    # A turn ends at <end_of_turn> (a stop token), or runs to max_tokens.
    assert finish in (["stop"], ["length"])
    assert chunks[-1].usage.completion_tokens <= 24
