"""The linear methods against the dequantized float32 weights, on the default model's real
blocks: gguf_linear (the default: int8 activations per block), PyTorch's int4 kernel (CPUs
without AVX-512 VNNI), and how the builder picks one per matrix."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from rillm.kernels import kernel_vectorized, load_cpu_kernels
from rillm.kernels.plan import LinearKernel, resolve_kernels
from rillm.model.builder import build_model
from rillm.model.embedding import BlockEmbedding
from rillm.model.linear import (
    MAX_INT4_ROWS,
    BFloat16Weight,
    Dense,
    GGUFBlocksMethod,
    Int4Method,
    Linear,
    make_linear,
)

NAMES = [
    "model.layers.0.self_attn.q_proj.weight",  # Q4_1, rows un-permuted by the loader
    "model.layers.7.mlp.down_proj.weight",  # Q4_1, K = 1536
    "model.embed_tokens.weight",  # Q8_0 (the tied lm_head)
]
CPU = torch.device("cpu")


@pytest.fixture(scope="module", autouse=True)
def kernels():
    assert load_cpu_kernels(), "this machine has a C++ compiler: the kernels must build"


def method_of(kind: LinearKernel, blocks, dense) -> Linear:
    return make_linear(kind, lambda: dense, None, blocks, torch.bfloat16, CPU)


KINDS = [pytest.param(LinearKernel.GGUF_VNNI, id="gguf"),
         pytest.param(LinearKernel.INT4_TORCH, id="int4-torch")]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("name", NAMES)
# The int4 kernel up to MAX_INT4_ROWS rows, the packed bf16 copy above; gguf_linear for all.
@pytest.mark.parametrize("rows", [1, 3, MAX_INT4_ROWS, MAX_INT4_ROWS + 1, 40])
def test_quantized_methods_equal_the_dequantized_matmul(default_loaded, name, rows, kind):
    if kind is LinearKernel.GGUF_VNNI and not kernel_vectorized("gguf_linear"):
        pytest.skip("this CPU has no AVX-512 VNNI: gguf_linear is never chosen here")
    blocks = default_loaded.quantized[name]
    dense = default_loaded.weights[name]
    linear = method_of(kind, [blocks], dense)
    expected_type = GGUFBlocksMethod if kind is LinearKernel.GGUF_VNNI else Int4Method
    assert type(linear.method) is expected_type
    x = torch.randn(rows, dense.shape[1], generator=torch.Generator().manual_seed(0))
    expected = x @ dense.T
    got = linear(x)
    assert got.dtype == torch.float32 and got.shape == expected.shape
    # bfloat16 activations, scales and output: ~0.4% of the output's scale; int8 activations
    # per block of 32 (gaussian inputs): ~0.8%.
    rel = (got - expected).norm() / expected.norm()
    assert rel < (1.2e-2 if kind is LinearKernel.GGUF_VNNI else 6e-3), rel


@pytest.mark.parametrize("rows", [1, 7, 64])
def test_packed_bfloat16_weight_equals_a_plain_bfloat16_matmul(default_loaded, rows):
    """oneDNN's packed layout changes how the weights are read, not what is computed."""
    dense = default_loaded.weights["model.layers.5.mlp.gate_proj.weight"].bfloat16()
    x = torch.randn(rows, dense.shape[1], generator=torch.Generator().manual_seed(2)).bfloat16()
    got = BFloat16Weight(dense)(x)
    expected = torch.nn.functional.linear(x, dense)
    assert got.dtype == torch.bfloat16 and got.shape == expected.shape
    torch.testing.assert_close(got, expected, rtol=1.6e-2, atol=1e-2)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("name", ["model.layers.3.self_attn.k_proj.weight",
                                  "model.embed_tokens.weight"])
def test_the_blocks_are_reproduced_exactly(default_loaded, name, kind):
    """Through an identity input a method returns W itself: equal to the dequantized weights
    up to the rounding of the output to bfloat16 (and, in PyTorch's kernel, of the block
    scales). Fewer than MAX_INT4_ROWS rows at a time, so the int4 kernel itself answers."""
    if kind is LinearKernel.GGUF_VNNI and not kernel_vectorized("gguf_linear"):
        pytest.skip("this CPU has no AVX-512 VNNI: gguf_linear is never chosen here")
    blocks, dense = default_loaded.quantized[name], default_loaded.weights[name]
    if dense.shape[0] > 4096:
        dense = dense[:4096]
        blocks = type(blocks)(blocks.type_name, blocks.data[:4096], (4096, dense.shape[1]))
    linear = method_of(kind, [blocks], dense)
    eye = torch.eye(dense.shape[1])
    recovered = torch.cat([linear(rows) for rows in eye.split(MAX_INT4_ROWS)]).T
    err = (recovered - dense).abs() / dense.abs().amax(dim=1, keepdim=True)
    # One bfloat16 rounding of the output (2^-9 relative; a one-hot row is exact in int8);
    # PyTorch's bfloat16 scales add more.
    assert err.max() < (2**-8 if kind is LinearKernel.GGUF_VNNI else 1e-2)


