"""FusedDecode: a decode step's decoder layers, each as one C++ op (torch.ops.rillm.decode_layer).

At a few sequences a layer's ~30 Python-side calls cost about as much as its kernels; the op
calls rillm's kernels directly with the same roundings, so the logits are the same bit for bit
as the layer-by-layer path (tests/engine/test_gguf_default.py). It takes layers whose four
matmuls are on gguf_linear (`LinearMethod.packed`), bfloat16, with no q/k norms and no
biases; the model builds it only where every layer is so (`KernelPlan.fused_decode`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from rillm.attention import AttentionMetadata, KVCache
from rillm.attention.backends import PagedDecodeMetadata


@dataclass(frozen=True)
class FusedLayerWeights:
    input_norm: torch.Tensor
    post_norm: torch.Tensor
    matrices: list[list[torch.Tensor]]
    """The QKV, output, gate/up and down matrices, each as gguf_linear's packed parts."""

    def op_arguments(self) -> tuple[list[torch.Tensor], list[int]]:
        """decode_layer's `weights` and `parts`."""
        flat = [self.input_norm, self.post_norm, *(p for m in self.matrices for p in m)]
        return flat, [len(m) for m in self.matrices]


class FusedDecode:
    def __init__(self, layers: Sequence[FusedLayerWeights], scale: float, num_heads: int,
                 num_kv_heads: int, eps: float, window: int | None = None) -> None:
        """`window`: every layer's sliding window (None: none has one)."""
        self.layers = [layer.op_arguments() for layer in layers]
        self.shape = (scale, num_heads, num_kv_heads, eps, window or 0)
        self._op = torch.ops.rillm.decode_layer.default

    def __call__(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor],
                 caches: Sequence[KVCache], metadata: AttentionMetadata) -> torch.Tensor:
        decode = metadata.decode
        assert metadata.decode_only and isinstance(decode, PagedDecodeMetadata)
        cos, sin = rope
        scale, heads, kv_heads, eps, window = self.shape
        for (weights, parts), cache in zip(self.layers, caches, strict=True):
            x = self._op(x, weights, parts, cos, sin, cache.key, cache.value, metadata.slot_mapping,
                         decode.block_tables, decode.context_lens, cache.block_size, scale,
                         heads, kv_heads, eps, window)
        return x
