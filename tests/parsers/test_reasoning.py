"""Reasoning parsers on the default model's real token streams: the split does not depend on
how the text was cut into tokens or events, and tags never leak."""

from __future__ import annotations

import pytest

from rillm.parsers.message import count_reasoning_tokens
from rillm.parsers.reasoning import make_reasoning_parser
from tests.parsers.helpers import chunkings, feed_all


def split(parser, chunks: list[str]) -> tuple[str, str]:
    deltas = feed_all(parser.feed, parser.flush, chunks)
    return "".join(d.reasoning for d in deltas), "".join(d.content for d in deltas)


def qwen3(prompt: str = "", **kwargs):
    return make_reasoning_parser("qwen3", prompt, kwargs)


def test_the_tags_really_are_split_across_tokens(smollm_tokenizer):
    assert len(smollm_tokenizer.encode("<think>", add_special_tokens=False)) > 1
    assert len(smollm_tokenizer.encode("</think>", add_special_tokens=False)) > 1


@pytest.mark.parametrize(("text", "reasoning", "content"), [
    ("<think>\nLet me add 2 and 2.\n</think>\n\nThe answer is 4.",
     "\nLet me add 2 and 2.\n", "The answer is 4."),
    ("<think>a </thinking> is not the end</think>Done", "a </thinking> is not the end", "Done"),
    ("<think>never finished", "never finished", ""),
    ("No thinking here, <think> later is content.", "", "No thinking here, <think> later is "
     "content."),
    ("<thin", "", "<thin"),
    ("<think></think>only an answer", "", "only an answer"),
])
def test_qwen3_splits_alike_however_the_text_arrives(smollm_tokenizer, text, reasoning,
                                                     content):
    for how, chunks in chunkings(smollm_tokenizer, text):
        assert split(qwen3(), chunks) == (reasoning, content), how


def test_a_prompt_that_opened_the_block_starts_in_reasoning(smollm_tokenizer):
    text = "Thinking hard.</think>Answer."
    for how, chunks in chunkings(smollm_tokenizer, text):
        assert split(qwen3("<|im_start|>assistant\n<think>\n"), chunks) == (
            "Thinking hard.", "Answer."), how
    assert make_reasoning_parser("qwen3", "", {"enable_thinking": False}) is None


@pytest.mark.parametrize(("text", "reasoning", "content"), [
    ("Step one, step two.</think>\nFinal.", "Step one, step two.", "Final."),
    ("<think>Opened anyway.</think>Final.", "Opened anyway.", "Final."),
    ("All of it is thought", "All of it is thought", ""),
])
def test_deepseek_r1_thinks_from_the_first_token(smollm_tokenizer, text, reasoning, content):
    for how, chunks in chunkings(smollm_tokenizer, text):
        assert split(make_reasoning_parser("deepseek_r1", "", {}), chunks) == (
            reasoning, content), how


def test_reasoning_tokens_count_up_to_the_closing_tag(smollm_tokenizer):
    tok = smollm_tokenizer
    thought = tok.encode("<think>Two plus two is four.</think>", add_special_tokens=False)
    answer = tok.encode("It is 4.", add_special_tokens=False)

    def decode(ids):
        return tok.decode(list(ids))

    assert count_reasoning_tokens(thought + answer, decode, qwen3) == len(thought)
    assert count_reasoning_tokens(answer, decode, qwen3) == 0
    assert count_reasoning_tokens(thought[:-2], decode, qwen3) == len(thought) - 2
    r1 = lambda: make_reasoning_parser("deepseek_r1", "", {})  # noqa: E731
    assert count_reasoning_tokens(answer, decode, r1) == len(answer)
