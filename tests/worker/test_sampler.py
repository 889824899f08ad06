"""Sampler: each SamplingParams knob does what a user expects, and seeded draws are stable."""

from __future__ import annotations

from collections.abc import Sequence

import pytest
import torch

from rillm.sampling_params import SamplingParams
from rillm.structured_outputs import StructuredOutputsParams
from rillm.worker.sampler import (
    Sampler,
    SamplerOutput,
    SamplingBatch,
    bitmask_words,
    gumbel_from_bits,
    unpack_bitmask,
)

EOS = 1
STOP = 2


def run(
    logits: torch.Tensor,
    params: Sequence[SamplingParams],
    *,
    seeds: Sequence[int] | None = None,
    prompts: Sequence[Sequence[int]] | None = None,
    outputs: Sequence[Sequence[int]] | None = None,
    allowed: torch.Tensor | None = None,
    consume: bool = False,
) -> SamplerOutput:
    rows = len(params)
    batch = SamplingBatch.build(
        params,
        seeds=list(range(rows)) if seeds is None else seeds,
        prompt_token_ids=[[]] * rows if prompts is None else prompts,
        output_token_ids=[[]] * rows if outputs is None else outputs,
        eos_token_ids=[EOS],
        vocab_size=logits.shape[-1],
        device="cpu",
        allowed=allowed,
    )
    return Sampler()(logits, batch, consume=consume)


def draws(row: torch.Tensor, params: SamplingParams, n: int, **kwargs) -> torch.Tensor:
    """n samples of one distribution: n copies of `row`, seeds 0..n-1, all at step 0."""
    return run(row.expand(n, -1), [params] * n, **kwargs).token_ids


def frequencies(tokens: torch.Tensor, vocab: int) -> torch.Tensor:
    return torch.bincount(tokens, minlength=vocab).float() / tokens.numel()


def logits_from_probs(*probs: float, vocab: int = 50) -> torch.Tensor:
    """A row whose softmax puts `probs` on tokens 10, 11, ... and the rest evenly elsewhere."""
    rest = (1.0 - sum(probs)) / (vocab - len(probs))
    p = torch.full((vocab,), rest)
    p[10 : 10 + len(probs)] = torch.tensor(probs)
    return p.log()


def test_greedy_takes_the_argmax() -> None:
    logits = torch.randn(8, 100, generator=torch.Generator().manual_seed(0))
    tokens = run(logits, [SamplingParams(temperature=0.0)] * 8).token_ids
    assert torch.equal(tokens, logits.argmax(dim=-1))
    # Temperatures too small to divide by are greedy too.
    assert torch.equal(run(logits, [SamplingParams(temperature=1e-7)] * 8).token_ids, tokens)


def test_low_temperature_concentrates_and_high_temperature_spreads() -> None:
    row = torch.linspace(0.0, 2.0, 100)  # token 99 leads by 0.02 over token 98
    cold = draws(row, SamplingParams(temperature=0.001), 1000)
    assert (cold == 99).all()
    hot = draws(row, SamplingParams(temperature=100.0), 4000)
    assert torch.unique(hot).numel() == 100
    assert frequencies(hot, 100).max() < 0.025  # near uniform 0.01


def test_top_k_one_is_greedy() -> None:
    logits = torch.randn(500, 300, generator=torch.Generator().manual_seed(1))
    tokens = run(logits, [SamplingParams(top_k=1)] * 500).token_ids
    assert torch.equal(tokens, logits.argmax(dim=-1))


def test_top_k_never_samples_outside_the_top_k() -> None:
    rows, vocab, k = 3000, 200, 5
    logits = torch.randn(rows, vocab, generator=torch.Generator().manual_seed(2))
    outputs = [[0] * (i % 13) for i in range(rows)]  # many different steps
    tokens = run(logits, [SamplingParams(top_k=k)] * rows, outputs=outputs).token_ids
    order = logits.argsort(dim=-1, descending=True)
    position = (order == tokens[:, None]).float().argmax(dim=-1)
    assert position.max() < k
    assert set(position.tolist()) == set(range(k))


