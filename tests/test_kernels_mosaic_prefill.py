"""The Mosaic GPU (Hopper) prefill kernel vs the pure-jnp reference, in Mosaic GPU interpret mode.

``paged_attention(..., kernel="mosaic", interpret=True)`` on a prefill/mixed batch runs the kernel
of ``pallas_kernels/mosaic_prefill.py`` in Mosaic GPU's CPU interpreter (SMEM, TMA page copies,
ring barriers and the output tiles simulated; the two matmuls as jnp.dot on the same SMEM tiles).
Every output buffer and SMEM scratch starts as NaN, and cache slots no valid key occupies hold
large random values (pallas_kernels/testing.py), so an unwritten row, a store of the wrong rows
(the kernel stores each item's real rows itself, in boxes of 1 to 64 rows), or a masked key that
leaks into the softmax (e.g. a block wrongly taking the unmasked fast path) fails the per-token
comparison; ``test_stores_only_real_rows`` checks that no other row is written.

The interpreter default is one compute warpgroup (64 query rows, inline: fast on the CPU); the
GPU default, two compute warpgroups fed by a producer warpgroup, runs as three interpreter threads
whose jaxprs compile per grid point (seconds each), so it gets one small case that still covers
its protocol: a warpgroup skipping the item's leading (window) and trailing (causal) blocks, an
empty warpgroup, an empty item, an item starting before its sequence. ``test_lowers_for_cuda``
lowers both variants for CUDA, also through Mosaic GPU's layout inference, which failed on the
GPU (JAX 0.11.2) while items started at rows that are not multiples of 8;
``test_no_copies_of_q_or_out_around_the_kernel`` checks that XLA gets no pass over q or out
around the kernel (for T % 8 == 0).
"""

from __future__ import annotations

import functools
import importlib
import re

import jax
import jax.experimental.mosaic.gpu as mgpu
import jax.numpy as jnp
import numpy as np
import pytest
from jax import export
from jax.experimental.pallas import mosaic_gpu as plgpu

from model_zoo.attention import AttentionMetadata
from pallas_kernels import mosaic_attention, mosaic_prefill
from pallas_kernels.paged_attention import _prefill_items, paged_attention
from pallas_kernels.reference import paged_attention_reference
from pallas_kernels.testing import abstract_metadata, make_batch
from tests.test_kernels_mosaic import TOL, _args

# Sequences: (context, queries). A whole prompt over two 64-row items plus a short tail, an exact
# block multiple, a single query (decode-like) token, and a chunk after a cached prefix of 90.
SEQS = [(150, 150), (64, 64), (9, 1), (160, 70)]

# (group, kv heads, head_dim, page_size, dtype, options, tuning); the interpret tuning is 64-key
# blocks in a 2-deep ring (up to 3 blocks a sequence: slots are reused).
CASES = [
    (1, 2, 64, 16, jnp.bfloat16, {}, {"pages_per_block": 8}),        # 128-key blocks
    (4, 1, 128, 16, jnp.bfloat16, {"soft_cap": 7.0}, {"num_stages": 3}),
    (8, 1, 64, 32, jnp.float16, {"sliding_window": 21}, {}),
    # A window wider than an item: masked leading blocks, unmasked middle ones, masked diagonal.
    (4, 1, 128, 32, jnp.bfloat16, {"soft_cap": 7.0, "sliding_window": 150}, {}),
]


def _batch(seed, seqs, *, group, kv_heads, head_dim, page, dtype, **kw):
    ctx, qs = zip(*seqs)
    return make_batch(np.random.default_rng(seed), seq_lens=ctx, q_lens=qs,
                      num_heads=group * kv_heads, num_kv_heads=kv_heads, head_dim=head_dim,
                      page_size=page, dtype=dtype, **kw)


def _check(batch, out, num_real_tokens, dtype, **kw):
    """Per token (not over the whole batch, where a few wrong rows would drown): relative error
    of the token's [H, D] output against the f64 reference."""
    ref = np.asarray(paged_attention_reference(*_args(batch), scale=batch.q.shape[-1] ** -0.5,
                                               **kw), np.float64)[:num_real_tokens]
    out = np.asarray(out, np.float64)[:num_real_tokens]
    assert np.isfinite(out).all(), "kernel left unwritten (NaN) or non-finite outputs"
    err = np.linalg.norm(out - ref, axis=(1, 2)) / np.linalg.norm(ref, axis=(1, 2))
    assert err.max() <= TOL[dtype], f"token {err.argmax()}: relative error {err.max():.3g}"


