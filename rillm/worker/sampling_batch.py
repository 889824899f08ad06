"""SamplingBatch: a step's per-request sampling parameters as tensors, built once per step.

The only per-row Python loop of sampling; `Sampler` (sampler.py) applies the result to the
logits with batched torch ops.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from rillm.sampling_params import SamplingParams

GREEDY_TEMPERATURE = 1e-5
"""Temperatures below this sample greedily: dividing by them would overflow float32 logits."""

MASK32 = 0xFFFF_FFFF


def device_tensor(values: Sequence[float] | Sequence[int] | Tensor, dtype: torch.dtype | None,
                  device: torch.device | str) -> Tensor:
    """`values` on `device`. To a GPU through pinned memory, without waiting: a copy from
    pageable memory waits for the device to finish what it is running (the step whose logits
    this batch will sample), so the host could not build the batch meanwhile."""
    t = values if isinstance(values, Tensor) else torch.tensor(values, dtype=dtype)
    if torch.device(device).type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


@dataclass(frozen=True, eq=False)
class SamplingBatch:
    """How to sample each row of one step's logits; row i belongs to one sequence.

    Optional tensors are None when no row needs them, so a batch of plain requests costs only
    the per-row vectors. Filter settings (top_k, top_p, min_p) are neutral on greedy rows.
    """

    num_rows: int
    vocab_size: int
    greedy: Tensor
    """[B] bool: argmax instead of a draw."""
    temperature: Tensor
    """[B] float32; 1.0 on greedy rows."""
    seed_lo: Tensor
    """[B] int64: low 32 bits of the row's seed."""
    seed_hi: Tensor
    """[B] int64: bits 32..63 of the row's seed."""
    steps: Tensor
    """[B] int64: index of the token being sampled (tokens generated so far)."""
    top_k: Tensor | None
    """[B] int64 in [1, V]; V keeps everything."""
    max_top_k: int
    """Largest top_k below V over sampled rows (0 when `top_k` is None)."""
    top_p: Tensor | None
    """[B] float32 in (0, 1]; 1.0 keeps everything."""
    min_p: Tensor | None
    """[B] float32 in [0, 1]; 0.0 keeps everything."""
    repetition_penalty: Tensor | None
    """[B] float32, set together with `seen_tokens`."""
    seen_tokens: Tensor | None
    """[B, V] bool: token occurs in the prompt or the output (rows with a repetition penalty)."""
    frequency_penalty: Tensor | None
    """[B] float32, set together with `presence_penalty` and `output_counts`."""
    presence_penalty: Tensor | None
    output_counts: Tensor | None
    """[B, V] float32: occurrences of each token in the output (rows with such a penalty)."""
    logit_bias: tuple[Tensor, Tensor, Tensor] | None
    """(rows, token ids, biases), int64/int64/float32, each [N] with unique (row, token) pairs."""
    banned: tuple[Tensor, Tensor] | None
    """(rows, token ids), int64 [N]: tokens this row must not produce at this step."""
    allowed: Tensor | None
    """[B, ceil(V / 32)] int32 bitmask of the tokens each row may produce (structured
    outputs): bit t % 32 of word t // 32; unconstrained rows are all ones."""
    all_greedy: bool
    any_greedy: bool
    max_num_logprobs: int | None
    """Largest top-logprobs count asked for; None when no row wants logprobs."""

    @classmethod
    def build(
        cls,
        params: Sequence[SamplingParams],
        seeds: Sequence[int],
        prompt_token_ids: Sequence[Sequence[int]],
        output_token_ids: Sequence[Sequence[int]],
        eos_token_ids: Sequence[int],
        vocab_size: int,
        device: torch.device | str,
        allowed: Tensor | None = None,
    ) -> SamplingBatch:
        """One row per entry of `params`; the other sequences are aligned with it.

        `seeds[i]` is any Python int; only its low 64 bits matter. Token ids at or above
        `vocab_size` in `logit_bias`, `stop_token_ids` or `eos_token_ids` are ignored: they
        can never be sampled (rejecting such requests is admission's job). Prompt and output
        tokens must lie below `vocab_size`.
        """
        num_rows = len(params)
        if num_rows == 0:
            raise ValueError("a sampling batch needs at least one row")
        if not len(seeds) == len(prompt_token_ids) == len(output_token_ids) == num_rows:
            raise ValueError("params, seeds, prompt and output token ids differ in length")

        def vector(values: Sequence[float] | Sequence[int], dtype: torch.dtype) -> Tensor:
            return device_tensor(values, dtype, device)

        greedy = [p.temperature < GREEDY_TEMPERATURE for p in params]
        rows = list(zip(params, greedy, strict=True))
        top_k = [vocab_size if g or p.top_k <= 0 else min(p.top_k, vocab_size) for p, g in rows]
        max_top_k = max((k for k in top_k if k < vocab_size), default=0)
        top_p = [1.0 if g else p.top_p for p, g in rows]
        min_p = [0.0 if g else p.min_p for p, g in rows]
        steps = [len(out) for out in output_token_ids]
        seeds64 = [seed & 0xFFFF_FFFF_FFFF_FFFF for seed in seeds]
        requested = [p.logprobs for p in params if p.logprobs is not None]
        repetition_penalty, seen_tokens = _repetition(
            params, prompt_token_ids, output_token_ids, vocab_size, device
        )
        frequency_penalty, presence_penalty, output_counts = _frequency(
            params, output_token_ids, vocab_size, device
        )

        return cls(
            num_rows=num_rows,
            vocab_size=vocab_size,
            greedy=vector(greedy, torch.bool),
            temperature=vector([1.0 if g else p.temperature for p, g in rows], torch.float32),
            seed_lo=vector([s & MASK32 for s in seeds64], torch.int64),
            seed_hi=vector([s >> 32 for s in seeds64], torch.int64),
            steps=vector(steps, torch.int64),
            top_k=vector(top_k, torch.int64) if max_top_k else None,
            max_top_k=max_top_k,
            top_p=vector(top_p, torch.float32) if any(p < 1.0 for p in top_p) else None,
            min_p=vector(min_p, torch.float32) if any(p > 0.0 for p in min_p) else None,
            repetition_penalty=repetition_penalty,
            seen_tokens=seen_tokens,
            frequency_penalty=frequency_penalty,
            presence_penalty=presence_penalty,
            output_counts=output_counts,
            logit_bias=_logit_bias(params, vocab_size, device),
            banned=_banned(params, steps, eos_token_ids, vocab_size, device),
            allowed=device_tensor(allowed, None, device) if allowed is not None else None,
            all_greedy=all(greedy),
            any_greedy=any(greedy),
            max_num_logprobs=max(requested) if requested else None,
        )