def test_top_k_with_top_p_near_one_still_honours_top_k() -> None:
    row = torch.zeros(100)  # flat: top_p alone would keep almost everything
    row[:3] = 0.01
    tokens = draws(row, SamplingParams(top_k=3, top_p=0.999), 2000)
    assert set(tokens.tolist()) == {0, 1, 2}


@pytest.mark.parametrize(
    ("top_p", "nucleus", "expected"),
    [(0.75, [10, 11], [0.625, 0.375]), (0.85, [10, 11, 12], [0.5 / 0.95, 0.3 / 0.95, 0.15 / 0.95])],
)
def test_top_p_keeps_only_the_nucleus(
    top_p: float, nucleus: list[int], expected: list[float]
) -> None:
    row = logits_from_probs(0.5, 0.3, 0.15)
    tokens = draws(row, SamplingParams(top_p=top_p), 4000)
    assert set(tokens.tolist()) == set(nucleus)
    observed = frequencies(tokens, 50)[nucleus]
    assert torch.allclose(observed, torch.tensor(expected), atol=0.03)


def test_top_p_always_keeps_the_top_token() -> None:
    row = logits_from_probs(0.3, 0.25)
    assert (draws(row, SamplingParams(top_p=0.01), 500) == 10).all()


def test_min_p_drops_tokens_below_a_fraction_of_the_top_probability() -> None:
    row = logits_from_probs(0.4, 0.3, 0.15, 0.1)
    tokens = draws(row, SamplingParams(min_p=0.3), 3000)  # keeps p >= 0.12
    assert set(tokens.tolist()) == {10, 11, 12}


def test_logit_bias_forces_and_bans_tokens() -> None:
    logits = torch.randn(1, 100, generator=torch.Generator().manual_seed(3))
    low = int(logits.argmin())
    forced = draws(logits[0], SamplingParams(logit_bias={low: 100.0}), 300)
    assert (forced == low).all()

    top2 = logits[0].topk(2).indices.tolist()
    banned = run(logits, [SamplingParams(temperature=0.0, logit_bias={top2[0]: -100.0})])
    assert banned.token_ids.tolist() == [top2[1]]
    # Ids outside the vocabulary cannot be sampled and are ignored.
    ignored = run(logits, [SamplingParams(temperature=0.0, logit_bias={100: 100.0})])
    assert ignored.token_ids.tolist() == [top2[0]]


def test_repetition_penalty_demotes_seen_tokens_positive_and_negative() -> None:
    positive = torch.zeros(2, 20)
    positive[:, 3], positive[:, 4] = 2.0, 1.5
    params = [
        SamplingParams(temperature=0.0, repetition_penalty=2.0),
        SamplingParams(temperature=0),
    ]
    # Token 3 is in the first row's prompt: 2.0 / 2 = 1.0 < 1.5. The second row has no penalty.
    assert run(positive, params, prompts=[[3], [3]]).token_ids.tolist() == [4, 3]

    negative = torch.full((1, 20), -5.0)
    negative[:, 3], negative[:, 4] = -1.0, -1.5
    # Token 3 is in the output: -1.0 * 2 = -2.0 < -1.5.
    assert run(negative, params[:1], outputs=[[3]]).token_ids.tolist() == [4]
    assert run(negative, params[:1], outputs=[[7]]).token_ids.tolist() == [3]


def test_frequency_penalty_scales_with_count_and_presence_does_not() -> None:
    logits = torch.zeros(1, 20)
    logits[:, 3], logits[:, 4] = 2.0, 1.5

    def greedy(outputs: list[int], frequency: float = 0.0, presence: float = 0.0) -> int:
        params = SamplingParams(
            temperature=0.0, frequency_penalty=frequency, presence_penalty=presence
        )
        return int(run(logits, [params], outputs=[outputs]).token_ids)

    assert greedy([3, 3], frequency=0.3) == 4  # 2.0 - 2 * 0.3 = 1.4
    assert greedy([3], frequency=0.3) == 3  # 2.0 - 0.3 = 1.7
    assert greedy([3], presence=0.6) == 4  # 2.0 - 0.6 = 1.4
    assert greedy([3, 3, 3], presence=0.4) == 3  # 2.0 - 0.4, however often
    assert greedy([], frequency=2.0, presence=2.0) == 3
    # The prompt does not count toward these penalties.
    params = SamplingParams(temperature=0.0, presence_penalty=2.0)
    assert int(run(logits, [params], prompts=[[3]]).token_ids) == 3


