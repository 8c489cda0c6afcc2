"""The Mosaic GPU (Hopper) decode kernel vs the pure-jnp reference, in Mosaic GPU interpret mode.

``paged_attention(..., kernel="mosaic", interpret=True)`` runs the kernel of
``pallas_kernels/mosaic_attention.py`` in Mosaic GPU's CPU interpreter, which simulates SMEM, the
TMA page copies, the ring's barriers and the output copies (the two matmuls run as jnp.dot on the
same SMEM tiles: the 0.10.2 interpreter cannot run wgmma with a transposed B or an A in
registers). The interpreter fills
every output buffer and SMEM scratch with NaN before the kernel runs and raises on out-of-bounds
reads; cache slots no valid key occupies hold large random values (pallas_kernels/testing.py), so
an unwritten output or a masked slot that leaks into the softmax fails the comparison.

The sweep covers ragged lengths including 1, exact page and block multiples and the block-table
maximum; pages in random order; GQA groups 1, 3, 4, 8, 16 (q boxes at every 8-row lead); head
dims 64 and 128; page sizes 16 and 32; bf16 and fp16 (rel err <= 2e-2); soft-cap and sliding
window; forced key splits (combine); rings shallower than the block count (slot reuse). fp32 is
not a Mosaic shape: the dispatcher runs the Triton kernel for it, checked here too.
``test_lowers_for_cuda`` lowers the GPU variant (Pallas -> Mosaic GPU MLIR, the checks of TMA,
wgmma and register layouts) without a GPU; ``test_no_copies_of_q_or_out_around_the_kernel``
checks that XLA runs nothing but bitcasts around it.
"""

from __future__ import annotations

import importlib
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import export

from pallas_kernels import mosaic_attention
from pallas_kernels.paged_attention import paged_attention
from pallas_kernels.reference import paged_attention_reference
from pallas_kernels.testing import abstract_metadata, make_batch

TOL = {np.float32: 1e-5, jnp.bfloat16: 2e-2, jnp.float16: 2e-2}

# (group, head_dim, page_size, dtype, options); every case has 64-key blocks (4 x 16, 2 x 32).
CASES = [
    (1, 64, 16, jnp.bfloat16, {}),
    (4, 128, 16, jnp.bfloat16, {"soft_cap": 7.0}),
    (8, 64, 32, jnp.float16, {"sliding_window": 21}),
    (16, 128, 32, jnp.bfloat16, {"soft_cap": 7.0, "sliding_window": 100}),
    (3, 64, 16, jnp.bfloat16, {}),     # 16-row q boxes; T * H = 36 rows, padded to 40
]
MAX_KEYS = 256                                   # 4 blocks of 64 keys


def _args(batch, layer=1):
    return (jnp.asarray(batch.q), jnp.asarray(batch.k_cache), jnp.asarray(batch.v_cache),
            jnp.int32(layer), batch.metadata())


def _check(batch, out, num_real_tokens, dtype, **kw):
    ref = np.asarray(paged_attention_reference(*_args(batch), scale=batch.q.shape[-1] ** -0.5,
                                               **kw), np.float64)[:num_real_tokens]
    out = np.asarray(out, np.float64)[:num_real_tokens]
    assert np.isfinite(out).all(), "kernel left unwritten (NaN) or non-finite outputs"
    err = np.linalg.norm(out - ref) / np.linalg.norm(ref)
    assert err <= TOL[dtype], f"relative error {err:.3g} > {TOL[dtype]}"


def _run(batch, **kw):
    return paged_attention(*_args(batch), scale=batch.q.shape[-1] ** -0.5, max_query_len=1,
                           kernel="mosaic", interpret=True, **kw)


@pytest.mark.parametrize("group,head_dim,page,dtype,opts", CASES)
def test_decode_matches_reference(group, head_dim, page, dtype, opts):
    rng = np.random.default_rng(group * 1000 + head_dim + page)
    max_pages = MAX_KEYS // page
    # 1 token, one page, exactly one block, the block-table maximum, and an odd length.
    lens = [1, page, 64, MAX_KEYS, 2 * 64 + 5]
    batch = make_batch(rng, seq_lens=lens, q_lens=[1] * len(lens), num_heads=2 * group,
                       num_kv_heads=2, head_dim=head_dim, page_size=page, max_pages=max_pages,
                       pad_tokens=1, pad_seqs=1, dtype=dtype)
    # One split, a 2-deep ring over up to 4 blocks: slots are refilled and reused.
    _check(batch, _run(batch, **opts), len(lens), dtype, **opts)
    # Forced key splits: 2 splits of 2 blocks (one empty for short sequences), 3-deep ring.
    _check(batch, _run(batch, num_splits=2, num_stages=3, **opts), len(lens), dtype, **opts)


