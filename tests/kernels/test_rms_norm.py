"""The C++ RMSNorm against the PyTorch path it replaces outside float32."""

from __future__ import annotations

import pytest
import torch

from rillm.kernels import load_cpu_kernels
from rillm.model.llama import RMSNorm


@pytest.fixture(scope="module", autouse=True)
def kernels():
    assert load_cpu_kernels(), "this machine has a C++ compiler: the kernels must build"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("rows", [1, 8, 300])
def test_rms_norm_equals_the_pytorch_path_but_for_the_order_of_a_sum(dtype, rows):
    gen = torch.Generator().manual_seed(rows)
    norm = RMSNorm((torch.rand(576, generator=gen) + 0.5).to(dtype), 1e-5, fused=False)
    x = (4 * torch.randn(rows, 576, generator=gen)).to(dtype)
    expected = norm(x)
    ours = torch.ops.rillm.rms_norm(x, norm.weight, norm.eps)
    assert ours.dtype == dtype and ours.shape == x.shape
    # The squares are summed in another order: float32 results move by an ulp or so; after
    # rounding to 16 bits almost every element is the same, none off by more than one step.
    torch.testing.assert_close(ours, expected, rtol=2e-6 if dtype == torch.float32 else 1e-2,
                               atol=1e-6)
    if dtype != torch.float32:
        assert (ours != expected).float().mean() < 1e-3


def test_the_model_uses_it_outside_float32_only(make_engine):
    fused = make_engine(dtype="bfloat16", quantization="none").runner.model
    exact = make_engine(quantization="none").runner.model
    assert all(m.fused for m in fused.modules() if isinstance(m, RMSNorm))
    assert not any(m.fused for m in exact.modules() if isinstance(m, RMSNorm))
