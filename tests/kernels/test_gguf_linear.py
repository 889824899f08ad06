"""rillm's gguf_linear: activations rounded to int8 per block of 32 times a GGUF file's blocks
(Q4_0, Q4_1, Q5_0, Q8_0, Q4_K, Q5_K, Q6_K). The rounding of x is checked bit for bit against
its definition, the product against the same integer arithmetic in float64 (up to the
output's rounding to bfloat16), the weights against gguf's own dequantizer."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch

from rillm.kernels import load_cpu_kernels
from rillm.kernels.gguf_pack import check_layout, pack
from rillm.loader.gguf_blocks import SUPPORTED_TYPES, GGUFBlocks, decode_blocks
from tests.loader.kquants import quantize


@pytest.fixture(scope="module", autouse=True)
def kernels():
    assert load_cpu_kernels(), "this machine has a C++ compiler: the kernels must build"
    check_layout()


def _matrix(fmt: str, n: int, k: int, seed: int = 0) -> GGUFBlocks:
    """A matrix of weights like a model's (rows and columns of different scales) in `fmt`."""
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((n, k)) * rng.random((n, 1)) * rng.random(k) * 0.1
    w[:, :32] += 0.02  # a block whose weights are all positive: the offset formats' m > 0
    data = quantize(w.astype(np.float32), gguf.GGMLQuantizationType[fmt])
    return GGUFBlocks(fmt, data, (n, k))


def _activations(rows, k, seed=1):
    gen = torch.Generator().manual_seed(seed)
    # Channels of very different scales, as a model's activations have.
    return (torch.randn(rows, k, generator=gen) * torch.rand(k, generator=gen) * 4).bfloat16()


def quantize_reference(x):
    """Each block of 32 of a row: q = round-half-even(x * (127 / absmax)), scale absmax / 127."""
    blocks = x.float().view(x.shape[0], -1, 32)
    absmax = blocks.abs().amax(-1)
    inverse = torch.where(absmax > 0, torch.full_like(absmax, 127.0) / absmax, 0.0)
    q = torch.round(blocks * inverse[..., None]).clamp(-127, 127).to(torch.int8)
    return q.view(x.shape), absmax / 127


