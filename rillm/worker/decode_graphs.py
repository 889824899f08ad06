"""Decode steps as CUDA graphs: one captured graph per batch size, replayed each step.

A decode step of a small model on a GPU is launch-bound: hundreds of kernels of a few
microseconds each, and Python launching them one by one takes longer than the GPU runs them.
Captured once, a step is one `replay()`.

A graph replays fixed shapes and fixed addresses, so a decode step is made static:

- the batch is padded up to the next captured size (`batch_sizes`); padding rows decode token 0
  at position 0 into a scratch block that the block manager never hands out (the cache has one
  block more than it), with a length of 1;
- every step's inputs live in one device buffer at fixed addresses (token ids, positions,
  cache slots, lengths, block tables `[rows, max_blocks]` wide enough for `max_model_len`),
  filled from one pinned host buffer by two copies;
- attention is the Triton decode kernel (rillm/attention/triton_paged.py), which reads the block
  tables and lengths on the device: the launch does not depend on the sequences' lengths.

`capture=False` runs the very same padded static step without a graph: what the tests check
on a CPU (with the kernels in Triton's interpreter), and what `--enforce-eager` would not need.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import numpy as np
import torch

from rillm.attention import AttentionMetadata, KVCache
from rillm.attention.backends import PagedDecodeMetadata
from rillm.model.builder import CausalLM

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class StaticDecode:
    """How decode steps are made static (the engine's settings)."""

    max_batch: int
    """Largest batch captured (the scheduler's max_num_seqs); larger decode steps run eagerly."""
    max_blocks: int
    """Block table width: blocks of a sequence of max_model_len tokens."""
    capture: bool = True
    """CUDA graphs; False runs the padded static step eagerly (tests on a CPU)."""


def batch_sizes(max_batch: int) -> list[int]:
    """The captured sizes: 1, 2, 4, 8, then every multiple of 16, and `max_batch` itself (a
    step pads at most 15 rows, or doubles below 8)."""
    sizes = [s for s in (1, 2, 4, 8) if s < max_batch]
    sizes += list(range(16, max_batch, 16))
    return sizes + [max_batch]


_FIELDS = 4  # token ids, positions, slots, lengths: one row of max_batch each


class DecodeGraphs:
    def __init__(self, model: CausalLM, caches: list[KVCache], block_size: int,
                 settings: StaticDecode, device: torch.device) -> None:
        """`caches` hold one block more than the block manager's: the last is the scratch
        block padding rows write to."""
        self.model, self.caches, self.block_size = model, caches, block_size
        self.settings = settings
        self.device = device
        self.sizes = batch_sizes(settings.max_batch)
        self.scratch_block = caches[0].key.shape[1] // block_size - 1
        rows, width = settings.max_batch, settings.max_blocks
        length = _FIELDS * rows + rows * width
        pinned = device.type == "cuda"
        self.host = torch.zeros(length, dtype=torch.int64, pin_memory=pinned)
        self._np = self.host.numpy()
        self.buffer = self.host if not settings.capture else torch.zeros(
            length, dtype=torch.int64, device=device)
        fields = self.buffer[: _FIELDS * rows].view(_FIELDS, rows)
        self.input_ids, self.positions, self.slots, self.lengths = fields.unbind(0)
        self.tables = self.buffer[_FIELDS * rows:].view(rows, width)
        self.rows = torch.arange(rows, device=device)
        self._pad(0, rows)
        if self.buffer is not self.host:
            self.buffer.copy_(self.host)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}
        self._copied = torch.cuda.Event() if settings.capture else None
        """Recorded after each step's copies from `host`: the next step waits for it before
        writing there (today every step reads its tokens back first anyway)."""

    def takes(self, num_new: list[int]) -> bool:
        """A step these graphs run: decodes only (one new token each), not too many."""
        return len(num_new) <= self.settings.max_batch and all(n == 1 for n in num_new)

    def capture(self) -> None:
        """Capture every size, largest first (the smaller ones reuse its memory pool)."""
        if not self.settings.capture:
            return
        started = time.perf_counter()
        free_before = torch.cuda.mem_get_info(self.device)[0]
        pool = None
        for size in reversed(self.sizes):
            self._forward(size)  # compiles the Triton kernels, sizes cuBLAS's workspace
            torch.cuda.synchronize(self.device)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self.outputs[size] = self._forward(size)
            pool = graph.pool()
            self.graphs[size] = graph
        torch.cuda.synchronize(self.device)
        used = free_before - torch.cuda.mem_get_info(self.device)[0]
        logger.info("rillm: captured %d decode graphs (batch 1-%d) in %.1f s, %.0f MiB",
                    len(self.sizes), self.settings.max_batch, time.perf_counter() - started,
                    used / 2**20)

    def run(self, token_ids: list[int], starts: list[int],
            block_tables: list[list[int]]) -> torch.Tensor:
        """One decode step: logits [B, vocab] float32, one row a sequence (a view of the
        graph's output, valid until the next step)."""
        batch = len(token_ids)
        size = next(s for s in self.sizes if s >= batch)
        rows, width, bs = self.settings.max_batch, self.settings.max_blocks, self.block_size
        host = self._np
        if self._copied is not None:
            self._copied.synchronize()
        positions = np.asarray(starts, dtype=np.int64)
        tables = host[_FIELDS * rows:].reshape(rows, width)
        for i, table in enumerate(block_tables):
            tables[i, : len(table)] = table
        host[:batch] = token_ids
        host[rows : rows + batch] = positions
        host[2 * rows : 2 * rows + batch] = (
            tables[np.arange(batch), positions // bs] * bs + positions % bs)
        host[3 * rows : 3 * rows + batch] = positions + 1
        self._pad(batch, size)
        if self.buffer is not self.host:
            fields = self.buffer[: _FIELDS * rows]
            fields.copy_(self.host[: _FIELDS * rows], non_blocking=True)
            used = slice(_FIELDS * rows, _FIELDS * rows + size * width)
            self.buffer[used].copy_(self.host[used], non_blocking=True)
            assert self._copied is not None
            self._copied.record()
        if size in self.graphs:
            self.graphs[size].replay()
            return self.outputs[size][:batch]
        return self._forward(size)[:batch]

    def _pad(self, start: int, end: int) -> None:
        """Rows [start, end) decode token 0 at position 0 into the scratch block."""
        rows, width = self.settings.max_batch, self.settings.max_blocks
        host = self._np
        for field in range(_FIELDS):
            host[field * rows + start : field * rows + end] = 0
        host[2 * rows + start : 2 * rows + end] = self.scratch_block * self.block_size
        host[3 * rows + start : 3 * rows + end] = 1
        host[_FIELDS * rows:].reshape(rows, width)[start:end, 0] = self.scratch_block

    @torch.inference_mode()
    def _forward(self, size: int) -> torch.Tensor:
        metadata = AttentionMetadata(
            self.slots[:size],
            decode=PagedDecodeMetadata(self.rows[:size], self.tables[:size],
                                       self.lengths[:size]),
            prefill=None, decode_only=True)
        return self.model(self.input_ids[:size], self.positions[:size], self.caches, metadata,
                          self.rows[:size])
