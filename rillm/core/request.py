"""Request: one sequence's scheduling state, the single token-accounting model of the engine.

A request has `num_tokens` known tokens (prompt + generated) of which `num_computed_tokens`
are in the KV cache. Prefill, chunked prefill, prefix-cache hits, decode and recompute after
preemption are all the same thing: computing tokens until the two numbers meet, then
sampling one more.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any, Protocol

from rillm.sampling_params import SamplingParams


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    PREEMPTED = "preempted"
    FINISHED_STOPPED = "stop"
    FINISHED_LENGTH = "length"
    FINISHED_ABORTED = "abort"

    @property
    def finished(self) -> bool:
        return self in _FINISHED

    @property
    def finish_reason(self) -> str | None:
        return self.value if self.finished else None


_FINISHED = frozenset(
    {RequestStatus.FINISHED_STOPPED, RequestStatus.FINISHED_LENGTH, RequestStatus.FINISHED_ABORTED}
)


class TokenConstraint(Protocol):
    """Which tokens a constrained sequence may produce next (structured outputs)."""

    def fill_bitmask(self, bitmask: Any, row: int) -> None:
        """Set row `row` of an int32 bitmask [rows, ceil(vocab / 32)]: bit t % 32 of word
        t // 32 is 1 when token t is allowed."""

    def accept(self, token_id: int) -> bool:
        """Advance past a sampled token; False if it was not allowed."""

    @property
    def is_terminated(self) -> bool:
        """Nothing may follow."""


@dataclass(slots=True, eq=False)
class Request:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    max_tokens: int
    """Resolved limit on generated tokens (params.max_tokens capped by the context length)."""
    seed: int
    """Every request has one (the user's or a random one): sampling draws depend on it only."""
    eos_token_ids: frozenset[int] = frozenset()
    arrival: int = 0
    """Arrival order; FCFS ties are broken by it."""
    output_token_ids: list[int] = field(default_factory=list)
    all_token_ids: list[int] = field(init=False)
    status: RequestStatus = RequestStatus.WAITING
    num_computed_tokens: int = 0
    num_cached_tokens: int = -1
    """Prompt tokens found in the prefix cache at first admission; -1 until admitted."""
    block_ids: list[int] = field(default_factory=list)
    block_hashes: list[int] = field(default_factory=list)
    """Chained hashes of this request's full blocks, computed as blocks fill."""
    num_registered_blocks: int = 0
    """Leading blocks of block_ids already offered to the prefix cache."""
    stop_reason: int | str | None = None
    num_preemptions: int = 0
    constraint: TokenConstraint | None = None
    """Structured outputs: the grammar state the sampler's token mask comes from."""

    def __post_init__(self) -> None:
        self.all_token_ids = list(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.all_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def is_finished(self) -> bool:
        return self.status.finished

    def append_token(self, token_id: int) -> None:
        self.output_token_ids.append(token_id)
        self.all_token_ids.append(token_id)

    def check_stop(self, max_model_len: int) -> RequestStatus | None:
        """The finished status the last appended token implies, if any."""
        last = self.output_token_ids[-1]
        params = self.params
        # The sampler masks EOS and stop tokens for the first min_tokens tokens.
        if self.num_output_tokens > params.min_tokens:
            if not params.ignore_eos and last in self.eos_token_ids:
                return RequestStatus.FINISHED_STOPPED
            if last in params.stop_token_ids:  # type: ignore[operator]
                self.stop_reason = last
                return RequestStatus.FINISHED_STOPPED
        if self.num_output_tokens >= self.max_tokens or self.num_tokens >= max_model_len:
            return RequestStatus.FINISHED_LENGTH
        return None
