"""The GPU's engine path, run on this CPU: Triton paged attention (in Triton's interpreter) and
decode steps made static for CUDA graphs (padded batches, a scratch block, device-side block
tables), against transformers on the same random weights. On CUDA (bench/cuda_check.sh,
RILLM_TEST_DEVICE=cuda) the same tests capture and replay real graphs."""

from __future__ import annotations

import os
from dataclasses import replace

import pytest
import torch

from rillm.attention import PagedAttention
from rillm.config import EngineConfig
from rillm.engine.llm_engine import LLMEngine
from rillm.kernels.plan import KernelPlan, cuda_plan
from rillm.loader import load_model
from rillm.model.builder import build_model
from rillm.sampling_params import SamplingParams
from rillm.worker.decode_graphs import StaticDecode, batch_sizes
from rillm.worker.model_runner import ModelRunner
from tests.model.test_llama_parity import CASES as PARITY_CASES
from tests.model.test_llama_parity import VOCAB, rillm_logits, save_tiny

DEVICE = torch.device(os.environ.get("RILLM_TEST_DEVICE", "cpu"))  # cpu: Triton's interpreter

CASES = {
    "llama": ("llama", {}),
    # Every layer windowed (8 keys) while prompts and outputs run far past it.
    "mistral-window": ("mistral", {"sliding_window": 8}),
    # Local (windowed) layers around a global one, each with its own RoPE.
    # Gemma 3 in three layers: local (windowed, its RoPE base) around a global one.
    "gemma3": ("gemma3_text", {
        **PARITY_CASES["gemma3"][1], "num_hidden_layers": 3,
        "layer_types": ["sliding_attention", "full_attention", "sliding_attention"]}),
}


def gpu_path_engine(path: str, max_batch: int = 4, dtype: torch.dtype = torch.float32,
                    plan: KernelPlan | None = None) -> LLMEngine:
    """An engine whose runner is the one a GPU gets: the CUDA plan (Triton attention and fused
    ops) and static decode steps (CUDA graphs on a GPU; the padded step run eagerly here)."""
    config = EngineConfig(model=path, device=str(DEVICE), dtype=str(dtype).split(".")[1],
                          num_kv_blocks=48, block_size=4, max_model_len=96,
                          max_num_seqs=max_batch, enforce_eager=True)
    engine = LLMEngine(config)
    loaded = load_model(path)
    arch = loaded.config
    plan = plan or cuda_plan(dtype)
    attention = PagedAttention.for_plan(plan, 4, dtype, DEVICE, arch.sliding_window)
    model = build_model(arch, loaded.weights, dtype, DEVICE, plan, attention)
    static = StaticDecode(max_batch=max_batch, max_blocks=96 // 4,
                          capture=DEVICE.type == "cuda")
    engine.runner = ModelRunner(model, attention, arch, 48, 4, dtype, DEVICE,
                                static_decode=static)
    if engine.runner.graphs is not None:
        engine.runner.graphs.capture()
    return engine


def generate(engine: LLMEngine, prompts: list[list[int]], steps: int) -> list[list[int]]:
    for i, prompt in enumerate(prompts):
        engine.add_request(str(i), prompt, SamplingParams(temperature=0, max_tokens=steps,
                                                          ignore_eos=True))
    tokens: dict[str, list[int]] = {str(i): [] for i in range(len(prompts))}
    while engine.has_unfinished_requests():
        for out in engine.step():
            tokens[out.request_id] += out.outputs[0].token_ids
    return [tokens[str(i)] for i in range(len(prompts))]


SLOW_ON_CPU = pytest.mark.slow if DEVICE.type == "cpu" else ()
"""Gemma's cases take 8-10 s each in Triton's interpreter: `make test-all` runs them here (the
fused Gemma ops are checked one by one in tests/kernels/test_triton_ops.py); a GPU runs them
always."""


@pytest.mark.parametrize("case", [pytest.param(c, marks=SLOW_ON_CPU) if c == "gemma3" else c
                                  for c in CASES])
