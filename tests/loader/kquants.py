"""A GGUF quantizer for tests: float32 matrices to the bytes of every block format rillm keeps.

Q4_0 / Q4_1 / Q5_0 / Q8_0 come from `gguf.quants.quantize` (llama.cpp's reference). The
`gguf` package has no K-quant quantizer, so Q4_K / Q5_K / Q6_K are written here from the
formats' definitions (ggml's block_q4_K / block_q5_K / block_q6_K): a plain min-max fit, not
llama.cpp's searched one — what matters to a test is that the bytes are valid blocks that
`gguf.quants.dequantize` reads back close to the input (tests/loader/test_kquants.py).
"""

from __future__ import annotations

import gguf
import numpy as np

T = gguf.GGMLQuantizationType


def quantize(values: np.ndarray, qtype: T) -> np.ndarray:
    """`values` [N, K] float32 -> the file's bytes [N, bytes per row] uint8."""
    values = np.ascontiguousarray(values, dtype=np.float32)
    if qtype in (T.Q4_K, T.Q5_K, T.Q6_K):
        rows, cols = values.shape
        assert cols % 256 == 0, "K-quants take rows of whole 256-weight super-blocks"
        blocks = values.reshape(-1, 256)
        encode = {T.Q4_K: _q4_k, T.Q5_K: _q5_k, T.Q6_K: _q6_k}[qtype]
        return encode(blocks).reshape(rows, -1)
    return gguf.quants.quantize(values, qtype)


def _half(x: np.ndarray) -> np.ndarray:
    return x.astype(np.float16).view(np.uint8).reshape(*x.shape[:-1], -1)


def _fit_min_max(blocks: np.ndarray, levels: int):
    """Per sub-block of 32: 6-bit scales and mins under float16 super-block d / dmin, and the
    integers u with w ~ d * sc * u - dmin * m."""
    sub = blocks.reshape(-1, 8, 32)
    low = np.minimum(sub.min(-1), 0.0)
    scale = (sub.max(-1) - low) / levels
    d = (scale.max(-1, keepdims=True) / 63).astype(np.float16)
    dmin = (-low.min(-1, keepdims=True) / 63).astype(np.float16)
    with np.errstate(divide="ignore", invalid="ignore"):
        sc = np.where(d > 0, np.rint(scale / d.astype(np.float32)), 0).clip(0, 63)
        m = np.where(dmin > 0, np.rint(-low / dmin.astype(np.float32)), 0).clip(0, 63)
        a = d.astype(np.float32) * sc
        b = dmin.astype(np.float32) * m
        u = np.where(a[..., None] > 0, np.rint((sub + b[..., None]) / a[..., None]), 0)
    u = u.clip(0, levels).astype(np.uint8)
    return d, dmin, sc.astype(np.uint8), m.astype(np.uint8), u


def _pack_scales(sc: np.ndarray, m: np.ndarray) -> np.ndarray:
    """Eight 6-bit scales and mins into 12 bytes: bytes 0-3 and 4-7 hold sub-blocks 0-3's
    (and the top two bits of 4-7's), bytes 8-11 the low four bits of 4-7's."""
    out = np.empty((*sc.shape[:-1], 12), dtype=np.uint8)
    out[..., 0:4] = (sc[..., :4] & 0x3F) | ((sc[..., 4:] >> 4) << 6)
    out[..., 4:8] = (m[..., :4] & 0x3F) | ((m[..., 4:] >> 4) << 6)
    out[..., 8:12] = (sc[..., 4:] & 0x0F) | ((m[..., 4:] & 0x0F) << 4)
    return out


def _low_nibbles(u: np.ndarray) -> np.ndarray:
    """[n, 8, 32] -> 128 bytes: sub-blocks 2p and 2p + 1 as the nibbles of bytes 32p..32p+31."""
    pairs = (u & 0x0F).reshape(-1, 4, 2, 32)
    return (pairs[:, :, 0] | (pairs[:, :, 1] << 4)).reshape(-1, 128)


def _q4_k(blocks: np.ndarray) -> np.ndarray:
    d, dmin, sc, m, u = _fit_min_max(blocks, 15)
    return np.concatenate((_half(d), _half(dmin), _pack_scales(sc, m), _low_nibbles(u)), -1)


def _q5_k(blocks: np.ndarray) -> np.ndarray:
    d, dmin, sc, m, u = _fit_min_max(blocks, 31)
    high = (u >> 4) & 1  # [n, 8 sub-blocks, 32]: bit j of byte l is sub-block j's weight l
    qh = (high << np.arange(8, dtype=np.uint8)[:, None]).sum(1, dtype=np.uint8)
    return np.concatenate((_half(d), _half(dmin), _pack_scales(sc, m), qh, _low_nibbles(u)),
                          -1)


def _q6_k(blocks: np.ndarray) -> np.ndarray:
    sub = blocks.reshape(-1, 16, 16)
    scale = np.abs(sub).max(-1) / 31
    d = (scale.max(-1, keepdims=True) / 127).astype(np.float16)
    with np.errstate(divide="ignore", invalid="ignore"):
        sc = np.where(d > 0, np.rint(scale / d.astype(np.float32)), 0).clip(-128, 127)
        a = d.astype(np.float32) * sc
        q = np.where(a[..., None] > 0, np.rint(sub / a[..., None]), 0)
    u = (q.clip(-32, 31) + 32).astype(np.uint8).reshape(-1, 2, 4, 32)  # [n, half, quarter, l]
    # Per half: ql[l] = quarter 0 | quarter 2 << 4, ql[32 + l] = quarter 1 | quarter 3 << 4;
    # qh[l] = the top two bits of quarters 0..3 at 0, 2, 4, 6.
    low = u & 0x0F
    ql = np.concatenate((low[:, :, 0] | (low[:, :, 2] << 4), low[:, :, 1] | (low[:, :, 3] << 4)),
                        -1)
    top = u >> 4
    qh = top[:, :, 0] | (top[:, :, 1] << 2) | (top[:, :, 2] << 4) | (top[:, :, 3] << 6)
    return np.concatenate((ql.reshape(-1, 128), qh.reshape(-1, 64),
                           sc.astype(np.int8).view(np.uint8), _half(d)), -1)