def _run(batch, **kw):
    return paged_attention(*_args(batch), scale=batch.q.shape[-1] ** -0.5, kernel="mosaic",
                           interpret=True, **kw)


@pytest.mark.parametrize("group,kv_heads,head_dim,page,dtype,opts,tuning", CASES)
def test_prefill_matches_reference(group, kv_heads, head_dim, page, dtype, opts, tuning):
    batch = _batch(group * 100 + head_dim + page, SEQS, group=group, kv_heads=kv_heads,
                   head_dim=head_dim, page=page, dtype=dtype, max_pages=256 // page,
                   pad_tokens=1, pad_seqs=1)
    _check(batch, _run(batch, **opts, **tuning), sum(q for _, q in SEQS), dtype, **opts)


# Sequences whose first query token sits at a flat row that is not a multiple of 8 (the items
# start at the multiple of 8 below it, the rows before it are the previous sequence's), next to
# ones that start aligned. Rows | positions:
#   0 | 0 (aligned); 1..3 | 37..39, inside one 8-row chunk with both neighbours; 4..10 | 0..6:
#   the 4 rows before it get positions -4..-1 (every key masked) and it spans two partial chunks;
#   11..19 | 64..72: row 8 has position 61, so only the first real row's position (64) makes
#   block 0 unmasked; 20..82 | 0..62 and 83..147 | 15..79: a 64-row item starting 4 / 3 rows
#   early and a short second item; 148..277 | 100..229: three items; then bucket padding.
UNALIGNED_SEQS = [(1, 1), (40, 3), (7, 7), (73, 9), (63, 63), (80, 65), (230, 130)]


@pytest.mark.parametrize("group,head_dim,page,opts", [
    (2, 64, 16, {}),
    (1, 128, 32, {"soft_cap": 7.0, "sliding_window": 21}),   # a window narrower than an item
])
def test_unaligned_sequence_starts(group, head_dim, page, opts):
    batch = _batch(10 + head_dim, UNALIGNED_SEQS, group=group, kv_heads=1, head_dim=head_dim,
                   page=page, dtype=jnp.bfloat16, pad_tokens=3, pad_seqs=1)
    _check(batch, _run(batch, **opts), sum(q for _, q in UNALIGNED_SEQS), jnp.bfloat16, **opts)


@pytest.mark.parametrize("align,block_q", [(8, 64), (8, 128), (1, 16)])
def test_prefill_items_cover_each_token_once(align, block_q):
    # Ragged layouts (random, and the worst case for the item count: every sequence starting 7
    # rows past a multiple of 8 with a span of one row more than an item) against the item
    # contract: rows start at multiples of align, fewer than align rows before the sequence, the
    # real rows [real_lo, q_hi) tile the tokens in order, kv_hi / kv_full from the positions, and
    # the static item count suffices.
    rng = np.random.default_rng(align * block_q)
    t, s = 300, 9
    layouts = [np.minimum(np.r_[0, 7 + block_q * np.arange(s)], t)]
    for _ in range(40):
        cuts = rng.integers(0, t + 1, s)
        cuts[rng.random(s) < 0.3] = cuts[0]        # empty sequences
        layouts.append(np.r_[0, np.sort(cuts)])
    items_fn = jax.jit(lambda md: _prefill_items(md, t, block_q, None, align=align))
    for qsl in layouts:
        positions = rng.integers(0, 1000, t).astype(np.int32)
        md = AttentionMetadata(
            positions=jnp.asarray(positions), token_seq_ids=jnp.zeros(t, jnp.int32),
            slot_mapping=jnp.zeros(t, jnp.int32), block_tables=jnp.zeros((s, 1), jnp.int32),
            seq_lens=jnp.zeros(s, jnp.int32), query_start_loc=jnp.asarray(qsl, jnp.int32))
        items, seq = (np.asarray(x) for x in items_fn(md))
        valid = items[:, 1] > items[:, 0]
        assert (np.diff(valid.astype(int)) <= 0).all(), "empty items must come last"
        q_lo, q_hi, _, kv_hi, kv_full, real_lo = items[valid, :6].T
        assert (q_lo % align == 0).all() and (real_lo - q_lo < align).all()
        assert (q_lo <= real_lo).all() and (real_lo < q_hi).all() and (q_hi - q_lo <= block_q).all()
        np.testing.assert_array_equal(np.r_[real_lo, qsl[-1]], np.r_[0, q_hi])   # tile in order
        assert (qsl[seq[valid]] <= real_lo).all() and (q_hi <= qsl[seq[valid] + 1]).all()
        np.testing.assert_array_equal(kv_hi, positions[q_hi - 1] + 1)
        np.testing.assert_array_equal(kv_full, positions[real_lo] + 1)


