"""The attention a model layer calls: rotary embedding, the K/V cache write, then the backend."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from rillm.attention.backends import AttentionMetadata, PagedAttention
from rillm.attention.kv_cache import KVCache


class Attention(nn.Module):
    """`Attention(q, k, v, rope, cache, metadata)` -> [T, num_heads * head_dim]: q and k rotated,
    k and v stored in the cache (every token's before attention reads it, which is what lets a
    request hit prefix blocks another request computes in the same step), then the step's
    backends over the paged cache."""

    def __init__(self, backend: PagedAttention, scale: float, rotary_cache_write: Any | None,
                 windowed: bool = False) -> None:
        super().__init__()
        self.backend = backend
        self.scale = scale
        self.windowed = windowed
        """Queries see only the backend's sliding window of keys (a local layer)."""
        self.ops = rotary_cache_write
        """The plan's fused ops, whose `rotary_cache_write` does the rotation and the write as
        one op, the same arithmetic (C++ on the CPU, Triton on CUDA); None: PyTorch's ops."""

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                rope: tuple[torch.Tensor, torch.Tensor], cache: KVCache,
                metadata: AttentionMetadata) -> torch.Tensor:
        """q: [T, heads, D]; k, v: [T, kv_heads, D]; rope: cos, sin [T, D]."""
        cos, sin = rope
        if self.ops is not None:
            q = self.ops.rotary_cache_write(
                q, k, v, cos, sin, cache.key, cache.value, metadata.slot_mapping)
        else:
            q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
            cache.write(metadata.slot_mapping, k, v)
        return self.backend.forward(q, cache, metadata, self.scale, self.windowed)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [T, H, D]; cos/sin: [T, D] (rotate-half layout)."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos[:, None, :] + rotated * sin[:, None, :]
