"""Checkpoint: a model's tensors handed out to the modules that are built from them.

Modules take their weights in their constructors (`tensor`, `linear`), so a model is whole
when it is built: no meta device, no state-dict loading, no attribute set afterwards.
Projections that read the same input are held fused (`PACKED_MODULES`), one matmul instead of
several; checkpoints keep Hugging Face's separate names, concatenated here along the rows.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch
from torch import nn

from rillm.kernels.gguf_pack import pack
from rillm.kernels.plan import LinearKernel
from rillm.loader.gguf_blocks import GGUFBlocks, decode_blocks
from rillm.model.embedding import BlockEmbedding
from rillm.model.linear import Dense, GGUFBlocksMethod, Linear, make_linear
from rillm.model.parallel import WHOLE, Shard

PACKED_MODULES: dict[str, tuple[str, ...]] = {
    "qkv_proj": ("q_proj", "k_proj", "v_proj"),
    "gate_up_proj": ("gate_proj", "up_proj"),
}
"""Fused module -> the checkpoint's modules whose output rows it holds, in order."""


class Checkpoint:
    def __init__(self, architecture: str, weights: Mapping[str, torch.Tensor],
                 dtype: torch.dtype, device: torch.device, linear: LinearKernel,
                 blocks: Mapping[str, GGUFBlocks] | None = None, shard: Shard = WHOLE) -> None:
        """`weights`: every tensor by Hugging Face name (float, on the CPU; a GGUF's are
        dequantized when looked up, so a matrix kept as blocks never is); `blocks`: a GGUF
        file's matrices as stored, by the same names, kept as blocks where `linear` says so.
        `dtype`: the activations' and the dense weights' dtype. `shard`: which tensor-parallel
        rank this model is (the modules ask `linear` for their slices)."""
        self.architecture = architecture
        self.shard = shard
        self.weights = weights
        self.blocks = blocks or {}
        self.dtype, self.device, self.kernel = dtype, device, linear
        self._unused = set(weights)
        self._packed: dict[str, torch.Tensor] = {}

    def tensor(self, name: str) -> torch.Tensor:
        """The tensor `name` on the device in the model's dtype (a fresh, contiguous copy:
        loaders may hand out views of file buffers that are misaligned for the kernels)."""
        self._take(name)
        return self.weights[name].to(device=self.device, dtype=self.dtype, copy=True).contiguous()

    def linear(self, name: str, sources: Sequence[str] | None = None,
               tied: torch.Tensor | None = None,
               rows: Sequence[tuple[int, int]] | None = None,
               cols: tuple[int, int] | None = None) -> Linear:
        """The (fused) projection `name` from the checkpoint's matrices `sources` (by default
        `name` itself, or its PACKED_MODULES parts). `tied`: an already built weight to share
        where the layer ends up dense (a tied lm_head). Tensor parallelism: `rows`, one
        [start, end) of output rows per source (column-parallel), or `cols`, [start, end) of
        input columns (row-parallel: its bias, if any, stays on rank 0 alone, so that the
        all-reduce adds it once)."""
        if sources is None:
            owner, dot, leaf = name.rpartition(".")
            sources = [f"{owner}{dot}{p}" for p in PACKED_MODULES.get(leaf, (leaf,))]
        if rows is not None or cols is not None:
            return self._sliced_linear(sources, rows, cols)
        for source in sources:
            self._take(f"{source}.weight")
        biases = [self.weights.get(f"{s}.bias") for s in sources]
        bias = None
        if any(b is not None for b in biases):
            bias = torch.cat([self.tensor(f"{s}.bias") for s in sources])
        parts = self.blocks_of(sources)
        if parts is None and tied is not None:
            return Linear(Dense(tied, bias))

        def dense() -> torch.Tensor:
            weights = [self.weights[f"{s}.weight"] for s in sources]
            return weights[0] if len(weights) == 1 else torch.cat(weights)

        def packed() -> list[torch.Tensor]:
            return [self.packed(f"{s}.weight") for s in sources]

        return make_linear(self.kernel, dense, bias, parts, self.dtype, self.device, packed)

    def _sliced_linear(self, sources: Sequence[str], rows: Sequence[tuple[int, int]] | None,
                       cols: tuple[int, int] | None) -> Linear:
        for source in sources:
            self._take(f"{source}.weight")
        row_ranges = list(rows) if rows is not None else [None] * len(sources)
        if len(row_ranges) != len(sources):
            raise ValueError(f"{len(row_ranges)} row ranges for {len(sources)} matrices")

        def cut(t: torch.Tensor, r: tuple[int, int] | None) -> torch.Tensor:
            t = t[r[0] : r[1]] if r is not None else t
            return t[:, cols[0] : cols[1]] if cols is not None and t.dim() == 2 else t

        bias = None
        biases = [self.weights.get(f"{s}.bias") for s in sources]
        if any(b is not None for b in biases) and (cols is None or self.shard.rank == 0):
            for s in sources:
                self._take(f"{s}.bias")
            bias = torch.cat([
                (b[r[0] : r[1]] if r is not None else b) for b, r in
                zip((self.weights[f"{s}.bias"] for s in sources), row_ranges, strict=True)
            ]).to(device=self.device, dtype=self.dtype).contiguous()
        elif any(b is not None for b in biases):
            for s in sources:
                self.skip(f"{s}.bias")
        whole = self.blocks_of(sources)
        parts = None
        if whole is not None:
            cut_parts = [_cut_blocks(b, r, cols) for b, r in zip(whole, row_ranges, strict=True)]
            parts = None if any(p is None for p in cut_parts) else [
                p for p in cut_parts if p is not None]

        def dense() -> torch.Tensor:
            weights = [cut(self.weights[f"{s}.weight"], r)
                       for s, r in zip(sources, row_ranges, strict=True)]
            return (weights[0] if len(weights) == 1 else torch.cat(weights)).contiguous()

        def packed() -> list[torch.Tensor]:
            assert parts is not None
            return [pack(decode_blocks(p)) for p in parts]

        return make_linear(self.kernel, dense, bias, parts, self.dtype, self.device, packed)

    def embedding(self, name: str) -> nn.Module:
        """The token embedding `name` (`[vocab, hidden]`): the file's blocks where they are
        kept (shared with a tied lm_head), else a dense table in the model's dtype."""
        parts = self.blocks_of([name.removesuffix(".weight")])
        if parts is not None and GGUFBlocksMethod.takes(parts):
            self._take(name)
            return BlockEmbedding(self.packed(name), parts[0].type_name, parts[0].shape,
                                  self.dtype, self.device)
        return nn.Embedding.from_pretrained(self.tensor(name), freeze=True)

    def packed(self, name: str) -> torch.Tensor:
        """The blocks of matrix `name` packed for gguf_linear, once however many modules
        use them (a tied embedding and lm_head)."""
        if name not in self._packed:
            self._packed[name] = pack(decode_blocks(self.blocks[name]))
        return self._packed[name]

    def blocks_of(self, sources: Sequence[str]) -> list[GGUFBlocks] | None:
        """The GGUF blocks of the matrices `sources` where the file has all of them and the
        plan keeps blocks; None otherwise."""
        blocks = [self.blocks.get(f"{s}.weight") for s in sources]
        if self.kernel is LinearKernel.DENSE or any(b is None for b in blocks):
            return None
        return [b for b in blocks if b is not None]

    def _take(self, name: str) -> None:
        if name not in self.weights:
            raise ValueError(f"checkpoint does not match the {self.architecture} "
                             f"architecture: missing [{name!r}]")
        self._unused.discard(name)

    def skip(self, name: str) -> None:
        """`name` may go unused (a tied head's saved copy)."""
        self._unused.discard(name)

    def finish(self) -> None:
        """Every tensor was taken: anything left is a checkpoint of another architecture."""
        if self._unused:
            raise ValueError(f"checkpoint does not match the {self.architecture} "
                             f"architecture: unexpected {sorted(self._unused)[:5]}")


def _cut_blocks(blocks: GGUFBlocks, rows: tuple[int, int] | None,
                cols: tuple[int, int] | None) -> GGUFBlocks | None:
    """A GGUF matrix's rows / input columns, as blocks: rows split anywhere, columns only on
    the format's block boundaries (None where they do not fall on them: that slice is then
    dense)."""
    data, (n, k) = blocks.data, blocks.shape
    if rows is not None:
        data, n = data[rows[0] : rows[1]], rows[1] - rows[0]
    if cols is not None:
        fmt = blocks.format
        if cols[0] % fmt.weights or cols[1] % fmt.weights:
            return None
        data = data[:, cols[0] // fmt.weights * fmt.nbytes : cols[1] // fmt.weights * fmt.nbytes]
        k = cols[1] - cols[0]
    return GGUFBlocks(blocks.type_name, np.ascontiguousarray(data), (n, k))
