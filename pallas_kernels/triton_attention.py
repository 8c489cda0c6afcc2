"""Portable (Triton-lowered) Pallas kernels for ragged paged attention: decode and ragged prefill.

These run on any CUDA GPU JAX supports (and in interpret mode on the CPU, which is how the tests
check them). Layers 1 and 2 of DESIGN.md rule 7 live here (kernel bodies and ``pallas_call``
wrappers); validation, tuning defaults and dispatch are in ``paged_attention.py``.

Cache layout (model_zoo/attention.py): ``[num_layers, Hkv, num_pages, page_size, D]``. The kernels
receive the WHOLE cache and the layer index as a one-element int32 array, and index
``cache[layer, kv_head, page_ids]`` themselves: the model scans over layers with the cache in the
carry, so slicing a layer out here would copy it every layer (the lowering switches to 64-bit
offsets once the cache passes 4 GiB, so large caches are safe).

Both kernels work on one KV head and the whole group of query heads that share it (GQA), so each
K/V page is read once per (token or query block, kv head). Triton's ``dot`` needs at least 16 rows,
so the group is padded with zero query rows (``padded_group``); padded rows are dropped on return.

Masking uses a large finite negative instead of -inf so that a fully masked block never produces
``inf - inf``: its bogus probabilities are multiplied by ``exp(mask - m_real) == 0`` as soon as a
block with a visible key for that row arrives, and every real row sees at least its own key.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)
_LOG2E = math.log2(math.e)


def _dot_precision(dtype):
    # Triton's float32 dot defaults to TF32 (~1e-3 error); HIGHEST asks for IEEE fp32.
    return jax.lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else None


def _logits(q, k, *, scale, soft_cap, precision):
    s = pltriton.dot(q, k, trans_b=True, precision=precision).astype(jnp.float32) * scale
    if soft_cap is not None:
        s = jnp.tanh(s / soft_cap) * soft_cap
    return s


def _online_softmax_step(s, v, carry, *, precision):
    """One flash-attention update: s [R, bk] masked logits, v [bk, D]; carry (o [R, D], m [R], l [R])."""
    o, m, l = carry
    m_new = jnp.maximum(m, s.max(axis=-1))
    correction = jnp.exp2((m - m_new) * _LOG2E)
    p = jnp.exp2((s - m_new[:, None]) * _LOG2E)
    l_new = l * correction + p.sum(axis=-1)
    pv = pltriton.dot(p.astype(v.dtype), v, precision=precision).astype(jnp.float32)
    return o * correction[:, None] + pv, m_new, l_new


# ----------------------------------------------------------------------------------------------
# Decode: one query token per program row, the key range split over a grid axis.
# ----------------------------------------------------------------------------------------------

def _decode_body(layer_ref, kv_len_ref, block_table_ref, q_ref, k_ref, v_ref,
                 o_ref, m_ref, l_ref, *, scale, soft_cap, sliding_window, pages_per_block,
                 pages_per_split, page_size, precision):
    # grid = (token, kv_head, split); refs: q/o [Gp, D], m/l [Gp], block_table [padded_pages].
    kv_head = pl.program_id(1)
    split = pl.program_id(2)
    layer = layer_ref[0]
    kv_len = kv_len_ref[0]                      # keys 0..kv_len-1 are causal-visible
    block_k = pages_per_block * page_size
    padded_group, head_dim = q_ref.shape

    # Keys this split owns, intersected with the visible range [lo, kv_len).
    split_lo = split * pages_per_split * page_size
    split_hi = split_lo + pages_per_split * page_size
    lo = split_lo
    if sliding_window is not None:
        lo = jnp.maximum(lo, kv_len - sliding_window)
    hi = jnp.minimum(split_hi, kv_len)
    first_page = lo // page_size
    num_blocks = jnp.where(hi > lo, pl.cdiv(hi - first_page * page_size, block_k), 0)

    q = q_ref[...]

    def body(i, carry):
        page0 = first_page + i * pages_per_block
        page_ids = block_table_ref[pl.ds(page0, pages_per_block)]
        k = k_ref[layer, kv_head, page_ids].reshape(block_k, head_dim)
        v = v_ref[layer, kv_head, page_ids].reshape(block_k, head_dim)
        s = _logits(q, k, scale=scale, soft_cap=soft_cap, precision=precision)
        key_pos = page0 * page_size + jax.lax.broadcasted_iota(jnp.int32, (1, block_k), 1)
        s = jnp.where((key_pos >= lo) & (key_pos < hi), s, MASK_VALUE)
        return _online_softmax_step(s, v, carry, precision=precision)

    init = (jnp.zeros((padded_group, head_dim), jnp.float32),
            jnp.full((padded_group,), MASK_VALUE, jnp.float32),
            jnp.zeros((padded_group,), jnp.float32))
    o, m, l = jax.lax.fori_loop(0, num_blocks, body, init)
    if m_ref is None:
        # Single split: normalise here and skip the combine pass. l > 0 for every real row.
        o_ref[...] = (o / jnp.maximum(l, 1e-30)[:, None]).astype(o_ref.dtype)
    else:
        o_ref[...] = o
        m_ref[...] = m
        l_ref[...] = l


def decode_pallas_call(q_grouped, k_cache, v_cache, layer_arr, kv_lens, token_block_tables, *,
                       scale, soft_cap, sliding_window, pages_per_block, num_splits,
                       num_warps, num_stages, interpret):
    """q_grouped [T, Hkv, Gp, D]; kv_lens [T]; token_block_tables [T, num_splits * pages_per_split
    + pages_per_block] (zero-padded) -> [T, Hkv, Gp, D] in q's dtype."""
    t, hkv, padded_group, d = q_grouped.shape
    page_size = k_cache.shape[3]
    padded_pages = token_block_tables.shape[1] - pages_per_block
    pages_per_split = padded_pages // num_splits
    multi = num_splits > 1
    body = functools.partial(
        _decode_body, scale=scale, soft_cap=soft_cap, sliding_window=sliding_window,
        pages_per_block=pages_per_block, pages_per_split=pages_per_split, page_size=page_size,
        precision=_dot_precision(q_grouped.dtype))
    if not multi:
        body = functools.partial(lambda f, *refs: f(*refs, None, None), body)
    in_specs = [
        pl.BlockSpec((1,), lambda i, h, s: (0,)),                                  # layer
        pl.BlockSpec((1,), lambda i, h, s: (i,)),                                  # kv_lens
        pl.BlockSpec((None, token_block_tables.shape[1]), lambda i, h, s: (i, 0)),  # block table
        pl.BlockSpec((None, None, padded_group, d), lambda i, h, s: (i, h, 0, 0)),  # q
        pl.no_block_spec,                                                          # k cache (whole)
        pl.no_block_spec,                                                          # v cache (whole)
    ]
    if multi:
        out_shape = [jax.ShapeDtypeStruct((num_splits, t, hkv, padded_group, d), jnp.float32),
                     jax.ShapeDtypeStruct((num_splits, t, hkv, padded_group), jnp.float32),
                     jax.ShapeDtypeStruct((num_splits, t, hkv, padded_group), jnp.float32)]
        out_specs = [
            pl.BlockSpec((None, None, None, padded_group, d), lambda i, h, s: (s, i, h, 0, 0)),
            pl.BlockSpec((None, None, None, padded_group), lambda i, h, s: (s, i, h, 0)),
            pl.BlockSpec((None, None, None, padded_group), lambda i, h, s: (s, i, h, 0)),
        ]
    else:
        out_shape = jax.ShapeDtypeStruct((t, hkv, padded_group, d), q_grouped.dtype)
        out_specs = pl.BlockSpec((None, None, padded_group, d), lambda i, h, s: (i, h, 0, 0))
    result = pl.pallas_call(
        body,
        grid=(t, hkv, num_splits),
        in_specs=in_specs,
        out_specs=out_specs,
        out_shape=out_shape,
        compiler_params=pltriton.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        name="jaxllm_paged_decode",
    )(layer_arr, kv_lens, token_block_tables, q_grouped, k_cache, v_cache)
    if not multi:
        return result
    o, m, l = result
    # Flash-decoding combine over splits; empty splits have m = MASK_VALUE and l = 0, weight 0.
    m_all = m.max(axis=0)
    w = jnp.exp(m - m_all[None])
    denom = (l * w).sum(axis=0)
    out = (o * w[..., None]).sum(axis=0) / jnp.maximum(denom, 1e-30)[..., None]
    return out.astype(q_grouped.dtype)


