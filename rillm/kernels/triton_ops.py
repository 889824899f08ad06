"""The fused ops on a GPU, in Triton: what rillm's C++ ops are on the CPU, with their signatures.

A decode step of a small model is hundreds of tiny kernels; PyTorch spends eight on an RMSNorm,
a dozen on the rotary embedding and the cache write, three on SiLU(gate) * up. These do each
in one, which is most of what a CUDA graph then replays:

- `rms_norm(x, weight, eps)`: weight * (x * rsqrt(mean(x^2) + eps)), normalised in float32,
  rounded to x's dtype before the weight's multiply, as PyTorch's path (the squares' sum is
  ordered otherwise and the square root and division are a few float32 ulps from PyTorch's,
  so the float32 path keeps PyTorch's); `add_rms_norm(x, residual,
  weight, eps)` adds the residual first and returns the sum too (a layer's second norm);
- `rms_norm_scaled(x, scale, eps)`: Gemma's, (x * rsqrt(...)) * scale all in float32, one
  rounding; x [rows, dim] or [a, b, dim] with a dense last dimension;
- `silu_mul(gate_up)`, `gelu_tanh_mul(gate_up)`: act(gate) * up of [T, 2I] -> [T, I], one
  rounding;
- `rotary_cache_write(q, k, v, cos, sin, key_cache, value_cache, slot_mapping)`: rotate q and
  k (rotate-half), write k and v to their cache slots, return q rotated; each product and the
  sum rounded to the dtype as PyTorch rounds them, no fused multiply-add: bit for bit the
  PyTorch path, float32 included.

Checked against the PyTorch path on the CPU in Triton's interpreter (tests/kernels/
test_triton_ops.py) and on a GPU by bench/cuda_check.sh.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rms_norm_kernel(x_ptr, w_ptr, out_ptr, inner, stride_outer, stride_inner, eps, dim,
                     SCALED: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    src = x_ptr + (row // inner) * stride_outer + (row % inner) * stride_inner
    d = tl.arange(0, BLOCK)
    ok = d < dim
    x = tl.load(src + d, mask=ok, other=0.0).to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / dim + eps)
    w = tl.load(w_ptr + d, mask=ok, other=0.0).to(tl.float32)
    if SCALED:
        y = (x * rstd) * w
    else:  # rounded to the dtype, then the weight's multiply rounded again
        y = (x * rstd).to(out_ptr.dtype.element_ty).to(tl.float32) * w
    tl.store(out_ptr + row * dim + d, y.to(out_ptr.dtype.element_ty), mask=ok)


def _norm(x: torch.Tensor, weight: torch.Tensor, eps: float, scaled: bool) -> torch.Tensor:
    assert x.stride(-1) == 1 and x.dim() in (2, 3)
    dim = x.shape[-1]
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    rows = out.numel() // dim
    if rows == 0:
        return out
    inner = x.shape[1] if x.dim() == 3 else 1
    stride_inner = x.stride(1) if x.dim() == 3 else 0
    _rms_norm_kernel[(rows,)](x, weight, out, inner, x.stride(0), stride_inner, eps, dim,
                              SCALED=scaled, BLOCK=triton.next_power_of_2(dim))
    return out


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return _norm(x, weight, eps, scaled=False)


@triton.jit
def _add_rms_norm_kernel(x_ptr, r_ptr, w_ptr, out_ptr, sum_ptr, eps, dim,
                         BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    d = tl.arange(0, BLOCK)
    ok = d < dim
    dtype = out_ptr.dtype.element_ty
    x = tl.load(x_ptr + row * dim + d, mask=ok, other=0.0).to(tl.float32)
    r = tl.load(r_ptr + row * dim + d, mask=ok, other=0.0).to(tl.float32)
    h = (x + r).to(dtype)  # the residual stream, rounded as PyTorch's add rounds it
    tl.store(sum_ptr + row * dim + d, h, mask=ok)
    h32 = h.to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(h32 * h32, axis=0) / dim + eps)
    w = tl.load(w_ptr + d, mask=ok, other=0.0).to(tl.float32)
    y = (h32 * rstd).to(dtype).to(tl.float32) * w
    tl.store(out_ptr + row * dim + d, y.to(dtype), mask=ok)


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                 eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """h = x + residual, and rms_norm(h): (normalised, h), one kernel instead of two."""
    assert x.dim() == 2 and x.is_contiguous() and residual.is_contiguous()
    rows, dim = x.shape
    out, total = torch.empty_like(x), torch.empty_like(x)
    if rows:
        _add_rms_norm_kernel[(rows,)](x, residual, weight, out, total, eps, dim,
                                      BLOCK=triton.next_power_of_2(dim))
    return out, total


def rms_norm_scaled(x: torch.Tensor, scale: torch.Tensor, eps: float) -> torch.Tensor:
    return _norm(x, scale, eps, scaled=True)


@triton.jit
def _act_mul_kernel(gate_up_ptr, out_ptr, width, stride_row, GELU: tl.constexpr,
                    BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = cols < width
    gate = tl.load(gate_up_ptr + row * stride_row + cols, mask=ok, other=0.0).to(tl.float32)
    up = tl.load(gate_up_ptr + row * stride_row + width + cols, mask=ok,
                 other=0.0).to(tl.float32)
    if GELU:  # tanh approximation: 0.5 g (1 + tanh(a)) = g * sigmoid(2a)
        a = 0.7978845608028654 * (gate + 0.044715 * gate * gate * gate)
        act = gate / (1.0 + tl.exp(-2.0 * a))
    else:
        act = gate / (1.0 + tl.exp(-gate))
    tl.store(out_ptr + row * width + cols, (act * up).to(out_ptr.dtype.element_ty), mask=ok)


def _act_mul(gate_up: torch.Tensor, gelu: bool) -> torch.Tensor:
    assert gate_up.dim() == 2 and gate_up.stride(-1) == 1
    rows, width = gate_up.shape[0], gate_up.shape[1] // 2
    out = torch.empty(rows, width, dtype=gate_up.dtype, device=gate_up.device)
    if rows:
        block = min(1024, triton.next_power_of_2(width))
        _act_mul_kernel[(rows, triton.cdiv(width, block))](
            gate_up, out, width, gate_up.stride(0), GELU=gelu, BLOCK=block)
    return out


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    return _act_mul(gate_up, gelu=False)


def gelu_tanh_mul(gate_up: torch.Tensor) -> torch.Tensor:
    return _act_mul(gate_up, gelu=True)


@triton.jit
def _rotary_cache_kernel(q_ptr, k_ptr, v_ptr, cos_ptr, sin_ptr, kc_ptr, vc_ptr, slots_ptr,
                         q_out_ptr, num_heads, stride_qt, stride_qh, stride_kt, stride_kh,
                         stride_vt, stride_vh, stride_ct, stride_st, stride_ch, stride_cs,
                         HALF: tl.constexpr, HALF_PAD: tl.constexpr):
    token = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1).to(tl.int64)  # q heads first, then the KV heads
    d = tl.arange(0, HALF_PAD)
    ok = d < HALF
    dtype = q_out_ptr.dtype.element_ty
    c1 = tl.load(cos_ptr + token * stride_ct + d, mask=ok, other=0.0).to(tl.float32)
    c2 = tl.load(cos_ptr + token * stride_ct + HALF + d, mask=ok, other=0.0).to(tl.float32)
    s1 = tl.load(sin_ptr + token * stride_st + d, mask=ok, other=0.0).to(tl.float32)
    s2 = tl.load(sin_ptr + token * stride_st + HALF + d, mask=ok, other=0.0).to(tl.float32)
    if head < num_heads:
        src = q_ptr + token * stride_qt + head * stride_qh
    else:
        src = k_ptr + token * stride_kt + (head - num_heads) * stride_kh
    x1 = tl.load(src + d, mask=ok, other=0.0).to(tl.float32)
    x2 = tl.load(src + HALF + d, mask=ok, other=0.0).to(tl.float32)
    # PyTorch's roundings: x * cos and rotate_half(x) * sin each to the dtype, then their
    # sum (each op in float32, exact for the dtype's operands, then rounded).
    y1 = ((x1 * c1).to(dtype).to(tl.float32) + (-x2 * s1).to(dtype).to(tl.float32)).to(dtype)
    y2 = ((x2 * c2).to(dtype).to(tl.float32) + (x1 * s2).to(dtype).to(tl.float32)).to(dtype)
    if head < num_heads:
        dst = q_out_ptr + (token * num_heads + head) * (2 * HALF)
        tl.store(dst + d, y1, mask=ok)
        tl.store(dst + HALF + d, y2, mask=ok)
    else:
        kv_head = head - num_heads
        slot = tl.load(slots_ptr + token)
        dst = kc_ptr + kv_head * stride_ch + slot * stride_cs
        tl.store(dst + d, y1, mask=ok)
        tl.store(dst + HALF + d, y2, mask=ok)
        v_src = v_ptr + token * stride_vt + kv_head * stride_vh
        v_dst = vc_ptr + kv_head * stride_ch + slot * stride_cs
        tl.store(v_dst + d, tl.load(v_src + d, mask=ok, other=0.0), mask=ok)
        tl.store(v_dst + HALF + d, tl.load(v_src + HALF + d, mask=ok, other=0.0), mask=ok)


def rotary_cache_write(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor,
                       sin: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
                       slot_mapping: torch.Tensor) -> torch.Tensor:
    """q [T, H, D], k and v [T, Hkv, D] (dense last dimension), cos and sin [T, D] -> q
    rotated [T, H, D]; k rotated and v written to `slot_mapping`'s slots of the caches
    [Hkv, slots, D]."""
    tokens, num_heads, dim = q.shape
    num_kv_heads = k.shape[1]
    assert dim % 2 == 0 and q.stride(2) == k.stride(2) == v.stride(2) == 1
    assert key_cache.is_contiguous() and value_cache.is_contiguous()
    q_out = torch.empty(tokens, num_heads, dim, dtype=q.dtype, device=q.device)
    if tokens == 0:
        return q_out
    half = dim // 2
    _rotary_cache_kernel[(tokens, num_heads + num_kv_heads)](
        q, k, v, cos, sin, key_cache, value_cache, slot_mapping, q_out, num_heads,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        cos.stride(0), sin.stride(0), key_cache.stride(0), key_cache.stride(1),
        HALF=half, HALF_PAD=triton.next_power_of_2(half), enable_fp_fusion=False)
    return q_out
