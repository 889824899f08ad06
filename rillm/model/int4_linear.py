"""Linear layers that keep a GGUF file's quantized weights and multiply with PyTorch's CPU
grouped-int4 kernel (`_weight_int4pack_mm_for_cpu`).

The kernel dequantizes each weight as `(q - 8) * scale + zero` with `q` in [0, 16), one
(scale, zero) pair per group of 32 weights along K, in bfloat16, and takes bfloat16
activations. Both GGUF formats of the default model map onto it:

- Q4_1 (`w = d * q + m`, q in [0, 16)): scale = d, zero = m + 8 d.
- Q8_0 (`w = d * q`, q in [-128, 128)): q = 16 hi + lo with hi in [-8, 8) and lo in [0, 16),
  so `w = (hi + 8 - 8) * 16 d + (lo - 8) * d + 8 d`: two int4 weights side by side along K
  (the input is fed twice), exact but for d rounded to bfloat16 (16 d and 8 d round alike).

The only loss against the dequantized float32 weights is d and m rounded to bfloat16 and the
activations rounded to bfloat16 at the kernel's input (bench/perplexity.py measures it).

The kernel unpacks the weights on every call, so its cost grows with every row: it wins while
reading the weights from memory is the cost, a quarter of the bytes of bfloat16. Above
`MAX_INT4_ROWS` rows a bfloat16 copy of the dequantized weights is used instead, packed once for
oneDNN (`torch.ops.mkldnn._reorder_linear_weight`): packed, a bfloat16 matmul skips the
per-call reorder of the weights that `F.linear` does, and is 1.1-2x faster than it at 6-128 rows.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

GROUP_SIZE = 32
"""Weights per (scale, zero) pair: both GGUF block formats used here hold 32."""
_INNER_K_TILES = 2
MAX_INT4_ROWS = 4
"""Inputs with more rows than this use the packed bfloat16 weights. Measured crossover (one
thread, AVX-512 BF16, weights cold in cache as in a real step): 4-6 rows for every matrix of the
default model, the 49152-row lm_head included."""

_INT4_MM = torch.ops.aten._weight_int4pack_mm_for_cpu.default
"""The overload itself: calling the packet resolves it again on every call (~5 µs, 121 calls a
decode step)."""
_PACKED_MM = torch.ops.mkldnn._linear_pointwise.default

Q4_1 = "Q4_1"
Q8_0 = "Q8_0"
SUPPORTED_TYPES = (Q4_1, Q8_0)


@dataclass(frozen=True)
class GGUFBlocks:
    """A matrix as the file stores it: `rows` rows of GGUF blocks, `[rows, bytes_per_row]`
    uint8, rows in Hugging Face order (Linear `[out, in]`)."""

    type_name: str
    data: np.ndarray
    shape: tuple[int, int]


def int4_weights(blocks: GGUFBlocks) -> tuple[torch.Tensor, torch.Tensor, int]:
    """-> (q [N, K'] int32 in [0, 16), scales_and_zeros [K'/32, N, 2] float32, K') for the
    kernel; K' is K for Q4_1 and 2 K for Q8_0 (see the module docstring)."""
    rows, cols = blocks.shape
    nblocks = cols // GROUP_SIZE
    raw = np.ascontiguousarray(blocks.data).reshape(rows, nblocks, -1)
    d = raw[:, :, 0:2].copy().view(np.float16)[..., 0].astype(np.float32)  # [N, K/32]
    if blocks.type_name == Q4_1:
        m = raw[:, :, 2:4].copy().view(np.float16)[..., 0].astype(np.float32)
        packed = raw[:, :, 4:20]  # byte j: q[j] low nibble, q[j + 16] high nibble
        q = np.concatenate((packed & 0x0F, packed >> 4), axis=-1).reshape(rows, cols)
        scale, zero = d, m + 8 * d
    elif blocks.type_name == Q8_0:
        q8 = raw[:, :, 2:34].copy().view(np.int8).astype(np.int16)  # [N, K/32, 32]
        # Nibbles fit a byte: int32 only once, at the end (the lm_head is 28M weights).
        hi, lo = ((q8 >> 4) + 8).astype(np.uint8), (q8 & 0x0F).astype(np.uint8)
        q = np.concatenate((hi.reshape(rows, cols), lo.reshape(rows, cols)), axis=1)
        scale = np.concatenate((16 * d, d), axis=1)
        zero = np.concatenate((np.zeros_like(d), 8 * d), axis=1)
    else:
        raise ValueError(f"GGUF type {blocks.type_name} has no int4 form")
    scales_and_zeros = np.stack((scale, zero), axis=-1).transpose(1, 0, 2)  # [K'/32, N, 2]
    return (
        torch.from_numpy(q.astype(np.int32, copy=False)),
        torch.from_numpy(np.ascontiguousarray(scales_and_zeros)),
        q.shape[1],
    )


class Int4Linear(nn.Module):
    packed: torch.Tensor
    scales_and_zeros: torch.Tensor

    """`y = x W^T (+ b)` with W held as packed int4 groups (for inputs of up to `max_int4_rows`
    rows) and as oneDNN-packed bfloat16 (above); x of any float dtype, y in x's dtype.

    Several GGUF matrices with the same input (Q, K and V; gate and up) may be packed into one
    by concatenating their rows: one kernel call instead of several."""

    def __init__(
        self,
        parts: list[GGUFBlocks],
        dense: torch.Tensor,
        bias: torch.Tensor | None = None,
        max_int4_rows: int = MAX_INT4_ROWS,
    ) -> None:
        """`dense`: the dequantized weights `[out, in]` (any float dtype; kept as bfloat16)."""
        super().__init__()
        self.in_features = parts[0].shape[1]
        self.out_features = dense.shape[0]
        self.max_int4_rows = max_int4_rows
        converted = [int4_weights(p) for p in parts]
        widths = {k for _, _, k in converted}
        if len(widths) != 1:
            raise ValueError("packed matrices must share one quantized input width")
        q = torch.cat([c[0] for c in converted], dim=0)
        if q.shape[0] != self.out_features:
            raise ValueError("the blocks and the dense weights differ in rows")
        self.duplicate_input = widths.pop() != self.in_features  # Q8_0: the input fed twice
        self.packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, _INNER_K_TILES)
        self.scales_and_zeros = torch.cat([c[1] for c in converted], dim=1).bfloat16()
        self.dense = BFloat16Weight(dense)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features).to(torch.bfloat16)
        if x2.shape[0] > self.max_int4_rows:
            y = self.dense(x2)
        else:
            if self.duplicate_input:
                x2 = torch.cat((x2, x2), dim=-1)
            y = _INT4_MM(x2, self.packed, GROUP_SIZE, self.scales_and_zeros)
        y = y.to(x.dtype)
        if self.bias is not None:
            y = y + self.bias
        return y.view(*lead, self.out_features)


class BFloat16Weight:
    """A CPU weight `[out, in]` in bfloat16, packed once into oneDNN's blocked layout where
    PyTorch has oneDNN (plain otherwise); called on a 2-D bfloat16 input `[rows, in]`."""

    def __init__(self, weight: torch.Tensor) -> None:
        plain = weight.to(torch.bfloat16, copy=True).contiguous()
        self.packed = torch.backends.mkldnn.is_available()
        self.weight = torch.ops.mkldnn._reorder_linear_weight(plain) if self.packed else plain

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed:
            return _PACKED_MM(x.contiguous(), self.weight, None, "none", [], "")
        return F.linear(x, self.weight)
