"""Mosaic GPU (Hopper) paged-attention decode kernel: TMA page copies into a multi-stage SMEM ring.

Layers 1 and 2 of DESIGN.md rule 7 (kernel body and ``plgpu.kernel`` wrapper); validation, tuning
defaults and dispatch are in ``paged_attention.py`` (``kernel="mosaic"``). ``decode_call`` takes
q as [T, Hkv, G, D] (a bitcast of [T, H, D]), the whole caches, the traced layer, and the
metadata as it is (positions, per-sequence block tables, token_seq_ids), with the key split
given as ``pages_per_split``; it returns [T, Hkv, G, D]. XLA runs no op on q, out or the
per-token metadata around it (one split).

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
sharing a kv head, rows [i * G, i * G + G) of q as [T * H, D] for pair i = token * Hkv + kv_head)
comes in with the 8-row aligned box around it (``q_box_rows``: a TMA into a tiled tile moves
whole 8-row tiles) into a zeroed ``[64, D]`` SMEM tile, where it sits at row lead = i * G % 8;
the box's other rows are neighbouring groups' queries, computed and never stored (rows are
independent). A block holds a multiple of 64 keys. The extra rows cost tensor-core time only;
decode is bandwidth-bound. The output leaves from an untiled SMEM tile (aliasing the q tile,
``plgpu.RefUnion``), where a TMA box may start at any row: one box of the G real rows straight
into out [T * H, D], so neither a pad of q to 8-row groups nor a slice of out runs in XLA (they
cost 1.9 + 1.9 us of 73 us at batch 32 x 2k on an H200). With key splits the f32 partial o rows
go out the same way; lse goes out as the whole box (4-byte rows: a box from row lead would be
misaligned) and the combine picks each group's rows.

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

Fused K/V write (``new_kv``): the CTA whose split holds the token's position stores the token's
new k and v rows (one-row TMA boxes from untiled SMEM) into the cache, aliased in and out, and
waits for them before it loads the block holding that position, which then reads the key back
(see ``_decode_body``); the caller promises one query token per sequence.

Interpret mode: ``interpret=True`` runs the kernel in Mosaic GPU's interpreter on the CPU
(``InterpretGPUParams``: uninitialised SMEM and outputs filled with NaN, out-of-bounds reads
raise), which simulates SMEM, the TMA copies and the barriers. Substitutions there, all no-ops
for the values: the matmuls run as jnp.dot on the same SMEM tiles, ``layout_cast`` is skipped
(see ``_decode_body``), the q and output tiles are two buffers (the 0.10.2 interpreter has no
rule for a ``RefUnion``'s views), and q gets zero rows up to the last box's end (the GPU's TMA
zero-fills a box past the array's end; the interpreter raises).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
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
    if q_box_rows(group) > WGMMA_ROWS:
        return (f"{group} query heads per kv head (their 8-row aligned q box, "
                f"{q_box_rows(group)} rows, exceeds {WGMMA_ROWS})")
    if page_size % _TILE_ROWS:
        return f"page_size {page_size} (must be a multiple of {_TILE_ROWS})"
    block_k = pages_per_block * page_size
    if block_k % BLOCK_KEYS_MULTIPLE or block_k > MAX_BLOCK_KEYS:
        return (f"blocks of {pages_per_block} x {page_size} keys (must be a multiple of "
                f"{BLOCK_KEYS_MULTIPLE} and at most {MAX_BLOCK_KEYS})")
    return None


def q_box_rows(group: int) -> int:
    """Rows of the TMA box that loads one query group into the tiled, swizzled wgmma tile.

    q is read as [T * H, D] with no copy: group ``g`` of (token, kv head) pair ``i`` is rows
    [i * g, i * g + g). A TMA into a tiled tile moves whole 8-row tiles, so the box starts at
    the multiple of 8 at or below i * g and the group sits at tile row lead = i * g % 8, a
    multiple of gcd(g, 8): the box spans lead + g <= 8 - gcd(g, 8) + g rows, rounded up to 8."""
    if group % _TILE_ROWS == 0:
        return group
    span = group + _TILE_ROWS - math.gcd(group, _TILE_ROWS)
    return -(-span // _TILE_ROWS) * _TILE_ROWS


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


def _decode_body(layer_ref, pos_ref, seq_ref, table_ref, q_ref, k_ref, v_ref, *refs, scale,
                 soft_cap, sliding_window, page_size, pages_per_block, pages_per_split,
                 num_pages, num_kv_heads, group, num_stages, multi, fused, interpret):
    if fused:
        # k_ref/v_ref are the caches aliased in and out (mutable refs); the new rows [T * Hkv, D],
        # the slots [T], and (last, after the other scratch) the write's SMEM rows and barrier.
        new_k_ref, new_v_ref, slot_ref, *refs, new_k_smem, new_v_smem, new_bar = refs
    if multi:
        o_ref, lse_ref, q_smem, k_smem, v_smem, table_smem, o32_smem, lse_smem, \
            k_bar, v_bar, setup_bar = refs
    else:
        o_ref, (q_smem, o_smem), k_smem, v_smem, table_smem, k_bar, v_bar, setup_bar = refs
    token = lax.axis_index("token")
    kv_head = lax.axis_index("kv_head")
    split = lax.axis_index("split")
    head_dim = q_ref.shape[1]                    # q_ref is [T * H (+ pad), D], o_ref [T * H, D]
    box_rows = q_box_rows(group)
    table_cols = table_smem.shape[1]
    block_k = pages_per_block * page_size
    dtype = q_ref.dtype
    wgmma_layout, row_layout = register_layouts(interpret)

    layer = layer_ref[0]
    kv_len = pos_ref[token] + 1                  # keys 0..position are causal-visible
    split_lo = split * (pages_per_split * page_size)
    lo = split_lo
    if sliding_window is not None:
        lo = jnp.maximum(lo, kv_len - sliding_window)
    hi = jnp.minimum(split_lo + pages_per_split * page_size, kv_len)
    first_block = (lo - split_lo) // block_k
    num_blocks = jnp.where(hi > lo, (hi - split_lo + block_k - 1) // block_k - first_block, 0)
    page_base = (layer * num_kv_heads + kv_head) * num_pages

    # This group's q rows are [start, start + group) of q_ref; they land in tile rows
    # [lead, lead + group) (see q_box_rows), the box's other rows hold neighbouring groups' (or
    # TMA zero-filled) queries: rows are independent, those are computed and never stored.
    pair = token * num_kv_heads + kv_head
    start = pair * group
    if group % _TILE_ROWS:
        box_start = pl.multiple_of(start // _TILE_ROWS * _TILE_ROWS, _TILE_ROWS)
        lead = start - box_start
    else:
        box_start, lead = pl.multiple_of(start, _TILE_ROWS), 0
    # Zero the query tile (rows >= box_rows stay zero), then bring in the box and the table.
    q_smem[...] = wgmma_layout(jnp.zeros((WGMMA_ROWS, head_dim), dtype))
    plgpu.commit_smem()
    plgpu.copy_gmem_to_smem(table_ref.at[seq_ref[token], split], table_smem, setup_bar)
    plgpu.copy_gmem_to_smem(q_ref.at[pl.ds(box_start, box_rows)], q_smem.at[pl.ds(0, box_rows)],
                            setup_bar)
    writer, key_block = False, None
    if fused:
        # Fused K/V write: the CTA whose split holds this token's position p writes the token's new
        # k and v rows (this kv head) into the cache at its slot, so that the block holding p reads
        # the key back through the normal path (kv_len = p + 1 includes it). Only that split
        # writes and only it reads the page: the page of p is table entry p // page_size, which
        # lies in exactly one split's entries (splits own disjoint entry ranges), and the caller
        # promises one query token per sequence, whose slot is p's (write_kv's slot). So no
        # other CTA reads or writes those rows (kv heads have their own pages) and no ordering
        # across CTAs is needed. Padding tokens (slot >= num_pages * page_size) write nothing.
        pos = pos_ref[token]
        slot_id = slot_ref[token]
        writer = (slot_id < num_pages * page_size) & (
            pos // (pages_per_split * page_size) == split)
        key_block = (pos - split_lo) // block_k          # the block holding p (in this split)

        @pl.when(writer)
        def _write_new_kv():
            plgpu.copy_gmem_to_smem(new_k_ref.at[pl.ds(pair, 1)], new_k_smem, new_bar)
            plgpu.copy_gmem_to_smem(new_v_ref.at[pl.ds(pair, 1)], new_v_smem, new_bar)
            plgpu.barrier_wait(new_bar)
            page = page_base + slot_id // page_size
            row = lax.rem(slot_id, page_size)
            # From untiled SMEM (a one-row box) to any row of the page. The stores run while the
            # first blocks load; only the block holding p waits for them (see ``issue``).
            plgpu.copy_smem_to_gmem(new_k_smem, k_ref.at[page, pl.ds(row, 1)])
            plgpu.copy_smem_to_gmem(new_v_smem, v_ref.at[page, pl.ds(row, 1)])
    plgpu.barrier_wait(setup_bar)

    def issue(cache_ref, ring, barriers, block, slot):
        if fused and cache_ref is k_ref:
            # Before the load of the block holding p (K first, so V is covered too): the writer
            # waits until its stores have reached global memory, then orders them before its
            # own TMA loads of the same memory (generic -> async proxy fence on global).
            @pl.when(writer & (block == key_block))
            def _stores_landed():
                plgpu.wait_smem_to_gmem(0)
                if not interpret:
                    _fence_proxy_async_global()
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
    # Only the group's real rows [lead, lead + group) go out, from untiled SMEM (where a TMA box
    # may start at any row: a row is D x 2 or 4 bytes, a multiple of the 128 that a TMA's SMEM
    # address needs), straight to their rows of out: one box of ``group`` rows.
    if multi:
        o32_smem[...] = out
        lse_smem[...] = m + jnp.log2(l)
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(o32_smem.at[pl.ds(lead, group)],
                                o_ref.at[split, pl.ds(start, group)])
        # lse goes out as the box's rows (a box from row lead would start at an SMEM address
        # that is not a multiple of 128 bytes); the combine picks each group's rows.
        plgpu.copy_smem_to_gmem(lse_smem.at[pl.ds(0, box_rows)],
                                lse_ref.at[split, pair])
    else:
        o_smem[...] = out.astype(dtype)          # q_smem's memory: every wgmma on it completed
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(o_smem.at[pl.ds(lead, group)], o_ref.at[pl.ds(start, group)])
    plgpu.wait_smem_to_gmem(0)


def _fence_proxy_async_global():
    """``fence.proxy.async.global``: orders this thread's completed TMA stores (made visible by
    ``wait_smem_to_gmem``) before its later TMA loads of the same global memory. JAX 0.10.2 has
    no public primitive for it; the private ``inline_ptx`` helper emits the instruction."""
    from jax._src.pallas.mosaic_gpu.helpers import inline_ptx
    inline_ptx("fence.proxy.async.global;")


def _kernel_with_refs(body, *, out_type, scratch_types, grid, grid_names, interpret):
    """``plgpu.kernel`` for operands that include mutable refs (``jax.new_ref``), which the
    kernel updates in place: Pallas aliases each to an output (input_output_aliases of the
    custom call). ``plgpu.kernel`` wraps its launch in a ``custom_vmap``, which rejects ref
    effects in JAX 0.10.2; this is the same launch (a Mosaic GPU mesh, the scratch as a scope
    around the body) without that wrapper (the kernel is never vmapped)."""
    mesh = plgpu.Mesh(grid=grid, grid_names=grid_names)

    def scoped_body(*refs):
        pl.run_scoped(functools.partial(body, *refs), *scratch_types)
    return pl.kernel(scoped_body, out_type=out_type, mesh=mesh, interpret=interpret,
                     name=body.__name__)


def _pad_last(x, size):
    """x zero-padded (the null page) to ``size`` entries along its last axis."""
    if x.shape[-1] == size:
        return x
    return jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, size - x.shape[-1])])


def decode_call(q_grouped, k_cache, v_cache, layer_arr, positions, block_tables, token_seq_ids,
                *, scale, soft_cap, sliding_window, pages_per_block, pages_per_split, num_stages,
                interpret, new_kv=None):
    """Paged decode attention on Hopper (every token attends on its own).

    q_grouped [T, Hkv, G, D] (a free reshape of [T, H, D]; G <= 64 with ``q_box_rows(G) <= 64``);
    k_cache/v_cache [L, Hkv, P, page, D] whole; layer_arr [1] int32; positions [T] int32 (token
    t sees keys 0..positions[t]); block_tables [S, max_pages] int32 (padding entries 0, the null
    page); token_seq_ids [T] int32 in [0, S). Splits own ``pages_per_split`` (a multiple of
    ``pages_per_block``) table entries each. ``interpret``: False (GPU), True (Mosaic GPU
    interpret mode, ``interpret_params()``) or interpret params. Returns [T, Hkv, G, D] in q's
    dtype.

    Around the kernel on the GPU (single split, T * H % 8 == 0): only bitcasts of q and out and
    the per-sequence table pads (layer-invariant); the position + 1 and the table row of each
    token are read in the kernel.
    """
    t, hkv, group, d = q_grouped.shape
    num_layers, _, num_pages, page_size, _ = k_cache.shape
    why = unsupported_reason(dtype=q_grouped.dtype, head_dim=d, group=group,
                             page_size=page_size, pages_per_block=pages_per_block)
    if why is not None:
        raise ValueError(f"the Mosaic GPU decode kernel does not support {why}")
    if pages_per_split % pages_per_block:
        raise ValueError(f"pages_per_split ({pages_per_split}) must be a multiple of "
                         f"pages_per_block ({pages_per_block})")
    table_rows, table_cols = table_layout(pages_per_split)
    if table_rows > 256:
        raise ValueError(f"{pages_per_split} pages per split exceed one TMA copy of the table")
    num_seqs, max_pages = block_tables.shape
    num_splits = -(-max_pages // pages_per_split)
    # [S, max_pages] -> [S, splits, rows, cols], zero (null page) padded: one TMA per CTA, of
    # row token_seq_ids[t]. Per sequence, so XLA may hoist the pads out of a layer scan.
    tables = _pad_last(block_tables.astype(jnp.int32), num_splits * pages_per_split)
    tables = _pad_last(tables.reshape(num_seqs, num_splits, pages_per_split),
                       table_rows * table_cols)
    tables = tables.reshape(num_seqs, num_splits, table_rows, table_cols)
    # [L, Hkv, P, page, D] -> [L * Hkv * P, page, D]: a bitcast of the contiguous cache.
    flat = (num_layers * hkv * num_pages, page_size, d)
    interpreting = interpret is not False and interpret is not None

    # q as [T * H, D] (a bitcast). Mosaic GPU tiles the whole GMEM array of a TMA into tiled
    # SMEM, so its row count must be a multiple of 8 (the prefill kernel failed to lower with
    # 250 rows on the GPU); a box's rows past the end read as zeros on the GPU (TMA fills them).
    # The interpreter raises on a copy past the end, so there q gets zero rows up to the last
    # box's end.
    rows = t * hkv * group
    box_rows = q_box_rows(group)
    q_rows = -(-rows // _TILE_ROWS) * _TILE_ROWS
    if interpreting:
        last_box = (t * hkv - 1) * group // _TILE_ROWS * _TILE_ROWS
        q_rows = max(q_rows, last_box + box_rows)
    q_flat = q_grouped.reshape(rows, d)
    if q_rows > rows:
        q_flat = jnp.pad(q_flat, ((0, q_rows - rows), (0, 0)))

    multi = num_splits > 1
    fused = new_kv is not None
    block_k = pages_per_block * page_size
    dtype = q_grouped.dtype
    tiled = (plgpu.TilingTransform((_TILE_ROWS, _SWIZZLE // dtype.itemsize)),
             plgpu.SwizzleTransform(_SWIZZLE))
    q_tile = plgpu.SMEM((WGMMA_ROWS, d), dtype, transforms=tiled)
    if multi:
        tiles = q_tile
    else:
        # The query tile (tiled, swizzled for wgmma) and, once the last wgmma completed, the
        # output tile (untiled, so that a store may start at any row) in one memory. JAX
        # 0.10.2's interpreter cannot run a RefUnion's aliased views (no rule for
        # ExtractAliasedRef), so there they are two buffers; the kernel's accesses are the same.
        tiles = (q_tile, plgpu.SMEM((WGMMA_ROWS, d), dtype))
        tiles = tiles if interpreting else plgpu.RefUnion(*tiles)
    scratch = [
        tiles,
        plgpu.SMEM((num_stages, block_k, d), dtype, transforms=tiled),       # K ring
        plgpu.SMEM((num_stages, block_k, d), dtype, transforms=tiled),       # V ring
        plgpu.SMEM((table_rows, table_cols), jnp.int32),                     # this split's pages
    ]
    # The kernel stores every real row itself and nothing else: out is [T * H, D].
    out_type = jax.ShapeDtypeStruct((rows, d), dtype)
    if multi:
        scratch += [plgpu.SMEM((WGMMA_ROWS, d), jnp.float32),
                    plgpu.SMEM((WGMMA_ROWS,), jnp.float32)]
        out_type = (jax.ShapeDtypeStruct((num_splits, rows, d), jnp.float32),
                    jax.ShapeDtypeStruct((num_splits, t * hkv, box_rows), jnp.float32))
    scratch += [plgpu.Barrier(num_arrivals=pages_per_block, num_barriers=num_stages),
                plgpu.Barrier(num_arrivals=pages_per_block, num_barriers=num_stages),
                plgpu.Barrier(num_arrivals=2)]                               # table + query
    caches = (k_cache.reshape(flat), v_cache.reshape(flat))
    extra = ()
    if fused:
        new_k, new_v, slots = new_kv
        if new_k.shape != (t, hkv, d) or new_v.shape != (t, hkv, d) or slots.shape != (t,):
            raise ValueError(f"new_kv must be ([T, Hkv, D], [T, Hkv, D], [T]) = "
                             f"({(t, hkv, d)}, {(t, hkv, d)}, {(t,)}), got "
                             f"{tuple(x.shape for x in new_kv)}")
        # Untiled one-row tiles: the TMA boxes may then start at any row (the pair's row of the
        # new rows, the slot's row of a page). A row is D x 2 bytes, a multiple of 128.
        scratch += [plgpu.SMEM((1, d), k_cache.dtype), plgpu.SMEM((1, d), v_cache.dtype),
                    plgpu.Barrier(num_arrivals=2)]                           # new k + new v
        # Mutable refs: plgpu.kernel passes them in and aliases them out (input_output_aliases).
        caches = tuple(jax.new_ref(c, memory_space=plgpu.GMEM) for c in caches)
        extra = (new_k.astype(k_cache.dtype).reshape(t * hkv, d),
                 new_v.astype(v_cache.dtype).reshape(t * hkv, d), slots.astype(jnp.int32))
    body = functools.partial(
        _decode_body, scale=scale, soft_cap=soft_cap, sliding_window=sliding_window,
        page_size=page_size, pages_per_block=pages_per_block, pages_per_split=pages_per_split,
        num_pages=num_pages, num_kv_heads=hkv, group=group, num_stages=num_stages, multi=multi,
        fused=fused, interpret=interpreting)
    body.__name__ = "jaxllm_paged_decode_mosaic"     # the kernel's name in profiles
    launch = plgpu.kernel if not fused else _kernel_with_refs
    result = launch(
        body,
        out_type=out_type,
        scratch_types=scratch,
        grid=(t, hkv, num_splits),
        grid_names=("token", "kv_head", "split"),
        interpret=(interpret_params() if interpret is True else interpret or None),
    )(layer_arr, positions.astype(jnp.int32), token_seq_ids.astype(jnp.int32), tables, q_flat,
      *caches, *extra)
    if fused:
        caches = tuple(jax.freeze(c).reshape(k_cache.shape) for c in caches)
    if multi:
        out = _combine(*result, t=t, hkv=hkv, group=group, dtype=dtype)
    else:
        out = result.reshape(t, hkv, group, d)
    return (out, *caches) if fused else out


def _combine(o, lse, *, t, hkv, group, dtype):
    """The splits' partials (o [splits, T * H, D] f32, lse [splits, T * Hkv, box rows]) ->
    [T, Hkv, G, D] in ``dtype``."""
    num_splits, rows, d = o.shape
    box_rows = lse.shape[2]
    # Each pair's lse rows are its box's [lead, lead + group) (lead = pair * group % 8, static
    # per pair): a constant-index gather that XLA fuses into the combine.
    if box_rows != group:
        lead = np.arange(t * hkv)[:, None] * group % _TILE_ROWS + np.arange(group)[None]
        lse = jnp.take_along_axis(lse, jnp.asarray(lead, jnp.int32)[None], axis=2,
                                  mode="promise_in_bounds")
    lse = lse.reshape(num_splits, rows)
    # Flash-decoding combine over splits, log2 domain; an empty split has lse = -inf, weight 0.
    lse_max = lse.max(axis=0)
    w = jnp.exp2(lse - lse_max[None])
    out = (o * w[..., None]).sum(axis=0) / w.sum(axis=0)[..., None]
    return out.astype(dtype).reshape(t, hkv, group, d)
