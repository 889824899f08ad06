"""The official openai SDK against `rillm serve`, as an app developer uses it."""

from __future__ import annotations

import asyncio

import pytest
from openai import AsyncOpenAI, OpenAI

# A system prompt under which the tiny default model's greedy answer is "The capital of France
# is Paris." by a clear margin (>= 0.375 nats between its first two candidates at every token
# before "Paris", float32 and bf16 paths alike). Under "You are terse." the exact float32 model
# prefers "The" over "Al" by 0.05 nats, so rounding alone decides between "Paris" and nonsense.
MESSAGES = [{"role": "system", "content": "Answer in one sentence."},
            {"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def client(server):
    return OpenAI(api_key="EMPTY", base_url=server.v1)


def stream_text(client, **kwargs) -> tuple[str, list]:
    chunks = list(client.chat.completions.create(stream=True, **kwargs))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    return text, chunks


def test_models_lists_the_served_model(client):
    models = client.models.list().data
    assert [m.id for m in models] == ["SmolLM2-135M-Instruct"]
    one = client.models.retrieve("SmolLM2-135M-Instruct")
    assert one.id == "SmolLM2-135M-Instruct"
    assert one.max_model_len == models[0].max_model_len > 0


def test_stream_equals_non_stream_for_greedy(client):
    model = client.models.list().data[0].id
    kwargs = dict(model=model, messages=MESSAGES, temperature=0, max_tokens=40)
    text, chunks = stream_text(client, **kwargs, stream_options={"include_usage": True})
    whole = client.chat.completions.create(**kwargs)
    assert text == whole.choices[0].message.content
    assert "Paris" in text
    assert chunks[-2].choices[0].finish_reason == whole.choices[0].finish_reason
    streamed = chunks[-1].usage
    assert (streamed.prompt_tokens, streamed.completion_tokens, streamed.total_tokens) == \
        (whole.usage.prompt_tokens, whole.usage.completion_tokens, whole.usage.total_tokens)
    # The same prompt again: its full blocks come from the prefix cache, and usage says so.
    cached = whole.usage.prompt_tokens_details.cached_tokens
    assert 0 < cached < whole.usage.prompt_tokens and cached % 16 == 0


def test_multi_turn_conversation_renders_every_turn(client, server):
    import httpx

    history = MESSAGES + [{"role": "assistant", "content": "Paris."},
                          {"role": "user", "content": "And of Italy?"}]
    reply = client.chat.completions.create(model="SmolLM2-135M-Instruct", temperature=0,
                                           max_tokens=30, messages=history)
    rendered = httpx.post(f"{server.base_url}/tokenize", json={"messages": history},
                          timeout=10).json()
    shorter = httpx.post(f"{server.base_url}/tokenize", json={"messages": MESSAGES},
                         timeout=10).json()
    assert reply.usage.prompt_tokens == rendered["count"] > shorter["count"] + 8
    assert reply.choices[0].message.content


def test_max_tokens_gives_length_and_usage(client):
    reply = client.chat.completions.create(model="SmolLM2-135M-Instruct", messages=MESSAGES,
                                           max_completion_tokens=3)
    assert reply.choices[0].finish_reason == "length"
    assert reply.usage.completion_tokens == 3
    text, chunks = stream_text(client, model="SmolLM2-135M-Instruct", messages=MESSAGES,
                               max_tokens=3, stream_options={"include_usage": True})
    assert chunks[-1].usage.completion_tokens == 3 and chunks[-1].choices == []


def test_stop_strings_cut_the_text(client):
    full = client.chat.completions.create(model="SmolLM2-135M-Instruct", messages=MESSAGES,
                                          temperature=0, max_tokens=30).choices[0].message.content
    stop = full.split()[-2]
    text, chunks = stream_text(client, model="SmolLM2-135M-Instruct", messages=MESSAGES,
                               temperature=0, max_tokens=30, stop=[stop])
    assert text == full[: full.index(stop)]
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_seed_makes_sampling_repeatable(client):
    kwargs = dict(model="SmolLM2-135M-Instruct", messages=MESSAGES, temperature=1.0,
                  max_tokens=20, seed=42)
    first = stream_text(client, **kwargs)[0]
    second = client.chat.completions.create(**kwargs).choices[0].message.content
    assert first == second
    other = client.chat.completions.create(**{**kwargs, "seed": 43}).choices[0].message.content
    assert other != first


def test_n_choices(client):
    reply = client.chat.completions.create(model="SmolLM2-135M-Instruct", messages=MESSAGES,
                                           n=2, seed=1, max_tokens=12, temperature=1.0)
    assert [c.index for c in reply.choices] == [0, 1]
    assert reply.choices[0].message.content != reply.choices[1].message.content
    # Usage counts the tokens of both choices.
    assert 12 < reply.usage.completion_tokens <= 24


def test_logprobs_chat_and_completions(client):
    reply = client.chat.completions.create(model="SmolLM2-135M-Instruct", messages=MESSAGES,
                                           temperature=0, max_tokens=5, logprobs=True,
                                           top_logprobs=3)
    content = reply.choices[0].logprobs.content
    assert len(content) == 5
    assert "".join(t.token for t in content) == reply.choices[0].message.content
    for entry in content:
        assert len(entry.top_logprobs) == 3
        assert entry.top_logprobs[0].token == entry.token
        assert entry.logprob == pytest.approx(entry.top_logprobs[0].logprob)
    done = client.completions.create(model="SmolLM2-135M-Instruct", prompt="One, two,",
                                     max_tokens=4, temperature=0, logprobs=2)
    lp = done.choices[0].logprobs
    assert len(lp.tokens) == 4 and len(lp.top_logprobs[0]) == 2
    assert "".join(lp.tokens) == done.choices[0].text


def test_logprob_bytes_of_a_character_split_over_tokens_are_its_own(client):
    """An emoji is several byte-level tokens, each decoding alone to U+FFFD: their `bytes`
    are the token's own, so that joined they are the emoji's UTF-8."""
    reply = client.chat.completions.create(
        model="SmolLM2-135M-Instruct", messages=[{"role": "user", "content": "A robot"}],
        max_tokens=10, logprobs=True, top_logprobs=2,
        extra_body={"structured_outputs": {"regex": "🤖 ok"}})
    assert reply.choices[0].message.content == "🤖 ok"
    content = reply.choices[0].logprobs.content
    assert sum("\ufffd" in entry.token for entry in content) >= 2  # split, as claimed
    joined = bytes(b for entry in content for b in entry.bytes)
    assert joined.decode("utf-8").startswith("🤖 ok")
    for entry in content:
        for top in entry.top_logprobs:
            assert top.bytes == list(top.token.encode()) or "\ufffd" in top.token


def test_engine_extras_through_extra_body(client):
    reply = client.chat.completions.create(
        model="SmolLM2-135M-Instruct", messages=MESSAGES, max_tokens=30,
        extra_body={"top_k": 1, "min_tokens": 25, "ignore_eos": True,
                    "repetition_penalty": 1.1, "min_p": 0.05})
    assert reply.usage.completion_tokens == 30


def test_completions_prompt_forms_and_echo(client):
    single = client.completions.create(model="SmolLM2-135M-Instruct",
                                       prompt="The capital of France is", max_tokens=3,
                                       temperature=0, echo=True)
    assert single.choices[0].text.startswith("The capital of France is")
    many = client.completions.create(model="SmolLM2-135M-Instruct",
                                     prompt=["Hello", "Goodbye", "Thanks"], max_tokens=2)
    assert sorted(c.index for c in many.choices) == [0, 1, 2]
    ids = client.completions.create(model="SmolLM2-135M-Instruct", prompt=[504, 3458, 282],
                                    max_tokens=2)
    assert ids.usage.prompt_tokens == 3


def test_sixteen_concurrent_async_streams_complete(server):
    async def one(client: AsyncOpenAI, i: int) -> tuple[str, str | None]:
        stream = await client.chat.completions.create(
            model="SmolLM2-135M-Instruct", stream=True, max_tokens=16 + i, seed=i,
            messages=[{"role": "user", "content": f"Tell me about the number {i}."}])
        text, finish = "", None
        async for chunk in stream:
            if chunk.choices:
                text += chunk.choices[0].delta.content or ""
                finish = chunk.choices[0].finish_reason or finish
        return text, finish

    async def main():
        async with AsyncOpenAI(api_key="EMPTY", base_url=server.v1) as client:
            return await asyncio.gather(*(one(client, i) for i in range(16)))

    results = asyncio.run(main())
    assert all(text and finish in ("stop", "length") for text, finish in results)