# ----------------------------------------------------------------------------------------------
# Ragged prefill: work items of up to block_q tokens of ONE sequence each.
# ----------------------------------------------------------------------------------------------

def _prefill_body(layer_ref, item_ref, block_table_ref, positions_ref, q_ref, k_ref, v_ref,
                  o_ref, *, scale, soft_cap, sliding_window, pages_per_block, page_size,
                  block_q, precision):
    # grid = (item, kv_head). item_ref: [8] = (q_lo, q_hi, kv_lo, kv_hi, kv_full, 0, 0, 0);
    # q/o: whole [T+bq, Hkv, Gp, D]. Keys in [kv_lo, kv_full) are visible to every row.
    kv_head = pl.program_id(1)
    layer = layer_ref[0]
    q_lo = item_ref[0]
    q_hi = item_ref[1]
    kv_lo = item_ref[2]
    kv_hi = item_ref[3]
    kv_full = item_ref[4]
    _, _, padded_group, head_dim = q_ref.shape
    rows = block_q * padded_group
    block_k = pages_per_block * page_size

    q = q_ref[pl.ds(q_lo, block_q), kv_head].reshape(rows, head_dim)
    # Row r is token q_lo + r // Gp; its absolute position bounds what it sees.
    row_pos = positions_ref[pl.ds(q_lo, block_q)]                     # [bq]
    row_pos = jnp.broadcast_to(row_pos[:, None], (block_q, padded_group)).reshape(rows, 1)
    first_page = kv_lo // page_size
    num_blocks = jnp.where(kv_hi > kv_lo, pl.cdiv(kv_hi - first_page * page_size, block_k), 0)
    # Leading blocks that lie wholly inside [kv_lo, kv_full) skip the mask (most of a long prefill).
    num_full = jnp.clip((kv_full - first_page * page_size) // block_k, 0, num_blocks)

    def body(i, carry, masked):
        page0 = first_page + i * pages_per_block
        page_ids = block_table_ref[pl.ds(page0, pages_per_block)]
        k = k_ref[layer, kv_head, page_ids].reshape(block_k, head_dim)
        v = v_ref[layer, kv_head, page_ids].reshape(block_k, head_dim)
        s = _logits(q, k, scale=scale, soft_cap=soft_cap, precision=precision)
        if masked:
            key_pos = page0 * page_size + jax.lax.broadcasted_iota(jnp.int32, (1, block_k), 1)
            visible = (key_pos <= row_pos) & (key_pos < kv_hi) & (key_pos >= kv_lo)
            if sliding_window is not None:
                visible &= key_pos > row_pos - sliding_window
            s = jnp.where(visible, s, MASK_VALUE)
        return _online_softmax_step(s, v, carry, precision=precision)

    init = (jnp.zeros((rows, head_dim), jnp.float32),
            jnp.full((rows,), MASK_VALUE, jnp.float32),
            jnp.zeros((rows,), jnp.float32))
    carry = jax.lax.fori_loop(0, num_full, functools.partial(body, masked=False), init)
    o, _, l = jax.lax.fori_loop(num_full, num_blocks, functools.partial(body, masked=True), carry)
    o = (o / jnp.maximum(l, 1e-30)[:, None]).astype(o_ref.dtype).reshape(
        block_q, padded_group, head_dim)
    # Items of neighbouring sequences overlap in the flat buffer: store only this item's rows.
    tok = q_lo + jax.lax.broadcasted_iota(jnp.int32, (block_q, padded_group, head_dim), 0)
    pltriton.store(o_ref.at[pl.ds(q_lo, block_q), kv_head], o, mask=tok < q_hi)


def prefill_pallas_call(q_grouped, k_cache, v_cache, layer_arr, items, item_block_tables,
                        positions, *, scale, soft_cap, sliding_window, pages_per_block, block_q,
                        num_warps, num_stages, interpret):
    """q_grouped [T + block_q, Hkv, Gp, D] (zero-padded tail); items [N, 8] int32;
    item_block_tables [N, max_pages + pages_per_block]; positions [T + block_q] -> like q_grouped."""
    num_items = items.shape[0]
    hkv = q_grouped.shape[1]
    body = functools.partial(
        _prefill_body, scale=scale, soft_cap=soft_cap, sliding_window=sliding_window,
        pages_per_block=pages_per_block, page_size=k_cache.shape[3], block_q=block_q,
        precision=_dot_precision(q_grouped.dtype))
    full = pl.no_block_spec  # whole array; the body indexes it
    return pl.pallas_call(
        body,
        grid=(num_items, hkv),
        in_specs=[
            pl.BlockSpec((1,), lambda i, h: (0,)),                                   # layer
            pl.BlockSpec((None, 8), lambda i, h: (i, 0)),                            # item
            pl.BlockSpec((None, item_block_tables.shape[1]), lambda i, h: (i, 0)),   # block table
            full,                                                                    # positions
            full,                                                                    # q
            full,                                                                    # k cache
            full,                                                                    # v cache
        ],
        out_specs=full,
        out_shape=jax.ShapeDtypeStruct(q_grouped.shape, q_grouped.dtype),
        compiler_params=pltriton.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        name="jaxllm_ragged_prefill",
    )(layer_arr, items, item_block_tables, positions, q_grouped, k_cache, v_cache)