def test_min_tokens_blocks_eos_and_stop_tokens_until_reached() -> None:
    logits = torch.zeros(1, 30)
    logits[:, EOS], logits[:, STOP] = 10.0, 9.0
    params = SamplingParams(min_tokens=3, stop_token_ids=[STOP], max_tokens=10)
    for step in range(3):
        tokens = draws(logits[0], params, 500, outputs=[[5] * step] * 500)
        assert not torch.isin(tokens, torch.tensor([EOS, STOP])).any()
    greedy = SamplingParams(temperature=0.0, min_tokens=3, stop_token_ids=[STOP], max_tokens=10)
    assert run(logits, [greedy], outputs=[[5, 5]]).token_ids.tolist() != [EOS]
    assert run(logits, [greedy], outputs=[[5, 5, 5]]).token_ids.tolist() == [EOS]


def test_ignore_eos_never_emits_eos_but_allows_stop_tokens() -> None:
    logits = torch.zeros(1, 30)
    logits[:, EOS], logits[:, STOP] = 10.0, 9.0
    params = SamplingParams(ignore_eos=True, stop_token_ids=[STOP])
    for step in (0, 7, 100):
        tokens = draws(logits[0], params, 500, outputs=[[5] * step] * 500)
        assert not (tokens == EOS).any()
        assert (tokens == STOP).float().mean() > 0.9


def test_logprobs_describe_the_raw_logits() -> None:
    logits = torch.randn(3, 80, generator=torch.Generator().manual_seed(4))
    params = [
        SamplingParams(temperature=0.5, repetition_penalty=1.3, logit_bias={7: 5.0}, logprobs=3),
        SamplingParams(temperature=0.0, frequency_penalty=1.0, logprobs=0),
        SamplingParams(top_k=10),
    ]
    out = run(logits, params, prompts=[[1, 2, 3]] * 3, outputs=[[4, 5]] * 3)
    assert out.logprobs is not None and out.ranks is not None
    assert out.top_ids is not None and out.top_logprobs is not None
    expected = torch.log_softmax(logits, dim=-1)
    assert torch.allclose(out.logprobs, expected.gather(1, out.token_ids[:, None]).squeeze(1))
    order = expected.argsort(dim=-1, descending=True)
    ranks = (order == out.token_ids[:, None]).float().argmax(dim=-1) + 1
    assert torch.equal(out.ranks, ranks)
    assert out.top_ids.shape == (3, 3)  # K = the largest k asked for
    assert torch.equal(out.top_ids, order[:, :3])
    assert torch.allclose(out.top_logprobs, expected.gather(1, order[:, :3]))
    assert (out.top_logprobs[:, :-1] >= out.top_logprobs[:, 1:]).all()


def test_logprobs_are_left_out_unless_asked_for() -> None:
    out = run(torch.randn(2, 40), [SamplingParams()] * 2)
    assert out.logprobs is None and out.ranks is None and out.top_ids is None


def test_seeded_draw_is_the_same_alone_and_anywhere_in_any_batch() -> None:
    vocab = 1000
    gen = torch.Generator().manual_seed(5)
    target_row = torch.randn(vocab, generator=gen) * 0.5
    target = SamplingParams(temperature=0.9, top_p=0.95, top_k=500)
    others = [
        SamplingParams(temperature=0.0),
        SamplingParams(top_p=0.3, logprobs=5),
        SamplingParams(top_k=2, repetition_penalty=1.5, frequency_penalty=0.5),
        SamplingParams(min_p=0.2, logit_bias={3: 10.0}),
        SamplingParams(min_tokens=4, ignore_eos=True, presence_penalty=1.0),
    ]
    seen = set()
    for seed, step in [(1234, 0), (1234, 5), (99, 5), (2**40 + 7, 17), (-3, 2)]:
        alone = run(target_row[None], [target], seeds=[seed], outputs=[[0] * step]).token_ids
        seen.add(int(alone))
        for position in (0, 11, 15):
            params = [others[i % len(others)] for i in range(16)]
            params[position] = target
            seeds = [seed + 1 + i for i in range(16)]
            seeds[position] = seed
            outputs = [[i] * (i + 3) for i in range(16)]
            outputs[position] = [9] * step  # which tokens does not matter, only how many
            logits = torch.randn(16, vocab, generator=gen)
            logits[position] = target_row
            batched = run(logits, params, seeds=seeds, prompts=[[1, 2]] * 16, outputs=outputs)
            assert int(batched.token_ids[position]) == int(alone)
    assert len(seen) > 1  # the check above is not trivially true


