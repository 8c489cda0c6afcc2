"""Page pool and KV cache manager: allocation, refcounts, the null page, LRU lazy eviction, hashing."""

import pytest

from serving.kv_cache_manager import KVCacheManager
from serving.page_pool import NULL_PAGE_ID, PagePool, hash_page
from serving.request import Request
from serving.sampling_params import SamplingParams

SP = SamplingParams(max_tokens=4)


def make_request(req_id, tokens, salt=None, **params):
    return Request(req_id, tokens, SamplingParams(**params) if params else SP, cache_salt=salt)


# --- PagePool -------------------------------------------------------------------------------------

def test_null_page_is_never_allocated_and_never_freed():
    pool = PagePool(5)
    assert pool.num_usable_pages == 4 and pool.num_free_pages == 4
    pages = pool.allocate(4)
    assert sorted(pages) == [1, 2, 3, 4] and NULL_PAGE_ID not in pages
    assert pool.num_free_pages == 0 and pool.usage == 1.0
    with pytest.raises(RuntimeError):
        pool.allocate(1)
    with pytest.raises(ValueError):
        pool.free([NULL_PAGE_ID])
    with pytest.raises(ValueError):
        pool.touch([NULL_PAGE_ID])
    pool.free(pages)
    assert pool.num_free_pages == 4 and pool.usage == 0.0
    pool.check_invariants()
    with pytest.raises(ValueError):
        PagePool(1)


def test_refcounts_and_double_free():
    pool = PagePool(4)
    [p] = pool.allocate(1)
    pool.touch([p])
    assert pool.ref_count(p) == 2
    pool.free([p])
    assert pool.ref_count(p) == 1 and p not in pool.free_page_ids()
    pool.free([p])
    assert pool.ref_count(p) == 0 and p in pool.free_page_ids()
    with pytest.raises(RuntimeError):
        pool.free([p])
    pool.check_invariants()


def test_cached_pages_stay_until_evicted_lru_lazily():
    pool = PagePool(4)                       # usable pages 1, 2, 3
    a, b, c = pool.allocate(3)
    for page, name in ((a, b"a"), (b, b"b"), (c, b"c")):
        assert pool.cache_page(page, name * 32)
    pool.free([b])                           # freed order: b, a, c  -> b is least recently used
    pool.free([a])
    pool.free([c])
    assert pool.num_free_pages == 3 and pool.num_cached_pages == 3
    assert pool.get_cached_page(b"a" * 32) == a   # still cached while free
    [x] = pool.allocate(1)                   # evicts only what it takes: the LRU page b
    assert x == b and pool.get_cached_page(b"b" * 32) is None and pool.page_hash(b) is None
    assert pool.get_cached_page(b"a" * 32) == a and pool.get_cached_page(b"c" * 32) == c
    # A hit on a free cached page takes it out of the queue in place; the order of the rest holds.
    pool.touch([c])
    assert pool.free_page_ids() == [a]
    pool.free([x, c])
    pool.check_invariants()


def test_uncached_free_pages_are_reused_before_cached_ones_are_evicted():
    pool = PagePool(4)
    a, b, c = pool.allocate(3)
    pool.cache_page(a, b"h" * 32)
    pool.free([a])                           # cached
    pool.free([b, c])                        # uncached: go to the front
    got = pool.allocate(2)
    assert set(got) == {b, c} and pool.get_cached_page(b"h" * 32) == a
    pool.free(got)
    pool.check_invariants()


def test_duplicate_content_keeps_one_cached_copy_and_reset():
    pool = PagePool(4)
    a, b = pool.allocate(2)
    assert pool.cache_page(a, b"x" * 32)
    assert not pool.cache_page(b, b"x" * 32)   # same content computed twice: one copy is enough
    assert pool.page_hash(b) is None and pool.get_cached_page(b"x" * 32) == a
    assert not pool.reset_prefix_cache()         # pages in use
    pool.free([a, b])
    assert pool.reset_prefix_cache() and pool.num_cached_pages == 0
    pool.check_invariants()


