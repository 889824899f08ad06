"""Attention backends: each builds its own metadata from a step's sequences and attends over
the paged cache with it.

A step's sequences are split in two groups so padding stays small: decodes (one query each)
and prefill chunks (many). `PagedAttention` runs one decode backend and one prefill backend:

- `KernelDecode`: rillm's `paged_decode_attention` walks each block table in the cache: no
  gather, no mask, float32 arithmetic, each row independent of the batch (1.5-4x faster than
  gather + matmuls).
- `TorchDecode`: gathers the keys once per layer (one `index_select` of slots computed once
  per step), two batched matmuls and a softmax with an additive mask; one sequence outside
  float32 gathers exactly its keys and runs SDPA with no mask (2x faster there). Any device.
- `KernelPrefill`: rillm's `paged_prefill_attention` (bfloat16, AVX-512 BF16), each 16-query
  tile against only the keys it sees (3-4x faster than masked SDPA at 8 x 128 tokens).
- `TorchPrefill`: gather + `scaled_dot_product_attention` with a causal mask: the float32 path
  held to transformers on the CPU.
- `TritonDecode`, `TritonPrefill`: the GPU's (triton_paged.py): block tables and lengths read
  on the device, only the keys each query sees; the decode launch's shape is the batch's
  alone, so CUDA graphs capture it (rillm/worker/decode_graphs.py).

Sliding windows (Gemma's local layers, Mistral): a layer with `windowed=True` lets each query
see only the last `window` keys, the position's own included (key > query - window), in every
backend: the kernels take the window, the PyTorch paths a second mask built once per step.

Grouped-query attention folds the query heads of a KV head into the query length, so K and V
are never repeated. The cache is head-major, so a gather is already `[kv_heads, B, keys, D]`.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

from rillm.attention.kv_cache import KVCache
from rillm.kernels.plan import DecodeAttention, KernelPlan, PrefillAttention


@dataclass(frozen=True)
class SequenceGroup:
    """The runner's view of some of a step's sequences (CPU tensors, one row a sequence)."""

    num_new: torch.Tensor
    """[B] tokens of each sequence in this step."""
    starts: torch.Tensor
    """[B] tokens already in the cache before this step (the first new token's position)."""
    offsets: torch.Tensor
    """[B] flat-batch row of each sequence's first new token (its rows are consecutive)."""
    block_tables: torch.Tensor
    """[B, max_blocks] int64 cache blocks of each sequence (padding: 0)."""


@dataclass(frozen=True)
class PagedDecodeMetadata:
    rows: torch.Tensor
    """[B] flat-batch row of each sequence's query."""
    block_tables: torch.Tensor
    """[B, blocks] contiguous."""
    context_lens: torch.Tensor
    """[B] int64 keys of each sequence, its new one included."""


@dataclass(frozen=True)
class GatherDecodeMetadata:
    rows: torch.Tensor
    slots: torch.Tensor
    """[B * L] the cache slots of each sequence's keys, back to back."""
    mask_bias: torch.Tensor
    """[1, B, 1, L] additive 0 / -inf in the model's dtype (empty where `single`)."""
    single: bool
    """One sequence, `slots` exactly its keys: nothing to mask."""
    local: GatherDecodeMetadata | None = None
    """The same for layers with a sliding window (None: the model has none)."""


@dataclass(frozen=True)
class PagedPrefillMetadata:
    block_tables: torch.Tensor
    query_offsets: torch.Tensor
    """[B] int64 flat-batch row of each sequence's first query."""
    query_lens: torch.Tensor
    """[B] int64 queries of each sequence, the last of its keys."""
    context_lens: torch.Tensor
    max_query_len: int
    """The most queries of one sequence (the Triton kernel's grid)."""


@dataclass(frozen=True)
class GatherPrefillMetadata:
    token_index: torch.Tensor
    """[B, Q] flat-batch rows of each sequence's queries (padding: 0)."""
    valid: torch.Tensor
    """[B, Q] bool, False on padding."""
    slots: torch.Tensor
    mask: torch.Tensor
    """[B, 1, Q, L] bool, True where a query may attend a key."""
    local_mask: torch.Tensor | None = None
    """The same within the sliding window (None: the model has none)."""


DecodeMetadata = PagedDecodeMetadata | GatherDecodeMetadata
PrefillMetadata = PagedPrefillMetadata | GatherPrefillMetadata


@dataclass(frozen=True)
class AttentionMetadata:
    """One step's attention inputs, shared by every layer."""

    slot_mapping: torch.Tensor
    """[T] cache slot (block * block_size + offset) each token's K/V is written to."""
    decode: DecodeMetadata | None
    prefill: PrefillMetadata | None
    decode_only: bool
    """Every token is one sequence's single decode query, in order: the decode group's
    queries are the flat batch itself (no gather of q, no scatter of the output)."""


class KernelDecode:
    name = "paged"

    def __init__(self, block_size: int, device: torch.device, window: int | None = None) -> None:
        self.block_size, self.device, self.window = block_size, device, window or 0

    def build(self, group: SequenceGroup) -> PagedDecodeMetadata:
        blocks = _blocks_needed(group, self.block_size)
        return PagedDecodeMetadata(
            rows=group.offsets.to(self.device),
            block_tables=group.block_tables[:, :blocks].contiguous().to(self.device),
            context_lens=(group.starts + group.num_new).to(self.device),
        )

    def forward(self, q: torch.Tensor, cache: KVCache, metadata: DecodeMetadata,
                scale: float, windowed: bool = False) -> torch.Tensor:
        """q: [B, H, D], one query per sequence -> [B, H * D]."""
        assert isinstance(metadata, PagedDecodeMetadata)
        return torch.ops.rillm.paged_decode_attention(
            q, cache.key, cache.value, metadata.block_tables, metadata.context_lens,
            cache.block_size, scale, self.window if windowed else 0)


class TorchDecode:
    name = "torch-gather"

    def __init__(self, block_size: int, dtype: torch.dtype, device: torch.device,
                 window: int | None = None) -> None:
        self.block_size, self.dtype, self.device = block_size, dtype, device
        self.window = window

    def build(self, group: SequenceGroup) -> GatherDecodeMetadata:
        metadata = self._build(group, None)
        if self.window is None:
            return metadata
        return replace(metadata, local=self._build(group, self.window))

    def _build(self, group: SequenceGroup, window: int | None) -> GatherDecodeMetadata:
        blocks = _blocks_needed(group, self.block_size)
        slots = _slots(group.block_tables[:, :blocks], self.block_size)
        # One decoding sequence: its keys are exactly its first slots (the window's last),
        # and the fused kernel needs no mask. Not in float32, the batch-invariant path: there
        # every decode row takes the same kernel whatever else is in the batch.
        if len(group.num_new) == 1 and self.dtype != torch.float32:
            end = int(group.starts[0]) + 1
            first = max(0, end - window) if window else 0
            return GatherDecodeMetadata(group.offsets.to(self.device),
                                        slots[first:end].to(self.device),
                                        torch.empty(0), single=True)
        key_pos = torch.arange(blocks * self.block_size)
        visible = key_pos[None, :] <= group.starts[:, None]  # [B, L]
        if window:
            visible &= key_pos[None, :] > group.starts[:, None] - window
        bias = torch.zeros(visible.shape, dtype=self.dtype).masked_fill_(~visible, float("-inf"))
        return GatherDecodeMetadata(group.offsets.to(self.device), slots.to(self.device),
                                    bias[None, :, None, :].to(self.device), single=False)

    def forward(self, q: torch.Tensor, cache: KVCache, metadata: DecodeMetadata,
                scale: float, windowed: bool = False) -> torch.Tensor:
        """q: [B, H, D], one query per sequence -> [B, H * D]."""
        assert isinstance(metadata, GatherDecodeMetadata)
        if windowed and metadata.local is not None:
            metadata = metadata.local
        batch, num_heads, dim = q.shape
        k, v = cache.gather(metadata.slots, batch)  # [Hkv, B, L, D]
        num_kv_heads = k.shape[0]
        if metadata.single:
            qh = q.view(num_kv_heads, 1, num_heads // num_kv_heads, dim)
            out = F.scaled_dot_product_attention(qh, k, v, scale=scale)  # [Hkv, 1, G, D]
            return out.reshape(1, num_heads * dim)
        qh = q.reshape(batch, num_kv_heads, num_heads // num_kv_heads, dim).transpose(0, 1)
        scores = torch.matmul(qh, k.transpose(-1, -2)).mul_(scale).add_(metadata.mask_bias)
        probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(v.dtype)  # [Hkv,B,G,L]
        return torch.matmul(probs, v).transpose(0, 1).reshape(batch, num_heads * dim)


class KernelPrefill:
    name = "paged"

    def __init__(self, block_size: int, device: torch.device, window: int | None = None) -> None:
        self.block_size, self.device, self.window = block_size, device, window or 0

    def build(self, group: SequenceGroup) -> PagedPrefillMetadata:
        blocks = _blocks_needed(group, self.block_size)
        return PagedPrefillMetadata(
            block_tables=group.block_tables[:, :blocks].contiguous().to(self.device),
            query_offsets=group.offsets.to(self.device),
            query_lens=group.num_new.to(self.device),
            context_lens=(group.starts + group.num_new).to(self.device),
            max_query_len=int(group.num_new.max()),
        )

    def forward(self, q: torch.Tensor, cache: KVCache, metadata: PrefillMetadata, scale: float,
                out: torch.Tensor, windowed: bool = False) -> None:
        """Writes the rows of `out` [T, H * D] of this group's queries (q: the flat batch)."""
        assert isinstance(metadata, PagedPrefillMetadata)
        torch.ops.rillm.paged_prefill_attention(
            q, cache.key, cache.value, metadata.block_tables, metadata.query_offsets,
            metadata.query_lens, metadata.context_lens, cache.block_size, scale, out,
            self.window if windowed else 0)


class TorchPrefill:
    name = "torch-sdpa"

    def __init__(self, block_size: int, device: torch.device, window: int | None = None) -> None:
        self.block_size, self.device, self.window = block_size, device, window

    def build(self, group: SequenceGroup) -> GatherPrefillMetadata:
        q_len = int(group.num_new.max())
        step = torch.arange(q_len)
        valid = step[None, :] < group.num_new[:, None]
        token_index = torch.where(valid, group.offsets[:, None] + step[None, :], 0)
        blocks = _blocks_needed(group, self.block_size)
        # Padding queries look at key 0 only, so no softmax row is empty.
        query_pos = torch.where(valid, group.starts[:, None] + step[None, :], 0)
        key_pos = torch.arange(blocks * self.block_size)
        mask = (key_pos[None, None, :] <= query_pos[:, :, None]).unsqueeze(1)
        local = None
        if self.window is not None:
            inside = key_pos[None, None, :] > query_pos[:, :, None] - self.window
            local = (mask & inside.unsqueeze(1)).to(self.device)
        return GatherPrefillMetadata(
            token_index.to(self.device), valid.to(self.device),
            _slots(group.block_tables[:, :blocks], self.block_size).to(self.device),
            mask.to(self.device), local)

    def forward(self, q: torch.Tensor, cache: KVCache, metadata: PrefillMetadata, scale: float,
                out: torch.Tensor, windowed: bool = False) -> None:
        assert isinstance(metadata, GatherPrefillMetadata)
        _, num_heads, dim = q.shape
        batch, q_len = metadata.token_index.shape
        k, v = cache.gather(metadata.slots, batch)  # [Hkv, B, L, D]
        num_kv_heads = k.shape[0]
        group_size = num_heads // num_kv_heads
        qg = q[metadata.token_index]  # [B, Q, H, D]
        # [B, Hkv, G*Q, D]: the G query heads of one KV head become extra query rows.
        qg = qg.view(batch, q_len, num_kv_heads, group_size, dim).permute(0, 2, 3, 1, 4)
        qg = qg.reshape(batch, num_kv_heads, group_size * q_len, dim)
        mask = metadata.mask
        if windowed and metadata.local_mask is not None:
            mask = metadata.local_mask
        mask = mask.repeat(1, 1, group_size, 1) if group_size > 1 else mask
        og = F.scaled_dot_product_attention(
            qg, k.transpose(0, 1), v.transpose(0, 1), attn_mask=mask, scale=scale)
        og = og.view(batch, num_kv_heads, group_size, q_len, dim).permute(0, 3, 1, 2, 4)
        og = og.reshape(batch, q_len, num_heads * dim)
        out[metadata.token_index[metadata.valid]] = og[metadata.valid]


class TritonDecode(KernelDecode):
    """rillm's Triton kernel (triton_paged.py): the block tables and lengths are read on the
    device, so the launch's shape is the batch's alone (CUDA graphs capture it)."""

    name = "triton"

    def __init__(self, block_size: int, device: torch.device, window: int | None = None) -> None:
        super().__init__(block_size, device, window)
        from rillm.attention import triton_paged

        self._decode = triton_paged.paged_decode

    def forward(self, q: torch.Tensor, cache: KVCache, metadata: DecodeMetadata,
                scale: float, windowed: bool = False) -> torch.Tensor:
        assert isinstance(metadata, PagedDecodeMetadata)
        return self._decode(q, cache.key, cache.value, metadata.block_tables,
                            metadata.context_lens, cache.block_size, scale,
                            self.window if windowed else 0)


class TritonPrefill(KernelPrefill):
    """rillm's Triton prefill kernel: each tile of queries against only the keys it sees."""

    name = "triton"

    def __init__(self, block_size: int, device: torch.device, window: int | None = None) -> None:
        super().__init__(block_size, device, window)
        from rillm.attention import triton_paged

        self._prefill = triton_paged.paged_prefill

    def forward(self, q: torch.Tensor, cache: KVCache, metadata: PrefillMetadata, scale: float,
                out: torch.Tensor, windowed: bool = False) -> None:
        assert isinstance(metadata, PagedPrefillMetadata)
        self._prefill(q, cache.key, cache.value, metadata.block_tables, metadata.query_offsets,
                      metadata.query_lens, metadata.context_lens, metadata.max_query_len,
                      cache.block_size, scale, out, self.window if windowed else 0)


DecodeBackend = KernelDecode | TorchDecode
PrefillBackend = KernelPrefill | TorchPrefill


class PagedAttention:
    """The hybrid the model runs: one decode backend, one prefill backend, chosen by the plan.
    The runner builds each step's metadata with `build`; every layer calls `forward`."""

    def __init__(self, decode: DecodeBackend, prefill: PrefillBackend) -> None:
        self.decode, self.prefill = decode, prefill

    @classmethod
    def for_plan(cls, plan: KernelPlan, block_size: int, dtype: torch.dtype,
                 device: torch.device, sliding_window: int | None = None) -> PagedAttention:
        """`sliding_window`: the keys a windowed layer's query sees (None: no layer is)."""
        window = sliding_window
        decode: DecodeBackend
        if plan.decode is DecodeAttention.TORCH:
            decode = TorchDecode(block_size, dtype, device, window)
        elif plan.decode is DecodeAttention.TRITON:
            decode = TritonDecode(block_size, device, window)
        else:
            decode = KernelDecode(block_size, device, window)
        prefill: PrefillBackend
        if plan.prefill is PrefillAttention.PAGED_AVX512BF16:
            prefill = KernelPrefill(block_size, device, window)
        elif plan.prefill is PrefillAttention.TRITON:
            prefill = TritonPrefill(block_size, device, window)
        else:
            prefill = TorchPrefill(block_size, device, window)
        return cls(decode, prefill)

    def build(self, slot_mapping: torch.Tensor, decodes: SequenceGroup | None,
              prefills: SequenceGroup | None) -> AttentionMetadata:
        return AttentionMetadata(
            slot_mapping,
            decode=None if decodes is None else self.decode.build(decodes),
            prefill=None if prefills is None else self.prefill.build(prefills),
            decode_only=prefills is None,
        )

    def forward(self, q: torch.Tensor, cache: KVCache, metadata: AttentionMetadata,
                scale: float, windowed: bool = False) -> torch.Tensor:
        """q: [T, num_heads, D] for the flat batch, whose K/V are already in `cache`.
        Returns [T, num_heads * D]. `windowed`: the layer has the sliding window."""
        if metadata.decode_only:
            assert metadata.decode is not None
            return self.decode.forward(q, cache, metadata.decode, scale, windowed)
        num_tokens, num_heads, dim = q.shape
        out = q.new_empty(num_tokens, num_heads * dim)
        if metadata.decode is not None:
            rows = metadata.decode.rows
            out[rows] = self.decode.forward(q[rows], cache, metadata.decode, scale, windowed)
        if metadata.prefill is not None:
            self.prefill.forward(q, cache, metadata.prefill, scale, out, windowed)
        return out


def _blocks_needed(group: SequenceGroup, block_size: int) -> int:
    return -(-int((group.starts + group.num_new).max()) // block_size)


def _slots(tables: torch.Tensor, block_size: int) -> torch.Tensor:
    """[B, blocks] -> [B * blocks * block_size] every slot of those blocks, in order."""
    return (tables[:, :, None] * block_size + torch.arange(block_size)).flatten()
