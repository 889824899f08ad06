"""ModelRunner: turns a scheduled step into tensors, runs the model, samples.

The only place that builds tensors from requests. One flat batch per step: the tokens of all
scheduled requests back to back, no padding in the linear layers; attention metadata groups
decodes and prefill chunks separately, and the attention backends build their metadata for them
(rillm/attention/backends.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

from rillm.arch_config import ModelArchConfig
from rillm.attention import AttentionMetadata, KVCache, PagedAttention, SequenceGroup
from rillm.core.scheduler import ScheduledRequest
from rillm.model.builder import CausalLM
from rillm.outputs import Logprob
from rillm.worker.decode_graphs import DecodeGraphs, StaticDecode
from rillm.worker.sampler import Sampler, SamplerOutput, SamplingBatch, bitmask_words
from rillm.worker.sampling_batch import device_tensor


@dataclass(frozen=True)
class StepInputs:
    """One model step as plain lists: what the step's tensors are built from (tensor
    parallelism sends them from rank 0 to the others)."""

    token_ids: list[int]
    num_new: list[int]
    starts: list[int]
    block_tables: list[list[int]]
    samples: list[bool]


class StepBroadcaster(Protocol):
    """Tensor parallelism's rank 0 side (rillm/engine/tensor_parallel.py)."""

    broken: bool

    def broadcast(self, step: StepInputs) -> None: ...


@dataclass(frozen=True)
class RunnerOutput:
    sampled_token_ids: list[int | None]
    """One entry per scheduled request; None where the step did not sample (partial prefill)."""
    logprobs: list[Logprob | None]


