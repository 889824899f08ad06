"""The C++ RMSNorm against the PyTorch path it replaces outside float32."""

from __future__ import annotations

import pytest
import torch

from rillm.kernels import load_cpu_kernels
from rillm.model.gemma3 import GemmaRMSNorm
from rillm.model.llama import RMSNorm


@pytest.fixture(scope="module", autouse=True)
def kernels():
    assert load_cpu_kernels(), "this machine has a C++ compiler: the kernels must build"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("rows", [1, 8, 300])
def test_rms_norm_equals_the_pytorch_path_but_for_the_order_of_a_sum(dtype, rows):
    gen = torch.Generator().manual_seed(rows)
    norm = RMSNorm((torch.rand(576, generator=gen) + 0.5).to(dtype), 1e-5, ops=None)
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


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("shape", [(1, 640), (33, 640), (5, 4, 256)])
def test_gemma_rms_norm_equals_the_pytorch_path_but_for_the_order_of_a_sum(dtype, shape):
    """Gemma's order (float32 1 + w, one rounding), on rows as they lie: q heads sliced out of
    a fused QKV output are not contiguous."""
    gen = torch.Generator().manual_seed(len(shape))
    norm = GemmaRMSNorm(torch.randn(shape[-1], generator=gen) * 0.3, 1e-6, ops=None)
    if len(shape) == 3:
        qkv = (4 * torch.randn(shape[0], shape[1] + 2, shape[2], generator=gen)).to(dtype)
        x = qkv[:, : shape[1]]
        assert not x.is_contiguous()
    else:
        x = (4 * torch.randn(*shape, generator=gen)).to(dtype)
    expected = norm(x)
    ours = torch.ops.rillm.rms_norm_scaled(x, norm.scale, norm.eps)
    assert ours.dtype == dtype and ours.shape == x.shape and ours.is_contiguous()
    torch.testing.assert_close(ours, expected, rtol=2e-6 if dtype == torch.float32 else 1e-2,
                               atol=1e-6)
    if dtype != torch.float32:
        assert (ours != expected).float().mean() < 2e-3


def test_gemma_rms_norm_refuses_what_it_cannot_read():
    scale = torch.ones(64)
    with pytest.raises(RuntimeError, match="float32"):
        torch.ops.rillm.rms_norm_scaled(torch.ones(2, 64), scale.bfloat16(), 1e-6)
    with pytest.raises(RuntimeError, match="contiguous"):
        torch.ops.rillm.rms_norm_scaled(torch.ones(64, 2).t(), scale, 1e-6)
    assert torch.ops.rillm.rms_norm_scaled(torch.ones(0, 64), scale, 1e-6).shape == (0, 64)