@pytest.mark.parametrize("kind", KINDS)
def test_a_fused_projection_equals_its_parts(default_loaded, kind):
    if kind is LinearKernel.GGUF_VNNI and not kernel_vectorized("gguf_linear"):
        pytest.skip("this CPU has no AVX-512 VNNI: gguf_linear is never chosen here")
    parts = [f"model.layers.2.self_attn.{p}_proj.weight" for p in "qkv"]
    blocks = [default_loaded.quantized[n] for n in parts]
    dense = [default_loaded.weights[n] for n in parts]
    x = torch.randn(3, 576, generator=torch.Generator().manual_seed(1))
    fused = make_linear(kind, lambda: torch.cat(dense), None, blocks, torch.bfloat16, CPU)(x)
    separate = torch.cat([method_of(kind, [b], d)(x) for b, d in zip(blocks, dense, strict=True)],
                         -1)
    assert torch.equal(fused, separate)


def test_blocks_no_kernel_takes_run_dense_and_say_so(default_loaded, caplog):
    """Parts of different types (a K-quant mix's fused QKV) are one gguf_linear matrix; on
    PyTorch's int4 kernel (Q4_1 / Q8_0 only) they fall back to one dense copy, logged."""
    q = default_loaded.quantized["model.layers.0.self_attn.q_proj.weight"]  # Q4_1
    embed = default_loaded.quantized["model.embed_tokens.weight"]  # Q8_0
    assert GGUFBlocksMethod.takes([q, embed])
    odd = type(q)(q.type_name, q.data[:8], (8, q.shape[1]))
    assert not GGUFBlocksMethod.takes([odd])  # outputs not a multiple of 16
    k6 = type(q)("Q6_K", np.zeros((16, 210 * 3), np.uint8), (16, 768))
    with caplog.at_level("WARNING", logger="rillm.model.linear"):
        linear = make_linear(LinearKernel.INT4_TORCH, lambda: torch.zeros(16, 768), None, [k6],
                             torch.bfloat16, CPU)
    assert isinstance(linear.method, Dense)
    assert "Q6_K blocks" in caplog.text and "dense copy" in caplog.text


@pytest.mark.parametrize("cpu_kernels", [False, True])
def test_a_quantized_model_keeps_every_matrix_as_blocks(default_loaded, cpu_kernels):
    config = default_loaded.config
    plan = resolve_kernels(CPU, torch.bfloat16, config.head_dim, True, cpu_kernels, True)
    model = build_model(config, default_loaded.weights, torch.bfloat16, CPU, plan,
                        quantized=default_loaded.quantized)
    linears = {n: m for n, m in model.named_modules() if isinstance(m, Linear)}
    assert len(linears) == 4 * config.num_hidden_layers + 1 and "lm_head" in linears
    # The default keeps one copy of each matrix: the file's blocks, packed for gguf_linear.
    expected = (GGUFBlocksMethod if cpu_kernels and kernel_vectorized("gguf_linear")
                else Int4Method)
    assert {type(m.method) for m in linears.values()} == {expected}
    assert (model.model.fused_decode is not None) == (expected is GGUFBlocksMethod)
    # The embedding is the file's blocks too, its rows the dense table's bit for bit.
    embed = model.model.embed_tokens
    assert isinstance(embed, BlockEmbedding)
    if expected is GGUFBlocksMethod:  # tied: one packed copy for the lookup and the lm_head
        assert embed.packed is model.lm_head.method.packed[0]
    ids = torch.tensor([[0, 5, 49151], [17, 17, 3]])
    rows = embed(ids)
    assert rows.dtype == torch.bfloat16 and rows.shape == (2, 3, config.hidden_size)
    table = default_loaded.weights["model.embed_tokens.weight"]
    assert torch.equal(rows, table[ids].bfloat16())
    with pytest.raises(IndexError):
        embed(torch.tensor([49152]))


def test_a_dense_tied_lm_head_shares_the_embedding(default_loaded):
    model = build_model(default_loaded.config, default_loaded.weights, torch.float32, CPU)
    method = model.lm_head.method
    assert isinstance(method, Dense)
    assert method.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
