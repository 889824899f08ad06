"""rillm's Triton paged attention (the GPU's backends) against dense causal attention.

Without a GPU the kernels run in Triton's interpreter (`TRITON_INTERPRET=1`, numpy on the CPU):
the same program, so the indexing, masks and online softmax are what is checked here; the
device check (bench/cuda_check.sh) runs these tests on CUDA too (RILLM_TEST_DEVICE=cuda)."""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

from rillm.attention import KVCache, PagedAttention, SequenceGroup
from rillm.attention.backends import TritonDecode, TritonPrefill

DEVICE = torch.device(os.environ.get("RILLM_TEST_DEVICE", "cpu"))  # cpu: Triton's interpreter


def reference(q, keys, values, scale, window=0):
    """q: [Q, H, D] the last Q positions of keys/values [L, Hkv, D], causal (windowed)."""
    group = q.shape[1] // keys.shape[1]
    k = keys.repeat_interleave(group, dim=1).transpose(0, 1)
    v = values.repeat_interleave(group, dim=1).transpose(0, 1)
    length, q_len = keys.shape[0], q.shape[0]
    key_pos = torch.arange(length)[None, :]
    query_pos = torch.arange(length - q_len, length)[:, None]
    mask = key_pos <= query_pos
    if window:
        mask &= key_pos > query_pos - window
    out = F.scaled_dot_product_attention(q.transpose(0, 1), k, v, attn_mask=mask, scale=scale)
    return out.transpose(0, 1).reshape(q_len, -1)


def run_step(sequences, *, heads, kv_heads, dim, block, dtype, window=0, seed=0):
    """`sequences`: (keys, queries, block table) each. Writes their K/V, runs one step through
    the Triton backends and returns (out, per-sequence (q, k, v, rows))."""
    gen = torch.Generator().manual_seed(seed)
    num_blocks = 1 + max(max(t) for _, _, t in sequences)
    cache = KVCache(num_blocks, block, kv_heads, dim, dtype, DEVICE)
    qs, inputs, offset = [], [], 0
    for length, q_len, table in sequences:
        k = torch.randn(length, kv_heads, dim, generator=gen).to(dtype)
        v = torch.randn(length, kv_heads, dim, generator=gen).to(dtype)
        slots = torch.tensor([table[p // block] * block + p % block for p in range(length)])
        cache.write(slots.to(DEVICE), k.to(DEVICE), v.to(DEVICE))
        q = torch.randn(q_len, heads, dim, generator=gen).to(dtype)
        qs.append(q)
        inputs.append((q, k, v, slice(offset, offset + q_len)))
        offset += q_len
    width = max(len(t) for _, _, t in sequences)
    tables = torch.tensor([t + [0] * (width - len(t)) for _, _, t in sequences])
    num_new = torch.tensor([q_len for _, q_len, _ in sequences])
    starts = torch.tensor([length for length, _, _ in sequences]) - num_new
    offsets = torch.cumsum(num_new, 0) - num_new

    def group(rows):
        return (SequenceGroup(num_new[rows], starts[rows], offsets[rows], tables[rows])
                if rows.any() else None)

    attention = PagedAttention(TritonDecode(block, DEVICE, window or None),
                               TritonPrefill(block, DEVICE, window or None))
    metadata = attention.build(torch.zeros(offset, dtype=torch.int64, device=DEVICE),
                               group(num_new == 1), group(num_new > 1))
    out = attention.forward(torch.cat(qs).to(DEVICE), cache, metadata, dim**-0.5,
                            windowed=bool(window))
    return out.cpu(), inputs


def check(sequences, dtype=torch.float32, window=0, heads=6, kv_heads=2, dim=16, block=4):
    out, inputs = run_step(sequences, heads=heads, kv_heads=kv_heads, dim=dim, block=block,
                           dtype=dtype, window=window)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    for q, k, v, rows in inputs:
        expected = reference(q.float(), k.float(), v.float(), dim**-0.5, window)
        torch.testing.assert_close(out[rows].float(), expected, rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decodes_read_their_block_tables(dtype):
    # Lengths below, at and past the 16 keys a program takes at once; tables out of order.
    check([(9, 1, [3, 7, 1]), (3, 1, [5, 6]), (37, 1, [0, 9, 2, 11, 12, 13, 14, 15, 4, 8])],
          dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_prefill_chunks_and_decodes_in_one_step(dtype):
    # Whole prompts, a later chunk (keys cached before its queries), more queries than one
    # 16-query tile, and decodes beside them.
    check([(9, 3, [3, 7, 1]), (6, 1, [5, 6]), (40, 21, list(range(8, 18))),
           (11, 1, [4, 18, 19]), (5, 5, [20, 21])], dtype)


@pytest.mark.parametrize("window", [1, 5, 16])
def test_a_sliding_window_sees_only_the_last_keys(window):
    check([(9, 1, [3, 7, 1]), (37, 1, list(range(8, 18))), (30, 12, list(range(18, 26))),
           (23, 23, list(range(26, 32)))], window=window)


def test_shapes_the_fast_kernels_never_see():
    """A head size that is no power of two, one KV head for 5 query heads (a group padded to
    8 rows) and blocks of 16 (a key tile of one block)."""
    check([(20, 1, [2, 0]), (33, 17, [1, 3, 4])], heads=5, kv_heads=1, dim=24, block=16)
