"""rillm's int8 linear layer (quantization="int8"): the C++ kernels give the bits of the PyTorch
reference in rillm/model/int4_linear.py, whichever weight layout runs, and the rotation does
what it is there for."""

from __future__ import annotations

import pytest
import torch

from rillm.kernels import load_cpu_kernels
from rillm.model.int4_linear import Int8Weight, quantize_rows_reference, rotate_blocks


@pytest.fixture(scope="module", autouse=True)
def kernels():
    assert load_cpu_kernels(), "this machine has a C++ compiler: the kernels must build"


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int16) if t.dtype == torch.bfloat16 else t.view(torch.int32)


def _activations(rows: int, k: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, k, generator=gen) * (torch.rand(k, generator=gen) * 4)
    return x.bfloat16()


@pytest.mark.parametrize("rotate", [False, True])
def test_quantize_rows_gives_the_references_bits(rotate):
    x = _activations(37, 576)
    x[3] = 0  # a row of zeros: scale 0, all zeros
    q, scales = torch.ops.rillm.int8_quantize_rows(x, rotate)
    q_ref, scales_ref = quantize_rows_reference(x, rotate)
    assert q.dtype == torch.int8 and torch.equal(q, q_ref)
    assert torch.equal(_bits(scales), _bits(scales_ref))
    assert scales[3] == 0 and not q[3].any()
    assert q.abs().max() == 127


def test_quantize_rounds_half_to_even():
    # absmax 127: the values are their own scaled values, ties included.
    row = torch.tensor([127.0, 63.5, -63.5, 0.5, 1.5, 2.5, -2.5, 3.0], dtype=torch.bfloat16)
    x = torch.nn.functional.pad(row, (0, 56)).view(1, 64)
    q, scales = torch.ops.rillm.int8_quantize_rows(x, False)
    assert q[0, :8].tolist() == [127, 64, -64, 0, 2, 2, -2, 3]
    assert scales.item() == pytest.approx(1.0)


def test_rotation_is_the_orthonormal_hadamard_matrix_by_blocks_of_64():
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < 64:
        h = torch.cat((torch.cat((h, h), 1), torch.cat((h, -h), 1)), 0)
    x = torch.randn(5, 192)
    expected = (x.double().view(5, 3, 64) @ h / 8).view(5, 192)
    assert torch.allclose(rotate_blocks(x).double(), expected, atol=1e-5)
    assert torch.allclose(rotate_blocks(rotate_blocks(x)), x, atol=1e-5)  # its own inverse


def _layouts(weight_q: torch.Tensor) -> dict[str, tuple[torch.Tensor, torch.Tensor | None]]:
    layouts = {"plain": (weight_q, None)}
    if torch.backends.mkldnn.is_available():
        layouts["onednn"] = (torch.ops.onednn.qlinear_prepack(weight_q, None), None)
    layouts["few-rows"] = (weight_q, torch.ops.rillm.int8_pack(weight_q))
    return layouts


@pytest.mark.parametrize(("n", "k"), [(96, 576), (48, 1536)])
@pytest.mark.parametrize("rows", [1, 3, 8, 9, 16, 17, 40])
def test_int8_linear_gives_the_references_bits_in_every_layout(n, k, rows):
    gen = torch.Generator().manual_seed(rows)
    w = torch.randn(n, k, generator=gen)
    x = _activations(rows, k, seed=rows)
    weight = Int8Weight(w)
    q, scales = quantize_rows_reference(w, True)
    assert torch.equal(weight.scales, scales)
    # The PyTorch path of Int8Weight: the reference arithmetic.
    reference = Int8Weight(w)
    reference.kernel, reference.weight = None, q
    expected = reference(x)
    assert expected.dtype == torch.bfloat16 and expected.shape == (rows, n)
    for name, (packed, few_rows) in _layouts(q).items():
        y = torch.ops.rillm.int8_linear(x, packed, scales, True, few_rows)
        assert torch.equal(_bits(y), _bits(expected)), name
    assert torch.equal(_bits(weight(x)), _bits(expected))


def test_each_row_is_computed_alone():
    """Per-row scales and exact int32 sums: a row's output does not depend on its batch."""
    w = Int8Weight(torch.randn(64, 576))
    x = _activations(20, 576)
    together = w(x)
    for i in (0, 7, 19):
        assert torch.equal(_bits(w(x[i:i + 1])), _bits(together[i:i + 1]))


def test_rotation_keeps_an_outlier_channel_from_flattening_the_rest():
    """A few activation channels far larger than the rest (as in the default model) leave the
    others a handful of int8 levels under one scale a row; rotated, the error is much smaller."""
    gen = torch.Generator().manual_seed(3)
    w = torch.randn(128, 576, generator=gen) * 0.05
    x = torch.randn(16, 576, generator=gen)
    x[:, 100] *= 60
    x = x.bfloat16()
    exact = x.double() @ w.double().T

    def error(rotate: bool) -> float:
        q_w, s_w = quantize_rows_reference(w, rotate)
        q_x, s_x = quantize_rows_reference(x, rotate)
        y = (q_x.double() @ q_w.double().T) * s_w.double() * s_x.double()[:, None]
        return ((y - exact).norm() / exact.norm()).item()

    assert error(True) < error(False) / 3


def test_pack_layout():
    w = torch.randint(-127, 128, (32, 8), dtype=torch.int8)
    packed = torch.ops.rillm.int8_pack(w)
    assert packed.dtype == torch.uint8 and packed.shape == (2, 2, 16, 4)
    # group g, step s, lane j, byte b: w[16 g + j, 4 s + b] + 128
    assert packed[1, 0, 3, 2].item() == w[19, 2].item() + 128
    assert packed[0, 1, 15, 0].item() == w[15, 4].item() + 128


def test_bad_arguments_are_errors_not_crashes():
    w = torch.randint(-127, 128, (32, 64), dtype=torch.int8)
    s = torch.ones(32)
    x = torch.randn(2, 64).bfloat16()
    with pytest.raises(RuntimeError, match="bfloat16"):
        torch.ops.rillm.int8_linear(x.float(), w, s, False)
    with pytest.raises(RuntimeError, match="features"):
        torch.ops.rillm.int8_linear(torch.randn(2, 128).bfloat16(), w, s, False)
    with pytest.raises(RuntimeError, match="scales"):
        torch.ops.rillm.int8_linear(x, w, torch.ones(31), False)
    with pytest.raises(RuntimeError, match="multiple of 64"):
        torch.ops.rillm.int8_quantize_rows(torch.randn(2, 96).bfloat16(), True)
    with pytest.raises(RuntimeError, match="multiple of 16"):
        torch.ops.rillm.int8_pack(torch.zeros(24, 64, dtype=torch.int8))
