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
import jax.numpy as jnp


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

    ``max_query_len`` is the runner's static hint (1 = decode-only step); this path needs none.

    Memory is O(T x max_pages x page_size): the CPU default and the GPU fallback, not the fast path.
    """
    t, h, d = q.shape
    _, hkv, _, page_size, _ = k_cache.shape
    g = h // hkv
    pages = md.block_tables[md.token_seq_ids]                      # [T, max_pages]
    k = k_cache[layer][:, pages]                                   # [Hkv, T, max_pages, page, D]
    v = v_cache[layer][:, pages]
    ctx = pages.shape[1] * page_size
    k = k.reshape(hkv, t, ctx, d)
    v = v.reshape(hkv, t, ctx, d)
    qg = q.reshape(t, hkv, g, d)
    s = jnp.einsum("tkgd,ktcd->tkgc", qg.astype(jnp.float32), k.astype(jnp.float32)) * scale
    if soft_cap is not None:
        s = jnp.tanh(s / soft_cap) * soft_cap
    key_pos = jnp.arange(ctx)[None, :]
    qpos = md.positions[:, None]
    mask = key_pos <= qpos
    if sliding_window is not None:
        mask &= key_pos > qpos - sliding_window
    s = jnp.where(mask[:, None, None, :], s, -jnp.inf)
    p = jax.nn.softmax(s, axis=-1)
    out = jnp.einsum("tkgc,ktcd->tkgd", p, v.astype(jnp.float32))
    return out.reshape(t, h, d).astype(q.dtype)
