"""The C++ prefill attention kernel against exact causal attention over each sequence's keys,
read from a paged cache in shuffled blocks, and against the SDPA path it replaces."""

from __future__ import annotations

import pytest
import torch

from rillm.attention import PagedAttention, SequenceGroup
from rillm.attention.backends import KernelDecode, KernelPrefill, TorchPrefill
from rillm.kernels import kernel_vectorized, load_cpu_kernels
from tests.kernels.paged_cache import filled_cache

BLOCK = 16


@pytest.fixture(scope="module", autouse=True)
def kernels():
    assert load_cpu_kernels(), "this machine has a C++ compiler: the kernels must build"
    assert kernel_vectorized("prefill_attention"), "this machine has AVX-512 BF16"


def _case(heads, kv_heads, dim, queries, lengths, block=BLOCK, seed=0, stale=True):
    """Sequences with `lengths` keys, the last `queries` of them this step's queries, in
    shuffled cache blocks; with `stale`, huge keys and NaN values in the slots past them."""
    gen = torch.Generator().manual_seed(seed)
    cache, block_tables, keys, values = filled_cache(torch.bfloat16, kv_heads, dim, lengths, gen,
                                                     block, stale)
    query_lens = torch.tensor(queries)
    offsets = torch.cumsum(query_lens, 0) - query_lens
    # Query rows as the model hands them over: a view into the fused q/k/v projection.
    qkv = torch.randn(sum(queries), heads + 2 * kv_heads, dim, generator=gen).bfloat16()
    return cache, block_tables, offsets, query_lens, torch.tensor(lengths), qkv[:, :heads], \
        keys, values


def _exact(q, k, v, scale, window=0):
    """float64 causal attention of the last Q positions q [Q, H, D] over keys/values
    [L, Hkv, D] -> [Q, H * D]; with a window, each sees its last `window` keys only."""
    group = q.shape[1] // k.shape[1]
    k = k.double().repeat_interleave(group, dim=1)
    v = v.double().repeat_interleave(group, dim=1)
    scores = torch.einsum("qhd,lhd->hql", q.double(), k) * scale
    length, count = k.shape[0], q.shape[0]
    key, query = torch.arange(length)[None, :], torch.arange(length - count, length)[:, None]
    seen = key <= query
    if window:
        seen &= key > query - window
    scores = scores.masked_fill(~seen, float("-inf"))
    return torch.einsum("hql,lhd->qhd", scores.softmax(-1), v).flatten(1)


def _kernel(q, cache, tables, offsets, query_lens, lens, scale, block=BLOCK, window=0):
    out = torch.full((q.shape[0], q.shape[1] * q.shape[2]), float("nan"), dtype=torch.bfloat16)
    torch.ops.rillm.paged_prefill_attention(q, cache.key, cache.value, tables, offsets,
                                            query_lens, lens, block, scale, out, window)
    return out


@pytest.mark.parametrize(("heads", "kv_heads", "dim"),
                         [(9, 3, 64), (4, 4, 128), (8, 2, 64), (4, 1, 256)])
@pytest.mark.parametrize("block", [16, 8, 32])
@pytest.mark.parametrize("window", [0, 1, 23, 64])
def test_kernel_equals_exact_causal_attention(heads, kv_heads, dim, block, window):
    # Whole prompts (queries = keys) across tile and block edges, later chunks of a prompt
    # (earlier keys already cached), and a single query.
    queries = [1, 15, 16, 17, 40, 5, 130]
    lengths = [1, 15, 16, 17, 100, 60, 130]
    cache, tables, offsets, qlens, lens, q, keys, values = _case(heads, kv_heads, dim, queries,
                                                                 lengths, block)
    scale = dim**-0.5
    out = _kernel(q, cache, tables, offsets, qlens, lens, scale, block, window)
    for b in range(len(lengths)):
        rows = slice(int(offsets[b]), int(offsets[b] + qlens[b]))
        expected = _exact(q[rows], keys[b], values[b], scale, window)
        # bf16 inputs, bf16 probabilities for the value pass, a bf16 result.
        torch.testing.assert_close(out[rows].double(), expected, rtol=2e-2, atol=2e-2)


def test_the_model_path_gives_what_sdpa_gave():
    # The two prefill backends over the same sequences, each with the metadata it builds:
    # the kernel, and gather + masked SDPA; both bf16.
    heads, kv_heads, dim = 9, 3, 64
    queries, lengths = [128, 3, 70], [128, 50, 70]
    cache, tables, offsets, qlens, lens, q, _, _ = _case(heads, kv_heads, dim, queries, lengths,
                                                         stale=False)
    starts = lens - qlens
    results = []
    cpu = torch.device("cpu")
    group = SequenceGroup(qlens, starts, offsets, tables)
    for prefill in (KernelPrefill(BLOCK, cpu), TorchPrefill(BLOCK, cpu)):
        attention = PagedAttention(KernelDecode(BLOCK, cpu), prefill)
        metadata = attention.build(torch.zeros(len(q), dtype=torch.long), None, group)
        results.append(attention.forward(q.contiguous(), cache, metadata, dim**-0.5))
    torch.testing.assert_close(results[0].float(), results[1].float(), rtol=2e-2, atol=2e-2)


def test_bad_arguments_are_errors_not_crashes():
    cache, tables, offsets, qlens, lens, q, _, _ = _case(9, 3, 64, [4, 4], [4, 20])
    with pytest.raises(RuntimeError, match="is not a cache block"):
        _kernel(q, cache, torch.full_like(tables, 10_000), offsets, qlens, lens, 0.125)
    with pytest.raises(RuntimeError, match="do not fit its block table"):
        _kernel(q, cache, tables, offsets, qlens, lens * 100, 0.125)
    with pytest.raises(RuntimeError, match="not rows of q"):
        _kernel(q, cache, tables, offsets + 5, qlens, lens, 0.125)
    with pytest.raises(RuntimeError, match="bfloat16"):
        _kernel(q.float(), cache, tables, offsets, qlens, lens, 0.125)
