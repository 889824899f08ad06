"""rillm's argmax over logit rows against torch.argmax: the same index in every case."""

from __future__ import annotations

import pytest
import torch

from rillm.kernels import load_cpu_kernels
from rillm.worker.sampler import Sampler, SamplingBatch


@pytest.fixture(scope="module", autouse=True)
def kernels():
    assert load_cpu_kernels(), "this machine has a C++ compiler: the kernels must build"


def _rows() -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(12, 49157, generator=gen)  # not a multiple of 16: a scalar tail
    x[1, 7] = x[1, 49000] = 1e3  # a tie: the first wins
    x[2, 49156] = 1e3  # the maximum in the tail
    x[3] = float("-inf")  # all -inf: index 0
    x[4, 100] = float("nan")  # NaN counts as the largest
    x[4, 200] = float("inf")
    x[5, 49155] = float("nan")  # NaN in the tail
    x[6, 3] = float("inf")
    x[7] = 0.0
    x[7, 5] = -0.0  # -0.0 == 0.0: the first zero
    x[8, :] = -1e30
    x[8, 31] = -1e29
    return x


def test_the_same_index_as_torch_argmax():
    x = _rows()
    assert torch.equal(torch.ops.rillm.argmax_rows(x), x.argmax(dim=-1))
    assert torch.equal(torch.ops.rillm.argmax_rows(x[:, :5]), x[:, :5].argmax(dim=-1))
    strided = x[:, ::2]
    assert torch.equal(torch.ops.rillm.argmax_rows(strided), strided.argmax(dim=-1))


def test_bad_input_raises():
    with pytest.raises(RuntimeError, match="float32"):
        torch.ops.rillm.argmax_rows(torch.zeros(2, 8, dtype=torch.bfloat16))
    with pytest.raises(RuntimeError, match="at least one column"):
        torch.ops.rillm.argmax_rows(torch.zeros(2, 0))


def test_the_sampler_picks_the_same_tokens_with_the_kernel():
    from rillm.sampling_params import SamplingParams

    x = _rows()[:, :1000]
    x[4] = torch.randn(1000)  # no NaN rows through the sampler
    x[5] = torch.randn(1000)
    params = [SamplingParams(temperature=0.0 if i % 2 else 0.8, seed=i) for i in range(12)]
    batch = SamplingBatch.build(
        params=params, seeds=list(range(12)), prompt_token_ids=[[1]] * 12,
        output_token_ids=[[]] * 12, eos_token_ids=[0], vocab_size=1000,
        device=torch.device("cpu"),
    )
    ours = Sampler(argmax_kernel=True)(x, batch).token_ids
    theirs = Sampler(argmax_kernel=False)(x, batch).token_ids
    assert torch.equal(ours, theirs)