def test_the_gpu_path_gives_transformers_logits_and_greedy_tokens(tmp_path, smollm_tokenizer,
                                                                  case):
    model_type, overrides = CASES[case]
    reference = save_tiny(tmp_path, smollm_tokenizer, model_type, overrides)
    engine = gpu_path_engine(str(tmp_path))
    generator = torch.Generator().manual_seed(1)
    tokens = torch.randint(3, VOCAB, (37,), generator=generator).tolist()

    # Prefill chunks through the Triton prefill kernel (16 queries, keys cached before them).
    ours = rillm_logits(engine, tokens, chunk=16).cpu()
    with torch.no_grad():
        theirs = reference(torch.tensor([tokens])).logits[0]
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)

    # Three prompts decoded together: batches of 3 padded to 4, lengths crossing blocks and
    # the window; each must get the tokens transformers gives it alone.
    prompts = [tokens[:10], tokens[5:8], tokens[:21]]
    expected = []
    for prompt in prompts:
        with torch.no_grad():
            out = reference.generate(torch.tensor([prompt]), max_new_tokens=20,
                                     do_sample=False, min_new_tokens=20, pad_token_id=0)
        expected.append(out[0, len(prompt):].tolist())
    assert generate(engine, prompts, 20) == expected


@pytest.mark.parametrize("case", ["llama", pytest.param("gemma3", marks=SLOW_ON_CPU)])
def test_bfloat16_with_fused_ops_stays_with_pytorchs_ops(tmp_path, smollm_tokenizer, case):
    """bfloat16, the GPU's default: the Triton norms, activations and rotation against the same
    step on PyTorch's ops (each a rounding or a summation order apart)."""
    model_type, overrides = CASES[case]
    save_tiny(tmp_path, smollm_tokenizer, model_type, overrides)
    tokens = torch.randint(3, VOCAB, (37,), generator=torch.Generator().manual_seed(2)).tolist()
    fused = gpu_path_engine(str(tmp_path), dtype=torch.bfloat16)
    assert fused.runner.model.model.layers[0].mlp.ops is not None
    plain = gpu_path_engine(str(tmp_path), dtype=torch.bfloat16,
                            plan=replace(cuda_plan(torch.bfloat16), fused_norm=False,
                                         rotary_cache_write=False))
    ours, theirs = (rillm_logits(e, tokens, chunk=16).cpu() for e in (fused, plain))
    # A random tiny model's logits are nearly flat, so a rounding flips some argmaxes (and
    # the interpreter rounds bfloat16 toward zero, a GPU to nearest).
    agree = (ours.argmax(-1) == theirs.argmax(-1)).float().mean()
    assert agree >= 0.8
    torch.testing.assert_close(ours, theirs, atol=0.15, rtol=0.05)
    assert generate(fused, [tokens[:12]], 12)[0][:4] == generate(plain, [tokens[:12]], 12)[0][:4]


def test_padding_rows_touch_only_the_scratch_block(tmp_path, smollm_tokenizer):
    """A decode step of 3 padded to 4 writes the real rows' slots and the scratch block's
    first slot, nothing else in the cache."""
    save_tiny(tmp_path, smollm_tokenizer, "llama", {})
    engine = gpu_path_engine(str(tmp_path))
    runner = engine.runner
    graphs = runner.graphs
    assert graphs is not None and graphs.scratch_block == 48
    assert runner.caches[0].key.shape[1] == 49 * 4  # one block more than the manager's
    for cache in runner.caches:
        cache.key.zero_()
        cache.value.zero_()
    tables = [[3], [7, 9], [11]]
    starts = [2, 5, 0]
    runner.graphs.run([5, 6, 7], starts, tables)
    written = (runner.caches[0].key[0].abs().sum(-1) != 0).nonzero().flatten().tolist()
    assert written == sorted([3 * 4 + 2, 9 * 4 + 1, 11 * 4 + 0, 48 * 4])


def test_batch_sizes_cover_every_batch():
    for most in (1, 3, 8, 17, 64, 100):
        sizes = batch_sizes(most)
        assert sizes == sorted(set(sizes)) and sizes[-1] == most
        for batch in range(1, most + 1):
            size = next(s for s in sizes if s >= batch)
            assert size - batch < max(16, batch)  # at most 15 padding rows, or doubled
