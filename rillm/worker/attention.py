"""Attention over the paged KV cache for one flat batch of tokens.

The flat batch mixes requests in any phase. Queries are split into two groups so padding
stays small: decodes (one query token each) and prefill chunks (many). Each group gathers its
sequences' keys and values from the cache once per layer (one `index_select` of the slots its
block tables name, computed once per step) and runs one attention over them, with a mask that
is causal inside the chunk and hides cache slots past each sequence's end. Grouped-query
attention folds the query heads that share a KV head into the query length, so K and V are
never repeated.

The cache is head-major (`[kv_heads, slots, head_dim]`), so a gather is already laid out as
`[kv_heads, batch, keys, head_dim]`: decodes multiply it directly (two batched matmuls and a
softmax, 2-3x faster than the fused CPU kernel for a batch of 1-query rows), prefill chunks hand
a view of it to `scaled_dot_product_attention`. A step that decodes a single sequence gathers
exactly its keys and takes the fused kernel without a mask (2x faster than the matmuls there;
not in float32, whose decode rows keep one kernel whatever the batch).

On the CPU, where rillm's C++ kernels are built (rillm/kernels), decode groups skip the gather:
`torch.ops.rillm.paged_decode_attention` walks each sequence's block table and reads its keys
and values in the cache, in float32 arithmetic, with no padding and no mask (1.5-4x faster than
gather + matmuls; exact to float32 rounding, and each row's result independent of the batch).
In bfloat16 on a CPU with AVX-512 BF16, prefill groups skip it too:
`torch.ops.rillm.paged_prefill_attention` gives each tile of 16 queries only the keys they see
(3-4x faster than gather + masked SDPA at 8 prompts of 128 tokens, BENCHMARKS.md). float32 keeps
SDPA: it is the path held to transformers.
"""

from __future__ import annotations

import math
import mmap
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from rillm.kernels import kernel_vectorized


@dataclass(frozen=True)
class AttentionGroup:
    token_index: torch.Tensor
    """[B, Q] positions in the flat batch of each sequence's query tokens (padding: 0)."""
    valid: torch.Tensor
    """[B, Q] bool, False on padding."""
    block_tables: torch.Tensor
    """[B, max_blocks] cache blocks of each sequence (padding: 0)."""
    mask: torch.Tensor | None
    """[B, 1, Q, max_blocks * block_size] bool, True where a query may attend a key (None
    where `context_lens` is set)."""
    slots: torch.Tensor | None
    """[B * max_blocks * block_size] the cache slots of each sequence's keys, back to back
    (None where `context_lens` is set)."""
    mask_bias: torch.Tensor | None = None
    """Decode groups (Q = 1) but `unmasked` ones: `mask` as [1, B, 1, keys] additive 0 / -inf in
    the model's dtype."""
    unmasked: bool = False
    """One sequence's single decode query, with `slots` exactly its keys: nothing to mask."""
    context_lens: torch.Tensor | None = None
    """Groups that a C++ kernel reads the cache for: [B] int64 keys of each sequence (its
    `block_tables` contiguous); nothing is gathered, no mask is built."""
    query_offsets: torch.Tensor | None = None
    """Prefill groups for `paged_prefill_attention`: [B] int64 the flat-batch row of each
    sequence's first query (its queries are consecutive rows)."""
    query_lens: torch.Tensor | None = None
    """With `query_offsets`: [B] int64 each sequence's queries, the last of its keys."""


@dataclass(frozen=True)
class AttentionMetadata:
    slot_mapping: torch.Tensor
    """[T] cache slot (block * block_size + offset) each token's K/V is written to."""
    groups: tuple[AttentionGroup, ...]
    decode_only: bool = False
    """Every token is one sequence's single decode query, in order: the decode group's
    queries are the flat batch itself (no gather of q, no scatter of the output)."""
    cpu_kernels: bool = False
    """rillm's C++ CPU kernels are loaded: the layers rotate and store K/V with
    `torch.ops.rillm.rotary_cache_write`."""