def test_two_compute_warpgroups_with_producer():
    # Three interpreter threads per grid point, so one small case covers the protocol and the
    # output paths of the second warpgroup. 64-key blocks, window 100; rows | positions:
    #   A, 0..75 | 0..75: the second warpgroup stores a whole 8-row chunk and a partial one.
    #   B, 72..137, real from 76 | 132..193 (rows 72..75 are A's): the stream is blocks 0..3, the
    #     first warpgroup (132..191) needs 0..2, the second (192, 193: one partial chunk) 1..3.
    #   C, 136..140, real from 138 | 7..9: the second warpgroup is empty; then an empty item.
    batch = _batch(4, [(76, 76), (194, 62), (10, 3)], group=1, kv_heads=1, head_dim=64,
                   page=16, dtype=jnp.bfloat16)
    _check(batch, _run(batch, block_q=128, sliding_window=100), 141, jnp.bfloat16,
           sliding_window=100)


def _call_kernel(batch, interpret, keep_seq=None):
    """``prefill_call`` itself (one warpgroup, 64-key blocks, 2 stages, scale 1/8, no window or
    cap), with the items of the sequences where ``keep_seq(seq)`` is False made empty."""
    q, k, v, layer, md = _args(batch)
    plan = mosaic_prefill.make_plan(dtype=q.dtype, head_dim=q.shape[-1], page_size=k.shape[3],
                                    max_pages=md.block_tables.shape[1], block_keys=64,
                                    num_stages=2, compute_wgs=1, smem_limit=227 * 1024)
    items, seq = _prefill_items(md, q.shape[0], plan.block_q, None,
                                align=mosaic_prefill.ROW_ALIGN)
    if keep_seq is not None:
        items = jnp.where(keep_seq(seq)[:, None], items, 0)
    return mosaic_prefill.prefill_call(
        q, k, v, jnp.reshape(layer, (1,)), items, md.block_tables[seq], scale=0.125,
        soft_cap=None, sliding_window=None, plan=plan, interpret=interpret)


def test_ring_protocol_has_no_races():
    # Every SMEM read of a ring slot must be ordered after the barrier wait of the TMA copies that
    # filled it (vector clocks, one per copy); a dropped barrier_wait fails here.
    batch = _batch(5, [(190, 100), (7, 7)], group=2, kv_heads=1, head_dim=64, page=16,
                   dtype=jnp.bfloat16)
    out = _call_kernel(batch, mosaic_attention.interpret_params(detect_races=True))
    assert not mosaic_attention.races_detected()
    _check(batch, out, 107, jnp.bfloat16)


def test_stores_only_real_rows():
    # The kernel writes each item's real rows and nothing else (no box of 8 rows that spills into
    # a neighbour): with the items of every other sequence left out (made empty), those
    # sequences' rows and the bucket padding stay as the interpreter poisoned them (NaN), while
    # the rows around them, in the same 8-row chunks and 64-row tiles, match the reference.
    batch = _batch(11, UNALIGNED_SEQS, group=2, kv_heads=1, head_dim=64, page=16,
                   dtype=jnp.bfloat16, pad_tokens=3)
    out = np.asarray(_call_kernel(batch, True, keep_seq=lambda seq: seq % 2 == 0), np.float64)
    ref = np.asarray(paged_attention_reference(*_args(batch), scale=0.125), np.float64)
    qsl = np.asarray(batch.metadata().query_start_loc)
    kept = np.zeros(out.shape[0], bool)
    for s in range(0, len(UNALIGNED_SEQS), 2):
        kept[qsl[s]:qsl[s + 1]] = True
    assert np.isnan(out[~kept]).all(), f"rows {np.flatnonzero(~np.isnan(out[~kept]).all((1, 2)))}"
    err = np.linalg.norm(out[kept] - ref[kept], axis=(1, 2)) / np.linalg.norm(ref[kept],
                                                                            axis=(1, 2))
    assert err.max() <= TOL[jnp.bfloat16], f"relative error {err.max():.3g}"