def test_splits_of_one_block_and_multi_token_batches():
    # 4 splits of one block each; queries of one sequence at several positions (a wrong
    # max_query_len hint costs speed only: every token is attended on its own).
    rng = np.random.default_rng(11)
    batch = make_batch(rng, seq_lens=[200, 64, 3], q_lens=[3, 1, 2], num_heads=8, num_kv_heads=2,
                       head_dim=64, page_size=16, max_pages=16, dtype=jnp.bfloat16)
    _check(batch, _run(batch, num_splits=4, num_stages=4), 6, jnp.bfloat16)


@pytest.mark.parametrize("pages_per_split", [8, 12])        # two key splits, one
def test_ring_protocol_has_no_races(pages_per_split):
    # Every SMEM read of a ring slot must be ordered after the barrier wait of the TMA copies
    # that filled it (vector clocks, one per copy); a dropped barrier_wait fails here. Both
    # output paths: partials + combine, and the single split's store from the untiled tile.
    rng = np.random.default_rng(12)
    batch = make_batch(rng, seq_lens=[190, 7], q_lens=[1, 1], num_heads=4, num_kv_heads=1,
                       head_dim=64, page_size=16, max_pages=12, dtype=jnp.bfloat16)
    q, k, v, _, md = _args(batch)
    out = mosaic_attention.decode_call(
        q.reshape(2, 1, 4, 64), k, v, jnp.array([1], jnp.int32), md.positions, md.block_tables,
        md.token_seq_ids, scale=0.125, soft_cap=None, sliding_window=None, pages_per_block=4,
        pages_per_split=pages_per_split, num_stages=2,
        interpret=mosaic_attention.interpret_params(detect_races=True))
    assert not mosaic_attention.races_detected()
    out = out.reshape(2, 4, 64)
    ref = paged_attention_reference(q, k, v, jnp.int32(1), md, scale=0.125)
    err = np.linalg.norm(np.asarray(out, np.float64) - np.asarray(ref, np.float64))
    assert err <= 2e-2 * np.linalg.norm(np.asarray(ref, np.float64))


def test_layer_index_is_traced_not_baked_in():
    # One executable serves every layer of the model's scan: the layer reaches the kernel traced.
    rng = np.random.default_rng(5)
    batch = make_batch(rng, seq_lens=[70, 30], q_lens=[1, 1], num_heads=4, num_kv_heads=2,
                       head_dim=64, page_size=16, num_layers=3, dtype=jnp.bfloat16)
    q, k, v, _, md = _args(batch)
    attend = lambda layer: paged_attention(q, k, v, layer, md, scale=0.125, max_query_len=1,
                                           kernel="mosaic", interpret=True)
    outs = jax.jit(lambda: jax.lax.map(attend, jnp.arange(3, dtype=jnp.int32)))()
    for layer, out in enumerate(np.asarray(outs, np.float64)):
        ref = np.asarray(paged_attention_reference(q, k, v, jnp.int32(layer), md, scale=0.125),
                         np.float64)
        assert np.linalg.norm(out - ref) <= 2e-2 * np.linalg.norm(ref)


def test_unsupported_shapes_run_the_triton_kernel(caplog):
    # fp32 (wgmma would be TF32) and head_dim 32: the dispatcher falls back to the Triton kernel,
    # and says so in the log (with the reason).
    caplog.set_level("WARNING", logger="jaxllm.pallas_kernels")
    importlib.import_module("pallas_kernels.paged_attention")._log_mosaic_fallback.cache_clear()      # logged once per reason and process
    rng = np.random.default_rng(6)
    for dtype, head_dim in ((np.float32, 64), (jnp.bfloat16, 32)):
        batch = make_batch(rng, seq_lens=[40, 9], q_lens=[1, 1], num_heads=4, num_kv_heads=2,
                           head_dim=head_dim, page_size=16, dtype=dtype)
        out = _run(batch)
        triton = paged_attention(*_args(batch), scale=head_dim ** -0.5, max_query_len=1,
                                 interpret=True)
        np.testing.assert_array_equal(np.asarray(out), np.asarray(triton))
        _check(batch, out, 2, dtype)
    fallbacks = [r.getMessage() for r in caplog.records if "Triton decode kernel runs it" in r.getMessage()]
    assert any("float32" in m for m in fallbacks) and any("head_dim" in m or "32" in m for m in fallbacks), fallbacks


