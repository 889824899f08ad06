"""BlockManager: who owns which KV-cache block, and which full blocks can be reused.

Invariants:
- Every block is either referenced (ref_count > 0, owned by one or more requests) or on the
  free queue; never both, never neither.
- A block with a hash holds exactly the KV of the tokens that hash names (its tokens and
  everything before them). Hashes are registered when a block is allocated for tokens that
  this step computes in full, so a request scheduled in the same step may already hit them:
  the model runner writes every token's KV before any attention reads the cache.
- Free blocks keep their hash until they are reused, so a finished request's prefix can be
  hit again. The free queue is least-recently-freed first; a request's blocks are freed tail
  first, so shared prefixes are evicted last.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

from rillm.core.request import Request

_ROOT_HASH = 0x5EED


def block_hash(parent: int, tokens: Sequence[int]) -> int:
    """The hash naming one full block: its tokens and, through `parent` (the previous block's
    hash, or the root's), every token before them. Python hashes ints and tuples of ints the
    same way in every process, so another process (a router) computes the same names."""
    return hash((parent, tuple(tokens)))


def prefix_block_hashes(token_ids: Sequence[int], block_size: int) -> list[int]:
    """The hashes of the full blocks of `token_ids`, as the block manager names them."""
    hashes: list[int] = []
    parent = _ROOT_HASH
    for start in range(0, len(token_ids) - block_size + 1, block_size):
        parent = block_hash(parent, token_ids[start : start + block_size])
        hashes.append(parent)
    return hashes


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError("num_blocks and block_size must be positive")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self._ref_counts = [0] * num_blocks
        self._block_hash: list[int | None] = [None] * num_blocks
        self._cached: dict[int, int] = {}
        """Block hash -> block id holding those tokens."""
        self._free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self.num_prefix_queries = 0
        self.num_prefix_hits = 0

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def usage(self) -> float:
        """Fraction of blocks referenced by requests (cached free blocks count as free)."""
        return 1.0 - self.num_free_blocks / self.num_blocks

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def find_cached_prefix(self, request: Request) -> list[int]:
        """Blocks already holding a prefix of the request's tokens (at least one token is left
        to compute, since the last one's logits are needed)."""
        if not self.enable_prefix_caching:
            return []
        max_blocks = (request.num_tokens - 1) // self.block_size
        self._hash_full_blocks(request, max_blocks)
        hits: list[int] = []
        for block_hash in request.block_hashes[:max_blocks]:
            block_id = self._cached.get(block_hash)
            if block_id is None:
                break
            hits.append(block_id)
        self.num_prefix_queries += request.num_tokens
        self.num_prefix_hits += len(hits) * self.block_size
        return hits

    def allocate(
        self, request: Request, num_new_tokens: int, cached_blocks: Sequence[int] = ()
    ) -> bool:
        """Give the request room for `num_new_tokens` more tokens after its computed ones
        (and after `cached_blocks`, which it takes as its first blocks). False, with nothing
        changed, when there are not enough free blocks."""
        num_cached_tokens = len(cached_blocks) * self.block_size
        total_tokens = request.num_computed_tokens + num_cached_tokens + num_new_tokens
        num_new_blocks = (
            self.blocks_needed(total_tokens) - len(request.block_ids) - len(cached_blocks)
        )
        # Cached blocks nobody references sit on the free queue; taking them uses it up too.
        num_revived = sum(1 for b in cached_blocks if self._ref_counts[b] == 0)
        if max(num_new_blocks, 0) + num_revived > self.num_free_blocks:
            return False
        for block_id in cached_blocks:
            if self._ref_counts[block_id] == 0:
                del self._free[block_id]
            self._ref_counts[block_id] += 1
            request.block_ids.append(block_id)
        for _ in range(num_new_blocks):
            request.block_ids.append(self._pop_free())
        if self.enable_prefix_caching:
            self._register_full_blocks(request, total_tokens // self.block_size)
        return True

    def free(self, request: Request) -> None:
        """Drop the request's references; its blocks stay cached until reused."""
        for block_id in reversed(request.block_ids):
            self._ref_counts[block_id] -= 1
            assert self._ref_counts[block_id] >= 0, f"block {block_id} freed twice"
            if self._ref_counts[block_id] == 0:
                self._free[block_id] = None
        request.block_ids.clear()
        request.num_registered_blocks = 0

    def reset_prefix_cache(self) -> None:
        for block_id in self._cached.values():
            self._block_hash[block_id] = None
        self._cached.clear()

    def _pop_free(self) -> int:
        block_id, _ = self._free.popitem(last=False)
        old_hash = self._block_hash[block_id]
        if old_hash is not None:
            if self._cached.get(old_hash) == block_id:
                del self._cached[old_hash]
            self._block_hash[block_id] = None
        self._ref_counts[block_id] = 1
        return block_id

    def _register_full_blocks(self, request: Request, num_full_blocks: int) -> None:
        self._hash_full_blocks(request, num_full_blocks)
        for index in range(request.num_registered_blocks, num_full_blocks):
            block_id = request.block_ids[index]
            if self._block_hash[block_id] is not None:
                continue
            block_hash = request.block_hashes[index]
            # Another block may already hold these tokens (two requests raced to compute them);
            # keep the first and leave this one unhashed.
            if block_hash not in self._cached:
                self._cached[block_hash] = block_id
                self._block_hash[block_id] = block_hash
        request.num_registered_blocks = max(request.num_registered_blocks, num_full_blocks)

    def _hash_full_blocks(self, request: Request, num_blocks: int) -> None:
        hashes = request.block_hashes
        tokens = request.all_token_ids
        size = self.block_size
        num_blocks = min(num_blocks, len(tokens) // size)
        parent = hashes[-1] if hashes else _ROOT_HASH
        for index in range(len(hashes), num_blocks):
            parent = block_hash(parent, tokens[index * size : (index + 1) * size])
            hashes.append(parent)
