"""Which engine replica should serve a prompt: the policy alone, no Ray in it.

A replica that served a prompt keeps its full KV blocks in its prefix cache until they are
evicted, so a later prompt that starts the same way is cheaper there. The policy remembers, per
replica, the block hashes of the prompts it sent there (bounded, least recently sent forgotten
first: an approximation of that replica's cache, as SGLang's router keeps one) and sends a
prompt to the replica holding its longest prefix, as long as that replica is not more than
`balance_threshold` requests busier than the least busy one. Otherwise, and when no replica
holds any of the prefix, the least busy replica serves it (most free KV blocks, then turns,
break ties).

Hashes are the block manager's (`rillm.core.block_manager.prefix_block_hashes`).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass

DEFAULT_BALANCE_THRESHOLD = 4
"""How many more requests in flight a replica with the prefix may have than the least busy
replica and still get the request."""

DEFAULT_TRACKED_BLOCKS = 1 << 16
"""Block hashes remembered per replica when it has not said how many blocks it has."""


@dataclass(frozen=True)
class ReplicaLoad:
    in_flight: int
    """Requests sent to the replica and not finished."""
    free_blocks: int = 0
    """KV-cache blocks the replica last reported free."""
    num_blocks: int = 0
    """KV-cache blocks the replica has (0: not reported yet)."""


POLICIES = ("prefix", "least-loaded")


class PrefixAffinityPolicy:
    def __init__(self, balance_threshold: int = DEFAULT_BALANCE_THRESHOLD,
                 prefix_aware: bool = True) -> None:
        """`prefix_aware=False`: load alone decides (the baseline the benchmark compares)."""
        if balance_threshold < 0:
            raise ValueError("balance_threshold must be >= 0")
        self.balance_threshold = balance_threshold
        self.prefix_aware = prefix_aware
        self._blocks: dict[Hashable, OrderedDict[int, None]] = {}
        self._turn = 0

    def rank(self, block_hashes: Sequence[int],
             loads: Mapping[Hashable, ReplicaLoad]) -> list[Hashable]:
        """Replicas in the order to try them: the chosen one first, then the rest by load."""
        if not loads:
            return []
        self._turn += 1
        replicas = list(loads)
        offset = self._turn % len(replicas)
        turns = {r: (i - offset) % len(replicas) for i, r in enumerate(replicas)}
        by_load = sorted(replicas, key=lambda r: (loads[r].in_flight, -loads[r].free_blocks,
                                                  turns[r]))
        least = loads[by_load[0]].in_flight
        best, best_match = by_load[0], 0
        for replica in by_load if self.prefix_aware else ():
            if loads[replica].in_flight - least > self.balance_threshold:
                break  # by_load is sorted: every later one is busier still
            match = self.matched_blocks(replica, block_hashes)
            if match > best_match:
                best, best_match = replica, match
        return [best] + [r for r in by_load if r != best]

    def matched_blocks(self, replica: Hashable, block_hashes: Sequence[int]) -> int:
        """How many leading blocks of the prompt were sent to `replica` (and not forgotten)."""
        known = self._blocks.get(replica)
        if not known:
            return 0
        count = 0
        for h in block_hashes:
            if h not in known:
                break
            count += 1
        return count

    def routed(self, replica: Hashable, block_hashes: Sequence[int], num_blocks: int = 0) -> None:
        """The prompt went to `replica`: its blocks are (about to be) in that replica's cache.
        At most `num_blocks` (what the replica holds) are remembered for it."""
        known = self._blocks.setdefault(replica, OrderedDict())
        for h in reversed(block_hashes):  # the first blocks last: they are forgotten last
            known[h] = None
            known.move_to_end(h)
        limit = num_blocks or DEFAULT_TRACKED_BLOCKS
        while len(known) > limit:
            known.popitem(last=False)

    def forget(self, replica: Hashable) -> None:
        """The replica is gone (or was replaced, with an empty cache)."""
        self._blocks.pop(replica, None)
