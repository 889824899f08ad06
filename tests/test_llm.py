"""The offline API as a researcher uses it: from rillm import LLM, SamplingParams."""

from __future__ import annotations

import pytest

from rillm import LLM, SamplingParams


@pytest.fixture(scope="module")
def llm():
    return LLM(max_model_len=2048)


def test_generate_returns_one_result_per_prompt_in_order(llm):
    prompts = ["The capital of France is", "1, 2, 3, 4,", "Once upon a time"]
    outputs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=8))
    assert [o.prompt for o in outputs] == prompts
    for out in outputs:
        choice = out.outputs[0]
        assert out.finished and choice.finish_reason in ("stop", "length")
        assert len(choice.token_ids) <= 8 and choice.text
    assert " Paris" in outputs[0].outputs[0].text
    # The same prompt alone gives the same text: batching does not change greedy output.
    alone = llm.generate("1, 2, 3, 4,", SamplingParams(temperature=0, max_tokens=8))
    assert alone[0].outputs[0].text == outputs[1].outputs[0].text


def test_generate_accepts_token_ids_and_per_prompt_params(llm):
    ids = llm.get_tokenizer().encode("Hello there")
    outputs = llm.generate(
        [{"prompt_token_ids": ids}, "Goodbye"],
        [SamplingParams(max_tokens=3, temperature=0), SamplingParams(max_tokens=5, seed=1)],
    )
    assert outputs[0].prompt_token_ids == tuple(ids)
    assert len(outputs[0].outputs[0].token_ids) <= 3
    assert len(outputs[1].outputs[0].token_ids) <= 5


def test_chat_uses_the_models_template(llm):
    out = llm.chat([{"role": "user", "content": "What is the capital of France?"}],
                   SamplingParams(temperature=0, max_tokens=30))[0]
    assert "Paris" in out.outputs[0].text
    assert out.outputs[0].finish_reason == "stop"
    assert "<|im_start|>" not in out.outputs[0].text
    assert out.prompt.startswith("<|im_start|>system")


def test_n_choices_and_logprobs(llm):
    out = llm.generate("Pick a colour:", SamplingParams(n=3, seed=5, max_tokens=6, logprobs=2))[0]
    assert [c.index for c in out.outputs] == [0, 1, 2]
    for choice in out.outputs:
        assert choice.logprobs is not None and len(choice.logprobs) == len(choice.token_ids)
        assert all(len(lp.top) == 2 for lp in choice.logprobs)


def test_bad_input_raises_value_error_and_leaves_nothing_running(llm):
    with pytest.raises(ValueError, match="max_tokens"):
        llm.generate(["fine", "x" * 10], SamplingParams(max_tokens=100_000))
    assert not llm.engine.has_unfinished_requests()
    with pytest.raises(ValueError, match="prompt"):
        llm.generate([[]])
