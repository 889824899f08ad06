"""FusedDecode: a decode step's decoder layers, each as one C++ op (torch.ops.rillm.decode_layer).

At a few sequences a layer's ~30 Python-side calls cost about as much as its kernels; the op
calls rillm's kernels directly with the same roundings, so the logits are the same bit for bit
as the layer-by-layer path (tests/engine/test_gguf_default.py). It takes layers whose four
matmuls are on gguf_linear (`LinearMethod.fused_weight`), bfloat16, with no q/k norms and no
biases; the model builds it only where every layer is so (`KernelPlan.fused_decode`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from rillm.attention import AttentionMetadata, KVCache
from rillm.attention.backends import PagedDecodeMetadata


class FusedDecode:
    def __init__(self, layers: Sequence[Sequence[torch.Tensor]], scale: float, num_heads: int,
                 num_kv_heads: int, eps: float) -> None:
        """`layers`: each layer's [input norm, qkv, o, post-attention norm, gate_up, down]
        weights, the matrices as gguf_linear's packed blocks."""
        self.layers = [list(weights) for weights in layers]
        self.shape = (scale, num_heads, num_kv_heads, eps)
        self._op = torch.ops.rillm.decode_layer.default

    def __call__(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor],
                 caches: Sequence[KVCache], metadata: AttentionMetadata) -> torch.Tensor:
        decode = metadata.decode
        assert metadata.decode_only and isinstance(decode, PagedDecodeMetadata)
        cos, sin = rope
        scale, heads, kv_heads, eps = self.shape
        for weights, cache in zip(self.layers, caches, strict=True):
            x = self._op(x, weights, cos, sin, cache.key, cache.value, metadata.slot_mapping,
                         decode.block_tables, decode.context_lens, cache.block_size, scale,
                         heads, kv_heads, eps)
        return x