class ModelRunner:
    def __init__(
        self,
        model: CausalLM,
        attention: PagedAttention,
        config: ModelArchConfig,
        num_blocks: int,
        block_size: int,
        dtype: torch.dtype,
        device: torch.device,
        threads: int | None = None,
        argmax_kernel: bool = False,
        num_kv_heads: int | None = None,
        group: StepBroadcaster | None = None,
        static_decode: StaticDecode | None = None,
    ) -> None:
        """`attention`: the backends the model was built with. `threads`: torch threads for
        the steps, set in the thread that runs them (None: whatever that thread has).
        `argmax_kernel`: the sampler's argmax on rillm's C++ kernel (KernelPlan.argmax).
        Tensor parallelism: `num_kv_heads`, the KV heads of this rank's cache; `group`, on
        rank 0, the other ranks, told each step's inputs before the model runs.
        `static_decode`: decode steps run padded to fixed shapes, as CUDA graphs where it
        says so (decode_graphs.py; the attention's decode backend must be Triton's); the
        caches then hold one scratch block more than `num_blocks`."""
        self.model = model
        self.attention = attention
        self.config = config
        self.block_size = block_size
        self.device = device
        self.eos_token_ids = config.eos_token_ids
        kv_heads = num_kv_heads if num_kv_heads is not None else config.num_key_value_heads
        cache_blocks = num_blocks + (1 if static_decode is not None else 0)
        self.caches = [
            KVCache(cache_blocks, block_size, kv_heads, config.head_dim, dtype, device)
            for _ in range(config.num_hidden_layers)
        ]
        self.graphs = (DecodeGraphs(model, self.caches, block_size, static_decode, device)
                       if static_decode is not None else None)
        self.group = group
        self.sampler = Sampler(argmax_kernel, prune=device.type == "cpu")
        self.threads = threads

    @torch.inference_mode()
    def forward(
        self, scheduled: Sequence[ScheduledRequest], all_tokens: bool = False
    ) -> torch.Tensor:
        """Run the model on the step, writing its K/V into the cache. Logits [N, vocab] (float32)
        of the last token of each request that samples, or of every token if `all_tokens`."""
        if self.threads and torch.get_num_threads() != self.threads:
            torch.set_num_threads(self.threads)  # a server steps in its own thread
        step = self.step_inputs(scheduled)
        if self.group is not None:
            self.group.broadcast(step)
        if self.graphs is not None and not all_tokens and self.graphs.takes(step.num_new):
            logits = self.graphs.run(step.token_ids, step.starts, step.block_tables)
            if all(step.samples):
                return logits
            rows = [i for i, sample in enumerate(step.samples) if sample]
            return logits.index_select(0, device_tensor(rows, torch.int64, self.device))
        input_ids, positions, metadata, logits_indices = self._prepare(step)
        if all_tokens:
            logits_indices = torch.arange(input_ids.shape[0], device=self.device)
        try:
            return self.model(input_ids, positions, self.caches, metadata, logits_indices)
        except BaseException:
            if self.group is not None:  # the other ranks may be inside an all-reduce
                self.group.broken = True
            raise

    @torch.inference_mode()
    def run_step(self, step: StepInputs) -> None:
        """A tensor-parallel rank other than 0: the step rank 0 scheduled, into this rank's
        cache; no logits (rank 0 samples)."""
        if self.threads and torch.get_num_threads() != self.threads:
            torch.set_num_threads(self.threads)
        input_ids, positions, metadata, _ = self._prepare(step)
        none = torch.zeros(0, dtype=torch.int64, device=self.device)
        self.model(input_ids, positions, self.caches, metadata, none)

    @torch.inference_mode()
    def execute(self, scheduled: Sequence[ScheduledRequest]) -> RunnerOutput:
        logits = self.forward(scheduled)
        sampling = [s for s in scheduled if s.samples]
        sampled: list[int | None] = [None] * len(scheduled)
        logprobs: list[Logprob | None] = [None] * len(scheduled)
        if not sampling:
            return RunnerOutput(sampled, logprobs)
        batch = SamplingBatch.build(
            params=[s.request.params for s in sampling],
            seeds=[s.request.seed for s in sampling],
            prompt_token_ids=[s.request.prompt_token_ids for s in sampling],
            output_token_ids=[s.request.output_token_ids for s in sampling],
            eos_token_ids=self.eos_token_ids,
            vocab_size=self.config.vocab_size,
            device=self.device,
            allowed=self._allowed_tokens(sampling),
        )
        result = self.sampler(logits, batch, consume=True)
        rows = [i for i, s in enumerate(scheduled) if s.samples]
        for row, token_id in zip(rows, result.token_ids.tolist(), strict=True):
            sampled[row] = token_id
        if result.logprobs is not None:
            for row, entry in zip(rows, _logprobs(result, sampling), strict=True):
                logprobs[row] = entry
        return RunnerOutput(sampled, logprobs)

    def _allowed_tokens(self, sampling: Sequence[ScheduledRequest]) -> torch.Tensor | None:
        """The token bitmask of constrained rows (structured outputs), or None if none is."""
        constrained = [(row, s.request.constraint) for row, s in enumerate(sampling)
                       if s.request.constraint is not None]
        if not constrained:
            return None
        bitmask = torch.full((len(sampling), bitmask_words(self.config.vocab_size)), -1,
                             dtype=torch.int32)
        for row, constraint in constrained:
            constraint.fill_bitmask(bitmask, row)
        return bitmask

    @staticmethod
    def step_inputs(scheduled: Sequence[ScheduledRequest]) -> StepInputs:
        """What the step's tensors are built from, as plain lists (tensor parallelism sends
        them to the other ranks)."""
        ids: list[int] = []
        for s in scheduled:
            ids.extend(s.request.all_token_ids[s.start : s.start + s.num_new_tokens])
        return StepInputs(ids, [s.num_new_tokens for s in scheduled],
                          [s.start for s in scheduled],
                          [list(s.request.block_ids) for s in scheduled],
                          [s.samples for s in scheduled])

    def _prepare(
        self, step: StepInputs
    ) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata, torch.Tensor]:
        device = self.device
        ids = step.token_ids
        num_new = torch.tensor(step.num_new, dtype=torch.int64)
        starts = torch.tensor(step.starts, dtype=torch.int64)
        ends = torch.cumsum(num_new, 0)
        offsets = ends - num_new  # where each request's tokens begin in the flat batch
        num_tokens = int(ends[-1])
        row = torch.repeat_interleave(torch.arange(len(step.num_new)), num_new)
        positions = starts[row] + torch.arange(num_tokens) - offsets[row]

        max_blocks = max(len(b) for b in step.block_tables)
        block_tables = torch.tensor(
            [b + [0] * (max_blocks - len(b)) for b in step.block_tables], dtype=torch.int64,
        )
        size = self.block_size
        slot_mapping = block_tables[row, positions // size] * size + positions % size

        decodes, prefills = (self._group(rows, num_new, starts, offsets, block_tables)
                             for rows in (num_new == 1, num_new > 1))
        metadata = self.attention.build(slot_mapping.to(device), decodes, prefills)
        samples = torch.tensor(step.samples, dtype=torch.bool)
        logits_indices = (ends - 1)[samples]
        return (
            torch.tensor(ids, dtype=torch.int64, device=device),
            positions.to(device),
            metadata,
            logits_indices.to(device),
        )

    @staticmethod
    def _group(rows: torch.Tensor, num_new: torch.Tensor, starts: torch.Tensor,
               offsets: torch.Tensor, block_tables: torch.Tensor) -> SequenceGroup | None:
        """The sequences where `rows` (bool) is set, or None where none is."""
        if not bool(rows.any()):
            return None
        return SequenceGroup(num_new[rows], starts[rows], offsets[rows], block_tables[rows])


def _logprobs(result: SamplerOutput, sampling: Sequence[ScheduledRequest]) -> list[Logprob | None]:
    assert result.logprobs is not None and result.ranks is not None
    assert result.top_ids is not None and result.top_logprobs is not None
    token_ids = result.token_ids.tolist()
    values = result.logprobs.tolist()
    ranks = result.ranks.tolist()
    top_ids = result.top_ids.tolist()
    top_values = result.top_logprobs.tolist()
    entries: list[Logprob | None] = []
    for i, s in enumerate(sampling):
        k = s.request.params.logprobs
        if k is None:
            entries.append(None)
            continue
        top = tuple(zip(top_ids[i][:k], top_values[i][:k], strict=True))
        entries.append(Logprob(token_ids[i], values[i], ranks[i], top))
    return entries
