"""Paged attention against a dense reference: the decode fast path and the prefill path."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from rillm.worker.attention import AttentionGroup, AttentionMetadata, KVCache, paged_attention

HEADS, KV_HEADS, DIM, BLOCK = 6, 2, 16, 4


def reference(q, keys, values, scale):
    """q: [Q, H, D] the last Q positions of keys/values [L, Hkv, D], causal."""
    group = HEADS // KV_HEADS
    k = keys.repeat_interleave(group, dim=1).transpose(0, 1)
    v = values.repeat_interleave(group, dim=1).transpose(0, 1)
    length, q_len = keys.shape[0], q.shape[0]
    mask = torch.arange(length)[None, :] <= torch.arange(length - q_len, length)[:, None]
    out = F.scaled_dot_product_attention(q.transpose(0, 1), k, v, attn_mask=mask, scale=scale)
    return out.transpose(0, 1).reshape(q_len, HEADS * DIM)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("q_len", [1, 3])
def test_paged_attention_matches_dense(dtype, q_len):
    gen = torch.Generator().manual_seed(0)
    lengths = [9, 2 + q_len, 13]
    cache = KVCache(16, BLOCK, KV_HEADS, DIM, dtype, torch.device("cpu"))
    tables = [[3, 7, 1], [5, 6], [0, 9, 2, 11]]
    max_blocks = max(len(t) for t in tables)
    padded = torch.tensor([t + [0] * (max_blocks - len(t)) for t in tables])
    seq_kv, qs, index, slot_all = [], [], [], []
    for b, (length, table) in enumerate(zip(lengths, tables, strict=True)):
        k = torch.randn(length, KV_HEADS, DIM, generator=gen).to(dtype)
        v = torch.randn(length, KV_HEADS, DIM, generator=gen).to(dtype)
        slots = torch.tensor([table[p // BLOCK] * BLOCK + p % BLOCK for p in range(length)])
        cache.write(slots, k, v)
        seq_kv.append((k, v))
        qs.append(torch.randn(q_len, HEADS, DIM, generator=gen).to(dtype))
        index.append(torch.arange(b * q_len, (b + 1) * q_len))
    num_keys = max_blocks * BLOCK
    key_pos = torch.arange(num_keys)
    query_pos = torch.tensor([[length - q_len + i for i in range(q_len)] for length in lengths])
    mask = (key_pos[None, None, :] <= query_pos[:, :, None]).unsqueeze(1)
    slot_all = (padded[:, :, None] * BLOCK + torch.arange(BLOCK)).flatten()
    bias = None
    if q_len == 1:
        bias = torch.zeros(len(lengths), num_keys, dtype=dtype).masked_fill(~mask[:, 0, 0],
                                                                             float("-inf"))
        bias = bias[None, :, None, :]
    group = AttentionGroup(torch.stack(index), torch.ones(len(lengths), q_len, dtype=torch.bool),
                           padded, mask, slot_all, bias)
    metadata = AttentionMetadata(torch.zeros(0, dtype=torch.int64), (group,))
    out = paged_attention(torch.cat(qs), cache, metadata, scale=DIM**-0.5)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    for b, (k, v) in enumerate(seq_kv):
        expected = reference(qs[b].float(), k.float(), v.float(), DIM**-0.5)
        torch.testing.assert_close(out[index[b]].float(), expected, rtol=tol, atol=tol)


@pytest.mark.parametrize("decode_only", [True, False])
def test_a_single_decoding_sequence_attends_all_its_keys_unmasked(decode_only):
    """One sequence's decode query, its slots exactly its keys (the fused-kernel path), alone
    or beside a prefill group in a mixed step."""
    gen = torch.Generator().manual_seed(3)
    dtype, length, table = torch.bfloat16, 11, [4, 8, 2]
    cache = KVCache(16, BLOCK, KV_HEADS, DIM, dtype, torch.device("cpu"))
    k = torch.randn(length, KV_HEADS, DIM, generator=gen).to(dtype)
    v = torch.randn(length, KV_HEADS, DIM, generator=gen).to(dtype)
    slots = torch.tensor([table[p // BLOCK] * BLOCK + p % BLOCK for p in range(length)])
    cache.write(slots, k, v)
    q = torch.randn(1, HEADS, DIM, generator=gen).to(dtype)
    group = AttentionGroup(torch.zeros(1, 1, dtype=torch.int64), torch.ones(1, 1, dtype=torch.bool),
                           torch.tensor([table]), torch.ones(1, 1, 1, length, dtype=torch.bool),
                           slots, unmasked=True)
    metadata = AttentionMetadata(torch.zeros(0, dtype=torch.int64), (group,), decode_only)
    out = paged_attention(q, cache, metadata, scale=DIM**-0.5)
    expected = reference(q.float(), k.float(), v.float(), DIM**-0.5)
    torch.testing.assert_close(out.float(), expected, rtol=2e-2, atol=2e-2)


def _mapping_of(address: int) -> dict[str, str]:
    """The /proc/self/smaps fields of the mapping that holds `address`."""
    fields: dict[str, str] = {}
    inside = False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split()[0]
        if "-" in head and not head.endswith(":"):
            low, high = (int(part, 16) for part in head.split("-"))
            inside = low <= address < high
        elif inside:
            key, _, value = line.partition(":")
            fields[key] = value.strip()
    return fields


@pytest.mark.skipif(not Path("/proc/self/smaps").exists(), reason="reads Linux's /proc")
def test_cpu_cache_is_zero_committed_as_used_and_asks_for_huge_pages():
    # 24 MiB a tensor: the cache must read as zeros, commit memory only where blocks are written,
    # and (where the kernel offers transparent huge pages) be eligible for them: decode attention
    # reads blocks scattered over the whole cache, and its speed relies on few TLB misses.
    cache = KVCache(4096, 16, 3, 64, torch.bfloat16, torch.device("cpu"))
    address = cache.key.data_ptr()
    assert address % (2 << 20) == 0
    assert not cache.key.any() and not cache.value.any()
    assert int(_mapping_of(address)["Rss"].split()[0]) < 4096  # KiB: untouched, only zero pages
    cache.key[:, :16] = 1.0  # one block of each head
    assert int(_mapping_of(address)["Rss"].split()[0]) <= 3 * 2048 + 4
    thp = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    if thp.exists() and "[never]" not in thp.read_text():
        assert _mapping_of(address)["THPeligible"] == "1"
    assert cache.key.sum().item() == 3 * 16 * 64
