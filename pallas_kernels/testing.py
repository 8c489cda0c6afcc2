"""Random ragged paged-attention batches for the kernel tests and benchmarks (host-side numpy).

A batch is built the way the engine builds one: each sequence owns pages drawn in random order
from the pool (page 0 stays the null page), its last ``q_len`` tokens are this step's queries, and
the flat metadata follows ``model_zoo.attention.AttentionMetadata``. Every cache slot that no valid
key occupies (stale tails of last pages, unused pages, the null page) holds LARGE random values, so
a kernel that reads a masked slot into the softmax produces a visibly wrong answer.
"""

from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True)
class PagedBatch:
    q: np.ndarray                 # [T, H, D]
    k_cache: np.ndarray           # [L, Hkv, P, page, D]
    v_cache: np.ndarray
    positions: np.ndarray         # [T]
    token_seq_ids: np.ndarray     # [T]
    slot_mapping: np.ndarray      # [T]
    block_tables: np.ndarray      # [S, max_pages]
    seq_lens: np.ndarray          # [S]
    query_start_loc: np.ndarray   # [S + 1]

    def metadata(self):
        """The batch's AttentionMetadata (as device arrays); imports jax lazily."""
        import jax.numpy as jnp

        from model_zoo.attention import AttentionMetadata
        return AttentionMetadata(
            positions=jnp.asarray(self.positions), token_seq_ids=jnp.asarray(self.token_seq_ids),
            slot_mapping=jnp.asarray(self.slot_mapping),
            block_tables=jnp.asarray(self.block_tables), seq_lens=jnp.asarray(self.seq_lens),
            query_start_loc=jnp.asarray(self.query_start_loc))


def make_batch(rng: np.random.Generator, *, seq_lens, q_lens, num_heads: int, num_kv_heads: int,
               head_dim: int, page_size: int, num_layers: int = 2, max_pages: int | None = None,
               pad_tokens: int = 0, pad_seqs: int = 0, spare_pages: int = 3,
               dtype=np.float32, poison: float = 60.0) -> PagedBatch:
    """Sequence s has context seq_lens[s] (this step's tokens included) and q_lens[s] queries.

    ``pad_tokens``/``pad_seqs`` append bucket padding the way the runner does (tokens in sequence
    row 0 at position 0 writing into page 0; sequence rows with empty queries and zero lengths).
    """
    seq_lens = [int(x) for x in seq_lens]
    q_lens = [int(x) for x in q_lens]
    if len(seq_lens) != len(q_lens) or any(q < 0 or q > c for q, c in zip(q_lens, seq_lens)):
        raise ValueError("need 0 <= q_len <= seq_len for every sequence")
    pages_needed = [-(-c // page_size) for c in seq_lens]
    max_pages = max_pages or max(1, max(pages_needed))
    if max(pages_needed) > max_pages:
        raise ValueError("a sequence needs more than max_pages pages")
    num_pages = 1 + sum(pages_needed) + spare_pages
    order = rng.permutation(np.arange(1, num_pages))                 # pages in random order
    s_total = len(seq_lens) + pad_seqs
    block_tables = np.zeros((s_total, max_pages), np.int32)
    used = 0
    for s, n in enumerate(pages_needed):
        block_tables[s, :n] = order[used:used + n]
        used += n

    shape = (num_layers, num_kv_heads, num_pages, page_size, head_dim)
    k = (poison * rng.standard_normal(shape)).astype(np.float32)
    v = (poison * rng.standard_normal(shape)).astype(np.float32)
    for s, c in enumerate(seq_lens):                                   # valid keys: unit scale
        for j in range(c):
            page, off = block_tables[s, j // page_size], j % page_size
            k[:, :, page, off] = rng.standard_normal((num_layers, num_kv_heads, head_dim))
            v[:, :, page, off] = rng.standard_normal((num_layers, num_kv_heads, head_dim))

    positions, seq_ids, slots = [], [], []
    qsl = [0]
    for s, (c, q) in enumerate(zip(seq_lens, q_lens)):
        for p in range(c - q, c):
            positions.append(p)
            seq_ids.append(s)
            slots.append(int(block_tables[s, p // page_size]) * page_size + p % page_size)
        qsl.append(qsl[-1] + q)
    qsl += [qsl[-1]] * pad_seqs
    positions += [0] * pad_tokens
    seq_ids += [0] * pad_tokens
    slots += [0] * pad_tokens
    t = len(positions)
    q = rng.standard_normal((t, num_heads, head_dim)).astype(np.float32)
    return PagedBatch(
        q=q.astype(dtype), k_cache=k.astype(dtype), v_cache=v.astype(dtype),
        positions=np.asarray(positions, np.int32), token_seq_ids=np.asarray(seq_ids, np.int32),
        slot_mapping=np.asarray(slots, np.int32), block_tables=block_tables,
        seq_lens=np.asarray(seq_lens + [0] * pad_seqs, np.int32),
        query_start_loc=np.asarray(qsl, np.int32))


def abstract_metadata(num_tokens: int, num_seqs: int, max_pages: int):
    """AttentionMetadata of int32 ``jax.ShapeDtypeStruct``s (a bucket's shapes, no values): for
    lowering ``paged_attention`` for a platform this machine lacks. Imports jax lazily."""
    import jax
    import jax.numpy as jnp

    from model_zoo.attention import AttentionMetadata

    def i32(*shape):
        return jax.ShapeDtypeStruct(shape, jnp.int32)

    return AttentionMetadata(positions=i32(num_tokens), token_seq_ids=i32(num_tokens), slot_mapping=i32(num_tokens),
                             block_tables=i32(num_seqs, max_pages), seq_lens=i32(num_seqs),
                             query_start_loc=i32(num_seqs + 1))
