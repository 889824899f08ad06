"""Linear layers and the ways they multiply: one method object per layer, chosen once.

`Linear` holds a `LinearMethod`; `make_linear` picks it from what the checkpoint has (dense
tensors, or a GGUF file's blocks) and from the process's `KernelPlan`:

- `Dense`: float32 / bfloat16 weights `[out, in]`, `F.linear`. The exact path
  (`quantization="none"`), Hugging Face directories, any device, and the one fallback for
  blocks no kernel here takes (logged once per format).
- `GGUFBlocksMethod`: the file's blocks (Q4_0, Q4_1, Q5_0, Q8_0, Q4_K, Q5_K, Q6_K; a fused
  matrix's parts may differ), the only copy, on rillm's `gguf_linear` with the activations
  rounded to int8 per block of 32 (a row's result does not depend on the batch). The CPU
  default where that kernel is vectorized (AVX-512 VNNI).
- `Int4Method`: Q4_1 / Q8_0 blocks as PyTorch int4 plus a oneDNN-packed bfloat16 copy, for a
  GGUF on a CPU without that kernel (or without rillm's kernels).

Adding a weight format is its decoder (rillm/loader/gguf_blocks.py), its layout
(rillm/kernels/gguf_pack.py) and its kernel; the fused decode layer (fused_decode.py) takes a
layer whose four methods all expose `packed`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Protocol

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from rillm.kernels.gguf_pack import LANES, pack
from rillm.kernels.plan import LinearKernel
from rillm.loader.gguf_blocks import (
    BLOCK_SIZE,
    Q4_1,
    Q8_0,
    SUPPORTED_TYPES,
    GGUFBlocks,
    decode_blocks,
)

logger = logging.getLogger(__name__)


class LinearMethod(Protocol):
    name: str
    out_features: int
    bias: torch.Tensor | None
    packed: list[torch.Tensor] | None
    """What torch.ops.rillm.decode_layer multiplies by (gguf_linear's packed blocks, one
    tensor a part), or None where the method is not one it runs."""

    def apply(self, x: torch.Tensor, out_dtype: torch.dtype | None = None) -> torch.Tensor:
        """`x [..., in]` (any float dtype) -> `x W^T + b` `[..., out]` in x's dtype, or in
        `out_dtype` (the lm_head's float32 logits: a method that can write them directly,
        unrounded, does, instead of a copy of the whole [rows, vocab] afterwards)."""
        ...


class Linear(nn.Module):
    def __init__(self, method: LinearMethod) -> None:
        super().__init__()
        self.method = method

    def forward(self, x: torch.Tensor, out_dtype: torch.dtype | None = None) -> torch.Tensor:
        return self.method.apply(x, out_dtype)

    def extra_repr(self) -> str:
        return f"{self.method.name}, out_features={self.method.out_features}"


class Dense:
    """`F.linear` on a float weight: the exact path whose results match transformers."""

    name = "dense"
    packed: list[torch.Tensor] | None = None

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        self.weight, self.bias = weight, bias
        self.out_features = weight.shape[0]

    def apply(self, x: torch.Tensor, out_dtype: torch.dtype | None = None) -> torch.Tensor:
        y = F.linear(x, self.weight, self.bias)
        return y if out_dtype is None else y.to(out_dtype)


class GGUFBlocksMethod:
    """rillm's `gguf_linear` on the file's blocks (each part of any supported format; every
    part's rows a multiple of 16): every number of rows, no other copy of the weights."""

    name = "gguf-vnni"

    def __init__(self, parts: Sequence[GGUFBlocks], bias: torch.Tensor | None,
                 packed: Sequence[torch.Tensor] | None = None) -> None:
        """`packed`: the parts already packed (rillm.kernels.gguf_pack.pack), if they are."""
        self._parts = list(packed) if packed is not None else [
            pack(decode_blocks(p)) for p in parts]
        self.packed: list[torch.Tensor] | None = self._parts
        self.in_features = parts[0].shape[1]
        self.out_features = sum(p.shape[0] for p in parts)
        self.bias = bias
        self._mm = torch.ops.rillm.gguf_linear.default  # the overload: resolved once

    @staticmethod
    def takes(parts: Sequence[GGUFBlocks]) -> bool:
        return all(p.type_name in SUPPORTED_TYPES and p.shape[0] % LANES == 0
                   and p.shape[1] % BLOCK_SIZE == 0 for p in parts)

    def apply(self, x: torch.Tensor, out_dtype: torch.dtype | None = None) -> torch.Tensor:
        lead = x.shape[:-1]
        dtype = out_dtype or x.dtype
        y = self._mm(x.reshape(-1, self.in_features).to(torch.bfloat16), self._parts,
                     dtype == torch.float32)
        y = y.to(dtype)
        if self.bias is not None:
            y = y + self.bias
        return y.view(*lead, self.out_features)


MAX_INT4_ROWS = 4
"""Int4Method: inputs with more rows than this use the packed bfloat16 copy. Measured crossover
(one thread, weights cold in cache as in a real step): 4-6 rows for every matrix of the default
model, the 49152-row lm_head included."""

_INNER_K_TILES = 2
_INT4_MM = torch.ops.aten._weight_int4pack_mm_for_cpu.default
"""The overload itself: calling the packet resolves it again on every call (~5 µs)."""
_PACKED_MM = torch.ops.mkldnn._linear_pointwise.default


class Int4Method:
    """Q4_1 / Q8_0 blocks on PyTorch's grouped-int4 kernel (`_weight_int4pack_mm_for_cpu`,
    bfloat16 activations) up to `MAX_INT4_ROWS` rows, a bfloat16 copy packed once for oneDNN
    above: for CPUs where gguf_linear has no vector path. The kernel takes `w = d * q + m`, q
    in [0, 16), per group of 32: Q4_1 as it is; Q8_0 (`w = d * q`, q in [-128, 128)) as q = 16
    hi + lo, i.e. `w = 16 d (hi + 8) - 128 d + d lo`, two int4 weights side by side along K
    (the input fed twice), exact in float16. Its (scale, zero) pairs are rounded to
    bfloat16."""

    name = "int4-torch"
    packed: list[torch.Tensor] | None = None
    TYPES = (Q4_1, Q8_0)

    def __init__(self, parts: Sequence[GGUFBlocks], dense: torch.Tensor,
                 bias: torch.Tensor | None) -> None:
        converted = [int4_weights(p) for p in parts]
        widths = {c[0].shape[1] for c in converted}
        if len(widths) != 1:
            raise ValueError("packed matrices must share one quantized input width")
        q = np.concatenate([c[0] for c in converted], axis=0)
        d = torch.from_numpy(np.concatenate([c[1] for c in converted], axis=0)).float()
        m = torch.from_numpy(np.concatenate([c[2] for c in converted], axis=0)).float()
        self.in_features, self.out_features = parts[0].shape[1], q.shape[0]
        self.duplicate_input = widths.pop() != self.in_features  # Q8_0: the input fed twice
        self.packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(
            torch.from_numpy(q.astype(np.int32)), _INNER_K_TILES)
        self.scales_and_zeros = (
            torch.stack((d, m + 8 * d), dim=-1).transpose(0, 1).contiguous().bfloat16()
        )  # [K'/32, N, 2]
        self.dense = BFloat16Weight(dense)
        self.bias = bias

    def apply(self, x: torch.Tensor, out_dtype: torch.dtype | None = None) -> torch.Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features).to(torch.bfloat16)
        if x2.shape[0] > MAX_INT4_ROWS:
            y = self.dense(x2)
        else:
            if self.duplicate_input:
                x2 = torch.cat((x2, x2), dim=-1)
            y = _INT4_MM(x2, self.packed, BLOCK_SIZE, self.scales_and_zeros)
        y = y.to(out_dtype or x.dtype)
        if self.bias is not None:
            y = y + self.bias
        return y.view(*lead, self.out_features)