def test_different_seeds_and_steps_give_different_draws() -> None:
    vocab = 1000
    flat = torch.zeros(vocab)
    by_seed = draws(flat, SamplingParams(), 300)
    assert torch.unique(by_seed).numel() > 250

    steps = run(
        flat.expand(300, -1),
        [SamplingParams()] * 300,
        seeds=[7] * 300,
        outputs=[[0] * i for i in range(300)],
    ).token_ids
    assert torch.unique(steps).numel() > 250

    # Seeds that differ only above bit 31 (or only below it) give unrelated streams.
    high = draws(flat, SamplingParams(), 1, seeds=[5])
    related = [5 + 2**32, 5 + 2**40, 5 + 2**63, 6]
    tokens = [int(draws(flat, SamplingParams(), 1, seeds=[s])) for s in related]
    assert int(high) not in tokens
    # Only the low 64 bits count.
    assert int(draws(flat, SamplingParams(), 1, seeds=[5 + 2**64])) == int(high)


@pytest.mark.parametrize(("temperature", "top_k"), [(1.0, 0), (0.7, 0), (1.5, 10)])
def test_sampled_tokens_follow_the_softmax(temperature: float, top_k: int) -> None:
    vocab, n = 50, 20000
    row = torch.randn(vocab, generator=torch.Generator().manual_seed(6)) * 1.5
    tokens = draws(row, SamplingParams(temperature=temperature, top_k=top_k), n)
    expected = torch.softmax(row / temperature, dim=-1)
    if top_k:
        expected = torch.where(row >= row.topk(top_k).values[-1], expected, 0.0)
        expected /= expected.sum()
    observed = frequencies(tokens, vocab)
    kept = expected > 0
    assert (observed[~kept] == 0).all()
    chi_square = n * ((observed[kept] - expected[kept]) ** 2 / expected[kept]).sum()
    degrees = int(kept.sum()) - 1
    assert chi_square < degrees + 6 * (2 * degrees) ** 0.5  # ~6 sigma above the mean
    assert 0.5 * (observed - expected).abs().sum() < 0.03


def test_a_batch_mixes_greedy_and_sampled_rows() -> None:
    rows, vocab = 400, 100
    logits = torch.randn(rows, vocab, generator=torch.Generator().manual_seed(7)) * 0.3
    params = [SamplingParams(temperature=0.0) if i % 2 else SamplingParams() for i in range(rows)]
    tokens = run(logits, params).token_ids
    assert torch.equal(tokens[1::2], logits[1::2].argmax(dim=-1))
    assert (tokens[0::2] != logits[0::2].argmax(dim=-1)).float().mean() > 0.5


def test_a_batch_of_one() -> None:
    logits = torch.randn(1, 64, generator=torch.Generator().manual_seed(8))
    out = run(logits, [SamplingParams(temperature=0.8, top_p=0.9, logprobs=2)], seeds=[42])
    assert out.token_ids.shape == (1,) and out.token_ids.dtype == torch.int64
    assert out.top_ids is not None and out.top_ids.shape == (1, 2)
    greedy = run(logits, [SamplingParams(temperature=0.0)])
    assert greedy.token_ids.tolist() == [int(logits.argmax())]


def test_the_callers_logits_are_not_modified() -> None:
    logits = torch.randn(2, 30)
    before = logits.clone()
    params = SamplingParams(
        temperature=0.5,
        top_k=5,
        top_p=0.8,
        min_p=0.1,
        logit_bias={1: 3.0},
        repetition_penalty=1.2,
        frequency_penalty=0.5,
        min_tokens=2,
    )
    run(logits, [params] * 2, prompts=[[3, 4]] * 2, outputs=[[5]] * 2)
    assert torch.equal(logits, before)


