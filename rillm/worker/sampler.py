"""Sampler: picks each sequence's next token from the model's logits, for a whole batch at once.

`SamplingBatch.build` turns per-request `SamplingParams` into tensors (the only per-row Python
loop); `Sampler` applies them to a [B, V] logits tensor with batched torch ops on any device.

Pipeline, in vLLM's order: logit bias, banned tokens (EOS and stop tokens before `min_tokens`,
EOS under `ignore_eos`), repetition/frequency/presence penalties; greedy rows take the argmax of
that; sampled rows go on through temperature, min_p, top_k, top_p and a seeded draw. Logprobs
describe the model's raw distribution (log_softmax of the logits as they came in).

Randomness is a counter-based hash of (seed, step, token id), so a row's token never depends on
the rows sampled beside it: a seeded request gives the same tokens alone, in any batch, and when
it is recomputed after preemption.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from rillm.worker.sampling_batch import MASK32, SamplingBatch

# Odd multipliers below 2**31, so a product of two 32-bit values stays below 2**63 and the
# int64 arithmetic is exact on every device (no reliance on signed-overflow wrapping).
_MUL_A = 0x7FEB_352D
_MUL_B = 0x5BD1_E995
_STEP_SALT = 0x6A09_E667
_STRIDE_SALT = 0xBB67_AE85


@dataclass(frozen=True, eq=False)
class SamplerOutput:
    """One step's tokens. The logprob fields are set only when some row asked for logprobs;
    they cover every row, and a row asking for k top logprobs reads the first k columns."""

    token_ids: Tensor
    """[B] int64."""
    logprobs: Tensor | None = None
    """[B] float32: the sampled token's logprob under the raw logits."""
    ranks: Tensor | None = None
    """[B] int64: 1 + the number of tokens strictly more likely than the sampled one."""
    top_ids: Tensor | None = None
    """[B, K] int64, most likely first; K = `SamplingBatch.max_num_logprobs`."""
    top_logprobs: Tensor | None = None
    """[B, K] float32, matching `top_ids`."""


class Sampler:
    """Turns [B, V] logits into a `SamplerOutput`, with no Python loop over rows.

    Never modifies the logits it is given unless told they are its own (`consume`: the model
    runner's fresh logits, where a copy of [B, V] float32 per step would cost more than the
    bans it makes room for: 10 ms at 32 rows of a 262k vocabulary). On a batch with top_p it
    reads one integer back from the device (the size of the candidate set it must sort);
    everything else is async.
    `argmax_kernel` (KernelPlan.argmax): the argmaxes of CPU float32 logits run on
    `torch.ops.rillm.argmax_rows` (the same answers as torch.argmax, on every thread).
    `prune` (the CPU): the draw hashes only the tokens that can win and top_p sorts only its
    candidates, each found with a read back from the device; unset (a GPU, where hashing and
    sorting the whole vocabulary is cheaper than waiting for the device), the step reads
    nothing back until its tokens. The tokens are the same either way.
    """

    def __init__(self, argmax_kernel: bool = False, prune: bool = True) -> None:
        self._argmax = _kernel_argmax if argmax_kernel else _torch_argmax
        self.prune = prune

    def __call__(self, logits: Tensor, batch: SamplingBatch, *,
                 consume: bool = False) -> SamplerOutput:
        if logits.dim() != 2 or logits.shape != (batch.num_rows, batch.vocab_size):
            raise ValueError(
                f"logits of shape {tuple(logits.shape)} do not match a batch of "
                f"{batch.num_rows} rows over {batch.vocab_size} tokens"
            )
        owned = consume or logits.dtype != torch.float32
        logits = logits.float()
        raw_logprobs = None
        if batch.max_num_logprobs is not None:
            raw_logprobs = torch.log_softmax(logits, dim=-1)

        logits = _process_logits(logits, batch, in_place=owned)
        if batch.all_greedy:
            token_ids = self._argmax(logits)
        else:
            token_ids = _sample(logits, batch, self._argmax, self.prune)
            if batch.any_greedy:
                token_ids = torch.where(batch.greedy, self._argmax(logits), token_ids)

        if raw_logprobs is None:
            return SamplerOutput(token_ids=token_ids)
        return _with_logprobs(token_ids, raw_logprobs, batch.max_num_logprobs or 0)


