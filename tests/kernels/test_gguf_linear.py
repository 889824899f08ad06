"""rillm's gguf_linear: activations rounded to int8 per block of 32 times GGUF Q4_1 / Q8_0
blocks. The rounding of x is checked bit for bit against its definition, the product against
the same arithmetic in float64 (up to the output's rounding to bfloat16)."""

from __future__ import annotations

import pytest
import torch

from rillm.kernels import load_cpu_kernels


@pytest.fixture(scope="module", autouse=True)
def kernels():
    assert load_cpu_kernels(), "this machine has a C++ compiler: the kernels must build"


def _q4_1(n, k, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randint(0, 16, (n, k), dtype=torch.uint8, generator=gen)
    d = (torch.rand(n, k // 32, generator=gen) * 0.02 + 1e-3).half()
    m = (-torch.rand(n, k // 32, generator=gen) * 0.1).half()
    return q, d, m, torch.ops.rillm.gguf_pack_q4_1(q, d, m)


def _q8_0(n, k, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randint(-128, 128, (n, k), dtype=torch.int8, generator=gen)
    d = (torch.rand(n, k // 32, generator=gen) * 2e-3 + 1e-4).half()
    return q, d, None, torch.ops.rillm.gguf_pack_q8_0(q, d)


FORMATS = {"Q4_1": _q4_1, "Q8_0": _q8_0}


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


def product_reference(x, q, d, m):
    """The kernel's arithmetic in float64: (y, the sum of the absolute values of its terms)."""
    n, k = q.shape
    xq, scales = quantize_reference(x)
    dot = torch.einsum("rbi,nbi->rnb", xq.double().view(-1, k // 32, 32),
                       q.double().view(n, k // 32, 32))
    terms = dot * d.double()[None] * scales.double()[:, None, :]
    if m is not None:  # m times the block's sum as rounded: scale * sum(q)
        q_sums = xq.view(-1, k // 32, 32).sum(-1, dtype=torch.int32).double()
        terms = terms + m.double()[None] * (q_sums * scales.double())[:, None, :]
    return terms.sum(-1), terms.abs().sum(-1)


def test_quantize_blocks_gives_the_definitions_bits():
    x = _activations(9, 576)
    x[2, 32:64] = 0  # a block of zeros: scale 0, all zeros
    q, scales, sums, q_sums = torch.ops.rillm.q8_quantize_blocks(x)
    q_ref, scales_ref = quantize_reference(x)
    assert q.dtype == torch.int8 and torch.equal(q, q_ref)
    assert torch.equal(scales, scales_ref)
    assert scales[2, 1] == 0 and not q[2, 32:64].any()
    assert torch.equal(q_sums, q_ref.view(9, -1, 32).sum(-1, dtype=torch.int32))
    assert torch.equal(sums, q_sums.float() * scales)
    # Every non-zero block reaches the int8 range's end.
    assert (q.view(9, -1, 32).abs().amax(-1)[scales > 0] == 127).all()


def test_quantize_rounds_half_to_even():
    # absmax 127: the values are their own scaled values, ties included.
    row = torch.tensor([127.0, 63.5, -63.5, 0.5, 1.5, 2.5, -2.5, 3.0], dtype=torch.bfloat16)
    x = torch.nn.functional.pad(row, (0, 24)).view(1, 32)
    q, scales, _, _ = torch.ops.rillm.q8_quantize_blocks(x)
    assert q[0, :8].tolist() == [127, 64, -64, 0, 2, 2, -2, 3]
    assert scales.item() == pytest.approx(1.0)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize(("n", "k"), [(960, 576), (64, 1536), (16, 32)])
@pytest.mark.parametrize("rows", [1, 3, 8, 9, 20])
def test_gguf_linear_is_its_arithmetic_up_to_the_outputs_rounding(fmt, n, k, rows):
    q, d, m, packed = FORMATS[fmt](n, k)
    x = _activations(rows, k)
    y = torch.ops.rillm.gguf_linear(x, packed)
    assert y.dtype == torch.bfloat16 and y.shape == (rows, n)
    expected, magnitude = product_reference(x, q, d, m)
    # The output's rounding to bfloat16 (at most 2^-8 relative) and float32 sums.
    bound = 2**-8 * expected.abs() + 1e-6 * magnitude
    assert ((y.double() - expected).abs() <= bound).all()


@pytest.mark.parametrize("fmt", FORMATS)
def test_each_row_is_computed_alone(fmt):
    *_, packed = FORMATS[fmt](256, 576)
    x = _activations(19, 576, seed=2)
    batch = torch.ops.rillm.gguf_linear(x, packed)
    alone = torch.cat([torch.ops.rillm.gguf_linear(x[i : i + 1], packed) for i in range(19)])
    assert torch.equal(batch, alone)


@pytest.mark.parametrize("fmt", FORMATS)
def test_close_to_the_dequantized_weights(fmt):
    """What the rounding of x costs against the exact product: under a percent."""
    q, d, m, packed = FORMATS[fmt](256, 1536)
    w = q.double() * d.double().repeat_interleave(32, 1)
    if m is not None:
        w = w + m.double().repeat_interleave(32, 1)
    x = _activations(12, 1536, seed=3)
    exact = x.double() @ w.T
    y = torch.ops.rillm.gguf_linear(x, packed).double()
    assert (y - exact).norm() / exact.norm() < 1e-2


def test_zero_rows_and_bad_input_raise_clearly():
    _, _, _, packed = _q4_1(32, 64)
    assert torch.ops.rillm.gguf_linear(torch.zeros(0, 64).bfloat16(), packed).shape == (0, 32)
    with pytest.raises(RuntimeError, match="columns"):
        torch.ops.rillm.gguf_linear(torch.zeros(1, 96).bfloat16(), packed)
    with pytest.raises(RuntimeError, match="bfloat16"):
        torch.ops.rillm.gguf_linear(torch.zeros(1, 64), packed)
    with pytest.raises(RuntimeError, match="gguf_pack"):
        torch.ops.rillm.gguf_linear(torch.zeros(1, 64).bfloat16(), packed[:, :, :100].clone())
    with pytest.raises(RuntimeError, match="multiple of 16"):
        torch.ops.rillm.gguf_pack_q4_1(torch.zeros(8, 64, dtype=torch.uint8),
                                       torch.zeros(8, 2).half(), torch.zeros(8, 2).half())
    with pytest.raises(RuntimeError, match=r"in \[0, 16\)"):
        torch.ops.rillm.gguf_pack_q4_1(torch.full((16, 64), 16, dtype=torch.uint8),
                                       torch.zeros(16, 2).half(), torch.zeros(16, 2).half())
    with pytest.raises(RuntimeError, match="float16"):
        torch.ops.rillm.gguf_pack_q8_0(torch.zeros(16, 64, dtype=torch.int8), torch.zeros(16, 2))


def test_this_cpu_gets_the_vectorized_kernel():
    # The machines rillm is measured on have AVX-512 VNNI and BF16; elsewhere the int4 path.
    flags = open("/proc/cpuinfo").read()
    assert torch.ops.rillm.vectorized("gguf_linear") == (
        "avx512_vnni" in flags and "avx512_bf16" in flags)
