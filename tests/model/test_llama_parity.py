"""The Llama-family model against transformers on the same random weights.

Logits are compared through the real paged path: the prompt is prefilled in two chunks into
KV-cache blocks, so chunking, block tables and the cache write/read all take part.
"""

from __future__ import annotations

import pytest
import torch

from rillm.config import EngineConfig
from rillm.core.request import Request
from rillm.core.scheduler import ScheduledRequest
from rillm.engine.llm_engine import LLMEngine
from rillm.sampling_params import SamplingParams
from tests.loader.tiny_models import tiny_config

VOCAB = 512

CASES = {
    "llama": ("llama", {}),
    "llama3-rope": (
        "llama",
        {
            "rope_scaling": {
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 32,
            },
            "rope_theta": 500000.0,
        },
    ),
    "llama-linear-rope": ("llama", {"rope_scaling": {"rope_type": "linear", "factor": 2.0}}),
    "mistral": ("mistral", {"sliding_window": None}),
    # Every layer windowed: the prompt (37) and the generation run far past the 8-key window.
    "mistral-window": ("mistral", {"sliding_window": 8}),
    # Local layers (window 8) around a global one (layer 5), each with its RoPE base, the
    # global one linearly scaled; scores scaled by query_pre_attn_scalar, not head_dim.
    "gemma3": ("gemma3_text", {
        "num_hidden_layers": 7, "sliding_window": 8, "query_pre_attn_scalar": 24,
        "tie_word_embeddings": True,
        "rope_parameters": {
            "full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e6},
            "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}}),
    "qwen2": ("qwen2", {}),
    "qwen3": ("qwen3", {}),
    "tied": ("llama", {"tie_word_embeddings": True}),
}


def save_tiny(tmp_path, smollm_tokenizer, model_type, overrides):
    from transformers import AutoModelForCausalLM

    config = tiny_config(model_type, VOCAB, **overrides)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    with torch.no_grad():  # norms start at one; make them matter
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    model.save_pretrained(tmp_path)
    smollm_tokenizer.save_pretrained(tmp_path)
    return model


def rillm_logits(engine: LLMEngine, tokens: list[int], chunk: int) -> torch.Tensor:
    request = Request("r", tokens, SamplingParams(), max_tokens=1, seed=0)
    pieces = []
    while request.num_computed_tokens < len(tokens):
        n = min(chunk, len(tokens) - request.num_computed_tokens)
        assert engine.block_manager.allocate(request, n)
        pieces.append(engine.runner.forward([ScheduledRequest.of(request, n)], all_tokens=True))
        request.num_computed_tokens += n
    return torch.cat(pieces)


@pytest.mark.parametrize("case", list(CASES))
def test_logits_and_greedy_tokens_match_transformers(tmp_path, smollm_tokenizer, case):
    model_type, overrides = CASES[case]
    reference = save_tiny(tmp_path, smollm_tokenizer, model_type, overrides)
    engine = LLMEngine(
        EngineConfig(model=str(tmp_path), num_kv_blocks=64, block_size=4, max_model_len=128)
    )
    tokens = torch.randint(3, VOCAB, (37,), generator=torch.Generator().manual_seed(1)).tolist()

    ours = rillm_logits(engine, tokens, chunk=16)
    with torch.no_grad():
        theirs = reference(torch.tensor([tokens])).logits[0]
    assert ours.shape == theirs.shape
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)

    with torch.no_grad():
        expected = reference.generate(
            torch.tensor([tokens[:10]]), max_new_tokens=24, do_sample=False,
            min_new_tokens=24, pad_token_id=0,
        )[0, 10:].tolist()
    engine.add_request("g", tokens[:10], SamplingParams(temperature=0, max_tokens=24,
                                                        ignore_eos=True))
    got: list[int] = []
    while engine.has_unfinished_requests():
        for out in engine.step():
            got += out.outputs[0].token_ids
    assert got == expected


def test_bfloat16_stays_close_to_float32(tmp_path, smollm_tokenizer):
    save_tiny(tmp_path, smollm_tokenizer, "llama", {})
    tokens = list(range(5, 30))
    logits = {}
    for dtype in ("float32", "bfloat16"):
        engine = LLMEngine(EngineConfig(model=str(tmp_path), dtype=dtype, num_kv_blocks=32,
                                        block_size=4, max_model_len=64))
        logits[dtype] = rillm_logits(engine, tokens, chunk=8)
    assert logits["bfloat16"].dtype == torch.float32
    # bf16 keeps 8 bits of mantissa: close, not equal, and the same top token nearly always.
    agree = (logits["bfloat16"].argmax(-1) == logits["float32"].argmax(-1)).float().mean()
    assert agree >= 0.9
    torch.testing.assert_close(logits["bfloat16"], logits["float32"], atol=0.15, rtol=0.05)
