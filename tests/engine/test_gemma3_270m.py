"""Gemma 3 270M, the second real model on PyPI (a base model; Q4_K_M mix: Q8_0 embedding,
Q5_0/Q8_0 attention and gate/up, Q4_K/Q6_K down projections). Its exact path equals
transformers reading the same GGUF; its default path keeps every block matrix as the file has
it and stays within 1% of the exact perplexity."""

from __future__ import annotations

import math
import os

import pytest
import torch

from bench.perplexity import DEFAULT_TEXT, logits_of
from rillm.config import EngineConfig
from rillm.engine.llm_engine import LLMEngine
from rillm.kernels import kernel_vectorized
from rillm.loader import load_model
from rillm.loader.default_model import gemma3_270m_path
from rillm.model.embedding import BlockEmbedding
from rillm.model.linear import GGUFBlocksMethod, Linear
from rillm.sampling_params import SamplingParams
from tests.engine.helpers import run

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, in a small village by the sea,",
    "The three primary colours are",
    "Water boils at a temperature of",
]


@pytest.fixture(scope="module")
def loaded():
    return load_model("gemma3-270m")


@pytest.fixture(scope="module")
def exact(loaded):
    return LLMEngine(EngineConfig(quantization="none"), loaded=loaded)


@pytest.fixture(scope="module")
def blocks(loaded):
    return LLMEngine(EngineConfig(), loaded=loaded)


@pytest.fixture(scope="module")
def prompt_ids(loaded):
    return {f"p{i}": loaded.tokenizer(p)["input_ids"] for i, p in enumerate(PROMPTS)}


def test_greedy_tokens_equal_transformers_on_the_same_gguf(exact, prompt_ids):
    from transformers import AutoModelForCausalLM

    path = gemma3_270m_path()
    reference = AutoModelForCausalLM.from_pretrained(
        os.path.dirname(path), gguf_file=os.path.basename(path), dtype=torch.float32
    ).eval()
    ours = run(exact, prompt_ids, SamplingParams(temperature=0, max_tokens=32, ignore_eos=True))
    for request_id, ids in prompt_ids.items():
        assert ids[0] == exact.tokenizer.bos_token_id  # a base model's prompt starts with <bos>
        with torch.no_grad():
            expected = reference.generate(
                torch.tensor([ids]), max_new_tokens=32, min_new_tokens=32, do_sample=False,
            )[0, len(ids):].tolist()
        assert list(ours[request_id].outputs[0].token_ids) == expected, request_id


def test_the_default_keeps_every_block_matrix_as_the_file_has_it(blocks):
    model = blocks.runner.model
    linear = {type(m.method) for m in model.modules() if isinstance(m, Linear)}
    if kernel_vectorized("gguf_linear"):
        assert linear == {GGUFBlocksMethod}
    # The 262k x 640 embedding stays Q8_0 blocks; the tied lm_head reads the same blocks.
    assert any(isinstance(m, BlockEmbedding) for m in model.modules())
    assert blocks.dtype == torch.bfloat16


def test_perplexity_on_the_blocks_within_one_percent_of_the_exact_path(exact, blocks, loaded):
    with open(DEFAULT_TEXT, encoding="utf-8") as f:
        tokens = loaded.tokenizer(f.read())["input_ids"]

    def perplexity(engine, chunk):
        logits = logits_of(engine, tokens, chunk)[:-1].float()
        return math.exp(torch.nn.functional.cross_entropy(logits, torch.tensor(tokens[1:])))

    reference = perplexity(exact, 256)
    # Prefill in chunks of 256 (the window is 512: chunks straddle it), then a token a step.
    for chunk in (256, 1):
        ours = perplexity(blocks, chunk)
        assert abs(ours / reference - 1) < 0.01, (chunk, ours, reference)


def test_an_instruct_turn_ends_at_end_of_turn(loaded):
    end_of_turn = loaded.tokenizer.convert_tokens_to_ids("<end_of_turn>")
    assert end_of_turn in loaded.config.eos_token_ids
    assert loaded.tokenizer.eos_token_id in loaded.config.eos_token_ids
