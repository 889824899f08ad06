"""Linear layers that keep a GGUF file's quantized weights and multiply with them as they are.

On a CPU with AVX-512 VNNI and rillm's C++ kernels loaded, the default: rillm's
`gguf_linear` (csrc/gguf_linear.cpp) at every number of rows, on the file's own Q4_1 or Q8_0
blocks with each block of 32 activations rounded to int8 (the arithmetic llama.cpp runs these
files with); no other copy of the weights is kept. Its perplexity on the default model is
within 0.6% of the dequantized float32 model's (bench/perplexity.py;
tests/engine/test_int4_default.py).

Elsewhere (or with `quantization="int8"`, or `gguf_kernel=False`) a grouped-int4 kernel for
a few rows: rillm's own (`torch.ops.rillm.q4_linear`, csrc/q4_linear.cpp) where the CPU has
AVX-512 BF16, PyTorch's (`_weight_int4pack_mm_for_cpu`) otherwise. Both take bfloat16
activations and weights `w = d * q + m` with `q` in [0, 16), one (d, m) pair per group of 32
weights along K. Both GGUF formats of the default model map onto that:

- Q4_1 (`w = d * q + m`, q in [0, 16)) as it is.
- Q8_0 (`w = d * q`, q in [-128, 128)): q = 16 hi + lo with hi in [-8, 8) and lo in [0, 16),
  so `w = 16 d (hi + 8) - 128 d + d lo`: two int4 weights side by side along K (the input is fed
  twice), the first with (16 d, -128 d), the second with (d, 0), exact in float16.

rillm's kernel keeps d and m in float16 as the file does and sums in float32; PyTorch's rounds
its (scale, zero) = (d, m + 8 d) pairs to bfloat16. These kernels unpack the weights on every
call, so their cost grows with every row: they win while reading the weights from memory is
the cost. Above `MAX_INT4_ROWS` rows a bfloat16 copy of the dequantized weights is used
instead, packed once for oneDNN (`torch.ops.mkldnn._reorder_linear_weight`): packed, a
bfloat16 matmul skips the per-call reorder of the weights that `F.linear` does.

With `quantization="int8"` (opt-in: lossy beyond the file's own quantization) that copy is int8
instead (`Int8Weight`): the dequantized weights rounded to int8 with one scale per output row,
each input row rounded to int8 with its own scale on every call, an int8 matmul (VNNI).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from rillm.kernels import kernel_vectorized

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


def gguf_blocks(blocks: GGUFBlocks) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """-> (q [N, K], d [N, K/32] float16, m [N, K/32] float16 or None), as the file stores
    them: Q4_1's q as uint8 in [0, 16) with `w = d * q + m`, Q8_0's as int8 with `w = d * q`
    (m None)."""
    rows, cols = blocks.shape
    raw = np.ascontiguousarray(blocks.data).reshape(rows, cols // GROUP_SIZE, -1)
    d = raw[:, :, 0:2].copy().view(np.float16)[..., 0]  # [N, K/32]
    if blocks.type_name == Q4_1:
        m = raw[:, :, 2:4].copy().view(np.float16)[..., 0]
        packed = raw[:, :, 4:20]  # byte j: q[j] low nibble, q[j + 16] high nibble
        q = np.concatenate((packed & 0x0F, packed >> 4), axis=-1).reshape(rows, cols)
        return q, d, m
    if blocks.type_name == Q8_0:
        return raw[:, :, 2:34].copy().view(np.int8).reshape(rows, cols), d, None
    raise ValueError(f"GGUF type {blocks.type_name} is not supported")


def dequantize_blocks(blocks: GGUFBlocks) -> torch.Tensor:
    """The matrix as float32 [N, K], with gguf.quants.dequantize's arithmetic (`d * q`, then
    `+ m` for Q4_1, each rounded to float32: the same bits) on torch's threads: the default
    model's 135M weights in ~0.3 s instead of ~1.2 s, which start-up waits for."""
    q, d, m = gguf_blocks(blocks)
    rows, cols = blocks.shape
    values = torch.from_numpy(q).view(rows, -1, GROUP_SIZE).float()
    values.mul_(torch.from_numpy(d).float().unsqueeze(-1))
    if m is not None:
        values.add_(torch.from_numpy(m).float().unsqueeze(-1))
    return values.view(rows, cols)


def int4_weights(blocks: GGUFBlocks) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """-> (q [N, K'] uint8 in [0, 16), d [N, K'/32] float16, m [N, K'/32] float16) with
    `w = d * q + m` per group of 32; K' is K for Q4_1 and 2 K for Q8_0 (see the module
    docstring)."""
    if blocks.type_name not in SUPPORTED_TYPES:
        raise ValueError(f"GGUF type {blocks.type_name} has no int4 form")
    q, d, m = gguf_blocks(blocks)
    if m is not None:  # Q4_1 as it is
        return q, d, m
    q8 = q.astype(np.int16)
    hi, lo = ((q8 >> 4) + 8).astype(np.uint8), (q8 & 0x0F).astype(np.uint8)
    scale = np.concatenate((16 * d, d), axis=1)  # exact: powers of two
    low = np.concatenate((-128 * d, np.zeros_like(d)), axis=1)
    return np.concatenate((hi, lo), axis=1), scale, low


