"""The paged KV cache: one layer's keys and values, head-major, on huge pages on the CPU."""

from __future__ import annotations

import math
import mmap

import torch


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