def product_reference(x, blocks: GGUFBlocks):
    """The kernel's arithmetic in float64: (y, the sum of the absolute values of its terms).
    Per scale group g of a block: a * s * (sum u qx - z sum qx), or a * s * sum u qx plus
    b * s * sum qx (the block's sum as rounded)."""
    decoded = decode_blocks(blocks)
    fmt = decoded.format
    n, k = decoded.u.shape
    group = fmt.scale_group
    xq, scales = quantize_reference(x)
    xg = xq.double().view(-1, k // group, group)
    u = torch.from_numpy(decoded.u).double().view(n, k // group, group)
    dot = torch.einsum("rgi,ngi->rng", xg, u)
    sums = xg.sum(-1)  # [rows, groups]
    s = scales.double().repeat_interleave(32 // group, 1)  # x's scale of each group
    a = torch.from_numpy(decoded.scale.astype(np.float64))
    if fmt.zero is not None:
        terms = (dot - fmt.zero * sums[:, None, :]) * a[None] * s[:, None, :]
    else:
        b = torch.from_numpy(decoded.offset.astype(np.float64))
        terms = dot * a[None] * s[:, None, :] + b[None] * (sums * s)[:, None, :]
    return terms.sum(-1), terms.abs().sum(-1)


def test_quantize_blocks_gives_the_definitions_bits():
    x = _activations(9, 576)
    x[2, 32:64] = 0  # a block of zeros: scale 0, all zeros
    q, scales, sums, q_sums, half_sums = torch.ops.rillm.q8_quantize_blocks(x)
    q_ref, scales_ref = quantize_reference(x)
    assert q.dtype == torch.int8 and torch.equal(q, q_ref)
    assert torch.equal(scales, scales_ref)
    assert scales[2, 1] == 0 and not q[2, 32:64].any()
    assert torch.equal(half_sums, q_ref.view(9, -1, 16).sum(-1, dtype=torch.int32))
    assert torch.equal(q_sums, q_ref.view(9, -1, 32).sum(-1, dtype=torch.int32))
    assert torch.equal(sums, q_sums.float() * scales)
    # Every non-zero block reaches the int8 range's end.
    assert (q.view(9, -1, 32).abs().amax(-1)[scales > 0] == 127).all()


def test_quantize_rounds_half_to_even():
    # absmax 127: the values are their own scaled values, ties included.
    row = torch.tensor([127.0, 63.5, -63.5, 0.5, 1.5, 2.5, -2.5, 3.0], dtype=torch.bfloat16)
    x = torch.nn.functional.pad(row, (0, 24)).view(1, 32)
    q, scales, *_ = torch.ops.rillm.q8_quantize_blocks(x)
    assert q[0, :8].tolist() == [127, 64, -64, 0, 2, 2, -2, 3]
    assert scales.item() == pytest.approx(1.0)


@pytest.mark.parametrize("fmt", SUPPORTED_TYPES)
def test_decoded_blocks_are_what_gguf_dequantizes(fmt):
    """decode_blocks reads the file's bytes as gguf's reference does (the packed kernel layout
    is built from it)."""
    blocks = _matrix(fmt, 32, 512)
    decoded = decode_blocks(blocks)
    reference = gguf.quants.dequantize(blocks.data, gguf.GGMLQuantizationType[fmt])
    group = decoded.format.scale_group
    a = np.repeat(decoded.scale.astype(np.float64), group, axis=1)
    if decoded.format.zero is not None:
        w = a * (decoded.u.astype(np.float64) - decoded.format.zero)
    else:
        w = a * decoded.u + np.repeat(decoded.offset.astype(np.float64), 32, axis=1)
    assert decoded.u.max() < 2 ** decoded.format.bits
    np.testing.assert_allclose(w, reference.reshape(w.shape), rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("fmt", SUPPORTED_TYPES)
@pytest.mark.parametrize(("n", "k"), [(96, 512), (16, 256)])
@pytest.mark.parametrize("rows", [1, 3, 8, 9, 33])
def test_gguf_linear_is_its_arithmetic_up_to_the_outputs_rounding(fmt, n, k, rows):
    blocks = _matrix(fmt, n, k)
    x = _activations(rows, k)
    y = torch.ops.rillm.gguf_linear(x, [pack(decode_blocks(blocks))])
    assert y.dtype == torch.bfloat16 and y.shape == (rows, n)
    expected, magnitude = product_reference(x, blocks)
    # The output's rounding to bfloat16 (at most 2^-8 relative) and float32 sums.
    bound = 2**-8 * expected.abs() + 1e-6 * magnitude
    assert ((y.double() - expected).abs() <= bound).all()


@pytest.mark.parametrize("fmt", SUPPORTED_TYPES)
@pytest.mark.parametrize("rows", [1, 3, 8, 33])
def test_float_out_is_the_same_sums_unrounded(fmt, rows):
    """The lm_head's float32 logits: the sums before their rounding to bfloat16, so within
    float32's error of the reference and, rounded, the bfloat16 result bit for bit."""
    blocks = _matrix(fmt, 96, 512)
    packed = pack(decode_blocks(blocks))
    x = _activations(rows, 512)
    y = torch.ops.rillm.gguf_linear(x, [packed], float_out=True)
    assert y.dtype == torch.float32 and y.shape == (rows, 96)
    expected, magnitude = product_reference(x, blocks)
    assert ((y.double() - expected).abs() <= 1e-6 * magnitude).all()
    assert torch.equal(y.bfloat16(), torch.ops.rillm.gguf_linear(x, [packed]))


def test_parts_of_different_formats_are_one_matrix():
    """A Q4_K_M file's fused QKV: parts of other formats, each its own rows of the output."""
    formats = ["Q4_K", "Q6_K", "Q5_0", "Q8_0"]
    parts = [_matrix(fmt, 32 * (i + 1), 512, seed=i) for i, fmt in enumerate(formats)]
    x = _activations(5, 512)
    fused = torch.ops.rillm.gguf_linear(x, [pack(decode_blocks(p)) for p in parts])
    alone = [torch.ops.rillm.gguf_linear(x, [pack(decode_blocks(p))]) for p in parts]
    assert torch.equal(fused, torch.cat(alone, dim=1))


@pytest.mark.parametrize("fmt", SUPPORTED_TYPES)
def test_each_row_is_computed_alone(fmt):
    packed = pack(decode_blocks(_matrix(fmt, 64, 512)))
    x = _activations(19, 512, seed=2)
    batch = torch.ops.rillm.gguf_linear(x, [packed])
    alone = torch.cat([torch.ops.rillm.gguf_linear(x[i : i + 1], [packed]) for i in range(19)])
    assert torch.equal(batch, alone)


@pytest.mark.parametrize("fmt", SUPPORTED_TYPES)
def test_close_to_the_dequantized_weights(fmt):
    """What the rounding of x costs against the exact product of the file's weights (gguf's
    dequantizer): under a percent."""
    blocks = _matrix(fmt, 64, 1536)
    w = gguf.quants.dequantize(blocks.data, gguf.GGMLQuantizationType[fmt]).reshape(64, 1536)
    x = _activations(12, 1536, seed=3)
    exact = x.double() @ torch.from_numpy(w).double().T
    y = torch.ops.rillm.gguf_linear(x, [pack(decode_blocks(blocks))]).double()
    assert (y - exact).norm() / exact.norm() < 1e-2


def test_zero_rows_and_bad_input_raise_clearly():
    packed = pack(decode_blocks(_matrix("Q4_1", 32, 64)))
    assert torch.ops.rillm.gguf_linear(torch.zeros(0, 64).bfloat16(), [packed]).shape == (0, 32)
    with pytest.raises(RuntimeError, match="columns"):
        torch.ops.rillm.gguf_linear(torch.zeros(1, 96).bfloat16(), [packed])
    with pytest.raises(RuntimeError, match="bfloat16"):
        torch.ops.rillm.gguf_linear(torch.zeros(1, 64), [packed])
    with pytest.raises(RuntimeError, match="gguf_pack"):
        torch.ops.rillm.gguf_linear(torch.zeros(1, 64).bfloat16(), [packed[:, :, :100].clone()])
    with pytest.raises(ValueError, match="multiple of 16"):
        pack(decode_blocks(_matrix("Q4_1", 8, 64)))


def test_this_cpu_gets_the_vectorized_kernel():
    # The machines rillm is measured on have AVX-512 VNNI and BF16; elsewhere the int4 path.
    flags = open("/proc/cpuinfo").read()
    assert torch.ops.rillm.vectorized("gguf_linear") == (
        "avx512_vnni" in flags and "avx512_bf16" in flags)
