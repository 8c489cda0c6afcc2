"""Attention over the paged KV cache: the metadata pytree and the plain-XLA implementation.

KV cache layout (one array for K, one for V), shared by every backend:

    k_cache, v_cache: [num_layers, num_kv_heads, num_pages, page_size, head_dim]

A token at absolute position ``p`` of a sequence lives in page ``block_table[p // page_size]`` at
offset ``p % page_size``; its flat slot is ``page * page_size + offset``. Page 0 is the null page:
padding block-table entries point there, and nothing valid ever reads it (lengths mask it out).
Padding tokens get an out-of-range slot and write nothing.

The attention-backend contract (``AttentionFn``; ``paged_attention_xla`` here, the Pallas
``paged_attention``, and ``sharding.attention.shard_local_attention``'s wrap of either):

    out = fn(q, k_cache, v_cache, layer, md, *, scale, soft_cap=None, sliding_window=None,
             max_query_len=None)                                       # q, out: [T, H, D]
    out, k_cache, v_cache = fn(..., new_kv=(k, v))                     # k, v: [T, Hkv, D]

With ``new_kv`` the function also writes this step's keys/values into ``layer`` of the caches at
``md.slot_mapping`` (``write_kv``'s semantics: out-of-range slots write nothing) before its queries
attend, and returns the updated caches; a backend may fuse the write into its kernel (the Pallas
Triton decode kernel does). The models always pass ``new_kv``; kernel tests and benchmarks call
without it on caches that already hold the keys.

The batch is flat and ragged: the tokens of sequence ``s`` are ``tokens[query_start_loc[s]:
query_start_loc[s+1]]``, at positions ``seq_lens[s] - q_len .. seq_lens[s] - 1`` (causal: a query at
position p sees keys 0..p of its own sequence). Decode is the case q_len == 1.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax

from pallas_kernels.reference import attend_after_write, paged_attention_reference, write_kv

__all__ = ["AttentionMetadata", "AttentionFn", "paged_attention_xla", "write_kv"]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class AttentionMetadata:
    positions: jax.Array        # [T] int32, absolute position of each token (padding: 0)
    token_seq_ids: jax.Array    # [T] int32, which sequence row each token belongs to (padding: 0)
    slot_mapping: jax.Array     # [T] int32, flat cache slot receiving the token's K/V (padding: out of range)
    block_tables: jax.Array     # [S, max_pages] int32, page ids per sequence (padding: 0)
    seq_lens: jax.Array         # [S] int32, context length including this step's tokens (padding: 0)
    query_start_loc: jax.Array  # [S + 1] int32, cumulative query lengths (padding rows: empty)


# (q, k_cache, v_cache, layer, md, *, scale, ..., new_kv=None) -> out, or (out, k_cache, v_cache)
# with new_kv: the contract in the module docstring.
AttentionFn = Callable[..., Any]


def paged_attention_xla(q, k_cache, v_cache, layer, md: AttentionMetadata, *, scale: float,
                        soft_cap: float | None = None, sliding_window: int | None = None,
                        max_query_len: int | None = None, new_kv=None):
    """Plain-jnp ragged paged attention: gathers each token's sequence pages. q: [T, H, D] -> [T, H, D].

    Memory is O(T x max_pages x page_size): the CPU default and the GPU fallback, not the fast path.
    ``max_query_len`` is the runner's static hint (1 = decode-only step); this path needs none.
    It is the kernels' pure-jnp reference at the backend's default matmul precision. ``new_kv``:
    ``write_kv`` first, then attend; returns ``(out, k_cache, v_cache)`` (the module's contract).
    """
    if new_kv is not None:
        return attend_after_write(paged_attention_xla, q, k_cache, v_cache, layer, md, new_kv,
                                  scale=scale, soft_cap=soft_cap, sliding_window=sliding_window)
    return paged_attention_reference(q, k_cache, v_cache, layer, md, scale=scale, soft_cap=soft_cap,
                                     sliding_window=sliding_window, precision=jax.lax.Precision.DEFAULT)