def test_consumed_logits_give_the_same_tokens_without_a_copy() -> None:
    """The model runner hands its fresh logits over: bans and biases are written into them,
    and every row draws what it draws from a copy."""
    logits = torch.randn(4, 40, generator=torch.Generator().manual_seed(5))
    logits[:, EOS] = 50.0  # banned under min_tokens: must not win either way
    params = [
        SamplingParams(temperature=0.0, min_tokens=3),
        SamplingParams(temperature=0.7, top_k=8, logit_bias={7: 2.0}, min_tokens=3),
        SamplingParams(temperature=1.0, top_p=0.9, ignore_eos=True),
        SamplingParams(temperature=0.0, logit_bias={3: 100.0}),
    ]
    copied = run(logits, params)
    consumed = run(logits, params, consume=True)
    assert torch.equal(copied.token_ids, consumed.token_ids)
    assert EOS not in copied.token_ids[:3].tolist() and copied.token_ids[3] == 3
    assert logits[0, EOS] == float("-inf")  # written in place


def test_build_skips_what_no_row_needs() -> None:
    plain = SamplingBatch.build(
        [SamplingParams()] * 2, [1, 2], [[3]] * 2, [[4]] * 2, [EOS], 50, "cpu"
    )
    assert plain.top_k is None and plain.top_p is None and plain.min_p is None
    assert plain.seen_tokens is None and plain.output_counts is None
    assert plain.logit_bias is None and plain.banned is None
    assert plain.max_num_logprobs is None and not plain.any_greedy and not plain.all_greedy
    # Filters on greedy rows change nothing, so they cost nothing either.
    greedy = SamplingParams(temperature=0.0, top_p=0.5, top_k=3, min_p=0.5)
    batch = SamplingBatch.build([greedy], [1], [[3]], [[4]], [EOS], 50, "cpu")
    assert batch.top_k is None and batch.top_p is None and batch.min_p is None
    assert batch.all_greedy


def test_mismatched_inputs_are_rejected() -> None:
    batch = SamplingBatch.build(
        [SamplingParams()] * 2, [1, 2], [[]] * 2, [[]] * 2, [EOS], 50, "cpu"
    )
    with pytest.raises(ValueError, match="shape"):
        Sampler()(torch.zeros(3, 50), batch)
    with pytest.raises(ValueError, match="length"):
        SamplingBatch.build([SamplingParams()] * 2, [1], [[]] * 2, [[]] * 2, [EOS], 50, "cpu")


def test_gumbel_noise_is_finite_for_every_hash_value() -> None:
    # Every 23-bit value, plus high bits that must be ignored: a +inf would make that token win
    # the draw whatever its logit.
    bits = torch.arange(2**23, dtype=torch.int64)
    noise = gumbel_from_bits(torch.cat([bits, bits + (5 << 23)]))
    assert torch.isfinite(noise).all()


def bitmask_allowing(rows: Sequence[Sequence[int] | None], vocab: int) -> torch.Tensor:
    """An int32 token bitmask; None rows allow everything."""
    mask = torch.zeros(len(rows), bitmask_words(vocab) * 32, dtype=torch.bool)
    for i, tokens in enumerate(rows):
        if tokens is None:
            mask[i] = True
        else:
            mask[i, list(tokens)] = True
    weights = (1 << torch.arange(32, dtype=torch.int64))
    words = (mask.view(len(rows), -1, 32).long() * weights).sum(-1)
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def test_unpack_bitmask_reads_bit_t_of_word_t_over_32() -> None:
    vocab = 70
    packed = bitmask_allowing([[0, 31, 32, 63, 69], None], vocab)
    mask = unpack_bitmask(packed, vocab)
    assert mask.shape == (2, vocab)
    assert mask[0].nonzero().flatten().tolist() == [0, 31, 32, 63, 69]
    assert mask[1].all()