def _process_logits(logits: Tensor, batch: SamplingBatch, in_place: bool) -> Tensor:
    """Bias, bans and penalties; returns a new tensor whenever it changes anything, unless
    `in_place` (then bias, bans and the grammar's mask write into `logits`)."""
    changes = batch.logit_bias is not None or batch.banned is not None or batch.allowed is not None
    if changes and not in_place:
        logits = logits.clone()
    if batch.logit_bias is not None:
        rows, tokens, biases = batch.logit_bias
        logits.index_put_((rows, tokens), biases, accumulate=True)
    if batch.banned is not None:
        banned_rows = batch.banned[0]  # a fill on the device: no scalar copied to it
        logits.index_put_(batch.banned, torch.full(banned_rows.shape, float("-inf"),
                                                   device=logits.device))
    if batch.allowed is not None:
        logits.masked_fill_(~unpack_bitmask(batch.allowed, batch.vocab_size), float("-inf"))
    if batch.seen_tokens is not None and batch.repetition_penalty is not None:
        penalty = batch.repetition_penalty[:, None]
        # Shrink toward "less likely" either way: positive logits divide, negative multiply.
        penalized = torch.where(logits > 0, logits / penalty, logits * penalty)
        logits = torch.where(batch.seen_tokens, penalized, logits)
    if (
        batch.output_counts is not None
        and batch.frequency_penalty is not None
        and batch.presence_penalty is not None
    ):
        counts = batch.output_counts
        logits = logits - batch.frequency_penalty[:, None] * counts
        logits = logits - batch.presence_penalty[:, None] * (counts > 0)
    return logits


def bitmask_words(vocab_size: int) -> int:
    """int32 words in one row of a token bitmask."""
    return (vocab_size + 31) // 32


def unpack_bitmask(bitmask: Tensor, vocab_size: int) -> Tensor:
    """[B, W] int32 bitmask -> [B, vocab_size] bool (True: allowed)."""
    shifts = torch.arange(32, dtype=torch.int32, device=bitmask.device)
    bits = (bitmask[:, :, None] >> shifts).bitwise_and_(1)
    return bits.reshape(bitmask.shape[0], -1)[:, :vocab_size].bool()


def _torch_argmax(x: Tensor) -> Tensor:
    return x.argmax(dim=-1)


def _kernel_argmax(x: Tensor) -> Tensor:
    if x.device.type == "cpu" and x.dtype == torch.float32 and x.dim() == 2 and x.shape[1]:
        return torch.ops.rillm.argmax_rows.default(x)
    return x.argmax(dim=-1)


def _sample(logits: Tensor, batch: SamplingBatch,
            argmax: Callable[[Tensor], Tensor] = _torch_argmax, prune: bool = True) -> Tensor:
    """Temperature, min_p, top_k, top_p, then a Gumbel-max draw: argmax(x + G) with
    G = -log(-log u) picks token i with probability softmax(x)_i, so no softmax is needed."""
    x = logits / batch.temperature[:, None]
    if batch.min_p is not None:
        # p_i < min_p * p_max  <=>  x_i < x_max + log(min_p); log(0) = -inf keeps everything.
        floor = x.amax(dim=-1, keepdim=True) + batch.min_p.log()[:, None]
        x.masked_fill_(x < floor, float("-inf"))
    if batch.top_k is not None:
        _mask_top_k_(x, batch.top_k, batch.max_top_k)
    if batch.top_p is not None:
        _mask_top_p_(x, batch.top_p, prune)
    return _gumbel_argmax(x, batch, argmax, prune)


# The noise's range: u lies in [0.5, 2**23 - 0.5] / 2**23, so G = -log(-log u) lies in
# [-2.81, 16.64]. A token whose value sits more than the difference below its row's largest can
# never win the draw, whatever the two noises.
_U_LOW, _U_HIGH = 0.5 / 2**23, (2**23 - 0.5) / 2**23
_GUMBEL_SPREAD = -math.log(-math.log(_U_HIGH)) + math.log(-math.log(_U_LOW))


def _gumbel_argmax(x: Tensor, batch: SamplingBatch,
                   argmax: Callable[[Tensor], Tensor] = _torch_argmax,
                   prune: bool = True) -> Tensor:
    """argmax(x + G) over each row, G = `_gumbel_noise(batch)`, hashing only the candidates.

    With a 262k vocabulary the noise of every token costs more than the model's step (95 ms a
    step at 32 rows against 56 for the step, Gemma 3 270M), yet a trained model's values leave
    only a few percent of tokens within `_GUMBEL_SPREAD` of the row's largest. Only those get
    their noise, the very values the full draw gives them, and the winner is the same token:
    the others' x + G stays below the winner's even after float32 rounding (the margin covers
    two roundings at the row's magnitude). Ties go to the lowest token id, as argmax's do.
    Not `prune` (a GPU): every token's noise, since finding the candidates reads back.
    """
    if not prune:
        return argmax(x.add_(_gumbel_noise(batch)))
    rows, vocab = x.shape
    top = x.amax(dim=-1, keepdim=True)
    margin = 0.01 + top.abs() * 1e-6
    row, col = (x >= top - (_GUMBEL_SPREAD + margin)).nonzero(as_tuple=True)
    if row.numel() > x.numel() // 4 or not torch.isfinite(top).all():
        # Most tokens in play (a high temperature), or no finite value to prune against.
        return argmax(x.add_(_gumbel_noise(batch)))
    start, stride = _row_streams(batch)
    h = col * stride[row]
    h.add_(start[row]).bitwise_and_(MASK32)
    score = x[row, col] + gumbel_from_bits(_mix32_(h))
    best = torch.full((rows,), float("-inf"), device=x.device).scatter_reduce_(
        0, row, score, "amax")
    won = score == best[row]
    return torch.full((rows,), vocab, dtype=torch.int64, device=x.device).scatter_reduce_(
        0, row[won], col[won], "amin")


