"""Every attention backend, with the metadata it builds itself, against dense causal attention:
decodes and prefill chunks, alone and in one mixed step."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from rillm.attention import KVCache, PagedAttention, SequenceGroup
from rillm.attention.backends import KernelDecode, TorchDecode, TorchPrefill
from rillm.kernels import load_cpu_kernels

HEADS, KV_HEADS, DIM, BLOCK = 6, 2, 16, 4
CPU = torch.device("cpu")


def reference(q, keys, values, scale, window=0):
    """q: [Q, H, D] the last Q positions of keys/values [L, Hkv, D], causal (each query seeing
    its last `window` keys only, where set)."""
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


def attention_with(decode: str, dtype: torch.dtype) -> PagedAttention:
    """The PyTorch prefill backend beside the decode backend named `decode`."""
    if decode == "kernel":
        assert load_cpu_kernels(), "this machine has a C++ compiler: the kernels must build"
        return PagedAttention(KernelDecode(BLOCK, CPU), TorchPrefill(BLOCK, CPU))
    return PagedAttention(TorchDecode(BLOCK, dtype, CPU), TorchPrefill(BLOCK, CPU))


def make_step(dtype, sequences, gen, *, heads=HEADS, kv_heads=KV_HEADS, dim=DIM, block=BLOCK,
              device=CPU):
    """`sequences`: (keys, queries, block table) each; their K/V written to a cache on
    `device`, their queries laid out back to back -> (cache, q, per-sequence (k, v, q rows),
    groups); q, k and v on the CPU."""
    num_blocks = max(16, 1 + max(max(t) for _, _, t in sequences))
    cache = KVCache(num_blocks, block, kv_heads, dim, dtype, device)
    qs, expected_inputs, offset = [], [], 0
    for length, q_len, table in sequences:
        k = torch.randn(length, kv_heads, dim, generator=gen).to(dtype)
        v = torch.randn(length, kv_heads, dim, generator=gen).to(dtype)
        slots = torch.tensor([table[p // block] * block + p % block for p in range(length)])
        cache.write(slots.to(device), k.to(device), v.to(device))
        qs.append(torch.randn(q_len, heads, dim, generator=gen).to(dtype))
        expected_inputs.append((k, v, slice(offset, offset + q_len)))
        offset += q_len
    max_blocks = max(len(t) for _, _, t in sequences)
    tables = torch.tensor([t + [0] * (max_blocks - len(t)) for _, _, t in sequences])
    num_new = torch.tensor([q_len for _, q_len, _ in sequences])
    starts = torch.tensor([length for length, _, _ in sequences]) - num_new
    offsets = torch.cumsum(num_new, 0) - num_new

    def group(rows):
        return SequenceGroup(num_new[rows], starts[rows], offsets[rows], tables[rows])

    decode_rows, prefill_rows = num_new == 1, num_new > 1
    groups = (group(decode_rows) if decode_rows.any() else None,
              group(prefill_rows) if prefill_rows.any() else None)
    return cache, torch.cat(qs), expected_inputs, groups


def check(attention, dtype, sequences, seed=0):
    gen = torch.Generator().manual_seed(seed)
    cache, q, inputs, (decodes, prefills) = make_step(dtype, sequences, gen)
    metadata = attention.build(torch.zeros(len(q), dtype=torch.int64), decodes, prefills)
    assert metadata.decode_only == (prefills is None)
    out = attention.forward(q, cache, metadata, scale=DIM**-0.5)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    for k, v, rows in inputs:
        expected = reference(q[rows].float(), k.float(), v.float(), DIM**-0.5)
        torch.testing.assert_close(out[rows].float(), expected, rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("decode", ["torch", "kernel"])
def test_decodes_alone(dtype, decode):
    sequences = [(9, 1, [3, 7, 1]), (3, 1, [5, 6]), (13, 1, [0, 9, 2, 11])]
    check(attention_with(decode, dtype), dtype, sequences)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_prefill_chunks_alone(dtype):
    # Whole prompts and a later chunk of one (keys already cached before its queries).
    check(attention_with("torch", dtype), dtype,
          [(9, 3, [3, 7, 1]), (5, 5, [5, 6]), (13, 2, [0, 9, 2, 11])])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("decode", ["torch", "kernel"])
def test_a_mixed_step_puts_each_row_where_it_belongs(dtype, decode):
    sequences = [(9, 3, [3, 7, 1]), (6, 1, [5, 6]), (13, 4, [0, 9, 2, 11]), (11, 1, [4, 8, 10])]
    check(attention_with(decode, dtype), dtype, sequences, seed=1)


@pytest.mark.parametrize("mixed", [False, True])
def test_a_single_decoding_sequence_attends_all_its_keys_unmasked(mixed):
    """Outside float32 one decoding sequence gathers exactly its keys and runs SDPA with no
    mask, alone or beside a prefill group in a mixed step."""
    attention = attention_with("torch", torch.bfloat16)
    sequences = [(11, 1, [4, 8, 2])] + ([(7, 3, [1, 3])] if mixed else [])
    gen = torch.Generator().manual_seed(3)
    _, _, _, (decodes, _) = make_step(torch.bfloat16, sequences, gen)
    metadata = attention.decode.build(decodes)
    assert metadata.single and metadata.slots.numel() == 11
    check(attention, torch.bfloat16, sequences, seed=3)