def test_matches_triton_kernel_with_cache_write():
    # What the engine runs: a mixed step (a prompt chunk and decode tokens) with new_kv, written
    # to the caches before the kernel; same caches, and outputs within bf16 rounding of Triton's.
    batch = _batch(6, [(100, 100), (40, 1), (75, 1)], group=4, kv_heads=2, head_dim=64,
                   page=16, dtype=jnp.bfloat16, pad_tokens=2)
    q, k, v, layer, md = _args(batch)
    rng = np.random.default_rng(7)
    new_kv = tuple(jnp.asarray(rng.standard_normal((q.shape[0], 2, 64)), jnp.bfloat16)
                   for _ in range(2))
    runs = [paged_attention(q, k, v, layer, md, scale=0.125, new_kv=new_kv, kernel=kernel,
                            interpret=True) for kernel in ("mosaic", "triton")]
    (out_m, k_m, v_m), (out_t, k_t, v_t) = runs
    np.testing.assert_array_equal(np.asarray(k_m), np.asarray(k_t))
    np.testing.assert_array_equal(np.asarray(v_m), np.asarray(v_t))
    out_m, out_t = (np.asarray(x, np.float64)[:102] for x in (out_m, out_t))
    assert np.isfinite(out_m).all()
    assert np.linalg.norm(out_m - out_t) <= 1e-2 * np.linalg.norm(out_t)


def test_unsupported_shapes_run_the_triton_kernel(caplog):
    # fp32 (wgmma would be TF32): the Triton prefill kernel runs it, and the log says so once.
    caplog.set_level("WARNING", logger="jaxllm.pallas_kernels")
    importlib.import_module("pallas_kernels.paged_attention")._log_mosaic_fallback.cache_clear()
    batch = _batch(8, [(40, 30), (9, 9)], group=2, kv_heads=2, head_dim=64, page=16,
                   dtype=np.float32)
    out = _run(batch)
    triton = paged_attention(*_args(batch), scale=0.125, interpret=True)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(triton))
    _check(batch, out, 39, np.float32)
    logged = [r.getMessage() for r in caplog.records]
    assert any("Triton prefill kernel runs it" in m and "float32" in m for m in logged), logged


def test_plan_and_validation():
    plan = mosaic_prefill.make_plan
    base = dict(dtype=jnp.bfloat16, head_dim=128, page_size=16, max_pages=512, block_keys=128,
                num_stages=2, compute_wgs=2, smem_limit=227 * 1024)
    p = plan(**base)
    assert (p.pages_per_block, p.num_stages, p.block_q) == (8, 2, 128)
    # K and V rings 2 x 2 x 128 x 128 bf16, two 64 x 128 query tiles, 512 table entries, and the
    # allowance for Mosaic's own scratch.
    assert p.smem == 2 * 2 * 128 * 128 * 2 + 2 * 64 * 128 * 2 + 4 * 512 + 2304
    # d256: the 128-key ring does not fit next to two 64 x 256 query tiles; 64-key blocks do.
    p = plan(**{**base, "head_dim": 256, "num_stages": 3})
    assert (p.pages_per_block * 16, p.num_stages) == (64, 2) and p.smem <= 227 * 1024
    assert "float32" in plan(**{**base, "dtype": jnp.float32})
    assert "head_dim 96" in plan(**{**base, "head_dim": 96})
    assert "page_size 4" in plan(**{**base, "page_size": 4})
    batch = _batch(9, [(20, 20)], group=1, kv_heads=1, head_dim=64, page=16, dtype=jnp.bfloat16)
    with pytest.raises(ValueError, match="block_q must be 64 or 128"):
        _run(batch, block_q=32)


