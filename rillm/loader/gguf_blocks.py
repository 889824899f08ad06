"""A GGUF matrix as the file stores it (blocks of quantized weights), and its exact dequantizer.

The loader hands these to the model builder, which picks how to multiply by them
(rillm/model/linear.py); the float32 reference path dequantizes them here.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

BLOCK_SIZE = 32
"""Weights per block (one scale d, and Q4_1's offset m): both formats read here hold 32."""

Q4_1 = "Q4_1"
Q8_0 = "Q8_0"
SUPPORTED_TYPES = (Q4_1, Q8_0)
"""The block formats kept as blocks; others are dequantized by the `gguf` package."""


@dataclass(frozen=True)
class GGUFBlocks:
    """A matrix as the file stores it: `rows` rows of GGUF blocks, `[rows, bytes_per_row]`
    uint8, rows in Hugging Face order (Linear `[out, in]`)."""

    type_name: str
    data: np.ndarray
    shape: tuple[int, int]


def parse_blocks(blocks: GGUFBlocks) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """-> (q [N, K], d [N, K/32] float16, m [N, K/32] float16 or None), as the file stores
    them: Q4_1's q as uint8 in [0, 16) with `w = d * q + m`, Q8_0's as int8 with `w = d * q`
    (m None)."""
    rows, cols = blocks.shape
    raw = np.ascontiguousarray(blocks.data).reshape(rows, cols // BLOCK_SIZE, -1)
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
    q, d, m = parse_blocks(blocks)
    rows, cols = blocks.shape
    values = torch.from_numpy(q).view(rows, -1, BLOCK_SIZE).float()
    values.mul_(torch.from_numpy(d).float().unsqueeze(-1))
    if m is not None:
        values.add_(torch.from_numpy(m).float().unsqueeze(-1))
    return values.view(rows, cols)