def gguf_kernel_available() -> bool:
    """rillm's gguf_linear is loaded and vectorized for this CPU (AVX-512 VNNI and BF16)."""
    return kernel_vectorized("gguf_linear")


def rillm_q4_available() -> bool:
    """rillm's q4_linear is loaded and vectorized for this CPU (else PyTorch's kernel is
    faster)."""
    return kernel_vectorized("q4_linear")


class Int4Linear(nn.Module):
    """`y = x W^T (+ b)` with W held as the GGUF file's blocks; x of any float dtype, y in x's
    dtype.

    With `gguf_kernel` (rillm's C++ kernels loaded, a CPU that vectorizes gguf_linear, all
    parts of one GGUF type, N a multiple of 16): `gguf_linear` for every number of rows, the
    only copy of the weights. Otherwise the int4 form for inputs of up to `max_int4_rows` rows
    and a oneDNN-packed bfloat16 copy, or int8 with `dense_int8`, above.

    Several GGUF matrices with the same input (Q, K and V; gate and up) may be packed into one
    by concatenating their rows: one kernel call instead of several. `rillm_kernel`: the caller
    has loaded rillm's C++ kernels; the int4 form uses rillm's q4_linear where this CPU
    vectorizes it and the shape suits it (K' a multiple of 64, N of 4)."""

    def __init__(
        self,
        parts: list[GGUFBlocks],
        dense: torch.Tensor,
        bias: torch.Tensor | None = None,
        max_int4_rows: int = MAX_INT4_ROWS,
        rillm_kernel: bool = False,
        dense_int8: bool = False,
        gguf_kernel: bool = True,
    ) -> None:
        """`dense`: the dequantized weights `[out, in]` (any float dtype), kept as bfloat16, or
        as int8 with `dense_int8`, where the int4 form needs a copy for many rows."""
        super().__init__()
        self.in_features = parts[0].shape[1]
        self.out_features = dense.shape[0]
        self.max_int4_rows = max_int4_rows
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        types = {p.type_name for p in parts}
        self.gguf: torch.Tensor | None = None
        """gguf_linear's packed blocks, where that kernel serves every row count."""
        if (gguf_kernel and rillm_kernel and not dense_int8 and len(types) == 1
                and self.out_features % 16 == 0 and self.in_features % GROUP_SIZE == 0
                and gguf_kernel_available()):
            self._pack_gguf(parts)
            return
        converted = [int4_weights(p) for p in parts]
        widths = {c[0].shape[1] for c in converted}
        if len(widths) != 1:
            raise ValueError("packed matrices must share one quantized input width")
        width = widths.pop()
        q = np.concatenate([c[0] for c in converted], axis=0)
        if q.shape[0] != self.out_features:
            raise ValueError("the blocks and the dense weights differ in rows")
        d = torch.from_numpy(np.concatenate([c[1] for c in converted], axis=0))
        m = torch.from_numpy(np.concatenate([c[2] for c in converted], axis=0))
        self.duplicate_input = width != self.in_features  # Q8_0: the input fed twice
        self.rillm_kernel = (rillm_kernel and rillm_q4_available() and width % 64 == 0
                             and self.out_features % 4 == 0)
        if self.rillm_kernel:
            self.q4_mm = torch.ops.rillm.q4_linear.default  # resolved once, as _INT4_MM
            self.packed = torch.ops.rillm.q4_pack(torch.from_numpy(q))
            self.scales, self.mins = d.contiguous(), m.contiguous()
        else:
            q32 = torch.from_numpy(q.astype(np.int32))
            self.packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q32, _INNER_K_TILES)
            zero = m.float() + 8 * d.float()
            self.scales_and_zeros = (
                torch.stack((d.float(), zero), dim=-1).transpose(0, 1).contiguous().bfloat16()
            )  # [K'/32, N, 2]
        self.dense: BFloat16Weight | Int8Weight | None = (
            Int8Weight(dense) if dense_int8 else BFloat16Weight(dense))

    def _pack_gguf(self, parts: list[GGUFBlocks]) -> None:
        converted = [gguf_blocks(p) for p in parts]
        q = torch.from_numpy(np.concatenate([c[0] for c in converted], axis=0))
        if q.shape[0] != self.out_features:
            raise ValueError("the blocks and the dense weights differ in rows")
        d = torch.from_numpy(np.concatenate([c[1] for c in converted], axis=0))
        if parts[0].type_name == Q4_1:
            m = torch.from_numpy(np.concatenate([c[2] for c in converted], axis=0))
            self.gguf = torch.ops.rillm.gguf_pack_q4_1(q, d, m)
        else:
            self.gguf = torch.ops.rillm.gguf_pack_q8_0(q, d)
        self.gguf_mm = torch.ops.rillm.gguf_linear.default  # resolved once, as _INT4_MM
        self.rillm_kernel, self.duplicate_input, self.dense = True, False, None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features).to(torch.bfloat16)
        if self.gguf is not None:
            y = self.gguf_mm(x2, self.gguf)
        elif x2.shape[0] > self.max_int4_rows:
            assert self.dense is not None
            y = self.dense(x2)
        else:
            if self.duplicate_input:
                x2 = torch.cat((x2, x2), dim=-1)
            if self.rillm_kernel:
                y = self.q4_mm(x2, self.packed, self.scales, self.mins)
            else:
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


