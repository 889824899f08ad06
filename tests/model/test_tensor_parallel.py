"""Tensor parallelism over loopback (gloo, 2 processes) against the same model unsplit: logits
of the paged path within 1e-4 (float32: only the all-reduce's summation order differs) and
the same greedy tokens."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from rillm.config import EngineConfig
from rillm.engine.llm_engine import LLMEngine
from rillm.model.parallel import Shard
from rillm.sampling_params import SamplingParams
from tests.model.test_llama_parity import VOCAB, rillm_logits, save_tiny

CASES = {
    "llama": ("llama", {}),  # 4 query heads over 2 KV heads: one KV head a rank
    "qwen3-one-kv-head": ("qwen3", {"num_key_value_heads": 1}),  # replicated on both ranks
    "qwen2-bias": ("qwen2", {}),  # q/k/v biases split with their rows
    # Uneven: 3 KV groups of 2 query heads over 2 ranks (1 and 2), an odd MLP width (48, 49).
    "llama-uneven": ("llama", {"hidden_size": 96, "num_attention_heads": 6,
                               "num_key_value_heads": 3, "intermediate_size": 97}),
}


def greedy(engine: LLMEngine, prompt: list[int], steps: int) -> list[int]:
    engine.add_request("g", prompt, SamplingParams(temperature=0, max_tokens=steps,
                                                   ignore_eos=True))
    tokens: list[int] = []
    while engine.has_unfinished_requests():
        for out in engine.step():
            tokens += out.outputs[0].token_ids
    return tokens


@pytest.mark.parametrize("case", list(CASES))
def test_two_ranks_give_the_logits_and_tokens_of_one(tmp_path, smollm_tokenizer, case):
    model_type, overrides = CASES[case]
    save_tiny(tmp_path, smollm_tokenizer, model_type, overrides)
    config = EngineConfig(model=str(tmp_path), num_kv_blocks=64, block_size=4,
                          max_model_len=128, num_threads=1)
    tokens = torch.randint(3, VOCAB, (37,), generator=torch.Generator().manual_seed(1)).tolist()
    one = LLMEngine(config)
    expected_logits = rillm_logits(one, tokens, chunk=16)
    expected = greedy(one, tokens[:10], 16)

    two = LLMEngine(replace(config, tensor_parallel_size=2))
    try:
        # Rank 0's cache holds its KV heads only (all of them where there is one to share).
        kv_heads = overrides.get("num_key_value_heads", 2)
        assert two.runner.caches[0].num_kv_heads == max(1, kv_heads // 2)
        with pytest.raises(ValueError, match="one tensor-parallel engine per process"):
            LLMEngine(replace(config, tensor_parallel_size=2))
        torch.testing.assert_close(rillm_logits(two, tokens, chunk=16), expected_logits,
                                   atol=1e-4, rtol=1e-4)
        assert greedy(two, tokens[:10], 16) == expected
    finally:
        two.close()
    assert all(not w.is_alive() for w in two.group.workers)


def test_heads_split_by_kv_groups():
    # SmolLM2-135M: 9 query heads in 3 KV groups, over 2 ranks: 1 group and 2.
    assert [Shard(r, 2).heads(9, 3) for r in range(2)] == [((0, 3), (0, 1)), ((3, 9), (1, 3))]
    # One KV head, 2 ranks: replicated, the query heads halved.
    assert [Shard(r, 2).heads(4, 1) for r in range(2)] == [((0, 2), (0, 1)), ((2, 4), (0, 1))]
    with pytest.raises(ValueError):
        Shard(0, 4).heads(6, 2)  # 2 ranks per KV head, 3 query heads each: no even split


def test_a_failed_start_stops_the_workers(tmp_path, smollm_tokenizer):
    save_tiny(tmp_path, smollm_tokenizer, "llama", {})
    # The cache cannot hold the context asked for: rank 0 fails after the workers started.
    config = EngineConfig(model=str(tmp_path), num_kv_blocks=2, block_size=4, max_model_len=128,
                          num_threads=1, tensor_parallel_size=2)
    with pytest.raises(ValueError):
        LLMEngine(config)
    # The process group is gone with them: another tensor-parallel engine can start.
    engine = LLMEngine(replace(config, num_kv_blocks=64))
    engine.close()
