"""The prefix-aware routing policy alone: no Ray, no model, milliseconds."""

from __future__ import annotations

import subprocess
import sys

import pytest

from rillm.core.block_manager import BlockManager, prefix_block_hashes
from rillm.distributed.routing import PrefixAffinityPolicy, ReplicaLoad
from tests.core.fakes import make_request

BLOCK = 4


def hashes(tokens: list[int]) -> list[int]:
    return prefix_block_hashes(tokens, BLOCK)


def idle(*replicas: str, in_flight: int = 0) -> dict[str, ReplicaLoad]:
    return {r: ReplicaLoad(in_flight=in_flight, free_blocks=100, num_blocks=100)
            for r in replicas}


SYSTEM = list(range(1, 17))  # four full blocks every prompt below starts with


def test_hashes_are_the_block_managers():
    bm = BlockManager(num_blocks=16, block_size=BLOCK, enable_prefix_caching=True)
    request = make_request(SYSTEM + [40, 41, 42])
    bm.find_cached_prefix(request)  # names the prompt's full blocks
    assert request.block_hashes == hashes(SYSTEM + [40, 41, 42])
    assert len(hashes(SYSTEM + [40, 41, 42])) == 4  # full blocks only


def test_hashes_agree_across_processes():
    # The router and the replicas are different processes (PYTHONHASHSEED differs).
    code = ("from rillm.core.block_manager import prefix_block_hashes;"
            "print(prefix_block_hashes(list(range(1, 17)), 4))")
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                           check=True, env={"PYTHONHASHSEED": "12345", "PATH": ""}).stdout
    assert other.strip() == str(hashes(SYSTEM))


def test_a_shared_prefix_goes_where_it_went_before():
    policy = PrefixAffinityPolicy()
    first = policy.rank(hashes(SYSTEM + [50]), idle("a", "b"))[0]
    policy.routed(first, hashes(SYSTEM + [50]))
    for tail in ([60, 61, 62, 63, 64], [70], [80, 81, 82, 83]):
        assert policy.rank(hashes(SYSTEM + tail), idle("a", "b"))[0] == first


def test_the_longest_match_wins():
    policy = PrefixAffinityPolicy()
    policy.routed("a", hashes(SYSTEM[:8]))
    policy.routed("b", hashes(SYSTEM))
    assert policy.rank(hashes(SYSTEM + [99]), idle("a", "b", "c"))[0] == "b"
    assert policy.matched_blocks("a", hashes(SYSTEM)) == 2
    assert policy.matched_blocks("b", hashes(SYSTEM)) == 4
    assert policy.matched_blocks("c", hashes(SYSTEM)) == 0


def test_a_busy_replica_loses_its_prefix_advantage():
    policy = PrefixAffinityPolicy(balance_threshold=2)
    policy.routed("a", hashes(SYSTEM))
    prompt = hashes(SYSTEM + [7])
    close = {"a": ReplicaLoad(in_flight=3), "b": ReplicaLoad(in_flight=1)}
    assert policy.rank(prompt, close)[0] == "a"  # 2 more: still balanced
    far = {"a": ReplicaLoad(in_flight=4), "b": ReplicaLoad(in_flight=1)}
    assert policy.rank(prompt, far) == ["b", "a"]  # 3 more: the least loaded serves it


def test_without_a_prefix_the_least_loaded_serves_and_ties_take_turns():
    policy = PrefixAffinityPolicy()
    loads = {"a": ReplicaLoad(in_flight=2), "b": ReplicaLoad(in_flight=0),
             "c": ReplicaLoad(in_flight=1)}
    assert policy.rank(hashes([9] * 8), loads) == ["b", "c", "a"]
    # Equal load: more free KV blocks first.
    roomy = {"a": ReplicaLoad(0, free_blocks=10), "b": ReplicaLoad(0, free_blocks=90)}
    assert policy.rank([], roomy)[0] == "b"
    # Equal in everything: each replica gets its turn.
    firsts = {policy.rank([], idle("a", "b", "c"))[0] for _ in range(3)}
    assert firsts == {"a", "b", "c"}


def test_memory_per_replica_is_bounded_by_its_blocks_and_keeps_the_prefix():
    policy = PrefixAffinityPolicy()
    long_prompt = hashes(list(range(1, 41)))  # ten blocks
    policy.routed("a", long_prompt, num_blocks=4)
    assert policy.matched_blocks("a", long_prompt) == 4  # the first four are what is kept
    policy.routed("a", hashes(list(range(500, 540))), num_blocks=4)
    assert policy.matched_blocks("a", long_prompt) == 0


def test_a_forgotten_replica_has_no_affinity():
    policy = PrefixAffinityPolicy()
    policy.routed("a", hashes(SYSTEM))
    policy.forget("a")
    assert policy.matched_blocks("a", hashes(SYSTEM)) == 0
    assert policy.rank([], {}) == []
    with pytest.raises(ValueError):
        PrefixAffinityPolicy(balance_threshold=-1)


def test_least_loaded_ignores_prefixes():
    policy = PrefixAffinityPolicy(prefix_aware=False)
    policy.routed("a", hashes(SYSTEM))
    loads = {"a": ReplicaLoad(in_flight=1), "b": ReplicaLoad(in_flight=0)}
    assert policy.rank(hashes(SYSTEM + [5]), loads) == ["b", "a"]
