"""The quantized linear layers against the dequantized float32 weights, on the default model's
real blocks: gguf_linear (the default: int8 activations per block), rillm's int4 kernel and
PyTorch's (bfloat16 activations; int8 mode and CPUs without AVX-512 VNNI)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from rillm.kernels import load_cpu_kernels
from rillm.model.int4_linear import (
    MAX_INT4_ROWS,
    BFloat16Weight,
    Int4Linear,
    gguf_kernel_available,
    rillm_q4_available,
)
from rillm.model.llama import build_model

NAMES = [
    "model.layers.0.self_attn.q_proj.weight",  # Q4_1, rows un-permuted by the loader
    "model.layers.7.mlp.down_proj.weight",  # Q4_1, K = 1536
    "model.embed_tokens.weight",  # Q8_0 (the tied lm_head)
]


@pytest.fixture(scope="module", autouse=True)
def kernels():
    assert load_cpu_kernels(), "this machine has a C++ compiler: the kernels must build"


# (rillm_kernel, gguf_kernel): the three ways an Int4Linear multiplies.
PATHS = [pytest.param((False, False), id="torch-int4"),
         pytest.param((True, False), id="rillm-q4"),
         pytest.param((True, True), id="rillm-gguf")]


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("name", NAMES)
# The int4 kernel up to MAX_INT4_ROWS rows, the packed bf16 copy above; gguf_linear for all.
@pytest.mark.parametrize("rows", [1, 2, 3, MAX_INT4_ROWS, MAX_INT4_ROWS + 1, 40])
def test_int4_linear_equals_dequantized_linear(default_loaded, name, rows, path):
    rillm_kernel, gguf_kernel = path
    blocks = default_loaded.quantized[name]
    dense = default_loaded.weights[name]
    linear = Int4Linear([blocks], dense, rillm_kernel=rillm_kernel, gguf_kernel=gguf_kernel)
    # gguf_linear where asked for and this CPU vectorizes it (AVX-512 VNNI), else rillm's int4
    # kernel where this CPU vectorizes that (AVX-512 BF16), else PyTorch's.
    gguf = rillm_kernel and gguf_kernel and gguf_kernel_available()
    assert (linear.gguf is not None) == gguf and (linear.dense is None) == gguf
    assert linear.rillm_kernel == (rillm_kernel and (gguf or rillm_q4_available()))
    x = torch.randn(rows, dense.shape[1], generator=torch.Generator().manual_seed(0))
    expected = x @ dense.T
    got = linear(x)
    assert got.dtype == torch.float32 and got.shape == expected.shape
    # bfloat16 activations, scales and output: ~0.4% of the output's scale; int8 activations
    # per block of 32 (gaussian inputs): ~0.8%.
    rel = (got - expected).norm() / expected.norm()
    assert rel < (1.2e-2 if gguf else 6e-3), rel


@pytest.mark.parametrize("rows", [1, 7, 64])
def test_packed_bfloat16_weight_equals_a_plain_bfloat16_matmul(default_loaded, rows):
    """oneDNN's packed layout changes how the weights are read, not what is computed."""
    dense = default_loaded.weights["model.layers.5.mlp.gate_proj.weight"].bfloat16()
    x = torch.randn(rows, dense.shape[1], generator=torch.Generator().manual_seed(2)).bfloat16()
    got = BFloat16Weight(dense)(x)
    expected = torch.nn.functional.linear(x, dense)
    assert got.dtype == torch.bfloat16 and got.shape == expected.shape
    torch.testing.assert_close(got, expected, rtol=1.6e-2, atol=1e-2)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("name", ["model.layers.3.self_attn.k_proj.weight",
                                  "model.embed_tokens.weight"])
