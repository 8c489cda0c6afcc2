"""Mosaic GPU (Hopper) ragged paged PREFILL attention: TMA page ring + wgmma, FA3-style.

Layers 1 and 2 of DESIGN.md rule 7 (kernel body and ``plgpu.kernel`` wrapper) plus the shape
planning the dispatcher needs (``unsupported_reason``, ``smem_bytes``, ``make_plan``); the public
entry, tuning table and fallback to Triton are in ``paged_attention.py`` (``kernel="mosaic"`` on a
non-decode call). ``prefill_call`` has the contract of ``paged_attention._prefill``: q [T, H, D],
whole caches [L, Hkv, P, page, D] with a traced layer, and the work items of
``paged_attention._prefill_items`` with ``align=ROW_ALIGN`` (``block_q`` rows, starting at a
multiple of 8, holding tokens of ONE sequence each).

Why: the Triton-lowered prefill kernel reaches 16-40% of the dense bf16 matmul rate on an H200
(2k-8k causal chunks); its K/V pages come in by pointer loads with little pipelining. Here a CTA
owns one (item, q head) and ``compute_wgs`` compute warpgroups; warpgroup w owns the item's tokens
[q_lo + 64 w, +64) of that head, its 64 wgmma rows (one TMA box: a strided [64, D] copy of
q [T, H, D]). K/V blocks (whole pages gathered through the block table, one TMA per page) stream
through a ``num_stages``-deep SMEM ring. Two variants (``plan.compute_wgs``):

    2 (the GPU default, FlashAttention-3's split): two compute warpgroups and a producer one.
      producer:  table -> SMEM; issue blocks 0..S-1 into slots 0..S-1; then for each later
                 block i: wait until every compute warpgroup freed slot i % S (k_free/v_free
                 barriers, one arrival per compute warpgroup), refill it with block i.
      compute:   for each block: wait K -> S = Q K^T (wgmma) -> free K -> mask (only where
                 needed) + online softmax -> wait V -> O += P V (wgmma) -> free V.
    1: one warpgroup issues its own copies, as the decode kernel does: it refills a slot with
       block i + S as soon as its wgmma has read block i there (no free barriers).

Two compute warpgroups share one K/V stream, so K/V SMEM traffic per query row halves; the producer
keeps ``num_stages`` blocks in flight while the tensor cores work. Each warpgroup's block range is
its own (causal: the first warpgroup's rows end 64 keys earlier); the blocks of the item's stream
it does not need are waited for and freed without math, so the ring's barrier phases stay the
same for every warpgroup (each thread tracks barrier parity itself, on the GPU and in the
interpreter).

Rows: every q box's TMA row offset must be provably a multiple of 8 (Mosaic GPU copies tiled SMEM
by whole (8, 64) tiles; ``pl.multiple_of``), so an item starts at the multiple of 8 at or below
its sequence's first token, and the sequence's later items every ``block_q`` rows after that.
Its rows before the sequence's first token (fewer than 8, an earlier sequence's) and after its
last (the next sequence's) are not real: computed, never stored. The real rows of a warpgroup
are consecutive tokens of one sequence, so row r has position ``p0 + r`` (p0 = the first real
row's position minus the rows before it; below 0 at a sequence's start): the positions of a
sequence's query tokens in a step are consecutive (the scheduler's invariant; ``_prefill_items``
relies on them being increasing), so the kernel needs no per-row positions. The window is
applied here, not by ``_prefill_items`` (called without it, so an item keeps its first real
position in ``kv_full``). Key k is visible to row r when ``k <= p0 + r`` (and
``k > p0 + r - window``). Block ranges count real rows only. Blocks wholly visible to every
real row of the warpgroup skip the mask (the fast path, most of a long chunk); at most the
window's leading blocks and the causal diagonal's trailing blocks are masked. Masked logits get a
large finite negative (never ``inf - inf``): a real row always sees its own key in its last block,
and a row that sees no key at all (not real) averages the masked ones, finite.

Items and output: items are sorted longest-first (their key range) so the long causal items do not
form the tail; the grid is flat (item x head, heads fastest) so the CTAs of one item, which read
the same K/V pages, run together. A warpgroup's 64-row tile overlaps the neighbouring sequences'
tokens and a TMA store cannot be masked per row, so each warpgroup writes its output into an
untiled SMEM tile (the memory of its q tile, a ``RefUnion``: wgmma needs q tiled and swizzled,
and a store from tiled SMEM must start at a multiple of 8 rows) and stores exactly its real rows
[lead, num_rows) straight into out [T, H * D]: n = num_rows - lead rows as one TMA box per set bit
of n (64, 32, ..., 1 rows, at most 7 boxes; from untiled SMEM a box may start at any row). So
the kernel's out is the result, reshaped for free: no per-item padded output (it would grow with
the sequence count, ~285 MB for a 2048-token, 256-sequence bucket at 32 heads x d128) and no pass
over out after the kernel. (Before, partial 8-row chunks went to a tail buffer that one gather +
select over ALL of out picked back: 12-50 us a call at 2k-8k tokens on an H100, as much as the
q pad below.) q goes in as [T, H * D] (a bitcast) when T % 8 == 0 and T >= 64, every
engine bucket: a q box's rows past T are zero-filled by the TMA unit and are never real, and no
box starts past T (only warpgroups with real rows load q, and their rows start below q_hi <= T).
Otherwise q is padded to a multiple of 8 rows (Mosaic GPU tiles a TMA's whole GMEM array; lowering
fails for a row count like 250) and at least 64; in interpret mode (which raises on a copy past
the array's end) by ``block_q`` zero rows more.

Interpret mode (``interpret=True``, the CPU tests): Mosaic GPU's interpreter runs the warpgroups as
concurrent threads and simulates SMEM, TMA copies and every barrier, which it checks (a thread that
skips a phase, a barrier completing again before anyone saw the last completion, races with
``detect_races``). With several warpgroups (variant 2) it compiles each thread's program afresh for
every grid point (~3 s each on the CPU), so the interpreter default is variant 1 (one inline
thread) and variant 2 gets one small test. As in ``mosaic_attention.py``, two substitutions, both
no-ops for the values: the matmuls run as jnp.dot on the same SMEM tiles (the 0.10.2 interpreter
cannot run wgmma with a transposed B or an A in registers), and ``layout_cast`` is skipped; and
the q and output tiles are two buffers there (it has no rule for a ``RefUnion``'s views). The
GPU's ``pl.run_state`` accumulation of P V into the running O (FA3's in-place accumulator) is thus
exercised only by the CUDA lowering test, not by the interpreter.

Not done (levers once measured): FA3's schedule barrier that alternates the two compute
warpgroups' softmax and wgmma phases, waiting for the next K inside the P V wgmma, and a
persistent grid.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels.mosaic_attention import (
    _LOG2E, _SWIZZLE, _TILE_ROWS, BLOCK_KEYS_MULTIPLE, MASK_VALUE, MAX_BLOCK_KEYS,
    SUPPORTED_DTYPES, WGMMA_ROWS, interpret_params, online_softmax_step, qk_logits,
    register_layouts, table_layout)

MAX_HEAD_DIM = 256       # a TMA box dimension and the P V wgmma's N are at most 256
# Register split of a 3-warpgroup CTA (FA3's): 2 x 128 x 232 + 128 x 40 <= 64 Ki registers.
_COMPUTE_REGISTERS = 232
_PRODUCER_REGISTERS = 40
_MOSAIC_EXTRA_SMEM = 2048 + 256
# A TMA copy between GMEM and a tiled, swizzled SMEM tile moves whole (8, 64) tiles, so every row
# offset of a q box is a multiple of 8 (and says so, pl.multiple_of): items start at rows that are
# multiples of ROW_ALIGN (``_prefill_items(..., align=ROW_ALIGN)``). Output stores come from an
# untiled tile and need no alignment.
ROW_ALIGN = _TILE_ROWS
# Row counts of the output stores: a warpgroup's n real rows go out as one box per set bit of n.
_STORE_ROWS = tuple(WGMMA_ROWS >> i for i in range(WGMMA_ROWS.bit_length()))


# On the GPU since 2026-11-22 (JAX 0.11.2, H100): the aligned items above made it lower (it failed
# with "prove the divisibility of index 0 using pl.multiple_of" while items started at any row);
# benchmarks/kernels.py's correctness rows match the reference (bf16 rel. err. 1.8e-3, as Triton)
# and it runs 2k/4k/8k causal chunks at 38/53/61% of the bf16 matmul rate by device busy time
# (Triton 26/36/41%; results/2026-11-22-h100-kernels-prefill-mosaic.json). Of that busy time the q
# pad and the tail pick-back took 24/49/97 us at 2k/4k/8k: both are gone since (output stores of
# real rows only, no pad for T % 8 == 0): on an H200 the op is then 84/279/1100 us a call busy,
# 56/67/68% of the matmul rate (results/2026-11-22-h200-kernels-prefill-mosaic.json, 22cfd7f).


def unsupported_reason(*, dtype, head_dim: int, page_size: int, block_keys: int) -> str | None:
    """Why the Mosaic prefill kernel cannot run the given shape (None when it can)."""
    if jnp.dtype(dtype) not in SUPPORTED_DTYPES:
        return (f"dtype {jnp.dtype(dtype)} (the Mosaic prefill kernel runs bf16/fp16 only: fp32 "
                "wgmma is TF32)")
    if head_dim % 64 or head_dim > MAX_HEAD_DIM:
        return f"head_dim {head_dim} (must be a multiple of 64, at most {MAX_HEAD_DIM})"
    if page_size % _TILE_ROWS:
        return f"page_size {page_size} (must be a multiple of {_TILE_ROWS})"
    if block_keys % page_size or block_keys % BLOCK_KEYS_MULTIPLE or block_keys > MAX_BLOCK_KEYS:
        return (f"blocks of {block_keys} keys with pages of {page_size} (must be whole pages, a "
                f"multiple of {BLOCK_KEYS_MULTIPLE} and at most {MAX_BLOCK_KEYS})")
    return None


def smem_bytes(*, head_dim: int, block_k: int, num_stages: int, itemsize: int,
               table_entries: int, compute_wgs: int) -> int:
    """Shared memory one CTA asks for: the K and V rings, a query/output tile per compute
    warpgroup, the item's block table, and an allowance for what Mosaic GPU adds (its default
    2 KiB reduction scratch, the barriers)."""
    ring = 2 * num_stages * block_k * head_dim * itemsize
    q_tiles = compute_wgs * WGMMA_ROWS * head_dim * itemsize
    return ring + q_tiles + 4 * table_entries + _MOSAIC_EXTRA_SMEM


@dataclasses.dataclass(frozen=True)
class PrefillPlan:
    pages_per_block: int
    num_stages: int
    compute_wgs: int
    table_shape: tuple[int, int]     # (rows, cols) of one item's block table in SMEM
    smem: int                        # bytes a CTA asks for

    @property
    def block_q(self) -> int:
        return self.compute_wgs * WGMMA_ROWS


def make_plan(*, dtype, head_dim: int, page_size: int, max_pages: int, block_keys: int,
              num_stages: int, compute_wgs: int, smem_limit: int) -> PrefillPlan | str:
    """The kernel's configuration for a shape, or the reason it cannot run it. The ring shrinks
    (fewer stages down to 2, then 64-key blocks) until a CTA fits ``smem_limit``."""
    block_keys = max(block_keys, page_size)      # a block holds whole pages
    why = unsupported_reason(dtype=dtype, head_dim=head_dim, page_size=page_size,
                             block_keys=block_keys)
    if why is not None:
        return why
    if compute_wgs not in (1, 2):
        return f"{compute_wgs} compute warpgroups (1 or 2)"
    itemsize = jnp.dtype(dtype).itemsize

    def fit(keys, stages):
        ppb = keys // page_size
        rows, cols = table_layout(-(-max_pages // ppb) * ppb)
        smem = smem_bytes(head_dim=head_dim, block_k=keys, num_stages=stages, itemsize=itemsize,
                          table_entries=rows * cols, compute_wgs=compute_wgs)
        return PrefillPlan(ppb, stages, compute_wgs, (rows, cols), smem)

    p = fit(block_keys, num_stages)
    while p.smem > smem_limit and (p.num_stages > 2 or p.pages_per_block * page_size > 64):
        if p.num_stages > 2:
            p = fit(block_keys, p.num_stages - 1)
        else:
            block_keys //= 2
            if block_keys % page_size or block_keys % BLOCK_KEYS_MULTIPLE:
                break
            p = fit(block_keys, p.num_stages)
    if p.smem > smem_limit:
        return (f"no {p.num_stages}-stage ring of {p.pages_per_block * page_size}-key blocks fits "
                f"shared memory ({p.smem} > {smem_limit} bytes)")
    if p.table_shape[0] > 256:
        return f"{max_pages} pages per sequence (more than one TMA copy of the table)"
    return p


def _prefill_body(layer_ref, items_ref, tables_ref, q_ref, k_ref, v_ref, o_ref, *scratch, scale,
                  soft_cap, sliding_window, page_size, pages_per_block, num_pages, num_kv_heads,
                  num_heads, num_stages, compute_wgs, interpret):
    specialised = compute_wgs > 1                # a producer warpgroup feeds the ring
    # q_smem (tiled, swizzled: the wgmma operand) and o_smem (untiled: the output stores) share
    # their memory on the GPU (a RefUnion: a warpgroup writes its output tile once every wgmma
    # reading its q tile has completed).
    if specialised:
        (q_smem, o_smem), k_smem, v_smem, table_smem, q_bar, k_bar, v_bar, table_bar, \
            k_free, v_free = scratch
    else:
        (q_smem, o_smem), k_smem, v_smem, table_smem, q_bar, k_bar, v_bar, table_bar = scratch
    work = lax.axis_index("work")
    item = work // num_heads                     # items are sorted longest-first
    head = work % num_heads
    wg = lax.axis_index("wg")                    # 0..compute_wgs-1 compute, compute_wgs producer
    head_dim = k_ref.shape[-1]            # q_ref is [T' >= T, H * D], o_ref [T, H * D]
    block_k = pages_per_block * page_size
    dtype = q_ref.dtype
    wgmma_layout, row_layout = register_layouts(interpret)

    # Item row: (q_lo, q_hi, 0, kv_hi, first real position + 1, real_lo, 0, 0) from
    # _prefill_items without a window and with align=ROW_ALIGN: rows [q_lo, q_hi), q_lo a multiple
    # of 8; the rows before real_lo (fewer than 8, in a sequence's first item only) are the
    # previous sequence's: computed, never stored. An empty item (q_lo == q_hi) streams no blocks
    # and stores nothing.
    q_lo = items_ref[item, 0]
    q_hi = items_ref[item, 1]
    kv_hi = items_ref[item, 3]
    real_pos = items_ref[item, 4] - 1            # position of the item's first real row
    real_lo = items_ref[item, 5]
    row0_pos = real_pos - (real_lo - q_lo)       # position of row q_lo: below 0 possibly
    kv_lo = 0 if sliding_window is None else jnp.maximum(0, real_pos - sliding_window + 1)
    first_block = kv_lo // block_k               # blocks are aligned to block_k keys (whole pages)
    num_blocks = jnp.where(q_hi > q_lo, (kv_hi + block_k - 1) // block_k - first_block, 0)

    # Page p of this layer and kv head is row page_base + p of the flattened caches.
    page_base = (layer_ref[0] * num_kv_heads + head // (num_heads // num_kv_heads)) * num_pages
    table_cols = table_smem.shape[1]

    def issue(cache_ref, ring, barriers, i, slot):
        """Block i of the item's stream into ring slot ``slot``: one TMA per page, all on the
        slot's barrier (which expects ``pages_per_block`` arrivals)."""
        for j in range(pages_per_block):
            entry = (first_block + i) * pages_per_block + j
            page_id = table_smem[entry // table_cols, entry % table_cols]
            plgpu.copy_gmem_to_smem(cache_ref.at[page_base + page_id],
                                    ring.at[slot, pl.ds(j * page_size, page_size)],
                                    barriers.at[slot])

    def start_stream():
        plgpu.copy_gmem_to_smem(tables_ref.at[item], table_smem, table_bar)
        plgpu.barrier_wait(table_bar)
        for s in range(num_stages):
            @pl.when(s < num_blocks)
            def _prologue():
                issue(k_ref, k_smem, k_bar, s, s)
                issue(v_ref, v_smem, v_bar, s, s)

    def release(cache_ref, ring, barriers, free, i, slot):
        """The compute warpgroup has read slot ``slot`` (block i): with a producer, say so;
        alone, refill the slot with block i + S right away."""
        if specialised:
            plgpu.barrier_arrive(free.at[slot])
        else:
            @pl.when(i + num_stages < num_blocks)
            def _refill():
                issue(cache_ref, ring, barriers, i + num_stages, slot)

    def producer():
        plgpu.set_max_registers(_PRODUCER_REGISTERS, action="decrease")
        start_stream()

        def refill(i, _):
            # Block i goes where block i - S was, once every compute warpgroup has freed it.
            slot = lax.rem(i, num_stages)
            plgpu.barrier_wait(k_free.at[slot])
            issue(k_ref, k_smem, k_bar, i, slot)
            plgpu.barrier_wait(v_free.at[slot])
            issue(v_ref, v_smem, v_bar, i, slot)
        lax.fori_loop(num_stages, num_blocks, refill, None)

        def drain(i, _):
            # The last S blocks' frees, waited so that this thread observes every phase of the
            # free barriers (the interpreter checks it; on the GPU it only delays this exit).
            slot = lax.rem(i, num_stages)
            plgpu.barrier_wait(k_free.at[slot])
            plgpu.barrier_wait(v_free.at[slot])
        lax.fori_loop(jnp.maximum(num_blocks - num_stages, 0), num_blocks, drain, None)

    def compute():
        if specialised:
            plgpu.set_max_registers(_COMPUTE_REGISTERS, action="increase")
        # This warpgroup's rows [rows_lo, +64): [lead, num_rows) are real (tokens of the item's
        # sequence); [0, lead) the previous sequence's, [num_rows, 64) the next one's.
        rows_lo = pl.multiple_of(q_lo + wg * WGMMA_ROWS, ROW_ALIGN)
        num_rows = jnp.clip(q_hi - rows_lo, 0, WGMMA_ROWS)
        lead = jnp.clip(real_lo - rows_lo, 0, WGMMA_ROWS)
        p0 = row0_pos + wg * WGMMA_ROWS                       # position of row 0
        has_rows = num_rows > lead
        q_tile = q_smem.at[wg]
        cols = pl.ds(head * head_dim, head_dim)
        # Only a warpgroup with real rows loads its q box (one without does no math on it), so
        # every box starts at a real row: rows_lo < q_hi <= T. Its rows past q's end (the GPU's
        # q is not padded when T % 8 == 0) are zero-filled by the TMA unit; they are not real,
        # and no real row's output depends on them (rows are independent).
        @pl.when(has_rows)
        def _load_q():
            plgpu.copy_gmem_to_smem(q_ref.at[pl.ds(rows_lo, WGMMA_ROWS), cols], q_tile,
                                    q_bar.at[wg])
        if not specialised:
            start_stream()
        pl.when(has_rows)(lambda: plgpu.barrier_wait(q_bar.at[wg]))

        # This warpgroup's blocks (absolute indices): [start, end) hold a key some real row
        # sees; [full_lo, full_hi) inside it is visible to every real row (no mask). Alone, the
        # warpgroup's range is the item's; without real rows it is empty. Only real rows count:
        # the previous sequence's rows (positions p0..p0 + lead - 1, below 0 at a sequence's
        # start) may see nothing in the masked blocks (every logit MASK_VALUE: p = 1, l > 0,
        # finite) and see keys beyond their position in the unmasked ones; they are never stored.
        first_real = p0 + lead                                # position of the first real row
        end = jnp.where(has_rows, (p0 + num_rows + block_k - 1) // block_k, first_block)
        if sliding_window is None:
            start = jnp.where(has_rows, first_block, end)
            full_lo = start
        else:
            start = jnp.where(has_rows,
                              jnp.maximum(0, first_real - sliding_window + 1) // block_k, end)
            # Every real row sees key k >= p0 + num_rows - window.
            full_lo = jnp.clip(-(-(p0 + num_rows - sliding_window) // block_k), start, end)
        full_hi = jnp.clip((first_real + 1) // block_k, full_lo, end)
        a, b, c, d = (x - first_block for x in (start, full_lo, full_hi, end))

        # Matmuls: wgmma on the GPU (B = K^T through transpose_ref, P from registers, O
        # accumulated in place as in pallas/ops/gpu/attention_mgpu.py); jnp.dot on the same SMEM
        # tiles in the interpreter, which supports neither a transposed B nor an A in registers.
        def qk_matmul(slot):
            return qk_logits(q_tile, k_smem.at[slot], interpret=interpret)

        def pv_matmul(acc, p, slot):
            if interpret:
                return acc + jnp.dot(p, v_smem[slot], preferred_element_type=jnp.float32)

            def pv(acc_ref):
                plgpu.wgmma(acc_ref, p, v_smem.at[slot])
            return pl.run_state(pv)(plgpu.ACC.init(acc))   # returns after the wgmma finished

        def step(i, carry, masked):
            acc, m, l = carry
            slot = lax.rem(i, num_stages)
            plgpu.barrier_wait(k_bar.at[slot])
            s = qk_matmul(slot)                   # [64, block_k] f32
            release(k_ref, k_smem, k_bar, k_free if specialised else None, i, slot)
            # Logits in the log2 domain (exp2 below).
            if soft_cap is None:
                s = s * (scale * _LOG2E)
            else:
                s = jnp.tanh(s * (scale / soft_cap)) * (soft_cap * _LOG2E)
            if masked:
                # Key kb + col vs row position p0 + row: visible iff col - row <= p0 - kb
                # (and > p0 - kb - window).
                iota = lambda dim: wgmma_layout(
                    lax.broadcasted_iota(jnp.int32, (WGMMA_ROWS, block_k), dim))
                diff = iota(1) - iota(0)
                rel = p0 - (first_block + i) * block_k
                visible = diff <= rel
                if sliding_window is not None:
                    visible &= diff > rel - sliding_window
                s = jnp.where(visible, s, MASK_VALUE)
            p, m_new, l, acc = online_softmax_step(s, m, l, acc)
            plgpu.barrier_wait(v_bar.at[slot])
            acc = pv_matmul(acc, p.astype(dtype), slot)
            release(v_ref, v_smem, v_bar, v_free if specialised else None, i, slot)
            return acc, m_new, l

        def skip(i, _):
            # A block of the item's stream that this warpgroup sees no key of (the other one
            # does): observe its arrival and free it.
            slot = lax.rem(i, num_stages)
            plgpu.barrier_wait(k_bar.at[slot])
            plgpu.barrier_arrive(k_free.at[slot])
            plgpu.barrier_wait(v_bar.at[slot])
            plgpu.barrier_arrive(v_free.at[slot])

        masked_step = functools.partial(step, masked=True)
        carry = (wgmma_layout(jnp.zeros((WGMMA_ROWS, head_dim), jnp.float32)),
                 row_layout(jnp.full((WGMMA_ROWS,), MASK_VALUE, jnp.float32)),
                 row_layout(jnp.zeros((WGMMA_ROWS,), jnp.float32)))
        if specialised:
            lax.fori_loop(0, a, skip, None)
        carry = lax.fori_loop(a, b, masked_step, carry)       # the window's leading edge
        carry = lax.fori_loop(b, c, functools.partial(step, masked=False), carry)
        acc, _, l = lax.fori_loop(c, d, masked_step, carry)   # the causal diagonal
        if specialised:
            lax.fori_loop(d, num_blocks, skip, None)

        @pl.when(has_rows)
        def _store():
            # l > 0 for every real row: its own key lies in its last block.
            out = acc / lax.broadcast_in_dim(l, acc.shape, [0])
            o_tile = o_smem.at[wg]                # q_tile's memory on the GPU: every wgmma
            o_tile[...] = out.astype(dtype)       # reading q_tile has completed
            plgpu.commit_smem()
            # Only the real rows [lead, num_rows) go out, straight to their tokens' rows of out:
            # the tile's other rows are neighbouring sequences' tokens, and a TMA store cannot be
            # masked per row. From the untiled tile a box may start at any row (a row is D x 2
            # bytes, a multiple of the 128 that a TMA's SMEM address needs), so the n real rows
            # go as one box per set bit of n (64, 32, ..., 1 rows; at most 7 boxes).
            n = num_rows - lead
            for size in _STORE_ROWS:
                lo = lead + (n & -(2 * size))         # the rows of the larger set bits come first

                @pl.when((n & size) != 0)
                def _rows():
                    plgpu.copy_smem_to_gmem(o_tile.at[pl.ds(lo, size)],
                                            o_ref.at[pl.ds(rows_lo + lo, size), cols])
            plgpu.wait_smem_to_gmem(0)

    if specialised:
        pl.when(wg == compute_wgs)(producer)
        pl.when(wg < compute_wgs)(compute)
    else:
        compute()


def prefill_call(q, k_cache, v_cache, layer_arr, items, item_tables, *, scale, soft_cap,
                 sliding_window, plan: PrefillPlan, interpret):
    """Ragged paged prefill attention on Hopper.

    q [T, H, D]; k_cache/v_cache [L, Hkv, P, page, D] whole; layer_arr [1] int32; items [N, 8]
    from ``_prefill_items(md, T, plan.block_q, None, align=ROW_ALIGN)`` (the window is applied
    here; on the GPU every q_lo MUST be a multiple of 8, which the kernel asserts to the compiler
    unchecked); item_tables [N, max_pages] (each item's sequence's block table, null-page padded).
    ``interpret``: False (GPU), True (``interpret_params()``) or interpret params.
    Returns [T, H, D] in q's dtype: the kernel writes exactly the items' real rows [real_lo,
    q_hi); rows of tokens outside every item are unspecified (never written).
    """
    t, h, d = q.shape
    num_layers, hkv, num_pages, page_size, _ = k_cache.shape
    why = unsupported_reason(dtype=q.dtype, head_dim=d, page_size=page_size,
                             block_keys=plan.pages_per_block * page_size)
    if why is not None:
        raise ValueError(f"the Mosaic GPU prefill kernel does not support {why}")
    if k_cache.dtype != q.dtype:
        raise ValueError(f"q ({q.dtype}) and the caches ({k_cache.dtype}) must have one dtype")
    n = items.shape[0]
    block_q = plan.block_q
    rows, cols = plan.table_shape
    ppb = plan.pages_per_block
    max_pages = item_tables.shape[1]
    if rows * cols < -(-max_pages // ppb) * ppb:
        raise ValueError(f"plan's table {plan.table_shape} is smaller than {max_pages} pages")

    # Longest key range first (empty items last), so long causal items do not form the tail.
    items = items.astype(jnp.int32)
    valid = items[:, 1] > items[:, 0]
    order = jnp.argsort(jnp.where(valid, -items[:, 3], 1), stable=True)
    tables = jnp.pad(item_tables.astype(jnp.int32), ((0, 0), (0, rows * cols - max_pages)))
    tables = tables[order].reshape(n, rows, cols)
    # Heads are folded into columns ([T, H * D], a bitcast): a box of one head is then a 2-D
    # [64, D] tile at column head * D. (JAX 0.11.2's Mosaic GPU layout inference fails an
    # assertion on a TMA box with a squeezed middle dimension, [64, -1, D].)
    # q rows: Mosaic GPU tiles the whole GMEM array of a TMA into tiled SMEM, so q's row count
    # must be a multiple of 8 (lowering fails otherwise), and a 64-row box must fit in it. On
    # the GPU that is all: a box's rows past the end read as zeros (TMA fills them), so for
    # every engine bucket (T % 8 == 0, T >= 64) q goes in as it is, with no copy. The
    # interpreter raises on a copy past the end, so there q gets block_q zero rows more.
    interpreting = interpret is not False and interpret is not None
    t8 = -(-t // _TILE_ROWS) * _TILE_ROWS
    q_rows = t8 + block_q if interpreting else max(t8, WGMMA_ROWS)
    q_rows_major = q.reshape(t, h * d)
    if q_rows > t:
        q_rows_major = jnp.pad(q_rows_major, ((0, q_rows - t), (0, 0)))
    flat = (num_layers * hkv * num_pages, page_size, d)          # a bitcast of the caches

    tiled = (plgpu.TilingTransform((_TILE_ROWS, _SWIZZLE // q.dtype.itemsize)),
             plgpu.SwizzleTransform(_SWIZZLE))
    block_k = ppb * page_size
    stages = plan.num_stages
    tile_shape = (plan.compute_wgs, WGMMA_ROWS, d)
    # A warpgroup's q tile (tiled, swizzled for wgmma) and, once its last wgmma completed, its
    # output tile (untiled, so that a store may start at any row) in the same memory (no SMEM
    # added). JAX 0.10.2's interpreter cannot run a RefUnion's aliased views (no rule for
    # ExtractAliasedRef), so there they are two buffers; the kernel's accesses are the same.
    q_and_out_tiles = (plgpu.SMEM(tile_shape, q.dtype, transforms=tiled),
                       plgpu.SMEM(tile_shape, q.dtype))
    scratch = [
        q_and_out_tiles if interpreting else plgpu.RefUnion(*q_and_out_tiles),
        plgpu.SMEM((stages, block_k, d), q.dtype, transforms=tiled),               # K ring
        plgpu.SMEM((stages, block_k, d), q.dtype, transforms=tiled),               # V ring
        plgpu.SMEM((rows, cols), jnp.int32),                                       # item's pages
        plgpu.Barrier(num_barriers=plan.compute_wgs),                              # q tiles
        plgpu.Barrier(num_arrivals=ppb, num_barriers=stages),                      # K landed
        plgpu.Barrier(num_arrivals=ppb, num_barriers=stages),                      # V landed
        plgpu.Barrier(),                                                           # table
    ]
    if plan.compute_wgs > 1:    # the producer refills a slot once every compute warpgroup freed it
        scratch += [plgpu.Barrier(num_arrivals=plan.compute_wgs, num_barriers=stages)] * 2
    body = functools.partial(
        _prefill_body, scale=scale, soft_cap=soft_cap, sliding_window=sliding_window,
        page_size=page_size, pages_per_block=ppb, num_pages=num_pages, num_kv_heads=hkv,
        num_heads=h, num_stages=stages, compute_wgs=plan.compute_wgs, interpret=interpreting)
    body.__name__ = "jaxllm_ragged_prefill_mosaic"   # the kernel's name in profiles
    # The kernel stores every real row itself and nothing else: out is [T, H * D] (any T, the
    # stores' SMEM is untiled), and its reshape to [T, H, D] is a bitcast.
    out = plgpu.kernel(
        body,
        out_type=jax.ShapeDtypeStruct((t, h * d), q.dtype),
        scratch_types=scratch,
        grid=(n * h,),
        grid_names=("work",),
        num_threads=plan.compute_wgs + 1 if plan.compute_wgs > 1 else 1,
        thread_name="wg",
        compiler_params=plgpu.CompilerParams(approx_math=True),
        interpret=(interpret_params() if interpret is True else interpret or None),
    )(layer_arr, items[order], tables, q_rows_major, k_cache.reshape(flat),
      v_cache.reshape(flat))
    return out.reshape(t, h, d)
