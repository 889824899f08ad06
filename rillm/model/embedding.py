"""Token embeddings: a dense table, or a GGUF file's blocks looked up row by row.

A 262k-token vocabulary's embedding is most of a small model (Gemma 3 270M: 168M of its
270M weights); kept as the file's blocks (packed for gguf_linear, shared with a tied lm_head)
it costs the file's bytes instead of a bfloat16 copy twice their size. A lookup dequantizes
only the rows asked for, with the float32 reference's arithmetic, then rounds them to the
model's dtype: the same values as a dense table built from the same file.
"""

from __future__ import annotations

import torch
from torch import nn

from rillm.kernels.gguf_pack import unpack_rows
from rillm.loader.gguf_blocks import dequantize_decoded


class BlockEmbedding(nn.Module):
    def __init__(self, packed: torch.Tensor, type_name: str, shape: tuple[int, int],
                 dtype: torch.dtype, device: torch.device) -> None:
        """`packed`: the matrix `[vocab, hidden]` as rillm.kernels.gguf_pack.pack made it."""
        super().__init__()
        self.packed, self.type_name = packed, type_name
        self.num_embeddings, self.embedding_dim = shape
        self.dtype, self.device = dtype, device

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        rows = ids.reshape(-1).to("cpu", torch.int64)
        if rows.numel() and (int(rows.min()) < 0 or int(rows.max()) >= self.num_embeddings):
            raise IndexError(f"token ids must lie in [0, {self.num_embeddings})")
        values = dequantize_decoded(unpack_rows(self.packed, self.type_name, rows))
        return values.to(device=self.device, dtype=self.dtype).view(*ids.shape, -1)

    def extra_repr(self) -> str:
        return f"{self.type_name} blocks, {self.num_embeddings}, {self.embedding_dim}"