def test_caching_disabled_registers_nothing():
    pool = PagePool(3, enable_caching=False)
    [a] = pool.allocate(1)
    assert not pool.cache_page(a, b"y" * 32) and pool.num_cached_pages == 0
    pool.free([a])


# --- hashing --------------------------------------------------------------------------------------

def test_hash_is_stable_chained_and_salted():
    h0 = hash_page(None, [1, 2, 3, 4], None)
    assert h0 == hash_page(None, (1, 2, 3, 4), None)        # deterministic (not Python's hash())
    assert h0 == hash_page(None, [1, 2, 3, 4], "")          # no salt == empty salt
    assert len(h0) == 32
    assert h0 != hash_page(None, [1, 2, 3, 5], None)
    assert h0 != hash_page(None, [1, 2, 3, 4], "tenant-a")
    assert hash_page(None, [1, 2, 3, 4], "tenant-a") != hash_page(None, [1, 2, 3, 4], "tenant-b")
    # The same page after different parents hashes differently: a hash names the whole prefix.
    other_parent = hash_page(None, [9, 9, 9, 9], None)
    assert hash_page(h0, [5, 6, 7, 8], None) != hash_page(other_parent, [5, 6, 7, 8], None)
    # Pinned value: the same in every process (Python's hash() would not be) and across versions.
    assert h0.hex()[:16] == "e4f14869df9d379a"


def test_request_page_hashes_chain_over_prompt_and_output():
    kv = KVCacheManager(num_pages=10, page_size=4)
    req = make_request("a", list(range(10)))
    req.output_token_ids.extend([50, 51])                    # 12 tokens: 3 full pages
    kv._ensure_page_hashes(req, 3)
    h1 = hash_page(None, [0, 1, 2, 3], None)
    h2 = hash_page(h1, [4, 5, 6, 7], None)
    h3 = hash_page(h2, [8, 9, 50, 51], None)
    assert req.page_hashes == [h1, h2, h3]


# --- KVCacheManager -------------------------------------------------------------------------------

def allocate_full(kv, req):
    pages, hit = kv.get_computed_pages(req)
    new = kv.allocate_slots(req, req.num_tokens - hit, pages)
    assert new is not None
    kv.record_prefix_lookup(req, hit)
    req.num_computed_tokens = req.num_tokens
    return pages, hit


def test_prefix_hit_reuses_pages_but_never_the_whole_sequence():
    kv = KVCacheManager(num_pages=12, page_size=4)
    a = make_request("a", list(range(12)))                   # exactly 3 full pages
    allocate_full(kv, a)
    a_pages = kv.get_page_ids("a")
    assert len(a_pages) == 3
    b = make_request("b", list(range(12)))                   # identical: 2 pages hit, last page recomputed
    hits, hit_tokens = allocate_full(kv, b)
    assert hits == a_pages[:2] and hit_tokens == 8
    assert kv.get_page_ids("b")[:2] == a_pages[:2] and kv.get_page_ids("b")[2] != a_pages[2]
    assert [kv.pool.ref_count(p) for p in a_pages] == [2, 2, 1]
    c = make_request("c", list(range(9)) + [99, 98, 97, 96])  # shares two pages, diverges in the third
    hits, hit_tokens = allocate_full(kv, c)
    assert hits == a_pages[:2] and hit_tokens == 8
    assert kv.prefix_cache_queries == 12 + 12 + 13 and kv.prefix_cache_hits == 0 + 8 + 8
    for r in (a, b, c):
        kv.free(r)
    assert kv.num_free_pages == 11
    kv.pool.check_invariants()


def test_cache_salt_isolates_prefixes():
    kv = KVCacheManager(num_pages=12, page_size=4)
    allocate_full(kv, make_request("a", list(range(9)), salt="alice"))
    assert kv.get_computed_pages(make_request("b", list(range(9)), salt="bob"))[1] == 0
    assert kv.get_computed_pages(make_request("c", list(range(9))))[1] == 0
    assert kv.get_computed_pages(make_request("d", list(range(9)), salt="alice"))[1] == 8


