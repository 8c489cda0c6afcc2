"""Attention over the paged KV cache: the metadata pytree and the plain-XLA implementation.

KV cache layout (one array for K, one for V), shared by every backend:

    k_cache, v_cache: [num_layers, num_kv_heads, num_pages, page_size, head_dim]

A token at absolute position ``p`` of a sequence lives in page ``block_table[p // page_size]`` at
offset ``p % page_size``; its flat slot is ``page * page_size + offset``. Page 0 is the null page:
padding block-table entries point there, and nothing valid ever reads it (lengths mask it out).
Padding tokens get an out-of-range slot and write nothing.

The batch is flat and ragged: the tokens of sequence ``s`` are ``tokens[query_start_loc[s]:
query_start_loc[s+1]]``, at positions ``seq_lens[s] - q_len .. seq_lens[s] - 1`` (causal: a query at
position p sees keys 0..p of its own sequence). Decode is the case q_len == 1.
"""

from __future__ import annotations

import dataclasses

import jax

from pallas_kernels.reference import paged_attention_reference


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class AttentionMetadata:
    positions: jax.Array        # [T] int32, absolute position of each token (padding: 0)
    token_seq_ids: jax.Array    # [T] int32, which sequence row each token belongs to (padding: 0)
    slot_mapping: jax.Array     # [T] int32, flat cache slot receiving the token's K/V (padding: in page 0)
    block_tables: jax.Array     # [S, max_pages] int32, page ids per sequence (padding: 0)
    seq_lens: jax.Array         # [S] int32, context length including this step's tokens (padding: 0)
    query_start_loc: jax.Array  # [S + 1] int32, cumulative query lengths (padding rows: empty)


def write_kv(k_cache, v_cache, layer, k, v, slot_mapping):
    """Scatter this step's keys/values ``[T, Hkv, D]`` into ``layer`` of the caches (in place when donated).

    A slot at or past ``num_pages * page_size`` is dropped: padding tokens write nothing, so their
    (possibly non-finite) values never reach a page a kernel reads."""
    page_size = k_cache.shape[3]
    pages = slot_mapping // page_size
    offs = slot_mapping % page_size
    # The heads axis is a slice (a window dimension of the scatter), not an index array: a KV
    # cache sharded on heads then scatters shard-locally, with no all-gather of k/v per layer.
    k_cache = k_cache.at[layer, :, pages, offs].set(
        k.astype(k_cache.dtype), mode="drop", unique_indices=False)
    v_cache = v_cache.at[layer, :, pages, offs].set(
        v.astype(v_cache.dtype), mode="drop", unique_indices=False)
    return k_cache, v_cache


def paged_attention_xla(q, k_cache, v_cache, layer, md: AttentionMetadata, *, scale: float,
                        soft_cap: float | None = None, sliding_window: int | None = None,
                        max_query_len: int | None = None):
    """Plain-jnp ragged paged attention: gathers each token's sequence pages. q: [T, H, D] -> [T, H, D].

    Memory is O(T x max_pages x page_size): the CPU default and the GPU fallback, not the fast path.
    ``max_query_len`` is the runner's static hint (1 = decode-only step); this path needs none.
    It is the kernels' pure-jnp reference at the backend's default matmul precision.
    """
    return paged_attention_reference(q, k_cache, v_cache, layer, md, scale=scale, soft_cap=soft_cap,
                                     sliding_window=sliding_window, precision=jax.lax.Precision.DEFAULT)
