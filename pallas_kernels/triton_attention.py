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

The decode kernel can also write this step's K/V into the cache (``new_kv``; the model's decode
steps do): the caches become outputs aliased to the cache inputs and one program per (token, kv
head) stores the token's key/value at its slot, masked off for out-of-range slots (padding, pipeline
bubbles). The kernel then reads cached keys [lo, kv_len - 1) only; the new key (position kv_len - 1,
visible under any window) enters split 0's online softmax from registers. No program uses a value
read from that slot: the page holding it may still be loaded as part of a block (by the token's own
split programs), where the key is masked and its finite old or new value gets weight exactly 0.

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

def _new_token_carry(q, k_new, v_new, first, *, scale, soft_cap):
    """The online-softmax carry after the new token alone (this program's ``first`` split), else
    the empty carry. q [Gp, D]; k_new/v_new [D] in the cache dtype.

    Triton's ``dot`` needs >= 16 rows on both sides, so q . k_new is a multiply and a sum over D."""
    s = (q.astype(jnp.float32) * k_new.astype(jnp.float32)[None, :]).sum(axis=-1) * scale
    if soft_cap is not None:
        s = jnp.tanh(s / soft_cap) * soft_cap
    o = jnp.broadcast_to(v_new.astype(jnp.float32)[None, :], q.shape)
    return (jnp.where(first, o, jnp.zeros_like(o)),
            jnp.where(first, s, jnp.full_like(s, MASK_VALUE)),
            jnp.where(first, jnp.ones_like(s), jnp.zeros_like(s)))


