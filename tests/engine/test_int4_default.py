"""The default on a CPU: the GGUF's own Q4_1/Q8_0 blocks on the int4 kernel. Its quality is
held to the exact float32 path by perplexity on a fixed text, through the engine's own paged
prefill and decode paths."""

from __future__ import annotations

import math
import os

import torch

from bench.perplexity import DEFAULT_TEXT, logits_of
from rillm.model.int4_linear import Int4Linear


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

