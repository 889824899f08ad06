"""The C++ decode attention kernel against exact attention over the same keys, and its
build: cached per machine, and a clear fallback where it cannot be built."""

from __future__ import annotations

import logging

import pytest
import torch

from rillm.kernels import load_cpu_kernels
from tests.kernels.paged_cache import filled_cache

BLOCK = 16


@pytest.fixture(scope="module", autouse=True)
def kernels():
    assert load_cpu_kernels(), "this machine has a C++ compiler: the kernels must build"


def _case(dtype, heads, kv_heads, dim, lengths, seed=0):
    """A cache holding random keys/values for sequences of `lengths`, in shuffled blocks."""
    gen = torch.Generator().manual_seed(seed)
    cache, block_tables, keys, values = filled_cache(dtype, kv_heads, dim, lengths, gen, BLOCK)
    # Query rows as the model hands them over: a view into the fused q/k/v projection.
    qkv = torch.randn(len(lengths), heads + 2 * kv_heads, dim, generator=gen).to(dtype)
    return cache, block_tables, torch.tensor(lengths), qkv[:, :heads], keys, values


def _exact(q, k, v, scale):
    """float64 attention of one query [H, D] over keys/values [L, Hkv, D] -> [H * D]."""
    group = q.shape[0] // k.shape[1]
    k = k.double().repeat_interleave(group, dim=1)  # [L, H, D]
    v = v.double().repeat_interleave(group, dim=1)
    scores = torch.einsum("hd,lhd->hl", q.double(), k) * scale
    return torch.einsum("hl,lhd->hd", scores.softmax(-1), v).flatten()


def _kernel(q, cache, block_tables, lengths, scale, window=0):
    return torch.ops.rillm.paged_decode_attention(q, cache.key, cache.value, block_tables,
                                                   lengths, BLOCK, scale, window)


@pytest.mark.parametrize(
    ("dtype", "tol"), [(torch.float32, 1e-5), (torch.bfloat16, 2e-2), (torch.float16, 2e-3)]
)
@pytest.mark.parametrize(("heads", "kv_heads", "dim"),
                         [(9, 3, 64), (4, 4, 128), (6, 2, 80), (4, 1, 256)])
# 0: every key; else a sliding window of that many (Gemma's local layers, Mistral).
@pytest.mark.parametrize("window", [0, 1, 16, 21])
def test_kernel_equals_exact_attention_over_each_sequences_keys(dtype, tol, heads, kv_heads,
                                                                dim, window):
    # Lengths on both sides of block edges, a single key, and one long sequence.
    lengths = [1, 15, 16, 17, 33, 300]
    cache, tables, lens, q, keys, values = _case(dtype, heads, kv_heads, dim, lengths)
    scale = dim**-0.5
    out = _kernel(q, cache, tables, lens, scale, window)
    assert out.shape == (len(lengths), heads * dim) and out.dtype == dtype
    for b, length in enumerate(lengths):
        first = max(0, length - window) if window else 0
        expected = _exact(q[b], keys[b][first:], values[b][first:], scale)
        torch.testing.assert_close(out[b].double(), expected, rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_sequences_result_does_not_depend_on_the_rest_of_the_batch(dtype):
    lengths = [40, 7, 130, 64]
    cache, tables, lens, q, _, _ = _case(dtype, 9, 3, 64, lengths)
    together = _kernel(q, cache, tables, lens, 0.125)
    for b in range(len(lengths)):
        alone = _kernel(q[b : b + 1], cache, tables[b : b + 1].contiguous(), lens[b : b + 1],
                        0.125)
        assert torch.equal(alone[0], together[b])


def test_bad_arguments_raise_instead_of_reading_wild_memory():
    cache, tables, lens, q, _, _ = _case(torch.float32, 9, 3, 64, [5, 9])
    with pytest.raises(RuntimeError, match="block_tables"):
        _kernel(q, cache, tables.int(), lens, 0.1)
    with pytest.raises(RuntimeError, match="dtype"):
        _kernel(q.bfloat16(), cache, tables, lens, 0.1)
    with pytest.raises(RuntimeError, match="context_lens"):
        _kernel(q, cache, tables, lens[:1], 0.1)
    with pytest.raises(RuntimeError, match="does not fit its block table"):
        _kernel(q, cache, tables, lens * 100, 0.1)
    bad = tables.clone()
    bad[1, 0] = 10_000
    with pytest.raises(RuntimeError, match=r"block_tables\[1\]\[0\] = 10000 is not a cache"):
        _kernel(q, cache, bad, lens, 0.1)


def test_a_build_is_cached_and_reused(tmp_path):
    assert load_cpu_kernels(tmp_path)
    (library,) = tmp_path.glob("*.so")
    built = library.stat().st_mtime_ns
    load_cpu_kernels.cache_clear()
    assert load_cpu_kernels(tmp_path)
    assert [p.stat().st_mtime_ns for p in tmp_path.glob("*.so")] == [built]


def test_without_a_compiler_the_loader_says_so_and_declines(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    with caplog.at_level(logging.WARNING, logger="rillm.kernels"):
        assert not load_cpu_kernels(tmp_path / "cache")
    assert "no C++ compiler" in caplog.text
    assert not any((tmp_path / "cache").glob("*.so"))


def test_the_kernels_run_on_torchs_threads():
    # at::parallel_for compiles to a one-thread loop unless the library is built with OpenMP.
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        assert torch.ops.rillm.parallel_threads() == 2
        torch.set_num_threads(1)
        assert torch.ops.rillm.parallel_threads() == 1
    finally:
        torch.set_num_threads(threads)
