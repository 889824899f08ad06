"""The C++ rotary + cache write against the PyTorch path it replaces: bit for bit."""

from __future__ import annotations

import pytest
import torch

from rillm.attention import KVCache, apply_rotary
from rillm.kernels import load_cpu_kernels

HEADS, KV_HEADS, BLOCK = 9, 3, 16


@pytest.fixture(scope="module", autouse=True)
def kernels():
    assert load_cpu_kernels(), "this machine has a C++ compiler: the kernels must build"


def _bits(t: torch.Tensor) -> torch.Tensor:
    """The bit patterns (so -0.0 and 0.0, or two NaNs, count as different)."""
    return t.view(torch.int32 if t.element_size() == 4 else torch.int16)


def _rope(positions: torch.Tensor, dtype: torch.dtype,
          dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, dim, 2).float() / dim))
    freqs = positions.float()[:, None] * inv_freq[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("tokens", [1, 7, 300])
@pytest.mark.parametrize("views", [True, False], ids=["projection-views", "normed-copies"])
# 64 and 128: the vectorised bfloat16 path; 80: its one-value-at-a-time fallback.
@pytest.mark.parametrize("dim", [64, 128, 80])
def test_same_bits_as_the_pytorch_rotation_and_write(dtype, tokens, views, dim):
    gen = torch.Generator().manual_seed(tokens)
    qkv = (3 * torch.randn(tokens, HEADS + 2 * KV_HEADS, dim, generator=gen)).to(dtype)
    qkv[0, :, :4] = 0.0  # zeros, whose signs must come out as PyTorch's
    qkv[0, :, 4:8] = -0.0
    q, k, v = qkv[:, :HEADS], qkv[:, HEADS : HEADS + KV_HEADS], qkv[:, HEADS + KV_HEADS :]
    if not views:  # what a model with q/k norms hands over
        q, k = q.contiguous(), k.contiguous()
    cos, sin = _rope(torch.randint(0, 4000, (tokens,), generator=gen), dtype, dim)
    slots = torch.randperm(40 * BLOCK, generator=gen)[:tokens]
    ours = KVCache(40, BLOCK, KV_HEADS, dim, dtype, torch.device("cpu"))
    theirs = KVCache(40, BLOCK, KV_HEADS, dim, dtype, torch.device("cpu"))

    q_rot = torch.ops.rillm.rotary_cache_write(q, k, v, cos, sin, ours.key, ours.value, slots)
    theirs.write(slots, apply_rotary(k, cos, sin), v)

    assert torch.equal(_bits(q_rot), _bits(apply_rotary(q, cos, sin)))
    assert torch.equal(_bits(ours.key), _bits(theirs.key))
    assert torch.equal(_bits(ours.value), _bits(theirs.value))


def test_a_slot_outside_the_cache_is_refused():
    cache = KVCache(2, BLOCK, KV_HEADS, 64, torch.float32, torch.device("cpu"))
    qkv = torch.randn(2, HEADS + 2 * KV_HEADS, 64)
    cos, sin = _rope(torch.tensor([0, 1]), torch.float32, 64)
    with pytest.raises(RuntimeError, match=r"slot_mapping\[1\] = 32 is not a cache slot"):
        torch.ops.rillm.rotary_cache_write(
            qkv[:, :HEADS], qkv[:, HEADS:12], qkv[:, 12:], cos, sin, cache.key, cache.value,
            torch.tensor([3, 32]),
        )
