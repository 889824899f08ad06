"""Paged attention in Triton: the GPU's decode and prefill kernels.

Both read each sequence's block table and length on the device and walk only the keys a query
sees, so a decode step's launch has the same shape whatever the sequences' lengths: it can be
captured once in a CUDA graph per batch size (rillm/worker/decode_graphs.py) and replayed.

- `paged_decode`: one program per (sequence, KV head); the KV head's query heads are rows of
  one tile, so each key is read once for its whole group. Keys are taken `KEYS` at a time
  (each key's block looked up in the table, so any block size works); an online softmax in
  float32 (the running maximum, sum and weighted values), then one division. A row depends on
  its own sequence only: the batch does not change its result.
- `paged_prefill`: one program per (sequence, query head, tile of `QUERIES` queries): the
  tile's scores as one matrix product against `KEYS` keys at a time, causal (and windowed)
  masks from positions, the same online softmax. Keys past the tile's last query are never
  read. The products take float32 inputs: IEEE for a float32 model (the path held to
  transformers), TF32 tensor cores otherwise (exact for bfloat16 and float16 inputs, whose
  mantissas fit TF32's; the softmax weights keep 10 bits instead of bfloat16's 7).

The kernels run on CUDA; `TRITON_INTERPRET=1` runs them on the CPU (numpy), which is how the
tests check them against PyTorch's attention on a machine with no GPU.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

KEYS = 16
"""Keys per iteration (tl.dot wants 16 at least on every side)."""
QUERIES = 16
"""Queries per prefill program."""


@triton.jit
def _decode_kernel(out_ptr, q_ptr, k_ptr, v_ptr, tables_ptr, lens_ptr, scale, window,
                   stride_qb, stride_qh, stride_ob, stride_kh, stride_ks, stride_tb,
                   GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, DIM: tl.constexpr,
                   DIM_PAD: tl.constexpr, BLOCK_SIZE: tl.constexpr, KEYS: tl.constexpr):
    seq = tl.program_id(0).to(tl.int64)  # offsets in int64: a layer's cache can pass 2**31
    kv_head = tl.program_id(1).to(tl.int64)
    length = tl.load(lens_ptr + seq)
    g = tl.arange(0, GROUP_PAD)
    d = tl.arange(0, DIM_PAD)
    heads = kv_head * GROUP + g
    row_ok = g < GROUP
    dim_ok = d < DIM
    q = tl.load(q_ptr + seq * stride_qb + heads[:, None] * stride_qh + d[None, :],
                mask=row_ok[:, None] & dim_ok[None, :], other=0.0).to(tl.float32)
    first = tl.where(window > 0, tl.maximum(length - window, 0), 0)
    m = tl.full((GROUP_PAD,), float("-inf"), tl.float32)
    total = tl.zeros((GROUP_PAD,), tl.float32)
    acc = tl.zeros((GROUP_PAD, DIM_PAD), tl.float32)
    k_base = k_ptr + kv_head * stride_kh
    v_base = v_ptr + kv_head * stride_kh
    for start in range(first - first % KEYS, length, KEYS):
        pos = start + tl.arange(0, KEYS)
        seen = (pos < length) & (pos >= first)
        block = tl.load(tables_ptr + seq * stride_tb + pos // BLOCK_SIZE, mask=seen, other=0)
        slots = block * BLOCK_SIZE + pos % BLOCK_SIZE
        kv_mask = seen[:, None] & dim_ok[None, :]
        k = tl.load(k_base + slots[:, None] * stride_ks + d[None, :], mask=kv_mask,
                    other=0.0).to(tl.float32)
        scores = tl.sum(q[:, None, :] * k[None, :, :], axis=2) * scale  # [GROUP_PAD, KEYS]
        scores = tl.where(seen[None, :], scores, float("-inf"))
        m_new = tl.maximum(m, tl.max(scores, axis=1))
        p = tl.exp(scores - m_new[:, None])
        alpha = tl.exp(m - m_new)
        total = total * alpha + tl.sum(p, axis=1)
        v = tl.load(v_base + slots[:, None] * stride_ks + d[None, :], mask=kv_mask,
                    other=0.0).to(tl.float32)
        acc = acc * alpha[:, None] + tl.sum(p[:, :, None] * v[None, :, :], axis=1)
        m = m_new
    out = acc / total[:, None]
    tl.store(out_ptr + seq * stride_ob + heads[:, None] * DIM + d[None, :],
             out.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & dim_ok[None, :])


@triton.jit
def _prefill_kernel(out_ptr, q_ptr, k_ptr, v_ptr, tables_ptr, offsets_ptr, qlens_ptr,
                    lens_ptr, scale, window,
                    stride_qt, stride_qh, stride_ot, stride_kh, stride_ks, stride_tb,
                    GROUP: tl.constexpr, DIM: tl.constexpr, DIM_PAD: tl.constexpr,
                    BLOCK_SIZE: tl.constexpr, KEYS: tl.constexpr, QUERIES: tl.constexpr,
                    PRECISION: tl.constexpr):
    seq = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1).to(tl.int64)
    tile = tl.program_id(2)
    q_len = tl.load(qlens_ptr + seq)
    length = tl.load(lens_ptr + seq)
    row0 = tl.load(offsets_ptr + seq)
    i = tile * QUERIES + tl.arange(0, QUERIES)
    q_ok = i < q_len
    q_pos = length - q_len + i  # each query's position
    d = tl.arange(0, DIM_PAD)
    dim_ok = d < DIM
    q = tl.load(q_ptr + (row0 + i)[:, None] * stride_qt + head * stride_qh + d[None, :],
                mask=q_ok[:, None] & dim_ok[None, :], other=0.0).to(tl.float32)
    kv_head = head // GROUP
    k_base = k_ptr + kv_head * stride_kh
    v_base = v_ptr + kv_head * stride_kh
    # Keys up to the tile's last query (none where the tile lies past this sequence's queries).
    end = tl.minimum(length - q_len + tile * QUERIES + QUERIES, length)
    end = tl.where(tile * QUERIES < q_len, end, 0)
    first = tl.where(window > 0, tl.maximum(length - q_len + tile * QUERIES - window + 1, 0), 0)
    m = tl.full((QUERIES,), float("-inf"), tl.float32)
    total = tl.zeros((QUERIES,), tl.float32)
    acc = tl.zeros((QUERIES, DIM_PAD), tl.float32)
    for start in range(first - first % KEYS, end, KEYS):
        pos = start + tl.arange(0, KEYS)
        inside = pos < end
        block = tl.load(tables_ptr + seq * stride_tb + pos // BLOCK_SIZE, mask=inside, other=0)
        slots = block * BLOCK_SIZE + pos % BLOCK_SIZE
        kv_mask = inside[:, None] & dim_ok[None, :]
        k = tl.load(k_base + slots[:, None] * stride_ks + d[None, :], mask=kv_mask,
                    other=0.0).to(tl.float32)
        scores = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale
        seen = (pos[None, :] <= q_pos[:, None]) & inside[None, :]
        seen = seen & ((pos[None, :] > q_pos[:, None] - window) | (window == 0))
        scores = tl.where(seen, scores, float("-inf"))
        m_new = tl.maximum(m, tl.max(scores, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row that saw no key yet
        p = tl.exp(scores - m_safe[:, None])
        alpha = tl.exp(m - m_safe)
        total = total * alpha + tl.sum(p, axis=1)
        v = tl.load(v_base + slots[:, None] * stride_ks + d[None, :], mask=kv_mask,
                    other=0.0).to(tl.float32)
        acc = acc * alpha[:, None] + tl.dot(p, v, input_precision=PRECISION)
        m = m_new
    out = acc / tl.where(total == 0.0, 1.0, total)[:, None]
    tl.store(out_ptr + (row0 + i)[:, None] * stride_ot + head * DIM + d[None, :],
             out.to(out_ptr.dtype.element_ty), mask=q_ok[:, None] & dim_ok[None, :])


def paged_decode(q: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
                 block_tables: torch.Tensor, context_lens: torch.Tensor, block_size: int,
                 scale: float, window: int = 0) -> torch.Tensor:
    """q: [B, H, D], one query per sequence, the last of its `context_lens` keys; caches
    [Hkv, slots, D]; block_tables [B, blocks]. `window` > 0: each query sees its last `window`
    keys only. -> [B, H * D] in q's dtype."""
    batch, num_heads, dim = q.shape
    num_kv_heads = key_cache.shape[0]
    group = num_heads // num_kv_heads
    q = _last_dim_contiguous(q)
    out = q.new_empty(batch, num_heads * dim)
    if batch == 0:
        return out
    group_pad, dim_pad = triton.next_power_of_2(group), triton.next_power_of_2(dim)
    _decode_kernel[(batch, num_kv_heads)](
        out, q, key_cache, value_cache, block_tables, context_lens, scale, window,
        q.stride(0), q.stride(1), out.stride(0), key_cache.stride(0), key_cache.stride(1),
        block_tables.stride(0),
        GROUP=group, GROUP_PAD=group_pad, DIM=dim, DIM_PAD=dim_pad, BLOCK_SIZE=block_size,
        KEYS=KEYS, num_warps=8 if group_pad * dim_pad > 512 else 4)  # tiles of [G, KEYS, D]
    return out


