"""The KV page pool: free queue, reference counts, and the prefix cache's hash -> page map.

Host bookkeeping only (no jax); the device cache is an array ``[num_pages, page_size, ...]`` that
the runner indexes with the page ids handed out here (vLLM v1's ``BlockPool``).

Invariants (``check_invariants`` asserts them in tests):

* page 0 is the null/padding page: never allocated, never freed, never in the free queue; the runner
  pads block tables with it.
* a page is in the free queue  <=>  its reference count is 0.
* a page with a hash is in the prefix cache (``hash -> page``) and its KV holds exactly the tokens
  the hash names (from the end of the step that fills it: pages are hashed when allocated, so a
  request scheduled later in the same step can already share them; the runner writes a step's KV
  before any of the step's attention reads it). Freeing keeps the hash: the page stays reusable by a later request with the same
  prefix until allocation evicts it.

Free-queue order (front = next to be allocated)::

    front [ pages without a hash ... | cached pages, least recently freed ... most recently freed ] tail

Uncached pages go to the front (they hold nothing worth keeping), cached pages to the tail, so the
least recently used cached page is evicted first, lazily, only when a page is actually allocated.
A cache hit on a free page takes it out of the queue in O(1) (OrderedDict keyed by page id).
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from typing import Iterable, Optional, Sequence

NULL_PAGE_ID = 0

# Parent "hash" of a request's first page: fixed bytes, so page hashes are stable across processes
# (Python's hash() is salted per process and is not used anywhere here).
_ROOT_HASH = b"\x00" * 32


def hash_page(parent_hash: Optional[bytes], token_ids: Sequence[int], cache_salt: Optional[str]) -> bytes:
    """Hash of one full page: blake2b over (parent page hash, the page's token ids, cache_salt).

    Chaining through the parent makes the hash name the whole prefix, so equal hashes mean equal
    token prefixes (and equal salts), not just equal pages. The encoding is unambiguous: a
    fixed-size parent, a length-prefixed salt, then fixed-width token ids.
    """
    h = hashlib.blake2b(digest_size=32)
    h.update(parent_hash if parent_hash is not None else _ROOT_HASH)
    salt = (cache_salt or "").encode("utf-8")
    h.update(len(salt).to_bytes(8, "little"))
    h.update(salt)
    h.update(array("q", token_ids).tobytes())
    return h.digest()


class PagePool:
    """``num_pages`` pages of which ``num_pages - 1`` are usable (page 0 is the null page)."""

    def __init__(self, num_pages: int, enable_caching: bool = True):
        if num_pages < 2:
            raise ValueError(f"the KV cache needs at least 2 pages (page 0 is the null page); got {num_pages}")
        self.num_pages = num_pages
        self.enable_caching = enable_caching
        self._ref_counts = [0] * num_pages
        self._hashes: list[Optional[bytes]] = [None] * num_pages
        self._free: OrderedDict[int, None] = OrderedDict((p, None) for p in range(1, num_pages))
        self._cached: dict[bytes, int] = {}

    # --- queries --------------------------------------------------------------------------------
    @property
    def num_usable_pages(self) -> int:
        return self.num_pages - 1

    @property
    def num_free_pages(self) -> int:
        return len(self._free)

    @property
    def num_cached_pages(self) -> int:
        return len(self._cached)

    @property
    def usage(self) -> float:
        """Fraction of usable pages held by requests (free-but-cached pages count as free)."""
        return 1.0 - len(self._free) / self.num_usable_pages

    def ref_count(self, page_id: int) -> int:
        return self._ref_counts[page_id]

    def page_hash(self, page_id: int) -> Optional[bytes]:
        return self._hashes[page_id]

    def get_cached_page(self, page_hash: bytes) -> Optional[int]:
        return self._cached.get(page_hash)

    def free_page_ids(self) -> list[int]:
        """The free queue, front (next to be allocated) first."""
        return list(self._free)

    # --- allocation -----------------------------------------------------------------------------
    def allocate(self, num: int) -> list[int]:
        """Take ``num`` pages from the front of the free queue, evicting their cached hashes."""
        if num > len(self._free):
            raise RuntimeError(f"allocating {num} pages with only {len(self._free)} free; check num_free_pages first")
        pages = []
        for _ in range(num):
            page_id, _ = self._free.popitem(last=False)
            self._drop_hash(page_id)
            self._ref_counts[page_id] = 1
            pages.append(page_id)
        return pages

    def touch(self, page_ids: Iterable[int]) -> None:
        """Take a reference on cached pages (prefix-cache hits), pulling free ones out of the queue."""
        for page_id in page_ids:
            if page_id == NULL_PAGE_ID:
                raise ValueError("the null page cannot be referenced")
            if self._ref_counts[page_id] == 0:
                del self._free[page_id]
            self._ref_counts[page_id] += 1

    def free(self, page_ids: Iterable[int]) -> None:
        """Drop one reference on each page; pages reaching 0 rejoin the free queue (see module doc).

        Callers pass a request's pages tail first, so its first pages (the most shareable prefix)
        are the most recently freed and are evicted last.
        """
        for page_id in page_ids:
            if page_id == NULL_PAGE_ID:
                raise ValueError("the null page is never allocated and cannot be freed")
            if self._ref_counts[page_id] <= 0:
                raise RuntimeError(f"page {page_id} freed more often than allocated")
            self._ref_counts[page_id] -= 1
            if self._ref_counts[page_id] == 0:
                self._free[page_id] = None
                if self._hashes[page_id] is None:
                    self._free.move_to_end(page_id, last=False)

    # --- prefix cache ---------------------------------------------------------------------------
    def cache_page(self, page_id: int, page_hash: bytes) -> bool:
        """Register a full, held page under ``page_hash``. Returns whether it is now the cached copy.

        A second page with the same content (two requests computed the same prefix before either
        could hit the other) stays unregistered: one copy per hash is enough.
        """
        if not self.enable_caching:
            return False
        current = self._hashes[page_id]
        if current is not None:
            if current != page_hash:
                raise RuntimeError(f"page {page_id} is already cached under a different hash")
            return True
        if page_hash in self._cached:
            return False
        self._hashes[page_id] = page_hash
        self._cached[page_hash] = page_id
        return True

    def uncache_page(self, page_id: int) -> None:
        """Forget a page's hash (its KV will not be written after all: a step was undone)."""
        if self._hashes[page_id] is not None:
            self._drop_hash(page_id)
            if self._ref_counts[page_id] == 0:
                self._free.move_to_end(page_id, last=False)

    def reset_prefix_cache(self) -> bool:
        """Drop every cached hash. Only allowed while no page is held (as in vLLM); returns success."""
        if len(self._free) != self.num_usable_pages:
            return False
        for page_id in list(self._cached.values()):
            self._hashes[page_id] = None
        self._cached.clear()
        return True

    def _drop_hash(self, page_id: int) -> None:
        h = self._hashes[page_id]
        if h is not None:
            self._hashes[page_id] = None
            if self._cached.get(h) == page_id:
                del self._cached[h]

    # --- testing aid ----------------------------------------------------------------------------
    def check_invariants(self) -> None:
        assert self._ref_counts[NULL_PAGE_ID] == 0 and NULL_PAGE_ID not in self._free, "null page in use"
        assert self._hashes[NULL_PAGE_ID] is None, "null page cached"
        for page_id in range(1, self.num_pages):
            in_free = page_id in self._free
            assert in_free == (self._ref_counts[page_id] == 0), f"page {page_id}: free queue vs refcount"
            assert self._ref_counts[page_id] >= 0
            h = self._hashes[page_id]
            if h is not None:
                assert self._cached.get(h) == page_id, f"page {page_id}: hash not in the cache map"
        for h, page_id in self._cached.items():
            assert self._hashes[page_id] == h, f"cache map entry for page {page_id} is stale"