def test_validation_errors():
    rng = np.random.default_rng(7)
    batch = make_batch(rng, seq_lens=[4], q_lens=[1], num_heads=4, num_kv_heads=2,
                       head_dim=64, page_size=16, dtype=jnp.bfloat16)
    with pytest.raises(ValueError, match="kernel must be one of"):
        paged_attention(*_args(batch), scale=1.0, kernel="cuda", interpret=True)
    with pytest.raises(ValueError, match="num_stages must be >= 2"):
        _run(batch, num_stages=1)
    with pytest.raises(ValueError, match="multiple of 64"):
        _run(batch, pages_per_block=2)            # 32-key blocks
    q, k, v, _, md = _args(batch)
    with pytest.raises(ValueError, match="does not support dtype float32"):
        mosaic_attention.decode_call(
            q.astype(jnp.float32).reshape(1, 2, 2, 64), k, v, jnp.array([0], jnp.int32),
            md.positions, md.block_tables, md.token_seq_ids, scale=1.0, soft_cap=None, sliding_window=None,
            pages_per_block=4, pages_per_split=4, num_stages=2, interpret=True)


@pytest.mark.parametrize("group", [1, 4, 8, 16])
@pytest.mark.parametrize("pages_per_split,soft_cap,sliding_window", [
    (64, None, None), (16, 30.0, 100)])
def test_lowers_for_cuda(group, pages_per_split, soft_cap, sliding_window):
    # Lowering to Mosaic GPU runs here without a GPU: it checks TMA shapes (<= 256 per box
    # dimension, 128-byte multiples), wgmma operand shapes and swizzles, register layouts, and
    # the q box at an 8-row aligned offset / the out stores at any row (untiled RefUnion view).
    # Compiling to PTX and running happen on the GPU only. 64 pages in one split or four.
    t, hkv, d, page, pages, seqs = 4, 8, 128, 16, 64, 3
    args = (jax.ShapeDtypeStruct((t, hkv, group, d), jnp.bfloat16),
            jax.ShapeDtypeStruct((2, hkv, 300, page, d), jnp.bfloat16),
            jax.ShapeDtypeStruct((2, hkv, 300, page, d), jnp.bfloat16),
            jax.ShapeDtypeStruct((1,), jnp.int32), jax.ShapeDtypeStruct((t,), jnp.int32),
            jax.ShapeDtypeStruct((seqs, pages), jnp.int32), jax.ShapeDtypeStruct((t,), jnp.int32))
    fn = jax.jit(lambda *a: mosaic_attention.decode_call(
        *a, scale=d ** -0.5, soft_cap=soft_cap, sliding_window=sliding_window, pages_per_block=4,
        pages_per_split=pages_per_split, num_stages=3, interpret=False))
    text = export.export(fn, platforms=["cuda"])(*args).mlir_module()
    assert "mosaic_gpu" in text


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("group", [1, 4, 16])
def test_no_copies_of_q_or_out_around_the_kernel(group, fused):
    # What XLA runs around the kernel on the GPU (paged_attention lowered for CUDA), one key
    # split: q goes in and out comes back by reshapes only (no pad of q to 8-row groups, no
    # slice of out), and no op on the per-token metadata (positions + 1 and the table gather
    # run in the kernel); the table pads are per sequence (none here: 128 pages fit one split's
    # table exactly). Every op is checked, in the StableHLO that XLA compiles. With new_kv the
    # K/V write runs in the kernel too: no scatter, the caches come back aliased.
    t, hkv, d, page, pages, s = 32, 8, 128, 16, 128, 32
    md = abstract_metadata(t, s, pages)
    cache = jax.ShapeDtypeStruct((2, hkv, 300, page, d), jnp.bfloat16)
    new = jax.ShapeDtypeStruct((t, hkv, d), jnp.bfloat16)
    fn = jax.jit(lambda q, k, v, layer, md, new_k, new_v: paged_attention(
        q, k, v, layer, md, scale=d ** -0.5, kernel="mosaic", max_query_len=1, num_splits=1,
        interpret=False, new_kv=(new_k, new_v) if fused else None))
    text = export.export(fn, platforms=["cuda"])(
        jax.ShapeDtypeStruct((t, hkv * group, d), jnp.bfloat16), cache, cache, jax.ShapeDtypeStruct((), jnp.int32),
        md, new, new).mlir_module()
    if fused:
        assert len(re.findall(r"output_operand_alias<", text)) == 2
    ops = [re.search(r"= (\"?[\w.]+)", line).group(1).strip('"')
           for line in text.splitlines() if re.search(r"%\S+ = ", line)]
    assert ops.count("stablehlo.custom_call") == 1 and "mosaic_gpu" in text
    others = [op for op in ops if op not in ("stablehlo.reshape", "stablehlo.custom_call", "call",
                                             "func.call", "stablehlo.constant")]
    assert others == [], others
