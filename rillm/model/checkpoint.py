"""Checkpoint: a model's tensors handed out to the modules that are built from them.

Modules take their weights in their constructors (`tensor`, `linear`), so a model is whole
when it is built: no meta device, no state-dict loading, no attribute set afterwards.
Projections that read the same input are held fused (`PACKED_MODULES`), one matmul instead of
several; checkpoints keep Hugging Face's separate names, concatenated here along the rows.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn

from rillm.kernels.gguf_pack import pack
from rillm.kernels.plan import LinearKernel
from rillm.loader.gguf_blocks import GGUFBlocks, decode_blocks
from rillm.model.embedding import BlockEmbedding
from rillm.model.linear import Dense, GGUFBlocksMethod, Linear, make_linear

PACKED_MODULES: dict[str, tuple[str, ...]] = {
    "qkv_proj": ("q_proj", "k_proj", "v_proj"),
    "gate_up_proj": ("gate_proj", "up_proj"),
}
"""Fused module -> the checkpoint's modules whose output rows it holds, in order."""


class Checkpoint:
    def __init__(self, architecture: str, weights: Mapping[str, torch.Tensor],
                 dtype: torch.dtype, device: torch.device, linear: LinearKernel,
                 blocks: Mapping[str, GGUFBlocks] | None = None) -> None:
        """`weights`: every tensor by Hugging Face name (float, on the CPU; a GGUF's are
        dequantized when looked up, so a matrix kept as blocks never is); `blocks`: a GGUF
        file's matrices as stored, by the same names, kept as blocks where `linear` says so.
        `dtype`: the activations' and the dense weights' dtype."""
        self.architecture = architecture
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
               tied: torch.Tensor | None = None) -> Linear:
        """The (fused) projection `name` from the checkpoint's matrices `sources` (by default
        `name` itself, or its PACKED_MODULES parts). `tied`: an already built weight to share
        where the layer ends up dense (a tied lm_head)."""
        if sources is None:
            owner, dot, leaf = name.rpartition(".")
            sources = [f"{owner}{dot}{p}" for p in PACKED_MODULES.get(leaf, (leaf,))]
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
