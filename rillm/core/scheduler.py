"""Scheduler: which requests compute how many tokens in the next step.

Continuous batching with one rule for every phase: each scheduled request computes
`num_tokens - num_computed_tokens` tokens, cut to what is left of the step's token budget.
Running requests go first (oldest first), so decodes are never starved by new prompts and a
long prompt is prefilled in chunks beside them; waiting requests are admitted after, while
there is budget, a free sequence slot and KV-cache room. When a running request cannot get a
block, the newest running request is preempted: its blocks are freed and it goes back to the
front of the queue to be recomputed later, keeping every token it generated.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from rillm.core.block_manager import BlockManager
from rillm.core.request import Request, RequestStatus


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int
    max_num_batched_tokens: int
    max_model_len: int

    def __post_init__(self) -> None:
        if self.max_num_seqs < 1:
            raise ValueError("max_num_seqs must be at least 1")
        if self.max_num_batched_tokens < 1:
            raise ValueError("max_num_batched_tokens must be at least 1")


@dataclass(frozen=True)
class ScheduledRequest:
    request: Request
    start: int
    """The request's num_computed_tokens when scheduled: this step computes tokens from here."""
    num_new_tokens: int
    samples: bool
    """Whether this step reaches the end of the known tokens, so a new token is sampled."""

    @classmethod
    def of(cls, request: Request, num_new_tokens: int) -> ScheduledRequest:
        start = request.num_computed_tokens
        return cls(request, start, num_new_tokens, start + num_new_tokens == request.num_tokens)


@dataclass(frozen=True)
class SchedulerOutput:
    scheduled: tuple[ScheduledRequest, ...]
    preempted: tuple[Request, ...] = ()

    @property
    def num_batched_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.scheduled)

    @property
    def is_empty(self) -> bool:
        return not self.scheduled


class Scheduler:
    def __init__(self, config: SchedulerConfig, block_manager: BlockManager) -> None:
        self.config = config
        self.block_manager = block_manager
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self._requests: dict[str, Request] = {}
        self.num_preemptions = 0

    @property
    def num_unfinished(self) -> int:
        return len(self._requests)

    def get(self, request_id: str) -> Request | None:
        return self._requests.get(request_id)

    def add(self, request: Request) -> None:
        if request.request_id in self._requests:
            raise ValueError(f"request id {request.request_id!r} is already in use")
        request.status = RequestStatus.WAITING
        self._requests[request.request_id] = request
        self.waiting.append(request)

    def schedule(self) -> SchedulerOutput:
        budget = self.config.max_num_batched_tokens
        scheduled: list[ScheduledRequest] = []
        preempted: list[Request] = []

        index = 0
        while index < len(self.running) and budget > 0:
            request = self.running[index]
            num_new = min(request.num_tokens - request.num_computed_tokens, budget)
            while not self.block_manager.allocate(request, num_new):
                victim = self.running.pop()
                self._preempt(victim)
                preempted.append(victim)
                if victim is request:
                    break
            else:
                scheduled.append(ScheduledRequest.of(request, num_new))
                budget -= num_new
                index += 1

        # Admitting new work right after preempting would only thrash the cache.
        while not preempted and self.waiting and budget > 0:
            if len(self.running) >= self.config.max_num_seqs:
                break
            request = self.waiting[0]
            cached: list[int] = []
            if request.num_computed_tokens == 0:
                cached = self.block_manager.find_cached_prefix(request)
            num_cached_tokens = len(cached) * self.block_manager.block_size
            num_new = min(request.num_tokens - num_cached_tokens, budget)
            if not self.block_manager.allocate(request, num_new, cached):
                break
            self.waiting.popleft()
            request.num_computed_tokens = num_cached_tokens
            if request.num_cached_tokens < 0:
                request.num_cached_tokens = num_cached_tokens
            request.status = RequestStatus.RUNNING
            self.running.append(request)
            scheduled.append(ScheduledRequest.of(request, num_new))
            budget -= num_new

        return SchedulerOutput(tuple(scheduled), tuple(preempted))

    def update(
        self, output: SchedulerOutput, sampled_token_ids: Sequence[int | None]
    ) -> list[Request]:
        """Account for a finished step. `sampled_token_ids` lines up with `output.scheduled`
        (None where nothing was sampled). Returns the requests that got a new token; those
        that finished because of it are already freed and carry their finished status."""
        updated: list[Request] = []
        for item, token_id in zip(output.scheduled, sampled_token_ids, strict=True):
            request = item.request
            if request.is_finished:  # aborted while the step ran
                continue
            request.num_computed_tokens += item.num_new_tokens
            if token_id is None:
                continue
            assert request.num_computed_tokens == request.num_tokens
            request.append_token(token_id)
            updated.append(request)
            status = request.check_stop(self.config.max_model_len)
            if status is not None:
                self._finish(request, status)
        return updated

    def finish(self, request_ids: Iterable[str], status: RequestStatus) -> list[Request]:
        """End requests (abort, or a stop string found by the detokenizer) and free their
        blocks at once. Unknown or already finished ids are ignored."""
        assert status.finished
        finished = []
        for request_id in request_ids:
            request = self._requests.get(request_id)
            if request is not None:
                self._finish(request, status)
                finished.append(request)
        return finished

    def _finish(self, request: Request, status: RequestStatus) -> None:
        if request.status is RequestStatus.RUNNING:
            self.running.remove(request)
        else:
            self.waiting.remove(request)
        request.status = status
        self.block_manager.free(request)
        del self._requests[request.request_id]

    def _preempt(self, request: Request) -> None:
        self.block_manager.free(request)
        request.num_computed_tokens = 0
        request.status = RequestStatus.PREEMPTED
        request.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(request)
