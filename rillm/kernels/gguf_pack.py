"""GGUF blocks in the layout rillm's gguf_linear reads (csrc/gguf_linear.cpp describes it).

`pack(decoded)`: a matrix's `(u, scale, offset)` (rillm/loader/gguf_blocks.py) as uint8
`[N / 16, K / 32, bytes a block]`: the outputs in groups of 16, per block of 32 inputs the
weights as vpdpbusd reads them (quad t of the block: inputs 4 t .. 4 t + 3, byte 4 * lane + j
of a 64-byte register the weight of output `lane` at input 4 t + j), then the constants.
"""

from __future__ import annotations

import functools

import numpy as np
import torch

from rillm.loader.gguf_blocks import BLOCK_SIZE, FORMATS, Decoded

LANES = 16
"""Outputs per group: a matrix kept as blocks has a multiple of it outputs."""

_KERNEL_ORDER = ("Q4_0", "Q4_1", "Q5_0", "Q8_0", "Q4_K", "Q5_K", "Q6_K")
"""The order of torch.ops.rillm.gguf_block_bytes()."""


def block_bytes(type_name: str) -> int:
    """Bytes of a packed block (16 outputs x 32 inputs) of the format."""
    fmt = FORMATS[type_name]
    weights = 512 if fmt.bits == 8 else 256 + 64 * (fmt.bits - 4)
    constant = (2 if fmt.half else 4) * LANES
    scales = constant * (BLOCK_SIZE // fmt.scale_group)
    return weights + scales + (constant if fmt.zero is None else 0)


@functools.cache
def check_layout() -> None:
    """The kernel and this module agree on every format's block size (the size names the
    format to the kernel)."""
    kernel = list(torch.ops.rillm.gguf_block_bytes())
    ours = [block_bytes(name) for name in _KERNEL_ORDER]
    if kernel != ours:
        raise RuntimeError(f"gguf_linear's block sizes {kernel} are not gguf_pack's {ours}")


def pack(decoded: Decoded) -> torch.Tensor:
    """The matrix packed for gguf_linear: uint8 `[N / 16, K / 32, block_bytes]`."""
    fmt = decoded.format
    rows, cols = decoded.u.shape
    if rows % LANES or cols % BLOCK_SIZE:
        raise ValueError(f"gguf_linear takes [N, K] with N a multiple of {LANES} and K of "
                         f"{BLOCK_SIZE}, got [{rows}, {cols}]")
    groups, blocks = rows // LANES, cols // BLOCK_SIZE
    u = torch.from_numpy(decoded.u)
    # [group, lane, block, quad, 4] -> [group, block, quad, lane, 4]: a quad's 64-byte register.
    quads = u.view(groups, LANES, blocks, 8, 4).permute(0, 2, 3, 1, 4)
    pieces = []
    if fmt.bits == 8:
        pieces.append(quads.reshape(groups, blocks, 512))
    else:
        low = quads & 0x0F
        pieces.append((low[:, :, 0::2] | (low[:, :, 1::2] << 4)).reshape(groups, blocks, 256))
        for bit in range(4, fmt.bits):
            pieces.append(_bit_plane(quads, bit).reshape(groups, blocks, 64))
    pieces.append(_per_lane(decoded.scale, groups, blocks))
    if decoded.offset is not None:
        pieces.append(_per_lane(decoded.offset, groups, blocks))
    packed = torch.cat(pieces, dim=-1).contiguous()
    assert packed.shape[-1] == block_bytes(fmt.name)
    return packed


def _bit_plane(quads: torch.Tensor, bit: int) -> torch.Tensor:
    """Bit `bit` of each quad's 64 weights as a little-endian 64-bit mask: [.., quad, 8]."""
    bits = ((quads >> bit) & 1).reshape(*quads.shape[:3], 8, 8)
    weights = torch.tensor([1 << i for i in range(8)], dtype=torch.uint8)
    return (bits * weights).sum(-1, dtype=torch.uint8)


def _per_lane(constants, groups: int, blocks: int) -> torch.Tensor:
    """[N, blocks * per_block] -> bytes [groups, blocks, per_block * 16 values]: per block,
    the 16 outputs' values for each of its scales."""
    values = torch.from_numpy(constants)
    per_block = values.shape[1] // blocks
    by_lane = values.view(groups, LANES, blocks, per_block).permute(0, 2, 3, 1).contiguous()
    return by_lane.view(groups, blocks, -1).view(torch.uint8)


def unpack_rows(packed: torch.Tensor, type_name: str, rows: torch.Tensor) -> Decoded:
    """Rows `rows` (int64 [n]) of a packed matrix back as (u, scale, offset): an embedding
    lookup on the blocks a tied lm_head already holds, with no other copy of the matrix."""
    fmt = FORMATS[type_name]
    n, blocks = rows.numel(), packed.shape[1]
    lane = (rows % LANES).view(n, 1, 1)
    picked = packed[rows // LANES]  # [n, blocks, bytes]
    select = torch.arange(n).view(n, 1, 1)

    def by_lane(data: torch.Tensor, width: int) -> torch.Tensor:
        # [n, blocks, k, 16 lanes, width] -> the row's lane: [n, blocks, k, width]
        shaped = data.reshape(n, blocks, -1, LANES, width)
        return shaped[select, torch.arange(blocks).view(1, -1, 1),
                      torch.arange(shaped.shape[2]).view(1, 1, -1), lane]

    if fmt.bits == 8:
        u = by_lane(picked[:, :, :512], 4)
        weight_bytes = 512
    else:
        nibbles = by_lane(picked[:, :, :256], 4)  # [n, blocks, 4 registers, 4]
        u = torch.stack((nibbles & 0x0F, nibbles >> 4), dim=3).reshape(n, blocks, 8, 4)
        shift = (4 * (lane % 2)).view(n, 1, 1, 1) + torch.arange(4).view(1, 1, 1, 4)
        for bit in range(4, fmt.bits):
            at = 256 + 64 * (bit - 4)
            plane = picked[:, :, at:at + 64].reshape(n, blocks, 8, 8)  # [.., quad, byte]
            byte = plane.gather(3, (lane // 2).view(n, 1, 1, 1).expand(n, blocks, 8, 1))
            u = u | (((byte.to(torch.int64) >> shift) & 1) << bit).to(torch.uint8)
        weight_bytes = 256 + 64 * (fmt.bits - 4)
    dtype = torch.float16 if fmt.half else torch.float32
    constant = (2 if fmt.half else 4) * LANES
    scale_bytes = constant * (BLOCK_SIZE // fmt.scale_group)

    def constants(at: int, size: int) -> np.ndarray:
        values = picked[:, :, at:at + size].contiguous().view(dtype)  # [n, blocks, k * 16]
        return by_lane(values, 1).reshape(n, -1).numpy()

    scale = constants(weight_bytes, scale_bytes)
    offset = None if fmt.zero is not None else constants(weight_bytes + scale_bytes, constant)
    return Decoded(fmt, u.reshape(n, -1).contiguous().numpy(), scale, offset)