ROTATION = 64
"""Int8Weight rotates the inputs of a layer whose width is a multiple of this by blocks of the
Hadamard matrix of this order (see csrc/int8_linear.cpp; kInt8Rotation in csrc/kernels.h is the
same rule for decode_layer)."""


def rotate_blocks(x: torch.Tensor) -> torch.Tensor:
    """Each block of 64 along the last dimension of float32 `x` times H_64 / 8 (orthonormal,
    symmetric): butterflies (a, b) -> (a + b, a - b) at strides 1, 2, ..., 32, the order of
    csrc/int8_linear.cpp's rotate64, so the same bits."""
    shape = x.shape
    for h in (1, 2, 4, 8, 16, 32):
        pairs = x.reshape(-1, ROTATION // (2 * h), 2, h)
        a, b = pairs[:, :, 0], pairs[:, :, 1]
        x = torch.stack((a + b, a - b), dim=2)
    return (x * 0.125).reshape(shape)


def quantize_rows_reference(x: torch.Tensor, rotate: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row of `x` (rotated by `rotate_blocks` with `rotate`) as int8 with its own scale:
    (q int8, scale float32 [rows]) with `x ~ q * scale`, scale = absmax / 127,
    q = round-half-even(x * (127 / absmax)) clamped to +-127; a row of zeros has scale 0. The
    rule of torch.ops.rillm.int8_quantize_rows (csrc/int8_linear.cpp), which gives the same
    bits."""
    x = x.float()
    if rotate:
        x = rotate_blocks(x)
    absmax = x.abs().amax(dim=-1)
    # 127 / absmax as a division: `127 / tensor` is reciprocal(tensor) * 127, another rounding.
    inverse = torch.where(absmax > 0, torch.full_like(absmax, 127.0) / absmax, 0.0)
    q = torch.round(x * inverse[:, None]).clamp(-127, 127).to(torch.int8)
    return q, absmax / 127


class Int8Weight:
    """A CPU weight `[out, in]` as int8 with a float32 scale per output row, called on a 2-D
    bfloat16 input: the input rows are quantized the same way on each call and
    `y = ((q_x q_w^T) * s_w) * s_x` is rounded to bfloat16. Where `in` is a multiple of
    `ROTATION` both sides are rotated first (`rotate_blocks`; the product is unchanged, the
    rounding error of the activations much smaller). On rillm's C++ kernel (`int8_linear`)
    where it is loaded, else the same arithmetic as PyTorch ops (same bits, several times
    slower)."""

    packed = True
    """Takes any number of rows (as BFloat16Weight.packed says of its oneDNN layout)."""

    def __init__(self, weight: torch.Tensor) -> None:
        self.rotate = weight.shape[1] % ROTATION == 0
        q, scales = quantize_rows_reference(weight, self.rotate)
        self.scales = scales.contiguous()
        self.kernel = _rillm_int8_linear()
        # Packed once into oneDNN's layout for its int8 matmul (as BFloat16Weight): unpacked,
        # every call reorders the whole matrix, as slow as the bfloat16 matmul it replaces.
        onednn = self.kernel is not None and torch.backends.mkldnn.is_available()
        self.weight = torch.ops.onednn.qlinear_prepack(q, None) if onednn else q.contiguous()
        # And a second copy for decode batches (up to 16 rows), in the layout of rillm's own
        # int8 matmul, which reads it near memory speed where oneDNN's reaches about half.
        out_features, in_features = q.shape
        self.few_rows = (torch.ops.rillm.int8_pack(q) if self.kernel is not None
                         and torch.ops.rillm.int8_pack_vectorized()
                         and out_features % 16 == 0 and in_features % 4 == 0 else None)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.kernel is not None:
            return self.kernel(x, self.weight, self.scales, self.rotate, self.few_rows)
        q, scales = quantize_rows_reference(x, self.rotate)
        acc = torch._int_mm(q, self.weight.t()) if q.shape[0] else q.new_zeros(
            (0, self.weight.shape[0]), dtype=torch.int32)
        return ((acc.float() * self.scales[None, :]) * scales[:, None]).to(x.dtype)


def _rillm_int8_linear():  # type: ignore[no-untyped-def]
    try:
        return torch.ops.rillm.int8_linear.default
    except (AttributeError, RuntimeError):
        return None