@pytest.mark.parametrize("compute_wgs,head_dim,soft_cap,sliding_window,t,inference", [
    (1, 64, None, None, 256, False), (2, 128, None, None, 250, False),
    (2, 256, 30.0, 1000, 256, False), (1, 64, None, None, 250, True),
    (2, 128, 30.0, 100, 256, True)])
def test_lowers_for_cuda(monkeypatch, compute_wgs, head_dim, soft_cap, sliding_window, t,
                         inference):
    # Lowering to Mosaic GPU runs without a GPU and checks TMA boxes, wgmma operand shapes and
    # swizzles, register layouts and the warpgroup split; PTX compilation and running need one.
    # 250 tokens: q's rows must be a multiple of 8 for its tiled TMA boxes (the wrapper pads
    # q; out keeps 250 rows: its stores come from untiled SMEM); 256: q goes in unpadded.
    # inference: JAX 0.11.2 on the GPU ran Mosaic GPU's layout inference on this kernel, which
    # must prove every TMA row offset into tiled SMEM a multiple of 8 (pl.multiple_of); 0.10.2
    # runs it only under Warpgroup lowering semantics, where it fails the same way without them.
    if inference:
        monkeypatch.setattr(plgpu, "CompilerParams", functools.partial(
            plgpu.CompilerParams, lowering_semantics=mgpu.LoweringSemantics.Warpgroup))
    h, hkv, page, pages, n = 8, 2, 16, 64, 6
    plan = mosaic_prefill.make_plan(dtype=jnp.bfloat16, head_dim=head_dim, page_size=page,
                                    max_pages=pages, block_keys=128, num_stages=2,
                                    compute_wgs=compute_wgs, smem_limit=227 * 1024)
    args = (jax.ShapeDtypeStruct((t, h, head_dim), jnp.bfloat16),
            jax.ShapeDtypeStruct((2, hkv, 300, page, head_dim), jnp.bfloat16),
            jax.ShapeDtypeStruct((2, hkv, 300, page, head_dim), jnp.bfloat16),
            jax.ShapeDtypeStruct((1,), jnp.int32), jax.ShapeDtypeStruct((n, 8), jnp.int32),
            jax.ShapeDtypeStruct((n, pages), jnp.int32))
    fn = jax.jit(lambda *a: mosaic_prefill.prefill_call(
        *a, scale=head_dim ** -0.5, soft_cap=soft_cap, sliding_window=sliding_window, plan=plan,
        interpret=False))
    text = export.export(fn, platforms=["cuda"])(*args).mlir_module()
    assert "mosaic_gpu" in text


@pytest.mark.parametrize("t,pads", [(256, 0), (64, 0), (250, 1), (32, 1)])
def test_no_copies_of_q_or_out_around_the_kernel(t, pads):
    # What XLA runs around the kernel on the GPU (paged_attention lowered for CUDA): for an
    # engine bucket (T % 8 == 0, T >= 64) q goes into the kernel and out comes back by reshapes
    # only (no pad of q, no slice, gather or select over out); otherwise q gets one pad (to a
    # multiple of 8 rows, and at least one 64-row box). Every op on a bf16 array is checked (the
    # caches are bf16 too; bf16 scalars are not arrays), in the StableHLO that XLA compiles.
    h, hkv, d, page, pages, s = 8, 2, 128, 16, 64, 4
    md = abstract_metadata(t, s, pages)
    cache = jax.ShapeDtypeStruct((2, hkv, 300, page, d), jnp.bfloat16)
    fn = jax.jit(lambda q, k, v, layer, md: paged_attention(
        q, k, v, layer, md, scale=d ** -0.5, kernel="mosaic", interpret=False))
    text = export.export(fn, platforms=["cuda"])(
        jax.ShapeDtypeStruct((t, h, d), jnp.bfloat16), cache, cache, jax.ShapeDtypeStruct((), jnp.int32), md).mlir_module()
    ops = [re.search(r"= (\"?[\w.]+)", line).group(1).strip('"')
           for line in text.splitlines()
           if re.search(r"tensor<\d[\dx]*xbf16>", line) and re.search(r"%\S+ = ", line)]
    assert ops.count("stablehlo.custom_call") == 1 and "mosaic_gpu" in text
    others = [op for op in ops if op not in ("stablehlo.reshape", "stablehlo.custom_call", "call",
                                             "func.call")]
    assert others == ["stablehlo.pad"] * pads, others
