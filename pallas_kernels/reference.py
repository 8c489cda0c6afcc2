"""Pure-jnp reference for ragged paged attention: the ground truth the Pallas kernels are tested against.

It is written for clarity, not speed: every query token gathers the whole block-table row of its
sequence (``max_pages * page_size`` keys) and masks it, all in float32. Memory is
O(T x max_pages x page_size x D), fine for tests and small benchmarks, not for serving.

Semantics (the same as ``model_zoo.attention.paged_attention_xla``): a query token at absolute
position ``p`` of sequence ``s`` sees the keys at positions ``0..p`` of ``s`` (causal), restricted to
``p - sliding_window < key_pos`` when a window is given; the key at position ``j`` lives in page
``block_tables[s, j // page_size]`` at offset ``j % page_size`` of layer ``layer``.

``write_kv`` is the reference (and the XLA backend's) cache write: a scatter of this step's
keys/values to their flat slots. The decode kernel can fuse the same write (``new_kv``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


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


def attend_after_write(attention_fn, q, k_cache, v_cache, layer, md, new_kv, **kwargs):
    """The backend contract's unfused path (model_zoo/attention.py): ``write_kv`` this step's
    ``new_kv=(k, v)`` at ``md.slot_mapping``, then ``attention_fn`` reads them back from the
    caches; returns ``(out, k_cache, v_cache)``."""
    k_cache, v_cache = write_kv(k_cache, v_cache, layer, *new_kv, md.slot_mapping)
    return attention_fn(q, k_cache, v_cache, layer, md, **kwargs), k_cache, v_cache


def paged_attention_reference(q, k_cache, v_cache, layer, md, *, scale: float,
                              soft_cap: float | None = None,
                              sliding_window: int | None = None,
                              precision=jax.lax.Precision.HIGHEST):
    """q: [T, H, D]; caches: [L, Hkv, P, page, D]; md: AttentionMetadata -> [T, H, D] in q.dtype.

    ``precision`` of the two einsums: HIGHEST for tests; the XLA serving backend passes DEFAULT."""
    t, h, d = q.shape
    _, hkv, _, page_size, _ = k_cache.shape
    group = h // hkv
    pages = md.block_tables[md.token_seq_ids]                         # [T, max_pages]
    ctx = pages.shape[1] * page_size
    layer_k = jax.lax.dynamic_index_in_dim(k_cache, layer, 0, keepdims=False)  # [Hkv, P, page, D]
    layer_v = jax.lax.dynamic_index_in_dim(v_cache, layer, 0, keepdims=False)
    k = layer_k[:, pages].reshape(hkv, t, ctx, d).astype(jnp.float32)  # [Hkv, T, ctx, D]
    v = layer_v[:, pages].reshape(hkv, t, ctx, d).astype(jnp.float32)
    qg = q.astype(jnp.float32).reshape(t, hkv, group, d)
    logits = jnp.einsum("tkgd,ktcd->tkgc", qg, k,
                        precision=precision) * scale
    if soft_cap is not None:
        logits = jnp.tanh(logits / soft_cap) * soft_cap
    key_pos = jnp.arange(ctx)[None, :]
    q_pos = md.positions[:, None]
    visible = key_pos <= q_pos
    if sliding_window is not None:
        visible &= key_pos > q_pos - sliding_window
    logits = jnp.where(visible[:, None, None, :], logits, -jnp.inf)
    probs = jax.nn.softmax(logits, axis=-1)
    out = jnp.einsum("tkgc,ktcd->tkgd", probs, v, precision=precision)
    return out.reshape(t, h, d).astype(q.dtype)
