"""A GGUF matrix as the file stores it (blocks of quantized weights), decoded and dequantized.

The loader hands these to the model builder, which picks how to multiply by them
(rillm/model/linear.py); the float32 reference path dequantizes them here, bit for bit as
`gguf.quants.dequantize` does.

Every format kept as blocks is, per block of 32 weights (Q6_K: 16) of one row, unsigned
integers `u` with float constants: zero-point formats `w = a * (u - z)` (Q4_0, Q5_0, Q8_0,
Q6_K), offset formats `w = a * u + b` (Q4_1; Q4_K and Q5_K, whose `b` is `-dmin * m`).
`decode_blocks` turns the file's bytes into that form (the one rillm's kernel runs, and the
one llama.cpp's definitions of the formats give), `dequantize_blocks` into float32.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

BLOCK_SIZE = 32
"""Weights per block of the activations' int8 rounding (and of every format's constants but
Q6_K's two of 16): a matrix kept as blocks has a multiple of it inputs."""
SUPER_BLOCK = 256
"""Weights per K-quant super-block (one float16 d, dmin)."""

Q4_0, Q4_1, Q5_0, Q8_0 = "Q4_0", "Q4_1", "Q5_0", "Q8_0"
Q4_K, Q5_K, Q6_K = "Q4_K", "Q5_K", "Q6_K"


@dataclass(frozen=True)
class BlockFormat:
    name: str
    weights: int
    """Weights per block in the file."""
    nbytes: int
    """Bytes per block in the file."""
    bits: int
    """Of u."""
    zero: int | None
    """z of a zero-point format; None for an offset format."""
    scale_group: int
    """Weights per scale a (32, or 16 for Q6_K)."""
    half: bool
    """a and b are the file's float16 values (else float32, exact products of the file's)."""


FORMATS = {f.name: f for f in (
    BlockFormat(Q4_0, 32, 18, 4, 8, 32, True),
    BlockFormat(Q4_1, 32, 20, 4, None, 32, True),
    BlockFormat(Q5_0, 32, 22, 5, 16, 32, True),
    BlockFormat(Q8_0, 32, 34, 8, 128, 32, True),
    BlockFormat(Q4_K, 256, 144, 4, None, 32, False),
    BlockFormat(Q5_K, 256, 176, 5, None, 32, False),
    BlockFormat(Q6_K, 256, 210, 6, 32, 16, False),
)}
SUPPORTED_TYPES = tuple(FORMATS)
"""The block formats kept as blocks; others (Q2_K, Q3_K, the IQ formats, ...) are
dequantized by the `gguf` package at load."""


@dataclass(frozen=True)
class GGUFBlocks:
    """A matrix as the file stores it: `rows` rows of GGUF blocks, `[rows, bytes_per_row]`
    uint8 (often a view of the file's memory map), rows in Hugging Face order (Linear
    `[out, in]`)."""

    type_name: str
    data: np.ndarray
    shape: tuple[int, int]

    @property
    def format(self) -> BlockFormat:
        return FORMATS[self.type_name]

    def rows(self, index: np.ndarray | slice) -> GGUFBlocks:
        """The rows `index` alone (an embedding lookup's)."""
        data = self.data[index]
        return GGUFBlocks(self.type_name, data, (data.shape[0], self.shape[1]))


@dataclass(frozen=True)
class Decoded:
    """A matrix `[N, K]` as `w = scale * (u - zero)` or `w = scale * u + offset`."""

    format: BlockFormat
    u: np.ndarray
    """[N, K] uint8, in [0, 2^bits)."""
    scale: np.ndarray
    """[N, K / scale_group], float16 (half formats) or float32."""
    offset: np.ndarray | None
    """[N, K / 32] (offset formats; scale's dtype), None for a zero-point format."""


