"""rillm's Triton fused ops (the GPU's) against the PyTorch path they replace: the norms and
activations within a rounding, the rotary embedding and cache write bit for bit.

Without a GPU they run in Triton's interpreter (`TRITON_INTERPRET=1`, numpy on the CPU);
bench/cuda_check.sh runs them on CUDA (RILLM_TEST_DEVICE=cuda)."""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

from rillm.attention import KVCache, apply_rotary
from rillm.kernels import triton_ops

DEVICE = torch.device(os.environ.get("RILLM_TEST_DEVICE", "cpu"))  # cpu: Triton's interpreter

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered in exp")  # the interpreter


def randn(*shape, dtype, seed=0, scale=1.0):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=gen) * scale).to(dtype).to(DEVICE)


def reference_norm(x, weight, eps):
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(x.dtype)


def reference_norm_scaled(x, scale, eps):
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return (x32 * scale).to(x.dtype)


def tolerance(dtype):
    return {"atol": 1e-5, "rtol": 1e-5} if dtype == torch.float32 else {"atol": 2e-2,
                                                                        "rtol": 1e-2}


@pytest.mark.parametrize("dtype", DTYPES)
def test_rms_norm_equals_the_pytorch_path(dtype):
    x = randn(5, 576, dtype=dtype, scale=3.0)
    weight = randn(576, dtype=dtype, seed=1)
    torch.testing.assert_close(triton_ops.rms_norm(x, weight, 1e-5),
                               reference_norm(x, weight, 1e-5), **tolerance(dtype))


@pytest.mark.parametrize("dtype", DTYPES)
def test_gemma_norm_of_heads_sliced_from_a_fused_projection(dtype):
    """x [tokens, heads, dim] with only its last dimension dense (q out of qkv)."""
    qkv = randn(3, 4 + 2 + 2, 24, dtype=dtype, scale=2.0)
    q = qkv[:, :4]
    scale = 1.0 + randn(24, dtype=torch.float32, seed=2)
    out = triton_ops.rms_norm_scaled(q, scale, 1e-6)
    assert out.shape == q.shape and out.is_contiguous()
    torch.testing.assert_close(out, reference_norm_scaled(q, scale, 1e-6), **tolerance(dtype))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("gelu", [False, True])
def test_activation_times_up(dtype, gelu):
    gate_up = randn(4, 2 * 1536 + 2 * 40, dtype=dtype, scale=4.0)  # width no power of two
    gate, up = gate_up.float().chunk(2, dim=-1)
    act = F.gelu(gate, approximate="tanh") if gelu else F.silu(gate)
    expected = (act * up).to(dtype)
    out = triton_ops.gelu_tanh_mul(gate_up) if gelu else triton_ops.silu_mul(gate_up)
    torch.testing.assert_close(out, expected, **tolerance(dtype))


@pytest.mark.parametrize("dtype", DTYPES)
def test_rotary_and_cache_write_are_the_pytorch_path_bit_for_bit(dtype):
    tokens, heads, kv_heads, dim, block = 5, 6, 2, 64, 4
    qkv = randn(tokens, heads + 2 * kv_heads, dim, dtype=dtype)
    q, k, v = qkv[:, :heads], qkv[:, heads:heads + kv_heads], qkv[:, heads + kv_heads:]
    angles = torch.arange(tokens)[:, None] * torch.rand(dim // 2,
                                                        generator=torch.Generator().manual_seed(3))
    emb = torch.cat((angles, angles), dim=-1)
    cos, sin = emb.cos().to(dtype).to(DEVICE), emb.sin().to(dtype).to(DEVICE)
    slots = torch.tensor([9, 2, 17, 3, 30], device=DEVICE)
    ours, theirs = (KVCache(8, block, kv_heads, dim, dtype, DEVICE) for _ in range(2))
    q_out = triton_ops.rotary_cache_write(q, k, v, cos, sin, ours.key, ours.value, slots)
    expected_q = apply_rotary(q, cos, sin)
    theirs.write(slots, apply_rotary(k, cos, sin), v)
    if DEVICE.type == "cpu" and dtype == torch.bfloat16:
        # Triton's interpreter rounds float32 to bfloat16 toward zero (a GPU to nearest, as
        # PyTorch does) after each of the three roundings: a few units in the last place of
        # the products (|x| < 5) apart.
        ulp = {"atol": 5 * 2**-7, "rtol": 2**-7}
        torch.testing.assert_close(q_out, expected_q, **ulp)
        torch.testing.assert_close(ours.key, theirs.key, **ulp)
    else:
        assert torch.equal(q_out, expected_q)
        assert torch.equal(ours.key, theirs.key)
    assert torch.equal(ours.value, theirs.value)


@pytest.mark.parametrize("dtype", DTYPES)
def test_add_rms_norm_returns_the_sum_and_its_norm(dtype):
    x = randn(5, 576, dtype=dtype, scale=3.0)
    residual = randn(5, 576, dtype=dtype, seed=4, scale=3.0)
    weight = randn(576, dtype=dtype, seed=1)
    normed, total = triton_ops.add_rms_norm(x, residual, weight, 1e-5)
    expected = reference_norm(total, weight, 1e-5)
    if DEVICE.type == "cpu" and dtype == torch.bfloat16:
        # The interpreter casts to bfloat16 toward zero (a GPU to nearest): its two roundings
        # of the normalised value can land two units in the last place off.
        torch.testing.assert_close(total, x + residual, atol=0.0, rtol=2**-7)
        torch.testing.assert_close(normed, expected, atol=2e-2, rtol=2**-6)
    else:
        assert torch.equal(total, x + residual)  # the residual stream exactly as PyTorch adds
        torch.testing.assert_close(normed, expected, **tolerance(dtype))
