"""What the engine hands back: per-request outputs, as deltas or as whole results."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace


@dataclass(frozen=True)
class Logprob:
    """One generated position: the chosen token's logprob and the most likely alternatives."""

    token_id: int
    logprob: float
    rank: int
    """1 for the most likely token."""
    top: tuple[tuple[int, float], ...] = ()
    """(token id, logprob) of the top-k tokens, most likely first."""


@dataclass(frozen=True)
class CompletionOutput:
    """One choice of a request. In a delta, `text`/`token_ids`/`logprobs` are only what is new."""

    index: int
    text: str
    token_ids: tuple[int, ...]
    logprobs: tuple[Logprob, ...] | None = None
    finish_reason: str | None = None
    """None while running; "stop" (EOS, stop token or stop string) or "length"; "abort"."""
    stop_reason: str | int | None = None
    """The stop string or stop token id that ended the choice, if any."""

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass(frozen=True)
class RequestMetrics:
    """When a finished request's phases ended, in seconds from its arrival (the engine's
    clock): what /metrics' latency histograms observe."""

    queued: float
    """Arrival -> first scheduled (time in the queue)."""
    first_token: float
    """Arrival -> first token (time to first token)."""
    finished: float
    """Arrival -> last token (end-to-end)."""
    inter_token: tuple[float, ...] = ()
    """The gaps between consecutive steps that gave it tokens."""


@dataclass(frozen=True)
class RequestOutput:
    """The new state of one request after an engine step."""

    request_id: str
    prompt_token_ids: tuple[int, ...]
    outputs: tuple[CompletionOutput, ...]
    finished: bool
    prompt: str | None = None
    num_cached_tokens: int = 0
    """Prompt tokens served from the prefix cache instead of being computed."""
    metrics: RequestMetrics | None = field(default=None, compare=False)
    """On a finished request's last output."""


def merge_all(outputs: Sequence[RequestOutput]) -> RequestOutput:
    """Consecutive deltas of one request as one delta: what merging them pairwise in order
    gives, with each choice's text and tokens joined once (pairwise, a stream nobody reads
    would re-join all its pending text on every step)."""
    if len(outputs) == 1:
        return outputs[0]
    parts: dict[int, list[CompletionOutput]] = {}
    for output in outputs:
        for c in output.outputs:
            parts.setdefault(c.index, []).append(c)
    merged = []
    for index in sorted(parts):
        pieces = parts[index]
        last = pieces[-1]
        logprobs = None
        if any(p.logprobs is not None for p in pieces):
            logprobs = tuple(entry for p in pieces for entry in (p.logprobs or ()))
        merged.append(CompletionOutput(
            index=index,
            text="".join(p.text for p in pieces),
            token_ids=tuple(t for p in pieces for t in p.token_ids),
            logprobs=logprobs,
            finish_reason=last.finish_reason,
            stop_reason=last.stop_reason,
        ))
    return replace(outputs[-1], outputs=tuple(merged))


def merge_outputs(first: RequestOutput, second: RequestOutput) -> RequestOutput:
    """Two consecutive deltas of one request as one delta."""
    by_index = {c.index: c for c in first.outputs}
    for c in second.outputs:
        prev = by_index.get(c.index)
        if prev is None:
            by_index[c.index] = c
            continue
        logprobs = None
        if prev.logprobs is not None or c.logprobs is not None:
            logprobs = (prev.logprobs or ()) + (c.logprobs or ())
        by_index[c.index] = CompletionOutput(
            index=c.index,
            text=prev.text + c.text,
            token_ids=prev.token_ids + c.token_ids,
            logprobs=logprobs,
            finish_reason=c.finish_reason,
            stop_reason=c.stop_reason,
        )
    outputs = tuple(by_index[i] for i in sorted(by_index))
    return replace(second, outputs=outputs)