def decode_blocks(blocks: GGUFBlocks) -> Decoded:
    """The file's bytes as (u, scale, offset): exactly what the format defines, no rounding."""
    fmt = blocks.format
    rows, cols = blocks.shape
    if cols % fmt.weights:
        raise ValueError(f"a {fmt.name} row of {cols} weights is not whole blocks")
    raw = np.ascontiguousarray(blocks.data).reshape(rows, cols // fmt.weights, fmt.nbytes)
    decode = _DECODERS[fmt.name]
    u, scale, offset = decode(raw)
    return Decoded(fmt, u.reshape(rows, cols), scale.reshape(rows, -1),
                   None if offset is None else offset.reshape(rows, -1))


def _half(raw: np.ndarray, at: int) -> np.ndarray:
    """The float16 at byte `at` of every block: [N, blocks]."""
    return raw[:, :, at:at + 2].copy().view(np.float16)[..., 0]


def _nibbles(packed: np.ndarray) -> np.ndarray:
    """Bytes [..., n] -> [..., 2 n]: the low nibbles, then the high ones."""
    return np.concatenate((packed & 0x0F, packed >> 4), axis=-1)


def _decode_q4_0(raw):
    return _nibbles(raw[:, :, 2:18]), _half(raw, 0), None


def _decode_q4_1(raw):
    return _nibbles(raw[:, :, 4:20]), _half(raw, 0), _half(raw, 2)


def _decode_q5_0(raw):
    # Bit i of the little-endian 32-bit qh is the fifth bit of weight i.
    high = np.unpackbits(raw[:, :, 2:6], axis=-1, bitorder="little")
    return _nibbles(raw[:, :, 6:22]) | (high << 4), _half(raw, 0), None


def _decode_q8_0(raw):
    return raw[:, :, 2:34] ^ np.uint8(0x80), _half(raw, 0), None  # u = q + 128


def _k_scales(raw: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q4_K / Q5_K: the eight 6-bit sub-block scales and mins packed in 12 bytes (4..16)."""
    packed = raw[:, :, 4:16]
    low, mid, top = packed[..., 0:4], packed[..., 4:8], packed[..., 8:12]
    scales = np.concatenate((low & 0x3F, (top & 0x0F) | ((low >> 2) & 0x30)), axis=-1)
    mins = np.concatenate((mid & 0x3F, (top >> 4) | ((mid >> 2) & 0x30)), axis=-1)
    return scales, mins


def _k_constants(raw: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q4_K / Q5_K: per sub-block of 32, a = d * scale and b = -(dmin * min), float32 (exact:
    an 11-bit mantissa times a 6-bit integer)."""
    scales, mins = _k_scales(raw)
    d = _half(raw, 0).astype(np.float32)[..., None]
    dmin = _half(raw, 2).astype(np.float32)[..., None]
    return d * scales.astype(np.float32), -(dmin * mins.astype(np.float32))


def _decode_q4_k(raw):
    # 128 bytes: for each pair of sub-blocks, 32 bytes holding the first in their low
    # nibbles and the second in their high ones.
    qs = raw[:, :, 16:144].reshape(*raw.shape[:2], 4, 32)
    u = np.stack((qs & 0x0F, qs >> 4), axis=3)  # [N, blocks, pair, 2, 32]
    return u, *_k_constants(raw)


def _decode_q5_k(raw):
    qh = raw[:, :, 16:48]  # bit j of byte l: the fifth bit of weight l of sub-block j
    qs = raw[:, :, 48:176].reshape(*raw.shape[:2], 4, 32)
    low = np.stack((qs & 0x0F, qs >> 4), axis=3).reshape(*raw.shape[:2], 8, 32)
    shifts = np.arange(8, dtype=np.uint8).reshape(8, 1)
    high = (qh[:, :, None, :] >> shifts) & 1
    return low | (high << 4), *_k_constants(raw)


def _decode_q6_k(raw):
    # Per half of 128 weights: 64 bytes whose low nibbles are weights 0-63 and high nibbles
    # 64-127, then 32 bytes whose four 2-bit fields are the high bits of weights l, l + 32,
    # l + 64 and l + 96.
    n, blocks = raw.shape[:2]
    ql = raw[:, :, 0:128].reshape(n, blocks, 2, 1, 64)
    low = (ql >> np.array([0, 4], dtype=np.uint8).reshape(2, 1)) & 0x0F  # [.., 2, 2, 64]
    low = low.reshape(n, blocks, 2, 4, 32)
    qh = raw[:, :, 128:192].reshape(n, blocks, 2, 1, 32)
    high = (qh >> np.array([0, 2, 4, 6], dtype=np.uint8).reshape(4, 1)) & 0x03
    u = low | (high << 4)
    scales = raw[:, :, 192:208].view(np.int8).astype(np.float32)  # [N, blocks, 16]
    d = _half(raw, 208).astype(np.float32)[..., None]
    return u, d * scales, None


_DECODERS = {Q4_0: _decode_q4_0, Q4_1: _decode_q4_1, Q5_0: _decode_q5_0, Q8_0: _decode_q8_0,
             Q4_K: _decode_q4_k, Q5_K: _decode_q5_k, Q6_K: _decode_q6_k}


def dequantize_decoded(decoded: Decoded) -> torch.Tensor:
    """float32 [N, K]: `scale * (u - zero)` or `scale * u + offset`, each product and sum
    rounded to float32 once, the arithmetic `gguf.quants.dequantize` does (the same bits), on
    torch's threads."""
    fmt = decoded.format
    rows, cols = decoded.u.shape
    group = fmt.scale_group
    u = torch.from_numpy(decoded.u).view(rows, cols // group, group)
    scale = torch.from_numpy(decoded.scale).float().unsqueeze(-1)
    if fmt.zero is not None:
        values = u.to(torch.int16).sub_(fmt.zero).float().mul_(scale)
        return values.view(rows, cols)
    assert decoded.offset is not None
    values = u.float().mul_(scale).view(rows, cols // BLOCK_SIZE, BLOCK_SIZE)
    values.add_(torch.from_numpy(decoded.offset).float().unsqueeze(-1))
    return values.view(rows, cols)


def dequantize_blocks(blocks: GGUFBlocks) -> torch.Tensor:
    """The matrix as float32 `[N, K]`, equal to `gguf.quants.dequantize` bit for bit: the
    default model's 135M weights in ~0.3 s instead of ~1.2 s, which start-up waits for."""
    return dequantize_decoded(decode_blocks(blocks))