def test_freed_pages_stay_cached_until_allocation_evicts_them():
    kv = KVCacheManager(num_pages=5, page_size=4)            # 4 usable pages
    a = make_request("a", list(range(9)))                    # pages: full, full, partial
    allocate_full(kv, a)
    kv.free(a)
    assert kv.num_free_pages == 4 and kv.pool.num_cached_pages == 2
    b = make_request("b", list(range(9)))
    assert kv.get_computed_pages(b)[1] == 8                  # hit after the owner finished
    # A request needing all 4 pages evicts the cached ones (lazily, as it allocates).
    big = make_request("big", [7] * 16)
    allocate_full(kv, big)
    assert kv.num_free_pages == 0 and kv.get_computed_pages(b)[1] == 0
    kv.free(big)
    kv.pool.check_invariants()


def test_allocation_fails_cleanly_and_counts_free_hits():
    kv = KVCacheManager(num_pages=4, page_size=4)            # 3 usable pages
    a = make_request("a", list(range(8)))
    allocate_full(kv, a)
    kv.free(a)                                               # 2 cached free pages + 1 free
    b = make_request("b", list(range(8)) + [1] * 8)          # hits 2 pages, needs 2 more: 4 > 3
    hits, hit_tokens = kv.get_computed_pages(b)
    assert hit_tokens == 8
    assert kv.allocate_slots(b, b.num_tokens - hit_tokens, hits) is None
    assert kv.get_page_ids("b") == [] and kv.num_free_pages == 3 and kv.pool.num_cached_pages == 2
    kv.pool.check_invariants()


def test_pages_filled_in_the_same_step_are_shared():
    kv = KVCacheManager(num_pages=10, page_size=4)
    a = make_request("a", list(range(10)))
    allocate_full(kv, a)                                     # hashed at allocation, before any compute
    b = make_request("b", list(range(10)))
    assert kv.get_computed_pages(b)[1] == 8


def test_prompt_logprobs_requests_skip_lookup_but_are_cached():
    kv = KVCacheManager(num_pages=10, page_size=4)
    a = make_request("a", list(range(9)), prompt_logprobs=1)
    assert kv.get_computed_pages(a) == ([], 0)
    allocate_full(kv, a)
    assert kv.prefix_cache_queries == 0
    assert kv.get_computed_pages(make_request("b", list(range(9))))[1] == 8


def test_undo_uncaches_pages_that_will_not_be_written():
    kv = KVCacheManager(num_pages=10, page_size=4)
    a = make_request("a", list(range(12)))
    assert kv.allocate_slots(a, 8) is not None               # "scheduled" 8 tokens: 2 pages hashed
    assert kv.pool.num_cached_pages == 2
    kv.free(a, num_valid_tokens=0)                           # the step is undone before it ran
    assert kv.pool.num_cached_pages == 0 and kv.num_free_pages == 9
    kv.pool.check_invariants()


def test_prefix_caching_disabled():
    kv = KVCacheManager(num_pages=10, page_size=4, enable_prefix_caching=False)
    allocate_full(kv, make_request("a", list(range(9))))
    assert kv.get_computed_pages(make_request("b", list(range(9)))) == ([], 0)
    assert kv.prefix_cache_queries == 0 and kv.pool.num_cached_pages == 0


def test_a_freed_request_loses_its_tail_pages_first():
    kv = KVCacheManager(num_pages=5, page_size=4)            # 4 usable pages
    a = make_request("a", list(range(13)))                   # 3 full pages + 1 partial
    allocate_full(kv, a)
    kv.free(a)
    b = make_request("b", [7] * 4)                           # takes the uncached page, then one cached
    allocate_full(kv, b)
    b2 = make_request("b2", [8] * 4)
    allocate_full(kv, b2)
    # The evicted cached page is a's last full page, so a's first two pages still hit.
    assert kv.get_computed_pages(make_request("a2", list(range(13))))[1] == 8
    kv.free(b)
    kv.free(b2)
