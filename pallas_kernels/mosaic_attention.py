"""Mosaic GPU (Hopper) paged-attention decode kernel: TMA page copies into a multi-stage SMEM ring.

Layers 1 and 2 of DESIGN.md rule 7 (kernel body and ``plgpu.kernel`` wrapper); validation, tuning
defaults and dispatch are in ``paged_attention.py`` (``kernel="mosaic"``). ``decode_call`` has
the contract of ``triton_attention.decode_pallas_call`` (grouped q, whole caches, traced layer,
kv_lens, per-token block tables), with the key split given as ``pages_per_split``.

Why: the Triton decode kernel loads each K/V block with no software pipelining (``num_stages=1``
was its best configuration) and reaches 30-70% of the copy bandwidth. Here every CTA (one
warpgroup) owns one (token, kv head, key split) and keeps ``num_stages`` K/V blocks in flight:

    prologue: issue blocks 0..S-1 into slots 0..S-1 (one TMA per page, all on the slot's barrier)
    block i:  wait K[i % S] -> S = Q K^T (wgmma) -> issue K of block i+S into the freed slot
              -> online softmax -> wait V[i % S] -> O += P V (wgmma) -> issue V of block i+S

so the loads of blocks i+1..i+S-1 overlap the math of block i. A K/V block is ``pages_per_block``
pages gathered through the block table: each page is a ``[page_size, D]`` TMA copy into rows
``j * page_size`` of the slot, and the slot's barrier expects ``pages_per_block`` arrivals.

wgmma needs 64 query rows and a contraction of 64 (128-byte swizzle): the query group (G heads
sharing a kv head, padded to a multiple of 8 rows in HBM) is copied into rows 0..Gq-1 of a zeroed
``[64, D]`` SMEM tile, and a block holds a multiple of 64 keys. The padded rows cost tensor-core
time only; decode is bandwidth-bound.

Cache layout: the wrapper flattens the caches to ``[L * Hkv * P, page, D]`` (a free reshape of
the contiguous ``[L, Hkv, P, page, D]`` array, not a copy, unlike slicing a layer out); the kernel
indexes page ``(layer * Hkv + kv_head) * P + page_id`` with the traced layer, so one executable
serves every layer of the model's scan, and each TMA descriptor stays 3-D (TMA allows at most 5
dimensions after tiling).

Masking: a block covers keys ``[split_lo + b * block_k, ... + block_k)``; keys outside the visible
range ``[lo, hi)`` (beyond ``kv_len``, before the sliding window, or in zero-padded table entries,
which point at the null page) get a large finite negative logit, so they contribute exactly zero.
Blocks are aligned to the split start and the loop covers only blocks holding a visible key, so
every processed block has one and no row ever normalises over masked keys alone.

Interpret mode: ``interpret=True`` runs the kernel in Mosaic GPU's interpreter on the CPU
(``InterpretGPUParams``: uninitialised SMEM and outputs filled with NaN, out-of-bounds reads
raise), which simulates SMEM, the TMA copies and the barriers. Two substitutions there, both
no-ops for the values: the matmuls run as jnp.dot on the same SMEM tiles, and ``layout_cast`` is
skipped (see ``_decode_body``).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)
_LOG2E = math.log2(math.e)
WGMMA_ROWS = 64          # one warpgroup's wgmma M
SUPPORTED_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
_SWIZZLE = 128           # bytes: rows of 64 16-bit elements per swizzle tile
_TILE_ROWS = 8


# A K/V block holds a multiple of 64 keys (the P V wgmma contracts over keys in 128-byte swizzle
# groups of 64 16-bit elements) and at most 256 (one TMA box / wgmma N for Q K^T).
BLOCK_KEYS_MULTIPLE = _SWIZZLE // 2
MAX_BLOCK_KEYS = 256


def unsupported_reason(*, dtype, head_dim: int, group: int, page_size: int,
                       pages_per_block: int) -> str | None:
    """Why this kernel cannot run the given shape (None when it can)."""
    if jnp.dtype(dtype) not in SUPPORTED_DTYPES:
        return (f"dtype {jnp.dtype(dtype)} (the Mosaic decode kernel runs bf16/fp16 only: fp32 "
                "wgmma is TF32)")
    if head_dim % 64:
        return f"head_dim {head_dim} (must be a multiple of 64)"
    if group > WGMMA_ROWS:
        return f"{group} query heads per kv head (at most {WGMMA_ROWS})"
    if page_size % _TILE_ROWS:
        return f"page_size {page_size} (must be a multiple of {_TILE_ROWS})"
    block_k = pages_per_block * page_size
    if block_k % BLOCK_KEYS_MULTIPLE or block_k > MAX_BLOCK_KEYS:
        return (f"blocks of {pages_per_block} x {page_size} keys (must be a multiple of "
                f"{BLOCK_KEYS_MULTIPLE} and at most {MAX_BLOCK_KEYS})")
    return None


def smem_bytes(*, head_dim: int, block_k: int, num_stages: int, itemsize: int,
               table_entries: int, multi_split: bool) -> int:
    """Shared memory one CTA asks for (K and V rings, the query tile, the block table)."""
    ring = 2 * num_stages * block_k * head_dim * itemsize
    q_tile = WGMMA_ROWS * head_dim * itemsize
    partials = (WGMMA_ROWS * head_dim + WGMMA_ROWS) * 4 if multi_split else 0
    return ring + q_tile + partials + 4 * table_entries


def table_layout(pages_per_split: int) -> tuple[int, int]:
    """(rows, cols) of one split's block-table tile. A TMA box has <= 256 elements a dimension,
    and Pallas copies a multiple of 128 bytes (one per thread of the warpgroup): short tables
    pad to 32 entries, long ones fold into rows of 128."""
    if pages_per_split <= 256:
        return 1, -(-pages_per_split // 32) * 32
    return -(-pages_per_split // 128), 128


def interpret_params(*, detect_races: bool = False):
    """Mosaic GPU interpret mode (CPU): uninitialised SMEM and outputs read as NaN, out-of-bounds
    reads raise; ``detect_races`` also checks every SMEM access against the TMA copies with
    vector clocks (a read not ordered after its copy's barrier wait is reported)."""
    try:  # public from some JAX version on; private in 0.10.2
        params_cls = plgpu.InterpretParams  # type: ignore[attr-defined]
    except AttributeError:
        from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams as params_cls
    # Each TMA copy gets its own vector-clock component only with enough simulated TMA
    # "threads"; with the default single one, any barrier wait orders every earlier copy and a
    # missing wait goes unnoticed.
    return params_cls(uninitialized_memory="nan", out_of_bounds_reads="raise",
                      detect_races=detect_races,
                      num_tma_threads_per_device=64 if detect_races else 1)


def races_detected() -> bool:
    """Whether the last interpreted kernel run with ``detect_races`` reported a race."""
    from jax._src.pallas.mosaic_gpu.interpret import interpret_pallas_call
    return bool(interpret_pallas_call.get_races().races_found)


def register_layouts(interpret: bool):
    """(to the wgmma accumulator layout, to its row-reduced layout): register layouts fix how
    loop carries and constants live in a warpgroup's registers. The interpreter has no rule for
    ``layout_cast`` (a no-op on values), so there both are the identity."""
    if interpret:
        return (lambda x: x), (lambda x: x)
    return (lambda x: plgpu.layout_cast(x, plgpu.Layout.WGMMA),
            lambda x: plgpu.layout_cast(x, plgpu.Layout.WGMMA.reduce(1)))


def qk_logits(q_tile, k_tile, *, interpret: bool):
    """S = Q K^T as f32 [64, block_k] from a [64, D] query tile and a [block_k, D] K tile in SMEM:
    wgmma with B = K^T through ``transpose_ref`` on the GPU; the interpreter (JAX 0.10.2) cannot
    run a transposed B, so there the same tiles are multiplied with jnp.dot."""
    if interpret:
        return jnp.dot(q_tile[...], k_tile[...].T, preferred_element_type=jnp.float32)

    def qk(acc_ref):
        plgpu.wgmma(acc_ref, q_tile, plgpu.transpose_ref(k_tile, (1, 0)))
        return acc_ref[...]                       # waits for the wgmma to finish
    return pl.run_scoped(qk, plgpu.ACC((WGMMA_ROWS, k_tile.shape[0]), jnp.float32))


def online_softmax_step(s, m, l, acc):
    """One block of the online softmax in the log2 domain: s [64, block_k] f32 logits (masked keys
    at MASK_VALUE), running row max m and sum l [64], accumulator acc [64, D] -> (p, m, l, acc) with
    p = exp2(s - new max) for the P V matmul and l, acc rescaled to the new max."""
    m_new = jnp.maximum(m, s.max(axis=1))
    alpha = jnp.exp2(m - m_new)
    p = jnp.exp2(s - lax.broadcast_in_dim(m_new, s.shape, [0]))
    l = l * alpha + p.sum(axis=1)
    acc = acc * lax.broadcast_in_dim(alpha, acc.shape, [0])
    return p, m_new, l, acc


def _decode_body(layer_ref, kv_len_ref, table_ref, q_ref, k_ref, v_ref, *refs, scale, soft_cap,
                 sliding_window, page_size, pages_per_block, pages_per_split, num_pages,
                 num_kv_heads, num_stages, multi, interpret):
    if multi:
        o_ref, lse_ref, q_smem, k_smem, v_smem, table_smem, o32_smem, lse_smem, \
            k_bar, v_bar, setup_bar = refs
    else:
        o_ref, q_smem, k_smem, v_smem, table_smem, k_bar, v_bar, setup_bar = refs
    token = lax.axis_index("token")
    kv_head = lax.axis_index("kv_head")
    split = lax.axis_index("split")
    group_rows, head_dim = q_ref.shape[2:]
    table_cols = table_smem.shape[1]
    block_k = pages_per_block * page_size
    dtype = q_ref.dtype
    wgmma_layout, row_layout = register_layouts(interpret)

    layer = layer_ref[0]
    kv_len = kv_len_ref[token]                   # keys 0..kv_len-1 are causal-visible
    split_lo = split * (pages_per_split * page_size)
    lo = split_lo
    if sliding_window is not None:
        lo = jnp.maximum(lo, kv_len - sliding_window)
    hi = jnp.minimum(split_lo + pages_per_split * page_size, kv_len)
    first_block = (lo - split_lo) // block_k
    num_blocks = jnp.where(hi > lo, (hi - split_lo + block_k - 1) // block_k - first_block, 0)
    page_base = (layer * num_kv_heads + kv_head) * num_pages

    # Zero the query tile (rows >= group_rows stay zero), then bring in the group and the table.
    q_smem[...] = wgmma_layout(jnp.zeros((WGMMA_ROWS, head_dim), dtype))
    plgpu.commit_smem()
    plgpu.copy_gmem_to_smem(table_ref.at[token, split], table_smem, setup_bar)
    plgpu.copy_gmem_to_smem(q_ref.at[token, kv_head], q_smem.at[pl.ds(0, group_rows)], setup_bar)
    plgpu.barrier_wait(setup_bar)

    def issue(cache_ref, ring, barriers, block, slot):
        for j in range(pages_per_block):       # one TMA per page, all on the slot's barrier
            entry = block * pages_per_block + j
            page_id = table_smem[entry // table_cols, entry % table_cols]
            plgpu.copy_gmem_to_smem(cache_ref.at[page_base + page_id],
                                    ring.at[slot, pl.ds(j * page_size, page_size)],
                                    barriers.at[slot])

    for s in range(num_stages):
        @pl.when(s < num_blocks)
        def _prologue():
            issue(k_ref, k_smem, k_bar, first_block + s, s)
            issue(v_ref, v_smem, v_bar, first_block + s, s)

    # The two matmuls: wgmma on the GPU, exactly as pallas/ops/gpu/attention_mgpu.py issues them
    # (B = K^T through transpose_ref, P from registers). Mosaic GPU's interpreter (JAX 0.10.2)
    # supports neither a transposed B nor an A in registers, so there the same SMEM tiles are
    # read and multiplied with jnp.dot; everything else is the GPU code path.
    def qk_matmul(slot):
        return qk_logits(q_smem, k_smem.at[slot], interpret=interpret)

    def pv_matmul(p, slot):
        if interpret:
            return jnp.dot(p, v_smem[slot], preferred_element_type=jnp.float32)

        def pv(acc_ref):
            plgpu.wgmma(acc_ref, p, v_smem.at[slot])
            return acc_ref[...]                   # waits for the wgmma to finish
        # A fresh accumulator added in registers rather than ``pl.run_state(ACC.init(acc))``
        # (which the interpreter cannot run either): one add next to a 16-32 KB block load.
        return pl.run_scoped(pv, plgpu.ACC((WGMMA_ROWS, head_dim), jnp.float32))

    def step(i, carry):
        acc, m, l = carry
        slot = lax.rem(i, num_stages)
        block = first_block + i
        refill = i + num_stages < num_blocks
        plgpu.barrier_wait(k_bar.at[slot])

        s = qk_matmul(slot)                       # [64, block_k] f32; the K slot is free after

        @pl.when(refill)
        def _refill_k():
            issue(k_ref, k_smem, k_bar, block + num_stages, slot)

        # Logits in the log2 domain (exp2 below); masked keys get a finite large negative.
        if soft_cap is None:
            s = s * (scale * _LOG2E)
        else:
            s = jnp.tanh(s * (scale / soft_cap)) * (soft_cap * _LOG2E)
        key_pos = split_lo + block * block_k + wgmma_layout(
            lax.broadcasted_iota(jnp.int32, (WGMMA_ROWS, block_k), 1))
        s = jnp.where((key_pos >= lo) & (key_pos < hi), s, MASK_VALUE)
        p, m_new, l, acc = online_softmax_step(s, m, l, acc)
        plgpu.barrier_wait(v_bar.at[slot])

        acc = acc + pv_matmul(p.astype(dtype), slot)  # the V slot is free after

        @pl.when(refill)
        def _refill_v():
            issue(v_ref, v_smem, v_bar, block + num_stages, slot)
        return acc, m_new, l

    init = (wgmma_layout(jnp.zeros((WGMMA_ROWS, head_dim), jnp.float32)),
            row_layout(jnp.full((WGMMA_ROWS,), MASK_VALUE, jnp.float32)),
            row_layout(jnp.zeros((WGMMA_ROWS,), jnp.float32)))
    acc, m, l = lax.fori_loop(0, num_blocks, step, init)

    # l == 0 only for an empty split (multi-split); its weight in the combine is exp2(-inf) = 0.
    l_safe = jnp.where(l == 0.0, 1.0, l)
    out = acc / lax.broadcast_in_dim(l_safe, acc.shape, [0])
    if multi:
        o32_smem[...] = out
        lse_smem[...] = m + jnp.log2(l)
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(o32_smem.at[pl.ds(0, group_rows)],
                                o_ref.at[split, token, kv_head])
        plgpu.copy_smem_to_gmem(lse_smem.at[pl.ds(0, group_rows)],
                                lse_ref.at[split, token, kv_head])
    else:
        q_smem[...] = out.astype(dtype)          # every wgmma on q_smem has completed
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(q_smem.at[pl.ds(0, group_rows)], o_ref.at[token, kv_head])
    plgpu.wait_smem_to_gmem(0)


def decode_call(q_grouped, k_cache, v_cache, layer_arr, kv_lens, token_block_tables, *, scale,
                soft_cap, sliding_window, pages_per_block, pages_per_split, num_stages, interpret):
    """Paged decode attention on Hopper; the contract of ``triton_attention.decode_pallas_call``.

    q_grouped [T, Hkv, Gq, D] (Gq a multiple of 8, <= 64; rows past the real group are zero);
    k_cache/v_cache [L, Hkv, P, page, D] whole; layer_arr [1] int32; kv_lens [T] int32 (keys
    0..kv_len-1 visible); token_block_tables [T, max_pages] int32 (any padding entries are 0, the
    null page). Splits own ``pages_per_split`` (a multiple of ``pages_per_block``) table entries
    each. ``interpret``: False (GPU), True (Mosaic GPU interpret mode, ``interpret_params()``) or
    interpret params. Returns [T, Hkv, Gq, D] in q's dtype.
    """
    t, hkv, group_rows, d = q_grouped.shape
    num_layers, _, num_pages, page_size, _ = k_cache.shape
    why = unsupported_reason(dtype=q_grouped.dtype, head_dim=d, group=group_rows,
                             page_size=page_size, pages_per_block=pages_per_block)
    if why is not None:
        raise ValueError(f"the Mosaic GPU decode kernel does not support {why}")
    if group_rows % _TILE_ROWS:
        raise ValueError(f"q_grouped rows per kv head ({group_rows}) must be a multiple of 8")
    if pages_per_split % pages_per_block:
        raise ValueError(f"pages_per_split ({pages_per_split}) must be a multiple of "
                         f"pages_per_block ({pages_per_block})")
    table_rows, table_cols = table_layout(pages_per_split)
    if table_rows > 256:
        raise ValueError(f"{pages_per_split} pages per split exceed one TMA copy of the table")
    max_pages = token_block_tables.shape[1]
    num_splits = -(-max_pages // pages_per_split)
    # [T, max_pages] -> [T, splits, rows, cols], zero (null page) padded: one TMA per CTA.
    tables = jnp.pad(token_block_tables.astype(jnp.int32),
                     ((0, 0), (0, num_splits * pages_per_split - max_pages)))
    tables = jnp.pad(tables.reshape(t, num_splits, pages_per_split),
                     ((0, 0), (0, 0), (0, table_rows * table_cols - pages_per_split)))
    tables = tables.reshape(t, num_splits, table_rows, table_cols)
    # [L, Hkv, P, page, D] -> [L * Hkv * P, page, D]: a bitcast of the contiguous cache.
    flat = (num_layers * hkv * num_pages, page_size, d)
    interpreting = interpret is not False and interpret is not None

    multi = num_splits > 1
    block_k = pages_per_block * page_size
    dtype = q_grouped.dtype
    tiled = (plgpu.TilingTransform((_TILE_ROWS, _SWIZZLE // dtype.itemsize)),
             plgpu.SwizzleTransform(_SWIZZLE))
    scratch = [
        plgpu.SMEM((WGMMA_ROWS, d), dtype, transforms=tiled),                # query tile / output
        plgpu.SMEM((num_stages, block_k, d), dtype, transforms=tiled),       # K ring
        plgpu.SMEM((num_stages, block_k, d), dtype, transforms=tiled),       # V ring
        plgpu.SMEM((table_rows, table_cols), jnp.int32),                     # this split's pages
    ]
    out_type = jax.ShapeDtypeStruct((t, hkv, group_rows, d), dtype)
    if multi:
        scratch += [plgpu.SMEM((WGMMA_ROWS, d), jnp.float32),
                    plgpu.SMEM((WGMMA_ROWS,), jnp.float32)]
        out_type = (jax.ShapeDtypeStruct((num_splits, t, hkv, group_rows, d), jnp.float32),
                    jax.ShapeDtypeStruct((num_splits, t, hkv, group_rows), jnp.float32))
    scratch += [plgpu.Barrier(num_arrivals=pages_per_block, num_barriers=num_stages),
                plgpu.Barrier(num_arrivals=pages_per_block, num_barriers=num_stages),
                plgpu.Barrier(num_arrivals=2)]                               # table + query
    body = functools.partial(
        _decode_body, scale=scale, soft_cap=soft_cap, sliding_window=sliding_window,
        page_size=page_size, pages_per_block=pages_per_block, pages_per_split=pages_per_split,
        num_pages=num_pages, num_kv_heads=hkv, num_stages=num_stages, multi=multi,
        interpret=interpreting)
    body.__name__ = "jaxllm_paged_decode_mosaic"     # the kernel's name in profiles
    result = plgpu.kernel(
        body,
        out_type=out_type,
        scratch_types=scratch,
        grid=(t, hkv, num_splits),
        grid_names=("token", "kv_head", "split"),
        interpret=(interpret_params() if interpret is True else interpret or None),
    )(layer_arr, kv_lens, tables, q_grouped, k_cache.reshape(flat), v_cache.reshape(flat))
    if not multi:
        return result
    o, lse = result
    # Flash-decoding combine over splits, log2 domain; an empty split has lse = -inf, weight 0.
    lse_max = lse.max(axis=0)
    w = jnp.exp2(lse - lse_max[None])
    out = (o * w[..., None]).sum(axis=0) / w.sum(axis=0)[..., None]
    return out.astype(dtype)
