"""The default model's greedy output against transformers, and batch invariance.

Both are properties of the exact path (`quantization="none"`: the GGUF dequantized to float32).
The default on a CPU runs the file's blocks instead; its quality is measured by
perplexity against the exact path (tests/engine/test_gguf_default.py, BENCHMARKS.md)."""

from __future__ import annotations

import pytest
import torch

from rillm.sampling_params import SamplingParams
from tests.engine.helpers import chat_ids, run

QUESTIONS = [
    "What is the capital of France?",
    "Write a short poem about the sea.",
    "Explain what a neural network is in two sentences.",
    "List three fruits that are red.",
    "How do I reverse a list in Python?",
]


@pytest.fixture(scope="module")
def reference(default_reference):
    return default_reference


@pytest.fixture(scope="module")
def reference_tokens(reference, smollm_tokenizer):
    """transformers' 64 greedy tokens for each question."""
    tokens = {}
    for i, question in enumerate(QUESTIONS):
        ids = chat_ids(smollm_tokenizer, question)
        with torch.no_grad():
            tokens[f"q{i}"] = reference.generate(
                torch.tensor([ids]), max_new_tokens=64, min_new_tokens=64, do_sample=False,
                pad_token_id=smollm_tokenizer.eos_token_id,
            )[0, len(ids):].tolist()
    return tokens


def test_greedy_tokens_equal_transformers(exact_engine, smollm_tokenizer, reference_tokens):
    assert exact_engine.kernels.rotary_cache_write  # the C++ kernels, built on this machine
    prompts = {f"q{i}": chat_ids(smollm_tokenizer, q) for i, q in enumerate(QUESTIONS)}
    ours = run(exact_engine, prompts, SamplingParams(temperature=0, max_tokens=64,
                                                       ignore_eos=True))
    for request_id, expected in reference_tokens.items():
        assert list(ours[request_id].outputs[0].token_ids) == expected, request_id


def test_the_pytorch_attention_path_also_equals_transformers(make_engine, smollm_tokenizer,
                                                            reference_tokens):
    """Without the C++ kernels (no compiler, a GPU, --no-cpu-kernels) the rotary embedding,
    cache write and decode attention run in PyTorch: the same greedy tokens."""
    engine = make_engine(quantization="none", cpu_kernels=False)
    assert not engine.kernels.rotary_cache_write
    prompts = {f"q{i}": chat_ids(smollm_tokenizer, q) for i, q in enumerate(QUESTIONS)}
    ours = run(engine, prompts, SamplingParams(temperature=0, max_tokens=64, ignore_eos=True))
    for request_id, expected in reference_tokens.items():
        assert list(ours[request_id].outputs[0].token_ids) == expected, request_id


def mixed_prompts(tokenizer, count: int) -> dict[str, list[int]]:
    topics = ["rivers", "the moon", "bread", "chess", "volcanoes", "music", "glass", "bees"]
    prompts = {}
    for i in range(count):
        words = " ".join(topics[(i + j) % len(topics)] for j in range(1 + 7 * (i % 5)))
        prompts[f"p{i}"] = chat_ids(tokenizer, f"Tell me about {words}.")
    return prompts


def test_greedy_request_same_alone_and_in_a_batch_of_16(make_engine, smollm_tokenizer):
    # A small token budget also makes the long prompts prefill in chunks beside decodes.
    engine = make_engine(max_num_batched_tokens=64, quantization="none")
    prompts = mixed_prompts(smollm_tokenizer, 16)
    params = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True)
    batch = run(engine, prompts, params)
    for target in ("p0", "p4", "p9"):
        alone = run(engine, {"alone": prompts[target]}, params)["alone"]
        assert alone.outputs[0].token_ids == batch[target].outputs[0].token_ids, target
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


def test_seeded_sample_same_alone_and_in_a_batch(make_engine, smollm_tokenizer):
    engine = make_engine(quantization="none")
    prompts = mixed_prompts(smollm_tokenizer, 8)
    seeded = SamplingParams(temperature=1.0, top_p=0.95, seed=1234, max_tokens=24)
    params = {rid: SamplingParams(temperature=0.8, max_tokens=16 + i) for i, rid in
              enumerate(prompts)}
    params["p3"] = seeded
    batch = run(engine, prompts, params)
    alone = run(engine, {"x": prompts["p3"]}, seeded)["x"]
    assert alone.outputs[0].token_ids == batch["p3"].outputs[0].token_ids
    other_seed = run(engine, {"y": prompts["p3"]},
                     SamplingParams(temperature=1.0, top_p=0.95, seed=99, max_tokens=24))["y"]
    assert other_seed.outputs[0].token_ids != alone.outputs[0].token_ids