class KVCache:
    """One layer's keys and values: [num_kv_heads, num_blocks * block_size, head_dim] each."""

    def __init__(
        self,
        num_blocks: int,
        block_size: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        shape = (num_kv_heads, num_blocks * block_size, head_dim)
        self.key = _zeros(shape, dtype, device)
        self.value = _zeros(shape, dtype, device)
        self.block_size = block_size

    @property
    def num_kv_heads(self) -> int:
        return self.key.shape[0]

    def write(self, slot_mapping: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> None:
        """key, value: [T, num_kv_heads, D] for the slots `slot_mapping` [T]."""
        self.key.index_copy_(1, slot_mapping, key.transpose(0, 1))
        self.value.index_copy_(1, slot_mapping, value.transpose(0, 1))

    def gather(self, slots: torch.Tensor, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """[B * L] slots -> keys and values [num_kv_heads, B, L, D] (contiguous)."""
        heads, _, dim = self.key.shape
        k = self.key.index_select(1, slots).view(heads, batch, -1, dim)
        v = self.value.index_select(1, slots).view(heads, batch, -1, dim)
        return k, v


def prefill_attention_available() -> bool:
    """rillm's paged_prefill_attention is loaded and vectorized for this CPU (AVX-512 BF16)."""
    return kernel_vectorized("prefill_attention")


_HUGE_PAGE = 2 << 20


def _zeros(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A zeroed cache. It must not hold NaN: masked-out slots still meet a zero attention
    weight in the matmul, and 0 * NaN is NaN. On the CPU, an anonymous mapping whose pages the
    kernel zeroes on first touch, so memory is committed only as blocks are used; on Linux it
    asks for transparent huge pages (`MADV_HUGEPAGE`, honoured where THP is `madvise` or
    `always`): a decode step reads every running sequence's blocks, scattered over the whole
    cache, and with 4 KiB pages nearly every block is a TLB miss (decode attention at 32
    sequences 25-30% faster on 2 MiB pages, BENCHMARKS.md)."""
    if device.type != "cpu":
        return torch.zeros(shape, dtype=dtype, device=device)
    nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    if not hasattr(mmap, "MAP_ANONYMOUS"):  # Windows
        return torch.zeros(shape, dtype=dtype)
    area = mmap.mmap(-1, nbytes + _HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    if hasattr(mmap, "MADV_HUGEPAGE"):
        area.madvise(mmap.MADV_HUGEPAGE)
    raw = torch.frombuffer(area, dtype=torch.uint8)  # keeps `area` alive
    start = -raw.data_ptr() % _HUGE_PAGE  # huge pages only back 2 MiB-aligned ranges
    return raw[start:start + nbytes].view(dtype).view(shape)


def paged_attention(
    q: torch.Tensor, cache: KVCache, metadata: AttentionMetadata, scale: float
) -> torch.Tensor:
    """q: [T, num_heads, D] for the flat batch, whose K/V are already in `cache`.
    Returns [T, num_heads * D]."""
    num_tokens, num_heads, dim = q.shape
    num_kv_heads = cache.num_kv_heads
    group_size = num_heads // num_kv_heads
    if metadata.decode_only:
        (group,) = metadata.groups
        if group.context_lens is not None:
            return _kernel_decode_attention(q, cache, group, scale)
        assert group.slots is not None
        k, v = cache.gather(group.slots, num_tokens)
        if group.unmasked:
            return _single_decode_attention(q, k, v, scale)
        assert group.mask_bias is not None
        return _decode_attention(q, k, v, group.mask_bias, scale)
    out = q.new_empty(num_tokens, num_heads * dim)
    for group in metadata.groups:  # at most two: decodes and prefills
        batch, q_len = group.token_index.shape
        if group.query_lens is not None:
            assert group.context_lens is not None and group.query_offsets is not None
            torch.ops.rillm.paged_prefill_attention(
                q, cache.key, cache.value, group.block_tables, group.query_offsets,
                group.query_lens, group.context_lens, cache.block_size, scale, out)
            continue
        if group.context_lens is not None:
            row = group.token_index[:, 0]
            out[row] = _kernel_decode_attention(q[row], cache, group, scale)
            continue
        assert group.slots is not None and group.mask is not None
        k, v = cache.gather(group.slots, batch)  # [Hkv, B, L, D]
        if group.unmasked:
            row = group.token_index[:, 0]
            out[row] = _single_decode_attention(q[row], k, v, scale)
            continue
        if group.mask_bias is not None:
            og = _decode_attention(q[group.token_index[:, 0]], k, v, group.mask_bias, scale)
            out[group.token_index[:, 0]] = og
            continue
        qg = q[group.token_index]  # [B, Q, H, D]
        # [B, Hkv, G*Q, D]: the G query heads of one KV head become extra query rows.
        qg = qg.view(batch, q_len, num_kv_heads, group_size, dim).permute(0, 2, 3, 1, 4)
        qg = qg.reshape(batch, num_kv_heads, group_size * q_len, dim)
        mask = group.mask.repeat(1, 1, group_size, 1) if group_size > 1 else group.mask
        og = F.scaled_dot_product_attention(
            qg, k.transpose(0, 1), v.transpose(0, 1), attn_mask=mask, scale=scale
        )
        og = og.view(batch, num_kv_heads, group_size, q_len, dim).permute(0, 3, 1, 2, 4)
        og = og.reshape(batch, q_len, num_heads * dim)
        out[group.token_index[group.valid]] = og[group.valid]
    return out


def _kernel_decode_attention(
    q: torch.Tensor, cache: KVCache, group: AttentionGroup, scale: float
) -> torch.Tensor:
    """q: [B, H, D], one query per sequence -> [B, H * D], by the C++ kernel (rillm/kernels)."""
    return torch.ops.rillm.paged_decode_attention(
        q, cache.key, cache.value, group.block_tables, group.context_lens, cache.block_size, scale
    )


def _single_decode_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float
) -> torch.Tensor:
    """One sequence's one query against all its keys. q: [1, H, D]; k, v: [Hkv, 1, L, D].
    The fused kernel, its query heads folded into the query length per KV head, needs no
    mask: 2x faster than the batched matmuls at a few hundred keys."""
    _, num_heads, dim = q.shape
    num_kv_heads = k.shape[0]
    qh = q.view(num_kv_heads, 1, num_heads // num_kv_heads, dim)
    out = F.scaled_dot_product_attention(qh, k, v, scale=scale)  # [Hkv, 1, G, D]
    return out.reshape(1, num_heads * dim)


def _decode_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask_bias: torch.Tensor, scale: float
) -> torch.Tensor:
    """One query per sequence. q: [B, H, D]; k, v: [Hkv, B, L, D]; mask_bias: [1, B, 1, L].
    Returns [B, H * D]."""
    batch, num_heads, dim = q.shape
    num_kv_heads = k.shape[0]
    qh = q.reshape(batch, num_kv_heads, num_heads // num_kv_heads, dim).transpose(0, 1)
    scores = torch.matmul(qh, k.transpose(-1, -2)).mul_(scale).add_(mask_bias)  # [Hkv,B,G,L]
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(v.dtype)
    return torch.matmul(probs, v).transpose(0, 1).reshape(batch, num_heads * dim)