def int4_weights(blocks: GGUFBlocks) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """-> (q [N, K'] uint8 in [0, 16), d [N, K'/32] float16, m [N, K'/32] float16) with
    `w = d * q + m` per group of 32; K' is K for Q4_1 and 2 K for Q8_0 (see Int4Method)."""
    decoded = decode_blocks(blocks)
    q, d, m = decoded.u, decoded.scale, decoded.offset
    if m is not None:  # Q4_1 as it is
        return q, d, m
    q8 = q.astype(np.int16) - 128  # Q8_0's u is q + 128
    hi, lo = ((q8 >> 4) + 8).astype(np.uint8), (q8 & 0x0F).astype(np.uint8)
    scale = np.concatenate((16 * d, d), axis=1)  # exact: powers of two
    low = np.concatenate((-128 * d, np.zeros_like(d)), axis=1)
    return np.concatenate((hi, lo), axis=1), scale, low


class BFloat16Weight:
    """A CPU weight `[out, in]` in bfloat16, packed once into oneDNN's blocked layout where
    PyTorch has oneDNN (plain otherwise; packed, a matmul skips the per-call reorder of the
    weights that `F.linear` does); called on a 2-D bfloat16 input `[rows, in]`."""

    def __init__(self, weight: torch.Tensor) -> None:
        plain = weight.to(torch.bfloat16, copy=True).contiguous()
        self.packed = torch.backends.mkldnn.is_available()
        self.weight = torch.ops.mkldnn._reorder_linear_weight(plain) if self.packed else plain

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed:
            return _PACKED_MM(x.contiguous(), self.weight, None, "none", [], "")
        return F.linear(x, self.weight)


