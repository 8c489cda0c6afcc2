"""Per-request page tables over the page pool, and the prefix cache's lookups (vLLM v1's KVCacheManager).

Host bookkeeping only (no jax). A request's pages cover its tokens in order::

    token position  0 ........ 15 | 16 ....... 31 | 32 .. 37 ___ |
    page            req_pages[0]  | req_pages[1]  | req_pages[2] (partial, never hashed)
                    <------ full pages: hashed and cached ------>

Page i of a request holds positions [i * page_size, (i + 1) * page_size). A page is hashed and
registered in the prefix cache as soon as the tokens scheduled so far fill it (at allocation time,
before the runner has computed it), so a request scheduled later in the same step can share it.
"""

from __future__ import annotations

from typing import Optional, Sequence

from serving.page_pool import PagePool, hash_page
from serving.request import Request


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


class KVCacheManager:
    def __init__(self, num_pages: int, page_size: int, enable_prefix_caching: bool = True):
        if page_size < 1:
            raise ValueError(f"page_size must be positive; got {page_size}")
        self.page_size = page_size
        self.enable_prefix_caching = enable_prefix_caching
        self.pool = PagePool(num_pages, enable_caching=enable_prefix_caching)
        self._req_pages: dict[str, list[int]] = {}
        # How many leading pages of each request have been offered to the prefix cache already.
        self._num_hashed_pages: dict[str, int] = {}
        # Prefix-cache counters in tokens, as vLLM counts them: every lookup queries the request's
        # num_tokens and hits the tokens found cached.
        self.prefix_cache_queries = 0
        self.prefix_cache_hits = 0

    # --- queries --------------------------------------------------------------------------------
    @property
    def num_pages(self) -> int:
        return self.pool.num_pages

    @property
    def num_free_pages(self) -> int:
        return self.pool.num_free_pages

    @property
    def usage(self) -> float:
        return self.pool.usage

    def get_page_ids(self, req_id: str) -> list[int]:
        return list(self._req_pages.get(req_id, ()))

    def max_pages_per_request(self, max_model_len: int) -> int:
        return cdiv(max_model_len, self.page_size)

    # --- prefix cache ---------------------------------------------------------------------------
    def _ensure_page_hashes(self, request: Request, num_full_pages: int) -> None:
        hashes = request.page_hashes
        bs = self.page_size
        while len(hashes) < num_full_pages:
            i = len(hashes)
            parent = hashes[i - 1] if i else None
            hashes.append(hash_page(parent, request.token_ids_slice(i * bs, (i + 1) * bs), request.cache_salt))

    def get_computed_pages(self, request: Request) -> tuple[list[int], int]:
        """The cached pages of the request's longest cached prefix, and how many tokens they hold.

        Never the whole sequence: at least one token must be computed so the step yields the logits
        to sample from (vLLM recomputes the last token too), hence (num_tokens - 1) // page_size.
        The pages are not referenced yet: allocate_slots takes them.
        """
        if not self.enable_prefix_caching or request.skip_prefix_cache_lookup:
            return [], 0
        max_pages = (request.num_tokens - 1) // self.page_size
        self._ensure_page_hashes(request, max_pages)
        pages = []
        for page_hash in request.page_hashes[:max_pages]:
            page_id = self.pool.get_cached_page(page_hash)
            if page_id is None:
                break
            pages.append(page_id)
        return pages, len(pages) * self.page_size

    def record_prefix_lookup(self, request: Request, num_hit_tokens: int) -> None:
        """Count one lookup (called once the request is actually scheduled, so retries don't count)."""
        if self.enable_prefix_caching and not request.skip_prefix_cache_lookup:
            self.prefix_cache_queries += request.num_tokens
            self.prefix_cache_hits += num_hit_tokens

    # --- allocation -----------------------------------------------------------------------------
    def allocate_slots(self, request: Request, num_new_tokens: int,
                       new_computed_pages: Sequence[int] = ()) -> Optional[list[int]]:
        """Make room for ``num_new_tokens`` more tokens after the request's computed ones.

        ``new_computed_pages`` are prefix-cache hits (from get_computed_pages) for a request being
        scheduled from the waiting queue; they sit before the new tokens. Returns the newly
        allocated pages (possibly none), or None, changing nothing, when the pool is short.
        """
        req_pages = self._req_pages.get(request.req_id, [])
        num_computed = request.num_computed_tokens + len(new_computed_pages) * self.page_size
        total = num_computed + num_new_tokens
        if not new_computed_pages and total <= len(req_pages) * self.page_size and (
                not self.enable_prefix_caching or total // self.page_size <= self._num_hashed_pages[request.req_id]):
            return []    # most decode steps: the tokens fit the pages held and fill no page to hash
        num_needed = max(0, cdiv(total, self.page_size) - len(req_pages) - len(new_computed_pages))
        # Hits sitting in the free queue (refcount 0) leave it when taken, so they count as used.
        num_free_hits = sum(1 for p in new_computed_pages if self.pool.ref_count(p) == 0)
        if num_needed + num_free_hits > self.pool.num_free_pages:
            return None

        if request.req_id not in self._req_pages:
            self._req_pages[request.req_id] = req_pages
            self._num_hashed_pages[request.req_id] = 0
        if new_computed_pages:
            if req_pages:
                raise RuntimeError(f"prefix-cache hits for {request.req_id}, which already holds pages")
            self.pool.touch(new_computed_pages)
            req_pages.extend(new_computed_pages)
            self._num_hashed_pages[request.req_id] = len(new_computed_pages)
        new_pages = self.pool.allocate(num_needed)
        req_pages.extend(new_pages)
        if self.enable_prefix_caching:
            # Only pages of known tokens: under async scheduling the last scheduled positions may be
            # placeholders for tokens still being sampled. A later call hashes the rest.
            self._hash_full_pages(request, req_pages, min(total, request.num_tokens) // self.page_size)
        return new_pages

    def _hash_full_pages(self, request: Request, req_pages: list[int], num_full_pages: int) -> None:
        start = self._num_hashed_pages[request.req_id]
        if num_full_pages <= start:
            return
        self._ensure_page_hashes(request, num_full_pages)
        for i in range(start, num_full_pages):
            self.pool.cache_page(req_pages[i], request.page_hashes[i])
        self._num_hashed_pages[request.req_id] = num_full_pages

    def has_shared_pages_from(self, request: Request, token_pos: int) -> bool:
        """Whether another request also holds one of this request's pages at or after ``token_pos``."""
        pages = self._req_pages.get(request.req_id, ())
        return any(self.pool.ref_count(p) > 1 for p in pages[token_pos // self.page_size:])

    def free(self, request: Request, *, num_valid_tokens: Optional[int] = None) -> None:
        """Release the request's pages (tail first, so its prefix pages are evicted last).

        ``num_valid_tokens``: set when this step's scheduling of the request is being undone; pages
        from that position on were hashed in anticipation of KV that will now never be written, so
        they leave the prefix cache.
        """
        pages = self._req_pages.pop(request.req_id, [])
        self._num_hashed_pages.pop(request.req_id, None)
        if num_valid_tokens is not None:
            for page_id in pages[num_valid_tokens // self.page_size:]:
                if self.pool.ref_count(page_id) > 1:
                    raise RuntimeError(f"undoing {request.req_id}, whose not-yet-written page {page_id} is shared")
                self.pool.uncache_page(page_id)
        self.pool.free(reversed(pages))

    def reset_prefix_cache(self) -> bool:
        return self.pool.reset_prefix_cache()
