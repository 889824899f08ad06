"""The default on a CPU: the GGUF's own Q4_1/Q8_0 blocks on the int4 kernel. Its quality is
held to the exact float32 path by perplexity on a fixed text, through the engine's own paged
prefill and decode paths."""

from __future__ import annotations

import math
import os

import torch

from bench.perplexity import DEFAULT_TEXT, logits_of
from rillm.model.int4_linear import Int4Linear, rillm_q4_available
from rillm.sampling_params import SamplingParams


def perplexity(engine, tokens: list[int], chunk: int) -> float:
    logits = logits_of(engine, tokens, chunk)[:-1].float()
    nll = torch.nn.functional.cross_entropy(logits, torch.tensor(tokens[1:]))
    return math.exp(nll.item())


def test_the_default_keeps_the_files_quantized_blocks(default_engine, exact_engine):
    assert any(isinstance(m, Int4Linear) for m in default_engine.runner.model.modules())
    assert default_engine.dtype == torch.bfloat16
    assert not any(isinstance(m, Int4Linear) for m in exact_engine.runner.model.modules())


def test_int4_perplexity_matches_the_dequantized_model(default_engine, exact_engine,
                                                       smollm_tokenizer):
    assert os.path.exists(DEFAULT_TEXT)
    with open(DEFAULT_TEXT, encoding="utf-8") as f:
        tokens = smollm_tokenizer(f.read())["input_ids"]
    exact = perplexity(exact_engine, tokens, 256)
    prefill = perplexity(default_engine, tokens, 256)  # the packed bf16 copy (>4 rows)
    decode = perplexity(default_engine, tokens[:240], 1)  # the int4 kernel, a token a step
    exact_decode = perplexity(exact_engine, tokens[:240], 1)
    assert abs(prefill / exact - 1) < 0.01, (prefill, exact)
    assert abs(decode / exact_decode - 1) < 0.01, (decode, exact_decode)



def test_fused_decode_layers_give_the_layer_by_layer_logits_bit_for_bit(default_engine):
    """Decode steps run each layer as one C++ op (int4 matmuls up to 4 sequences, packed
    bfloat16 above); every step's logits must equal those of the same step through the Python
    layers."""
    model = default_engine.runner.model.model
    fused_rows = model.fused_decode_rows
    if not rillm_q4_available():  # no AVX-512 BF16: PyTorch's int4 kernel, layer by layer
        assert fused_rows == 0
        return
    assert fused_rows >= 64 and model.fused_decode_int4_rows == 4
    runner_forward = default_engine.runner.forward
    compared = []

    def both_ways(scheduled, all_tokens=False):
        model.fused_decode_rows = 0
        layered = runner_forward(scheduled, all_tokens)  # rewrites the same K/V: idempotent
        model.fused_decode_rows = fused_rows
        fused = runner_forward(scheduled, all_tokens)
        if all(s.num_new_tokens == 1 for s in scheduled):
            compared.append(len(scheduled))
            assert torch.equal(fused, layered)
        return fused

    default_engine.runner.forward = both_ways
    ids = [f"fused-{i}" for i in range(6)]
    try:
        generator = torch.Generator().manual_seed(5)
        for i, request_id in enumerate(ids):  # decode batches of 6, then 5, ... then 1
            prompt = torch.randint(100, 40000, (17 + 11 * i,), generator=generator).tolist()
            params = SamplingParams(temperature=0, max_tokens=12 + 4 * i, ignore_eos=True)
            default_engine.add_request(request_id, prompt, params)
        while default_engine.has_unfinished_requests():
            default_engine.step()
    finally:
        default_engine.abort_request(ids)  # on failure: leave the shared engine empty
        default_engine.runner.forward = runner_forward
        model.fused_decode_rows = fused_rows
    assert {1, 2, 3, 4, 5, 6} <= set(compared)
