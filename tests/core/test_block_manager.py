from rillm.core.block_manager import BlockManager
from tests.core.fakes import make_request


def test_allocation_takes_whole_blocks_and_free_returns_them():
    bm = BlockManager(num_blocks=10, block_size=4, enable_prefix_caching=True)
    req = make_request(10)
    assert bm.allocate(req, 10)
    assert len(req.block_ids) == 3
    assert bm.num_free_blocks == 7
    req.num_computed_tokens = 10
    req.append_token(7)
    assert bm.allocate(req, 1)  # token 11 still fits the third block
    assert len(req.block_ids) == 3
    req.num_computed_tokens = 11
    req.append_token(7)
    req.num_computed_tokens = 12
    req.append_token(7)
    assert bm.allocate(req, 1)
    assert len(req.block_ids) == 4
    bm.free(req)
    assert bm.num_free_blocks == 10 and req.block_ids == []


def test_allocation_fails_without_side_effects_when_full():
    bm = BlockManager(num_blocks=3, block_size=4, enable_prefix_caching=False)
    a, b = make_request(8), make_request(8)
    assert bm.allocate(a, 8)
    assert not bm.allocate(b, 8)
    assert b.block_ids == [] and bm.num_free_blocks == 1


def test_prefix_hit_shares_blocks_and_counts_references():
    bm = BlockManager(num_blocks=10, block_size=4, enable_prefix_caching=True)
    system = list(range(1, 9))  # two full blocks
    a = make_request(system + [50, 51])
    assert bm.find_cached_prefix(a) == []
    assert bm.allocate(a, a.num_tokens)
    b = make_request(system + [60])
    hits = bm.find_cached_prefix(b)
    assert hits == a.block_ids[:2]
    assert bm.allocate(b, 1, hits)
    assert b.block_ids[:2] == a.block_ids[:2]
    assert bm.num_free_blocks == 10 - 3 - 1
    bm.free(a)
    # The shared blocks are still referenced by b.
    assert bm.num_free_blocks == 10 - 3
    bm.free(b)
    assert bm.num_free_blocks == 10


def test_freed_blocks_stay_cached_until_reused():
    bm = BlockManager(num_blocks=4, block_size=4, enable_prefix_caching=True)
    a = make_request(list(range(1, 10)))
    assert bm.allocate(a, a.num_tokens)
    bm.free(a)
    again = make_request(list(range(1, 10)))
    assert len(bm.find_cached_prefix(again)) == 2
    # Filling the cache with other tokens evicts the old prefix.
    other = make_request(list(range(200, 216)))
    assert bm.allocate(other, 16)
    bm.free(other)
    assert bm.find_cached_prefix(make_request(list(range(1, 10)))) == []


def test_prefix_lookup_leaves_the_last_token_to_compute():
    bm = BlockManager(num_blocks=8, block_size=4, enable_prefix_caching=True)
    a = make_request(list(range(1, 9)))  # exactly two blocks
    assert bm.allocate(a, 8)
    b = make_request(list(range(1, 9)))
    assert len(bm.find_cached_prefix(b)) == 1


def test_same_tokens_after_a_different_prefix_do_not_hit():
    bm = BlockManager(num_blocks=8, block_size=4, enable_prefix_caching=True)
    a = make_request([1, 2, 3, 4, 5, 6, 7, 8, 9])
    assert bm.allocate(a, 9)
    b = make_request([9, 9, 9, 9, 5, 6, 7, 8, 9])
    assert bm.find_cached_prefix(b) == []


def test_disabled_prefix_caching_never_hits():
    bm = BlockManager(num_blocks=8, block_size=4, enable_prefix_caching=False)
    a = make_request(list(range(1, 10)))
    assert bm.allocate(a, 9)
    assert bm.find_cached_prefix(make_request(list(range(1, 10)))) == []
