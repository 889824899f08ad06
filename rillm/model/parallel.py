"""Tensor parallelism's model-side pieces: which shard this process builds, and the sum of the
partial outputs of a row-parallel layer across the ranks (torch.distributed; gloo on the CPU,
nccl on CUDA). The processes and their group are set up by rillm/engine/tensor_parallel.py.

A Llama-family layer splits as Megatron-LM does: q/k/v and gate/up by output rows (each rank
its heads, its slice of the MLP), o_proj and down_proj by input columns, followed by an
all-reduce; KV heads are replicated when there are fewer of them than ranks. Embedding, norms
and the lm_head are whole on every rank.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Shard:
    rank: int
    world: int

    def __post_init__(self) -> None:
        if not 0 <= self.rank < self.world:
            raise ValueError(f"rank {self.rank} outside a world of {self.world}")

    @property
    def parallel(self) -> bool:
        return self.world > 1

    def split(self, size: int) -> tuple[int, int]:
        """This rank's [start, end) of `size` units, split as evenly as they go."""
        return self.rank * size // self.world, (self.rank + 1) * size // self.world

    def heads(self, num_heads: int, num_kv_heads: int) -> tuple[tuple[int, int], tuple[int, int]]:
        """This rank's query heads and KV heads, [start, end) each. KV heads are split as
        evenly as they go (SmolLM2-135M's 3 over 2 ranks: 2 and 1) and each rank takes the
        query heads that read them; with fewer KV heads than ranks, each KV head is replicated
        on the ranks that share its query heads."""
        if num_heads % num_kv_heads:
            raise ValueError(f"{num_heads} heads do not group over {num_kv_heads} KV heads")
        group = num_heads // num_kv_heads
        if num_kv_heads >= self.world:
            k0, k1 = self.split(num_kv_heads)
            return (k0 * group, k1 * group), (k0, k1)
        if self.world % num_kv_heads or group % (self.world // num_kv_heads):
            raise ValueError(f"{num_heads} heads over {num_kv_heads} KV heads do not split "
                             f"over {self.world} ranks")
        sharing = self.world // num_kv_heads  # ranks per KV head
        kv, part = divmod(self.rank, sharing)
        q0 = kv * group + part * (group // sharing)
        return (q0, q0 + group // sharing), (kv, kv + 1)


WHOLE = Shard(0, 1)
"""No tensor parallelism."""


def all_reduce(x: torch.Tensor, shard: Shard) -> torch.Tensor:
    """The sum of every rank's `x` (a row-parallel layer's partial output), in place."""
    if shard.parallel:
        dist.all_reduce(x)
    return x