def _repetition(
    params: Sequence[SamplingParams],
    prompt_token_ids: Sequence[Sequence[int]],
    output_token_ids: Sequence[Sequence[int]],
    vocab_size: int,
    device: torch.device | str,
) -> tuple[Tensor | None, Tensor | None]:
    """(per-row penalty, [B, V] mask of tokens seen in prompt or output), or Nones."""
    rows = [i for i, p in enumerate(params) if p.repetition_penalty != 1.0]
    if not rows:
        return None, None
    seen = torch.zeros(len(params), vocab_size, dtype=torch.bool, device=device)
    row_ids, token_ids = _flatten(
        rows, [[*prompt_token_ids[i], *output_token_ids[i]] for i in rows], device
    )
    seen[row_ids, token_ids] = True
    penalty = [p.repetition_penalty for p in params]
    return device_tensor(penalty, torch.float32, device), seen


def _frequency(
    params: Sequence[SamplingParams],
    output_token_ids: Sequence[Sequence[int]],
    vocab_size: int,
    device: torch.device | str,
) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """(frequency penalties, presence penalties, [B, V] output token counts), or Nones."""
    rows = [
        i for i, p in enumerate(params) if p.frequency_penalty != 0.0 or p.presence_penalty != 0.0
    ]
    if not rows:
        return None, None, None
    counts = torch.zeros(len(params), vocab_size, dtype=torch.float32, device=device)
    row_ids, token_ids = _flatten(rows, [output_token_ids[i] for i in rows], device)
    counts.index_put_((row_ids, token_ids), counts.new_ones(row_ids.shape), accumulate=True)
    frequency = [p.frequency_penalty for p in params]
    presence = [p.presence_penalty for p in params]
    return (
        device_tensor(frequency, torch.float32, device),
        device_tensor(presence, torch.float32, device),
        counts,
    )


def _logit_bias(
    params: Sequence[SamplingParams], vocab_size: int, device: torch.device | str
) -> tuple[Tensor, Tensor, Tensor] | None:
    entries = [
        (row, token, bias)
        for row, p in enumerate(params)
        for token, bias in (p.logit_bias or {}).items()
        if token < vocab_size
    ]
    if not entries:
        return None
    rows, tokens, biases = zip(*entries, strict=True)
    return (
        device_tensor(rows, torch.int64, device),
        device_tensor(tokens, torch.int64, device),
        device_tensor(biases, torch.float32, device),
    )


def _banned(
    params: Sequence[SamplingParams],
    steps: Sequence[int],
    eos_token_ids: Sequence[int],
    vocab_size: int,
    device: torch.device | str,
) -> tuple[Tensor, Tensor] | None:
    """Before `min_tokens` a row may not stop, so EOS and its stop tokens are banned; under
    `ignore_eos` EOS is banned for good while its stop tokens stay allowed. A row with
    structured outputs is never banned anything: its grammar decides when it ends."""
    rows: list[int] = []
    tokens: list[int] = []
    for row, (p, step) in enumerate(zip(params, steps, strict=True)):
        if p.structured_outputs is not None:
            continue
        if step < p.min_tokens:
            banned = set(eos_token_ids) | set(p.stop_token_ids or ())
        elif p.ignore_eos:
            banned = set(eos_token_ids)
        else:
            continue
        kept = [t for t in banned if t < vocab_size]
        rows.extend([row] * len(kept))
        tokens.extend(kept)
    if not rows:
        return None
    return (
        device_tensor(rows, torch.int64, device),
        device_tensor(tokens, torch.int64, device),
    )


def _flatten(
    rows: Sequence[int], token_lists: Sequence[Sequence[int]], device: torch.device | str
) -> tuple[Tensor, Tensor]:
    """(row index, token id) pairs for every token of every listed row, as two int64 tensors."""
    row_ids = torch.repeat_interleave(
        torch.tensor(rows, dtype=torch.int64), torch.tensor([len(t) for t in token_lists])
    )
    token_ids = torch.tensor(list(itertools.chain.from_iterable(token_lists)), dtype=torch.int64)
    return device_tensor(row_ids, None, device), device_tensor(token_ids, None, device)