def make_linear(kernel: LinearKernel, dense: Callable[[], torch.Tensor],
                bias: torch.Tensor | None, parts: Sequence[GGUFBlocks] | None,
                dtype: torch.dtype, device: torch.device,
                packed: Callable[[], Sequence[torch.Tensor]] | None = None) -> Linear:
    """The layer for one (fused) matrix: `parts` the GGUF blocks of its rows where the file has
    all of them and the plan keeps them (None: dense), `dense()` its float weights `[out, in]`
    (on the CPU; called only where the method needs them); `bias` already on the device in
    `dtype`; `packed()` the parts packed for gguf_linear where the caller keeps them. Blocks
    the plan's kernel cannot take run dense, logged once per format."""
    method: LinearMethod
    if parts is not None and kernel is LinearKernel.GGUF_VNNI and GGUFBlocksMethod.takes(parts):
        method = GGUFBlocksMethod(parts, bias, packed() if packed is not None else None)
    elif (parts is not None and kernel is LinearKernel.INT4_TORCH
          and all(p.type_name in Int4Method.TYPES for p in parts)):
        method = Int4Method(parts, dense(), bias)
    else:
        if parts is not None and kernel is not LinearKernel.DENSE:
            _log_dense_fallback(kernel, parts)
        # A fresh copy: loaders may hand out views of file buffers that are misaligned for the
        # matmul kernels (seen: 100x slower linear layers for batch > 1).
        weight = dense().to(device=device, dtype=dtype, copy=True).contiguous()
        method = Dense(weight, bias)
    return Linear(method)


_FALLBACKS_LOGGED: set[tuple[str, ...]] = set()


def _log_dense_fallback(kernel: LinearKernel, parts: Sequence[GGUFBlocks]) -> None:
    formats = tuple(sorted({p.type_name for p in parts}))
    if formats not in _FALLBACKS_LOGGED:
        _FALLBACKS_LOGGED.add(formats)
        shapes = ", ".join(f"{list(p.shape)}" for p in parts)
        logger.warning("%s blocks (%s) are not a format and shape the %s kernel takes "
                       "(outputs in 16s, inputs in 32s): dequantized to a dense copy (slower, "
                       "more memory)", "+".join(formats), shapes, kernel.value)