def paged_prefill(q: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
                  block_tables: torch.Tensor, query_offsets: torch.Tensor,
                  query_lens: torch.Tensor, context_lens: torch.Tensor, max_query_len: int,
                  block_size: int, scale: float, out: torch.Tensor, window: int = 0) -> None:
    """Writes the rows of `out` [T, H * D] of each sequence's queries: q is the flat batch
    [T, H, D]; sequence b's `query_lens[b]` queries start at row `query_offsets[b]` and are
    the last of its `context_lens[b]` keys."""
    _, num_heads, dim = q.shape
    num_kv_heads = key_cache.shape[0]
    batch = block_tables.shape[0]
    q = _last_dim_contiguous(q)
    if batch == 0 or max_query_len == 0:
        return
    grid = (batch, num_heads, triton.cdiv(max_query_len, QUERIES))
    _prefill_kernel[grid](
        out, q, key_cache, value_cache, block_tables, query_offsets, query_lens,
        context_lens, scale, window,
        q.stride(0), q.stride(1), out.stride(0), key_cache.stride(0), key_cache.stride(1),
        block_tables.stride(0),
        GROUP=num_heads // num_kv_heads, DIM=dim, DIM_PAD=max(16, triton.next_power_of_2(dim)),
        BLOCK_SIZE=block_size, KEYS=KEYS, QUERIES=QUERIES,
        PRECISION="ieee" if q.dtype == torch.float32 else "tf32")


def _last_dim_contiguous(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()