def _decode_body(layer_ref, kv_len_ref, block_table_ref, q_ref, k_ref, v_ref, new_refs,
                 o_ref, m_ref, l_ref, cache_out_refs, *, scale, soft_cap, sliding_window,
                 pages_per_block, pages_per_split, page_size, precision):
    # grid = (token, kv_head, split); refs: q/o [Gp, D], m/l [Gp], block_table [padded_pages].
    # Fused K/V write (new_refs = (k_new [D], v_new [D], slot [1]), cache_out_refs = the caches
    # aliased in place): the new key at position kv_len-1 enters split 0's softmax from registers
    # and the cache is read only below it, so no program reads what this call writes.
    kv_head = pl.program_id(1)
    split = pl.program_id(2)
    layer = layer_ref[0]
    kv_len = kv_len_ref[0]                      # keys 0..kv_len-1 are causal-visible
    block_k = pages_per_block * page_size
    padded_group, head_dim = q_ref.shape
    fused = new_refs is not None
    q = q_ref[...]

    # Keys this split reads from the cache, intersected with the visible range [lo, hi).
    split_lo = split * pages_per_split * page_size
    split_hi = split_lo + pages_per_split * page_size
    lo = split_lo
    if sliding_window is not None:
        lo = jnp.maximum(lo, kv_len - sliding_window)
    hi = jnp.minimum(split_hi, kv_len - 1 if fused else kv_len)
    first_page = lo // page_size
    num_blocks = jnp.where(hi > lo, pl.cdiv(hi - first_page * page_size, block_k), 0)

    if fused:
        k_new_ref, v_new_ref, slot_ref = new_refs
        k_new, v_new = k_new_ref[...], v_new_ref[...]
        # Split 0 always exists and its program also stores the token, so one program per
        # (token, kv head) owns the new key; the combine merges it like any split's keys.
        init = _new_token_carry(q, k_new, v_new, split == 0, scale=scale, soft_cap=soft_cap)
        # write_kv's drop semantics: a slot outside [0, num_pages * page) (padding, pipeline
        # bubble) writes nothing; the page index is clamped so even the masked address is valid.
        k_out_ref, v_out_ref = cache_out_refs
        num_pages = k_out_ref.shape[2]
        slot = slot_ref[0]
        store = (split == 0) & (slot >= 0) & (slot < num_pages * page_size)
        page = jnp.clip(slot // page_size, 0, num_pages - 1)
        off = slot % page_size
        mask = jnp.broadcast_to(store, (head_dim,))
        pltriton.store(k_out_ref.at[layer, kv_head, page, off], k_new, mask=mask)
        pltriton.store(v_out_ref.at[layer, kv_head, page, off], v_new, mask=mask)
    else:
        init = (jnp.zeros((padded_group, head_dim), jnp.float32),
                jnp.full((padded_group,), MASK_VALUE, jnp.float32),
                jnp.zeros((padded_group,), jnp.float32))

    def body(i, carry):
        page0 = first_page + i * pages_per_block
        page_ids = block_table_ref[pl.ds(page0, pages_per_block)]
        k = k_ref[layer, kv_head, page_ids].reshape(block_k, head_dim)
        v = v_ref[layer, kv_head, page_ids].reshape(block_k, head_dim)
        s = _logits(q, k, scale=scale, soft_cap=soft_cap, precision=precision)
        key_pos = page0 * page_size + jax.lax.broadcasted_iota(jnp.int32, (1, block_k), 1)
        s = jnp.where((key_pos >= lo) & (key_pos < hi), s, MASK_VALUE)
        return _online_softmax_step(s, v, carry, precision=precision)

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
                       num_warps, num_stages, interpret, new_kv=None):
    """q_grouped [T, Hkv, Gp, D]; kv_lens [T]; token_block_tables [T, num_splits * pages_per_split
    + pages_per_block] (zero-padded) -> [T, Hkv, Gp, D] in q's dtype.

    ``new_kv=(k_new, v_new, slots)`` ([T, Hkv, D] in the cache dtype, [T] int32) fuses the cache
    write: token t's key/value (position kv_lens[t] - 1) is stored at ``slots[t]`` and the call
    returns ``(out, k_cache, v_cache)``, the caches aliased to the inputs (in place when the
    caller's buffers can be reused, e.g. donated or a scan carry)."""
    t, hkv, padded_group, d = q_grouped.shape
    page_size = k_cache.shape[3]
    padded_pages = token_block_tables.shape[1] - pages_per_block
    pages_per_split = padded_pages // num_splits
    multi = num_splits > 1
    fused = new_kv is not None
    body = functools.partial(
        _decode_body, scale=scale, soft_cap=soft_cap, sliding_window=sliding_window,
        pages_per_block=pages_per_block, pages_per_split=pages_per_split, page_size=page_size,
        precision=_dot_precision(q_grouped.dtype))
    num_in = 9 if fused else 6
    num_partials = 3 if multi else 1

    def kernel(*refs):
        ins, outs = refs[:num_in], refs[num_in:]
        o_ref, m_ref, l_ref = outs[:3] if multi else (outs[0], None, None)
        body(*ins[:6], ins[6:] if fused else None, o_ref, m_ref, l_ref,
             outs[num_partials:] if fused else None)

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
        out_shape = [jax.ShapeDtypeStruct((t, hkv, padded_group, d), q_grouped.dtype)]
        out_specs = [pl.BlockSpec((None, None, padded_group, d), lambda i, h, s: (i, h, 0, 0))]
    args = [layer_arr, kv_lens, token_block_tables, q_grouped, k_cache, v_cache]
    aliases = {}
    if fused:
        k_new, v_new, slots = new_kv
        in_specs += [pl.BlockSpec((None, None, d), lambda i, h, s: (i, h, 0)),      # k_new
                     pl.BlockSpec((None, None, d), lambda i, h, s: (i, h, 0)),      # v_new
                     pl.BlockSpec((1,), lambda i, h, s: (i,))]                      # slots
        args += [k_new, v_new, slots]
        # The caches come back as outputs written in place (inputs 4 and 5 alias them): the
        # kernel stores only the new tokens' slots, so no program copies the cache.
        out_shape += [jax.ShapeDtypeStruct(k_cache.shape, k_cache.dtype),
                      jax.ShapeDtypeStruct(v_cache.shape, v_cache.dtype)]
        out_specs += [pl.no_block_spec, pl.no_block_spec]
        aliases = {4: num_partials, 5: num_partials + 1}
    result = pl.pallas_call(
        kernel,
        grid=(t, hkv, num_splits),
        in_specs=in_specs,
        out_specs=out_specs,
        out_shape=out_shape,
        input_output_aliases=aliases,
        compiler_params=pltriton.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        name="jaxllm_paged_decode_kv_write" if fused else "jaxllm_paged_decode",
    )(*args)
    caches = tuple(result[num_partials:])
    if not multi:
        out = result[0]
    else:
        o, m, l = result[:3]
        # Flash-decoding combine over splits; empty splits have m = MASK_VALUE and l = 0, weight 0.
        m_all = m.max(axis=0)
        w = jnp.exp(m - m_all[None])
        denom = (l * w).sum(axis=0)
        out = (o * w[..., None]).sum(axis=0) / jnp.maximum(denom, 1e-30)[..., None]
        out = out.astype(q_grouped.dtype)
    return (out, *caches) if fused else out


# ----------------------------------------------------------------------------------------------
# Ragged prefill: work items of up to block_q tokens of ONE sequence each.
# ----------------------------------------------------------------------------------------------

def _prefill_body(layer_ref, item_ref, block_table_ref, positions_ref, q_ref, k_ref, v_ref,
                  o_ref, *, scale, soft_cap, sliding_window, pages_per_block, page_size,
                  block_q, precision):
    # grid = (item, kv_head). item_ref: [8] = (q_lo, q_hi, kv_lo, kv_hi, kv_full, real_lo, 0, 0)
    # from _prefill_items with align=1, so real_lo == q_lo (unused here); q/o: whole
    # [T+bq, Hkv, Gp, D]. Keys in [kv_lo, kv_full) are visible to every row.
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
    # Longest items first: under causal masking an item's cost grows with its key range, and the
    # items of a chunk come in position order, so launching them as listed leaves the longest for
    # the last wave (a tail on the GPU's 132 SMs). Empty items (kv_lo == kv_hi) sort last.
    order = jnp.argsort(items[:, 2] - items[:, 3], stable=True)
    items, item_block_tables = items[order], item_block_tables[order]
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
