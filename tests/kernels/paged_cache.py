"""A paged KV cache holding random keys and values for sequences of given lengths, in shuffled
blocks: what the attention kernels' tests read."""

from __future__ import annotations

import torch

from rillm.attention import KVCache


def filled_cache(dtype: torch.dtype, kv_heads: int, dim: int, lengths: list[int],
                 gen: torch.Generator, block: int = 16, stale: bool = False
                 ) -> tuple[KVCache, torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
    """-> (cache, block_tables [B, max_blocks] padded with 0, each sequence's keys and values
    [L, kv_heads, dim]). With `stale`, huge keys and NaN values in every slot no sequence
    fills (three spare blocks, and each sequence's last block past its end)."""
    per_seq = [-(-n // block) for n in lengths]
    num_blocks = sum(per_seq) + 3
    cache = KVCache(num_blocks, block, kv_heads, dim, dtype, torch.device("cpu"))
    if stale:
        cache.key.copy_(torch.randn(cache.key.shape, generator=gen) * 1e3)
        cache.value.fill_(float("nan"))
    order = torch.randperm(num_blocks, generator=gen).tolist()
    tables, keys, values = [], [], []
    for length, count in zip(lengths, per_seq, strict=True):
        table, order = order[:count], order[count:]
        tables.append(table)
        k = torch.randn(length, kv_heads, dim, generator=gen).to(dtype)
        v = torch.randn(length, kv_heads, dim, generator=gen).to(dtype)
        slots = torch.tensor([table[p // block] * block + p % block for p in range(length)])
        cache.write(slots, k, v)
        keys.append(k)
        values.append(v)
    width = max(per_seq)
    block_tables = torch.tensor([t + [0] * (width - len(t)) for t in tables])
    return cache, block_tables, keys, values
