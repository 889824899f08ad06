"""rillm's int4 matmul (q4_linear) against the exact product with the dequantized weights."""

from __future__ import annotations

import pytest
import torch

from rillm.kernels import load_cpu_kernels


@pytest.fixture(scope="module", autouse=True)
def kernels():
    assert load_cpu_kernels(), "this machine has a C++ compiler: the kernels must build"


def _weights(n, k, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randint(0, 16, (n, k), dtype=torch.uint8, generator=gen)
    d = (torch.rand(n, k // 32, generator=gen) * 0.02 + 1e-3).half()
    m = (-torch.rand(n, k // 32, generator=gen) * 0.1).half()
    w = (d.double().repeat_interleave(32, 1) * q.double()
         + m.double().repeat_interleave(32, 1))
    return q, d, m, w


# K: whole 128-weight chunks, and chunks plus a 64-weight tail (576 = 4 x 128 + 64).
@pytest.mark.parametrize(("n", "k"), [(960, 576), (64, 1536), (8, 64), (4, 192)])
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 9])
def test_q4_linear_equals_the_exact_product_up_to_the_outputs_rounding(n, k, rows):
    q, d, m, w = _weights(n, k)
    x = torch.randn(rows, k, generator=torch.Generator().manual_seed(1)).bfloat16()
    y = torch.ops.rillm.q4_linear(x, torch.ops.rillm.q4_pack(q), d, m)
    assert y.dtype == torch.bfloat16 and y.shape == (rows, n)
    exact = x.double() @ w.T
    # float32 sums of exact products: the output's own rounding to bfloat16 dominates.
    rounding = (exact.bfloat16().double() - exact).abs()
    assert ((y.double() - exact).abs() <= 2 * rounding + 1e-3 * exact.abs().mean()).all()


def test_each_row_of_x_is_computed_alone():
    q, d, m, _ = _weights(256, 576)
    packed = torch.ops.rillm.q4_pack(q)
    x = torch.randn(7, 576, generator=torch.Generator().manual_seed(2)).bfloat16()
    batch = torch.ops.rillm.q4_linear(x, packed, d, m)
    alone = torch.cat([torch.ops.rillm.q4_linear(x[i : i + 1], packed, d, m) for i in range(7)])
    assert torch.equal(batch, alone)


def test_bad_shapes_raise():
    q, d, m, _ = _weights(8, 128)
    packed = torch.ops.rillm.q4_pack(q)
    with pytest.raises(RuntimeError, match="K divisible by 64"):
        torch.ops.rillm.q4_pack(torch.zeros(8, 96, dtype=torch.uint8))
    with pytest.raises(RuntimeError, match="N divisible by 4"):
        torch.ops.rillm.q4_pack(torch.zeros(6, 128, dtype=torch.uint8))
    with pytest.raises(RuntimeError, match=r"in \[0, 16\)"):
        torch.ops.rillm.q4_pack(torch.full((8, 128), 16, dtype=torch.uint8))
    with pytest.raises(RuntimeError, match="columns"):
        torch.ops.rillm.q4_linear(torch.zeros(1, 64).bfloat16(), packed, d, m)
    with pytest.raises(RuntimeError, match="bfloat16"):
        torch.ops.rillm.q4_linear(torch.zeros(1, 128), packed, d, m)


def test_this_cpu_gets_the_vectorized_kernel():
    # The machines rillm is measured on have AVX-512 BF16; elsewhere PyTorch's kernel is used.
    flags = open("/proc/cpuinfo").read()
    assert torch.ops.rillm.q4_linear_vectorized() == ("avx512_bf16" in flags)
