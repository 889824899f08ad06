"""The C++ rotary + cache write against the PyTorch path it replaces: bit for bit."""

from __future__ import annotations

import pytest
import torch

from rillm.kernels import load_cpu_kernels
from rillm.model.llama import apply_rotary
from rillm.worker.attention import KVCache

HEADS, KV_HEADS, DIM, BLOCK = 9, 3, 64, 16


@pytest.fixture(scope="module", autouse=True)
def kernels():
    assert load_cpu_kernels(), "this machine has a C++ compiler: the kernels must build"


def _rope(positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, DIM, 2).float() / DIM))
    freqs = positions.float()[:, None] * inv_freq[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("tokens", [1, 7, 300])
@pytest.mark.parametrize("views", [True, False], ids=["projection-views", "normed-copies"])
def test_same_bits_as_the_pytorch_rotation_and_write(dtype, tokens, views):
    gen = torch.Generator().manual_seed(tokens)
    qkv = (3 * torch.randn(tokens, HEADS + 2 * KV_HEADS, DIM, generator=gen)).to(dtype)
    q, k, v = qkv[:, :HEADS], qkv[:, HEADS : HEADS + KV_HEADS], qkv[:, HEADS + KV_HEADS :]
    if not views:  # what a model with q/k norms hands over
        q, k = q.contiguous(), k.contiguous()
    cos, sin = _rope(torch.randint(0, 4000, (tokens,), generator=gen), dtype)
    slots = torch.randperm(40 * BLOCK, generator=gen)[:tokens]
    ours = KVCache(40, BLOCK, KV_HEADS, DIM, dtype, torch.device("cpu"))
    theirs = KVCache(40, BLOCK, KV_HEADS, DIM, dtype, torch.device("cpu"))

    q_rot = torch.ops.rillm.rotary_cache_write(q, k, v, cos, sin, ours.key, ours.value, slots)
    theirs.write(slots, apply_rotary(k, cos, sin), v)

    assert torch.equal(q_rot, apply_rotary(q, cos, sin))
    assert torch.equal(ours.key, theirs.key) and torch.equal(ours.value, theirs.value)


def test_a_slot_outside_the_cache_is_refused():
    cache = KVCache(2, BLOCK, KV_HEADS, DIM, torch.float32, torch.device("cpu"))
    qkv = torch.randn(2, HEADS + 2 * KV_HEADS, DIM)
    cos, sin = _rope(torch.tensor([0, 1]), torch.float32)
    with pytest.raises(RuntimeError, match=r"slot_mapping\[1\] = 32 is not a cache slot"):
        torch.ops.rillm.rotary_cache_write(
            qkv[:, :HEADS], qkv[:, HEADS:12], qkv[:, 12:], cos, sin, cache.key, cache.value,
            torch.tensor([3, 32]),
        )