def _mask_top_k_(x: Tensor, top_k: Tensor, max_top_k: int) -> None:
    """Keep the top_k largest entries of each row (ties with the k-th included)."""
    vocab = x.shape[-1]
    largest = x.topk(max_top_k, dim=-1).values
    kth = largest.gather(1, (top_k.clamp(max=max_top_k) - 1)[:, None])
    kth.masked_fill_(top_k[:, None] >= vocab, float("-inf"))
    x.masked_fill_(x < kth, float("-inf"))


def _mask_top_p_(x: Tensor, top_p: Tensor, prune: bool = True) -> None:
    """Keep each row's nucleus: the most likely tokens whose total probability first
    reaches top_p (the top token always stays).

    Sorting all V entries is the slow part on a CPU, so only candidates are sorted: tokens
    with p >= (1 - top_p) / V. Those below carry less than 1 - top_p in total, so the
    candidates alone reach top_p and the nucleus lies among them. Not `prune`: every entry
    is sorted (no read back from the device).
    """
    vocab = x.shape[-1]
    probs = x.softmax(dim=-1)
    active = top_p < 1.0
    floor = torch.where(active, (1.0 - top_p) / vocab, 2.0)[:, None]
    num_candidates = int((probs >= floor).sum(dim=-1).max()) if prune else vocab  # host sync
    ranked = probs.topk(max(num_candidates, 1), dim=-1).values
    before = ranked.cumsum(dim=-1) - ranked
    num_kept = (before < top_p[:, None]).sum(dim=-1).clamp(min=1)
    threshold = ranked.gather(1, (num_kept - 1)[:, None])
    threshold.masked_fill_(~active[:, None], 0.0)
    x.masked_fill_(probs < threshold, float("-inf"))


def _gumbel_noise(batch: SamplingBatch) -> Tensor:
    """[B, V] float32 Gumbel noise; entry (i, t) is a pure function of (seed_i, step_i, t).

    Each row is a SplitMix-style stream: seed and step hash to a start value and an odd
    stride, token t reads mix32(start + t * stride). Rows get different strides, so no row's
    stream is a shifted copy of another's. 23 hashed bits become u in (0, 1), and
    -log(-log u) is the Gumbel noise (see `gumbel_from_bits`).
    """
    start, stride = _row_streams(batch)
    # token id < 2**31 times stride < 2**32 stays below 2**63.
    h = torch.arange(batch.vocab_size, device=start.device)[None, :] * stride[:, None]
    h.add_(start[:, None]).bitwise_and_(MASK32)
    _mix32_(h)
    return gumbel_from_bits(h)


def _row_streams(batch: SamplingBatch) -> tuple[Tensor, Tensor]:
    """[B] start values and odd strides of the rows' noise streams."""
    start = _mix32(((batch.steps + _STEP_SALT) & MASK32) ^ batch.seed_hi)
    start = _mix32(start ^ batch.seed_lo)
    return start, _mix32(start ^ _STRIDE_SALT) | 1


def gumbel_from_bits(h: Tensor) -> Tensor:
    """Gumbel noise from the low 23 bits of each int64 entry (consumed in place).

    u = (bits + 0.5) / 2**23 lies strictly inside (0, 1) in float32: its 24 significant bits
    hold exactly. With 24 bits the top value rounds to u = 1.0, whose noise is +inf, and that
    token would win the draw whatever its logit (even a masked one)."""
    u = h.bitwise_and_(0x7F_FFFF).float().add_(0.5).mul_(2.0**-23)
    return u.log_().neg_().log_().neg_()


def _mix32(x: Tensor) -> Tensor:
    """A 32-bit integer finalizer (xorshift-multiply); a bijection on [0, 2**32)."""
    return _mix32_(x.clone())


def _mix32_(x: Tensor) -> Tensor:
    """`_mix32` in place: [B, V] temporaries are expensive to allocate on a CPU."""
    x.bitwise_xor_(x >> 16)
    x.mul_(_MUL_A).bitwise_and_(MASK32)
    x.bitwise_xor_(x >> 15)
    x.mul_(_MUL_B).bitwise_and_(MASK32)
    x.bitwise_xor_(x >> 16)
    return x


def _with_logprobs(token_ids: Tensor, logprobs: Tensor, num_top: int) -> SamplerOutput:
    chosen = logprobs.gather(1, token_ids[:, None])
    ranks = (logprobs > chosen).sum(dim=-1) + 1
    top_logprobs, top_ids = logprobs.topk(num_top, dim=-1)
    return SamplerOutput(
        token_ids=token_ids,
        logprobs=chosen.squeeze(1),
        ranks=ranks,
        top_ids=top_ids,
        top_logprobs=top_logprobs,
    )
