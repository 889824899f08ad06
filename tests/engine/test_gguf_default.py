"""The default on a CPU: the GGUF's own Q4_1/Q8_0 blocks, multiplied by gguf_linear with the
activations rounded to int8 per block of 32 (where the CPU has AVX-512 VNNI). Its quality is
held to the exact float32 path by perplexity on a fixed text, through the engine's own paged
prefill and decode paths."""

from __future__ import annotations

import math
import os

import pytest
import torch

from bench.perplexity import DEFAULT_TEXT, logits_of
from rillm.kernels import kernel_vectorized
from rillm.kernels.plan import LinearKernel
from rillm.model.linear import Dense, GGUFBlocksMethod, Linear
from rillm.sampling_params import SamplingParams


def perplexity(engine, tokens: list[int], chunk: int) -> float:
    logits = logits_of(engine, tokens, chunk)[:-1].float()
    nll = torch.nn.functional.cross_entropy(logits, torch.tensor(tokens[1:]))
    return math.exp(nll.item())


def methods(engine) -> set[type]:
    return {type(m.method) for m in engine.runner.model.modules() if isinstance(m, Linear)}


def test_the_default_keeps_the_files_quantized_blocks(default_engine, exact_engine):
    assert Dense not in methods(default_engine)
    assert default_engine.dtype == torch.bfloat16
    assert methods(exact_engine) == {Dense}
    assert exact_engine.kernels.linear is LinearKernel.DENSE


def test_gguf_perplexity_matches_the_dequantized_model(default_engine, exact_engine,
                                                       smollm_tokenizer):
    assert os.path.exists(DEFAULT_TEXT)
    with open(DEFAULT_TEXT, encoding="utf-8") as f:
        tokens = smollm_tokenizer(f.read())["input_ids"]
    exact = perplexity(exact_engine, tokens, 256)
    # Measured (BENCHMARKS.md): -0.1% (chunks of 256), -0.3% (a token a step). The exact path
    # gives the same perplexity in any chunking, so one float32 pass is the reference for both;
    # the whole text a token a step (a 240-token prefix moved by 1.1%: too few tokens).
    prefill = perplexity(default_engine, tokens, 256)
    decode = perplexity(default_engine, tokens, 1)
    assert abs(prefill / exact - 1) < 0.01, (prefill, exact)
    assert abs(decode / exact - 1) < 0.01, (decode, exact)


def test_the_default_keeps_one_copy_of_the_weights(default_engine):
    """gguf_linear serves every number of rows: no bfloat16 copy beside the blocks (without
    AVX-512 VNNI: PyTorch's int4 kernel and a bfloat16 copy for more rows)."""
    gguf = kernel_vectorized("gguf_linear")
    assert (methods(default_engine) == {GGUFBlocksMethod}) == gguf
    assert (default_engine.kernels.linear is LinearKernel.GGUF_VNNI) == gguf


def test_fused_decode_layers_give_the_layer_by_layer_logits_bit_for_bit(default_engine):
    """Decode steps run each layer as one C++ op (gguf_linear for every batch); every step's
    logits must equal those of the same step through the Python layers."""
    assert {1, 2, 3, 4, 5, 6} <= _compare_fused_decode(default_engine, requests=6)


def _compare_fused_decode(engine, requests: int) -> set[int]:
    """Run `requests` greedy requests of different lengths, computing every decode step both
    through the fused layers and through the Python layers; -> the batch sizes compared."""
    model = engine.runner.model.model
    fused = model.fused_decode
    if not kernel_vectorized("gguf_linear"):  # PyTorch's int4 kernel, layer by layer
        assert fused is None and not engine.kernels.fused_decode
        return set(range(1, requests + 1))
    assert fused is not None and engine.kernels.fused_decode
    runner_forward = engine.runner.forward
    compared = []

    def both_ways(scheduled, all_tokens=False):
        model.fused_decode = None  # the test's switch: production code never sets it
        layered = runner_forward(scheduled, all_tokens)  # rewrites the same K/V: idempotent
        model.fused_decode = fused
        logits = runner_forward(scheduled, all_tokens)
        if all(s.num_new_tokens == 1 for s in scheduled):
            compared.append(len(scheduled))
            assert torch.equal(logits, layered)
        return logits

    engine.runner.forward = both_ways
    ids = [f"fused-{i}" for i in range(requests)]
    try:
        generator = torch.Generator().manual_seed(5)
        for i, request_id in enumerate(ids):  # decode batches of all, then one fewer, ...
            prompt = torch.randint(100, 40000, (17 + 5 * i,), generator=generator).tolist()
            params = SamplingParams(temperature=0, max_tokens=12 + 3 * i, ignore_eos=True)
            engine.add_request(request_id, prompt, params)
        while engine.has_unfinished_requests():
            engine.step()
    finally:
        engine.abort_request(ids)  # on failure: leave the shared engine empty
        engine.runner.forward = runner_forward
        model.fused_decode = fused
    return set(compared)


def test_gguf_is_refused_where_it_cannot_run(tmp_path, smollm_tokenizer):
    from rillm.config import EngineConfig
    from rillm.engine.llm_engine import LLMEngine
    from tests.loader.tiny_models import tiny_config, tiny_model

    with pytest.raises(ValueError, match="CPU only"):
        EngineConfig(quantization="gguf", device="cuda")
    with pytest.raises(ValueError, match="gguf"):
        EngineConfig(quantization="int9")
    with pytest.raises(ValueError, match="called gguf now"):
        EngineConfig(quantization="int4")
    with pytest.raises(ValueError, match="removed"):
        EngineConfig(quantization="int8")
    # A Hugging Face directory has no GGUF blocks to start from: a clear error, not a silent
    # float32 model.
    tiny_model(tiny_config("llama", len(smollm_tokenizer))).save_pretrained(tmp_path)
    smollm_tokenizer.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="GGUF"):
        LLMEngine(EngineConfig(model=str(tmp_path), quantization="gguf"))