def test_the_token_mask_is_never_crossed_even_at_high_temperature() -> None:
    vocab = 300
    logits = torch.randn(1, vocab, generator=torch.Generator().manual_seed(5)) * 5
    worst = logits[0].topk(250, largest=False).indices[:3].tolist()
    n = 2000
    params = SamplingParams(temperature=2.0, structured_outputs=StructuredOutputsParams(
        regex="x"))
    tokens = run(logits.expand(n, -1), [params] * n,
                 allowed=bitmask_allowing([worst] * n, vocab)).token_ids
    assert set(tokens.tolist()) == set(worst)
    greedy = run(logits, [SamplingParams(temperature=0.0)],
                 allowed=bitmask_allowing([worst], vocab)).token_ids
    assert greedy.tolist()[0] == max(worst, key=lambda t: logits[0, t])


def test_a_constrained_row_may_end_before_min_tokens() -> None:
    logits = torch.zeros(1, 10)
    logits[0, EOS] = 10.0
    constrained = SamplingParams(temperature=0.0, min_tokens=5, ignore_eos=True,
                                 structured_outputs=StructuredOutputsParams(regex="x"))
    assert run(logits, [constrained]).token_ids.tolist() == [EOS]


def test_the_pruned_draw_picks_what_the_full_noise_picks() -> None:
    """Only tokens near a row's largest value get their noise hashed (big vocabularies); the
    draw must be the token argmax(x + noise of every token) picks, ties and masks included."""
    from rillm.worker.sampler import _gumbel_argmax, _gumbel_noise

    generator = torch.Generator().manual_seed(3)
    vocab, rows = 5000, 64
    for spread in (2.0, 6.0, 30.0):  # a flat row (no pruning), a model's, a peaked one
        x = torch.randn(rows, vocab, generator=generator) * spread
        x[::3, ::7] = float("-inf")  # masked by top_k / top_p / a grammar
        x[1, :] = x[1, 0]  # every token tied
        x[2, 100:200] = x[2].max()  # a tie at the top
        x[4] *= 1e4  # a large magnitude: rounding of x + noise at ~1e5
        batch = SamplingBatch.build(
            [SamplingParams(temperature=1.0, seed=s) for s in range(rows)],
            seeds=[s * 7919 + 1 for s in range(rows)], prompt_token_ids=[[]] * rows,
            output_token_ids=[list(range(s % 5)) for s in range(rows)], eos_token_ids=[EOS],
            vocab_size=vocab, device="cpu")
        expected = (x + _gumbel_noise(batch)).argmax(dim=-1)
        assert torch.equal(_gumbel_argmax(x.clone(), batch), expected), spread


def test_the_unpruned_sampler_draws_the_same_tokens_without_reading_back() -> None:
    """The GPU's sampler (`prune=False`: every token's noise, every entry sorted for top_p)
    picks the tokens the CPU's picks, row by row; on CUDA it reads nothing back from the
    device before its tokens (RILLM_TEST_DEVICE=cuda, bench/cuda_check.sh)."""
    import os

    device = torch.device(os.environ.get("RILLM_TEST_DEVICE", "cpu"))
    generator = torch.Generator().manual_seed(5)
    vocab, rows = 3000, 48
    logits = torch.randn(rows, vocab, generator=generator) * 4
    params = []
    for i in range(rows):
        kind = i % 6
        params.append(SamplingParams(
            temperature=0.0 if kind == 0 else 0.7 + 0.1 * kind, seed=i,
            top_p=0.9 if kind in (1, 4) else 1.0, top_k=40 if kind in (2, 4) else 0,
            min_p=0.05 if kind == 3 else 0.0, repetition_penalty=1.2 if kind == 5 else 1.0))
    batch = SamplingBatch.build(params, seeds=[i * 31 + 7 for i in range(rows)],
                                prompt_token_ids=[[3, 4, 5]] * rows,
                                output_token_ids=[list(range(i % 4)) for i in range(rows)],
                                eos_token_ids=[EOS], vocab_size=vocab, device=device)
    pruned = Sampler()(logits.to(device), batch).token_ids
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")  # a read back raises
    try:
        full = Sampler(prune=False)(logits.to(device), batch).token_ids
    finally:
        if device.type == "cuda":
            torch.cuda.set_sync_debug_mode("default")
    assert full.tolist() == pruned.tolist()
    assert len(set(full.tolist())) > rows // 3  # real draws, not one token everywhere