def test_int4_weights_reproduce_the_blocks_exactly(default_loaded, name, path):
    """Through an identity input the kernel returns W itself: equal to the dequantized weights
    up to the rounding of the output to bfloat16 (and, in PyTorch's kernel, of the block
    scales)."""
    dense = default_loaded.weights[name]
    if dense.shape[0] > 4096:
        dense = dense[:4096]
        blocks = default_loaded.quantized[name]
        blocks = type(blocks)(blocks.type_name, blocks.data[:4096], (4096, dense.shape[1]))
    else:
        blocks = default_loaded.quantized[name]
    rillm_kernel, gguf_kernel = path
    linear = Int4Linear([blocks], dense, max_int4_rows=1 << 20, rillm_kernel=rillm_kernel,
                        gguf_kernel=gguf_kernel)
    recovered = linear(torch.eye(dense.shape[1])).T
    err = (recovered - dense).abs() / dense.abs().amax(dim=1, keepdim=True)
    # One bfloat16 rounding of the output (2^-9 relative; a one-hot row is exact in int8);
    # PyTorch's bfloat16 scales add more.
    assert err.max() < (1e-2 if not rillm_kernel else 2**-8)


def test_rillm_kernel_agrees_with_pytorchs(default_loaded):
    name = "model.layers.11.mlp.gate_proj.weight"
    blocks, dense = default_loaded.quantized[name], default_loaded.weights[name]
    x = torch.randn(4, dense.shape[1], generator=torch.Generator().manual_seed(3)).bfloat16()
    ours = Int4Linear([blocks], dense, rillm_kernel=True, gguf_kernel=False)(x).float()
    theirs = Int4Linear([blocks], dense, rillm_kernel=False)(x).float()
    assert (ours - theirs).norm() / theirs.norm() < 4e-3


@pytest.mark.parametrize("path", PATHS)
def test_packed_int4_equals_separate(default_loaded, path):
    rillm_kernel, gguf_kernel = path
    parts = [f"model.layers.2.self_attn.{p}_proj.weight" for p in "qkv"]
    blocks = [default_loaded.quantized[n] for n in parts]
    dense = [default_loaded.weights[n] for n in parts]
    x = torch.randn(3, 576, generator=torch.Generator().manual_seed(1))
    options = {"rillm_kernel": rillm_kernel, "gguf_kernel": gguf_kernel}
    fused = Int4Linear(blocks, torch.cat(dense), **options)(x)
    separate = torch.cat([Int4Linear([b], d, **options)(x)
                          for b, d in zip(blocks, dense, strict=True)], -1)
    assert torch.equal(fused, separate)


@pytest.mark.parametrize("cpu_kernels", [False, True])
def test_quantized_model_swaps_every_matrix_and_keeps_the_rest(default_loaded, cpu_kernels):
    config = default_loaded.config
    model = build_model(config, default_loaded.weights, torch.bfloat16, torch.device("cpu"),
                        quantized=default_loaded.quantized, cpu_kernels=cpu_kernels)
    int4 = {n: m for n, m in model.named_modules() if isinstance(m, Int4Linear)}
    assert len(int4) == 4 * config.num_hidden_layers + 1 and "lm_head" in int4
    assert all(m.rillm_kernel == (cpu_kernels and rillm_q4_available()) for m in int4.values())
    # The default keeps one copy of each matrix: the file's blocks, packed for gguf_linear.
    gguf = cpu_kernels and gguf_kernel_available()
    assert all((m.gguf is not None) == gguf and (m.dense is None) == gguf
               for m in int4.values())
    dense_linears = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    assert dense_linears == []
    embed = model.model.embed_tokens.weight
    assert embed.dtype == torch.bfloat16
    np.testing.assert_array_equal(
        embed[:4].detach().float().numpy(),
        default_loaded.weights["model.embed_tokens.weight"][:4].bfloat16().float().numpy(),
    )


def test_building_a_model_leaves_torchs_init_functions_as_they_were(default_loaded):
    # build_model skips the random init of the meta-device modules by swapping nn.init's
    # functions for the duration (their first call would import torch._dynamo, ~1 s).
    before = (torch.nn.init.normal_, torch.nn.init.uniform_, torch.nn.init.kaiming_uniform_)
    build_model(default_loaded.config, default_loaded.weights, torch.float32, torch.device("cpu"))
    after = (torch.nn.init.normal_, torch.nn.init.uniform_, torch.nn.init.kaiming_uniform_)
    assert after == before
    weight = torch.empty(4, 4)
    torch.nn.init.normal_(weight)
    assert weight.std() > 0
