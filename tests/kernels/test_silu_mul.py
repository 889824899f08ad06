"""The C++ SiLU(gate) * up and tanh-GELU(gate) * up against the exact value: one rounding to
bfloat16."""

from __future__ import annotations

import pytest
import torch

from rillm.kernels import load_cpu_kernels


@pytest.fixture(scope="module", autouse=True)
def kernels():
    assert load_cpu_kernels(), "this machine has a C++ compiler: the kernels must build"


@pytest.mark.parametrize("rows", [1, 7, 300])
def test_silu_mul_is_the_exact_value_rounded_once(rows):
    gen = torch.Generator().manual_seed(rows)
    gate_up = (torch.randn(rows, 2 * 1536, generator=gen) * 4).bfloat16()
    gate_up[0, :8] = torch.tensor([0.0, -0.0, 100.0, -100.0, 1e-20, -87.5, 88.0, 3.0])
    out = torch.ops.rillm.silu_mul(gate_up)
    assert out.dtype == torch.bfloat16 and out.shape == (rows, 1536)
    gate, up = gate_up.double().chunk(2, dim=-1)
    exact = torch.nn.functional.silu(gate) * up
    # Rounding to bfloat16 is within 2^-8 relative; the float32 arithmetic adds ~1e-6.
    assert ((out.double() - exact).abs() <= (2**-8 + 1e-5) * exact.abs() + 1e-30).all()
    # What the two-op PyTorch path gives, up to its extra rounding of silu(gate).
    two_ops = torch.nn.functional.silu(gate_up[:, :1536]) * gate_up[:, 1536:]
    torch.testing.assert_close(out, two_ops, rtol=2**-7, atol=1e-30)


def test_silu_mul_propagates_nan_and_refuses_bad_shapes():
    gate_up = torch.ones(1, 4).bfloat16()
    gate_up[0, 0] = float("nan")
    assert torch.ops.rillm.silu_mul(gate_up)[0, 0].isnan()
    with pytest.raises(RuntimeError, match="bfloat16"):
        torch.ops.rillm.silu_mul(torch.ones(2, 4))
    with pytest.raises(RuntimeError, match="2 \\* inner"):
        torch.ops.rillm.silu_mul(torch.ones(2, 5).bfloat16())


@pytest.mark.parametrize("rows", [1, 7, 300])
def test_gelu_tanh_mul_is_the_exact_value_rounded_once(rows):
    gen = torch.Generator().manual_seed(rows)
    gate_up = (torch.randn(rows, 2 * 2048, generator=gen) * 3).bfloat16()
    gate_up[0, :8] = torch.tensor([0.0, -0.0, 100.0, -100.0, 1e-20, -20.0, 9.0, -3.0])
    out = torch.ops.rillm.gelu_tanh_mul(gate_up)
    assert out.dtype == torch.bfloat16 and out.shape == (rows, 2048)
    gate, up = gate_up.double().chunk(2, dim=-1)
    exact = torch.nn.functional.gelu(gate, approximate="tanh") * up
    # One rounding (2^-8 relative); where GELU nearly cancels (gate around -3 and below) the
    # float32 tanh's absolute error of ~1e-7 is what is left.
    assert ((out.double() - exact).abs() <= 2**-8 * exact.abs() + 1e-6 * up.abs()).all()
    two_ops = torch.nn.functional.gelu(gate_up[:, :2048], approximate="tanh") * gate_up[:, 2048:]
    torch.testing.assert_close(out, two_ops, rtol=2**-7, atol=1e-5)


def test_gelu_tanh_mul_refuses_bad_shapes():
    with pytest.raises(RuntimeError, match="gelu_tanh_mul.*bfloat16"):
        torch.ops.rillm.gelu_tanh_mul(torch.ones(2, 4))
