"""Attention over the paged KV cache for one flat batch of tokens.

The flat batch mixes requests in any phase. Queries are split into two groups so padding
stays small: decodes (one query token each) and prefill chunks (many). Each group runs one
scaled-dot-product attention over keys gathered from the cache through its block tables,
with a mask that is causal inside the chunk and hides cache slots past each sequence's end.
Grouped-query attention folds the query heads that share a KV head into the query length,
so K and V are never repeated.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class AttentionGroup:
    token_index: torch.Tensor
    """[B, Q] positions in the flat batch of each sequence's query tokens (padding: 0)."""
    valid: torch.Tensor
    """[B, Q] bool, False on padding."""
    block_tables: torch.Tensor
    """[B, max_blocks] cache blocks of each sequence (padding: 0)."""
    mask: torch.Tensor
    """[B, 1, Q, max_blocks * block_size] bool, True where a query may attend a key."""


@dataclass(frozen=True)
class AttentionMetadata:
    slot_mapping: torch.Tensor
    """[T] cache slot (block * block_size + offset) each token's K/V is written to."""
    groups: tuple[AttentionGroup, ...]


class KVCache:
    """One layer's keys and values: [num_blocks * block_size, num_kv_heads, head_dim] each."""

    def __init__(
        self,
        num_blocks: int,
        block_size: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        shape = (num_blocks * block_size, num_kv_heads, head_dim)
        self.key = _zeros(shape, dtype, device)
        self.value = _zeros(shape, dtype, device)
        self.block_size = block_size

    def write(self, slot_mapping: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> None:
        self.key.index_copy_(0, slot_mapping, key)
        self.value.index_copy_(0, slot_mapping, value)

    def gather(self, block_tables: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[B, max_blocks] -> keys and values [B, num_kv_heads, max_blocks * block_size, D]."""
        batch, max_blocks = block_tables.shape
        _, heads, dim = self.key.shape
        paged_k = self.key.view(-1, self.block_size, heads, dim)
        paged_v = self.value.view(-1, self.block_size, heads, dim)
        k = paged_k[block_tables].view(batch, max_blocks * self.block_size, heads, dim)
        v = paged_v[block_tables].view(batch, max_blocks * self.block_size, heads, dim)
        return k.transpose(1, 2), v.transpose(1, 2)


def _zeros(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A zeroed cache. It must not hold NaN: masked-out slots still meet a zero attention
    weight in the matmul, and 0 * NaN is NaN. On the CPU, numpy's calloc hands out pages the
    kernel zeroes on first touch, so memory is committed only as blocks are used."""
    if device.type != "cpu":
        return torch.zeros(shape, dtype=dtype, device=device)
    itemsize = torch.empty((), dtype=dtype).element_size()
    raw = np.zeros(shape[:-1] + (shape[-1] * itemsize,), dtype=np.uint8)
    return torch.from_numpy(raw).view(dtype)


def paged_attention(
    q: torch.Tensor, cache: KVCache, metadata: AttentionMetadata, scale: float
) -> torch.Tensor:
    """q: [T, num_heads, D] for the flat batch, whose K/V are already in `cache`.
    Returns [T, num_heads * D]."""
    num_tokens, num_heads, dim = q.shape
    num_kv_heads = cache.key.shape[1]
    group_size = num_heads // num_kv_heads
    out = q.new_empty(num_tokens, num_heads * dim)
    for group in metadata.groups:  # at most two: decodes and prefills
        batch, q_len = group.token_index.shape
        qg = q[group.token_index]  # [B, Q, H, D]
        # [B, Hkv, G*Q, D]: the G query heads of one KV head become extra query rows.
        qg = qg.view(batch, q_len, num_kv_heads, group_size, dim).permute(0, 2, 3, 1, 4)
        qg = qg.reshape(batch, num_kv_heads, group_size * q_len, dim)
        k, v = cache.gather(group.block_tables)
        mask = group.mask.repeat(1, 1, group_size, 1) if group_size > 1 else group.mask
        og = F.scaled_dot_product_attention(qg, k, v, attn_mask=mask, scale=scale)
        og = og.view(batch, num_kv_heads, group_size, q_len, dim).permute(0, 3, 1, 2, 4)
        og = og.reshape(batch, q_len, num_heads * dim)
        out[group.token_index[group.valid]] = og[group.valid]
    return out
