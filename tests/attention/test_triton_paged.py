"""rillm's Triton paged attention (the GPU's backends) against dense causal attention.

Without a GPU the kernels run in Triton's interpreter (`TRITON_INTERPRET=1`, numpy on the CPU):
the same program, so the indexing, masks and online softmax are what is checked here; the
device check (bench/cuda_check.sh) runs these tests on CUDA too (RILLM_TEST_DEVICE=cuda)."""

from __future__ import annotations

import os

import pytest
import torch

from rillm.attention import PagedAttention
from rillm.attention.backends import TritonDecode, TritonPrefill
from tests.attention.test_backends import make_step, reference

DEVICE = torch.device(os.environ.get("RILLM_TEST_DEVICE", "cpu"))  # cpu: Triton's interpreter


def check(sequences, dtype=torch.float32, window=0, heads=6, kv_heads=2, dim=16, block=4):
    """One step of `sequences` (keys, queries, block table) through the Triton backends on
    DEVICE (test_backends.py's harness), each sequence's rows against dense attention."""
    gen = torch.Generator().manual_seed(0)
    cache, q, inputs, (decodes, prefills) = make_step(
        dtype, sequences, gen, heads=heads, kv_heads=kv_heads, dim=dim, block=block,
        device=DEVICE)
    attention = PagedAttention(TritonDecode(block, DEVICE, window or None),
                               TritonPrefill(block, DEVICE, window or None))
    metadata = attention.build(torch.zeros(len(q), dtype=torch.int64, device=DEVICE),
                               decodes, prefills)
    out = attention.forward(q.to(DEVICE), cache, metadata, dim**-0.5,
                            windowed=bool(window)).cpu()
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    for k, v, rows in inputs:
        expected = reference(q[rows].float(), k.float(), v.float(), dim**-0.5, window)
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
