"""The decode kernel with the K/V cache write fused in (``paged_attention(..., new_kv=(k, v))``).

Checked against the unfused ground truth, ``write_kv`` then ``paged_attention_reference``, in
Pallas interpret mode on the CPU. The sweep covers ragged lengths including 1 (only the new key is
visible), exact page multiples and the block-table maximum; pages in random order; GQA groups
1, 4, 8; head dims 64 and 128; pages of 16 and 32; one and several key splits (with splits whose
only key is the new one); soft-cap and sliding window; padding tokens whose slots are out of range
(they must write nothing); fp32 (rel err <= 1e-5) and bf16 (<= 2e-2).

Poisoning: every cache slot no valid key occupies holds large random values
(pallas_kernels/testing.py), the new tokens' own slots included, so a kernel that read the new key
back from the cache (instead of from ``new_kv``) fails; interpret mode fills the attention output
with NaN before the kernel runs. The returned caches must equal the reference's exactly: the write
is a copy. Padding tokens' outputs are not compared (nobody reads them; the fused kernel attends
them to their own new key, the reference to whatever the cache holds).
"""

from __future__ import annotations

import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from model_zoo.attention import paged_attention_xla
from pallas_kernels import triton_attention
from pallas_kernels.paged_attention import paged_attention
from pallas_kernels.reference import paged_attention_reference, write_kv
from pallas_kernels.testing import make_batch

TOL = {np.float32: 1e-5, jnp.bfloat16: 2e-2}
MAX_PAGES = 4
LAYER = 1
PAD_TOKENS = 3

# (group, head_dim, page_size, dtype, options)
CASES = [
    (1, 64, 16, np.float32, {}),
    (4, 128, 16, np.float32, {"soft_cap": 7.0}),
    (8, 64, 32, jnp.bfloat16, {"sliding_window": 21}),
    (4, 128, 32, jnp.bfloat16, {"soft_cap": 7.0, "sliding_window": 40}),
    (8, 128, 16, np.float32, {"sliding_window": 1}),
    (1, 128, 32, jnp.bfloat16, {}),
]


def _decode_batch(rng, lens, *, group, head_dim, page, dtype, kv_heads=2, num_layers=2):
    """A decode batch (one new token per sequence, then padding tokens with out-of-range slots),
    this step's K/V (fp32, as the model produces them before the cast), and the batch metadata.
    The new tokens' cache slots hold poison, not their keys."""
    batch = make_batch(rng, seq_lens=lens, q_lens=[1] * len(lens), num_heads=group * kv_heads,
                       num_kv_heads=kv_heads, head_dim=head_dim, page_size=page,
                       max_pages=MAX_PAGES, num_layers=num_layers, pad_tokens=PAD_TOKENS,
                       pad_seqs=1, dtype=dtype)
    k_cache = np.asarray(batch.k_cache, np.float32)
    v_cache = np.asarray(batch.v_cache, np.float32)
    num_slots = k_cache.shape[2] * page
    slots = batch.slot_mapping.copy()
    for s in slots[:len(lens)]:
        shape = k_cache[:, :, s // page, s % page].shape
        k_cache[:, :, s // page, s % page] = 60 * rng.standard_normal(shape)
        v_cache[:, :, s // page, s % page] = 60 * rng.standard_normal(shape)
    # Padding the way the runner pads (the first slot past the cache), and further out.
    slots[len(lens):] = num_slots + np.arange(PAD_TOKENS) * 7
    t = len(slots)
    new_k = rng.standard_normal((t, kv_heads, head_dim)).astype(np.float32)
    new_v = rng.standard_normal((t, kv_heads, head_dim)).astype(np.float32)
    md = dataclasses.replace(batch.metadata(), slot_mapping=jnp.asarray(slots))
    caches = (jnp.asarray(k_cache, dtype), jnp.asarray(v_cache, dtype))
    return jnp.asarray(batch.q), caches, (jnp.asarray(new_k), jnp.asarray(new_v)), md


def _unfused(q, caches, new_kv, md, layer=LAYER, **kw):
    kc, vc = write_kv(*caches, layer, *new_kv, md.slot_mapping)
    out = paged_attention_reference(q, kc, vc, jnp.int32(layer), md, scale=q.shape[-1] ** -0.5,
                                    **kw)
    return out, kc, vc


def _check(got, want, num_real, dtype):
    out, kc, vc = (np.asarray(x, np.float64) for x in got)
    ref, ref_kc, ref_vc = (np.asarray(x, np.float64) for x in want)
    out, ref = out[:num_real], ref[:num_real]
    assert np.isfinite(out).all(), "kernel left unwritten (NaN) or non-finite outputs"
    err = np.linalg.norm(out - ref) / np.linalg.norm(ref)
    assert err <= TOL[dtype], f"relative error {err:.3g} > {TOL[dtype]}"
    np.testing.assert_array_equal(kc, ref_kc)
    np.testing.assert_array_equal(vc, ref_vc)


@pytest.mark.parametrize("kernel", ["triton", "mosaic"])
@pytest.mark.parametrize("group,head_dim,page,dtype,opts", CASES)
def test_fused_decode_matches_write_then_reference(group, head_dim, page, dtype, opts, kernel):
    # kernel="mosaic": the bf16 cases run the Mosaic kernel's fused write (64-key blocks: one
    # split at page 16; at page 32, num_splits=3 gives 2 splits of 2 pages); fp32 is not a Mosaic
    # shape and runs Triton's fused write. Either way no scatter runs outside the kernel.
    rng = np.random.default_rng(group * 1000 + head_dim + page)
    # 1 token (first of its sequence), exact page multiples, the block-table maximum and one
    # key below it, an odd length.
    lens = [1, page, 3 * page, MAX_PAGES * page, MAX_PAGES * page - 1, 2 * page + 5]
    q, caches, new_kv, md = _decode_batch(rng, lens, group=group, head_dim=head_dim, page=page,
                                          dtype=dtype)
    want = _unfused(q, caches, new_kv, md, **opts)
    # One split; then 3 splits over 4 pages (2 pages each, one split empty for short sequences,
    # and with a window, split 0 owning no cached key: only the new one).
    for num_splits in (None, 3):
        call = lambda q, caches, new_kv, md: paged_attention(  # noqa: E731
            q, *caches, jnp.int32(LAYER), md, scale=head_dim ** -0.5, max_query_len=1,
            new_kv=new_kv, num_splits=num_splits, interpret=True, kernel=kernel, **opts)
        prims = [p for p, _ in _primitives(jax.make_jaxpr(call)(q, caches, new_kv, md).jaxpr)]
        assert "scatter" not in prims
        _check(call(q, caches, new_kv, md), want, len(lens), dtype)


def test_fused_decode_in_a_layer_scan_with_the_cache_in_the_carry():
    # The model's shape of use: one compiled call per layer inside a scan, the caches carried
    # (and donated), the layer index traced.
    rng = np.random.default_rng(11)
    lens = [5, 40, 17, 64]
    q, caches, (new_k, new_v), md = _decode_batch(rng, lens, group=4, head_dim=64, page=16,
                                                  dtype=np.float32, num_layers=3)
    new_ks = jnp.stack([new_k * (i + 1) for i in range(3)])     # distinct K/V per layer
    new_vs = jnp.stack([new_v - i for i in range(3)])

    def fused(caches, q, new_ks, new_vs, md):
        def layer_fn(caches, xs):
            layer, k, v = xs
            out, kc, vc = paged_attention(q, *caches, layer, md, scale=0.125, max_query_len=1,
                                          new_kv=(k, v), interpret=True)
            return (kc, vc), out
        return jax.lax.scan(layer_fn, caches, (jnp.arange(3, dtype=jnp.int32), new_ks, new_vs))

    want_caches = caches
    want_outs = []
    for layer in range(3):
        out, *want_caches = _unfused(q, want_caches, (new_ks[layer], new_vs[layer]), md,
                                     layer=layer)
        want_outs.append(out)
    got_caches, got_outs = jax.jit(fused, donate_argnums=0)(caches, q, new_ks,
                                                                         new_vs, md)
    for layer in range(3):
        _check((got_outs[layer], *got_caches), (want_outs[layer], *want_caches), len(lens),
               np.float32)


@pytest.mark.parametrize("path", ["prefill", "mosaic_prefill", "xla"])
def test_new_kv_on_unfused_paths_writes_then_attends(path):
    # Prefill/mixed batches (a multi-token sequence, so the decode contract does not hold) on
    # either kernel family and the XLA backend scatter, then attend.
    rng = np.random.default_rng(12)
    batch = make_batch(rng, seq_lens=[9, 30, 20], q_lens=[1, 12, 20], num_heads=8,
                       num_kv_heads=2, head_dim=64, page_size=16, pad_tokens=2, pad_seqs=1)
    num_slots = batch.k_cache.shape[2] * 16
    slots = batch.slot_mapping.copy()
    slots[-2:] = num_slots
    md = dataclasses.replace(batch.metadata(), slot_mapping=jnp.asarray(slots))
    t = len(slots)
    new_kv = (jnp.asarray(rng.standard_normal((t, 2, 64)), jnp.float32),
              jnp.asarray(rng.standard_normal((t, 2, 64)), jnp.float32))
    q, caches = jnp.asarray(batch.q), (jnp.asarray(batch.k_cache), jnp.asarray(batch.v_cache))
    want = _unfused(q, caches, new_kv, md)
    fns = {"prefill": lambda **kw: paged_attention(interpret=True, **kw),
           "xla": paged_attention_xla,
           "mosaic_prefill": lambda **kw: paged_attention(interpret=True, kernel="mosaic", **kw)}
    got = fns[path](q=q, k_cache=caches[0], v_cache=caches[1], layer=jnp.int32(LAYER), md=md,
                    scale=0.125, new_kv=new_kv)
    _check(got, want, t - 2, np.float32)
    # Without new_kv every backend returns the attention output alone, as before.
    plain = fns[path](q=q, k_cache=want[1], v_cache=want[2], layer=jnp.int32(LAYER), md=md,
                      scale=0.125)
    assert not isinstance(plain, tuple)


def test_new_kv_validation_errors():
    rng = np.random.default_rng(13)
    q, caches, (k, v), md = _decode_batch(rng, [4], group=2, head_dim=64, page=16,
                                          dtype=np.float32)
    call = lambda new_kv: paged_attention(q, *caches, 0, md, scale=1.0, max_query_len=1,  # noqa: E731
                                          new_kv=new_kv, interpret=True)
    with pytest.raises(ValueError, match="pair"):
        call((k, v, k))
    with pytest.raises(ValueError, match="new_kv's k"):
        call((k[:, :1], v))
    with pytest.raises(ValueError, match="new_kv's v"):
        call((k, v[..., :32]))


@pytest.mark.parametrize("num_splits,soft_cap,sliding_window", [(1, None, None), (4, 30.0, 100)])
def test_fused_decode_lowers_for_cuda(num_splits, soft_cap, sliding_window):
    # Pallas -> Triton IR runs here without a GPU (Triton's own compile runs on the GPU only):
    # the masked stores with traced scalar indices lower, and the caches come back as outputs
    # aliased to operands 4 and 5 of the custom call (no copy when XLA can reuse the buffers).
    t, hkv, d, page = 4, 8, 128, 16
    bf16 = lambda *s: jax.ShapeDtypeStruct(s, jnp.bfloat16)  # noqa: E731
    i32 = lambda *s: jax.ShapeDtypeStruct(s, jnp.int32)  # noqa: E731
    args = (bf16(t, hkv, 16, d), bf16(2, hkv, 300, page, d), bf16(2, hkv, 300, page, d), i32(1),
            i32(t), i32(t, 72), bf16(t, hkv, d), bf16(t, hkv, d), i32(t))
    fn = jax.jit(lambda q, kc, vc, layer, lens, tables, k, v, slots:
                 triton_attention.decode_pallas_call(
                     q, kc, vc, layer, lens, tables, scale=d ** -0.5, soft_cap=soft_cap,
                     sliding_window=sliding_window, pages_per_block=8, num_splits=num_splits,
                     num_warps=4, num_stages=1, interpret=False, new_kv=(k, v, slots)))
    text = fn.trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    assert "jaxllm_paged_decode_kv_write" in text
    aliases = re.findall(r"output_tuple_indices = \[(\d+)\], operand_index = (\d+)", text)
    first = 3 if num_splits > 1 else 1                     # after o (and m, l with splits)
    assert sorted(aliases) == [(str(first), "4"), (str(first + 1), "5")]


@pytest.mark.parametrize("pages_per_split", [4, 2])                # one key split, two
def test_mosaic_fused_write_has_no_races(pages_per_split):
    # The Mosaic kernel's write with race detection on (every SMEM read of the new rows ordered
    # after their TMA's barrier wait, the ring as before); a padding token; caches bit-exact.
    from pallas_kernels import mosaic_attention

    rng = np.random.default_rng(14)
    lens = [120, 7, 70]
    q, caches, new_kv, md = _decode_batch(rng, lens, group=4, head_dim=64, page=32,
                                          dtype=jnp.bfloat16, kv_heads=2)
    want = _unfused(q, caches, new_kv, md)
    t = q.shape[0]
    fn = jax.jit(lambda q, kc, vc, k, v: mosaic_attention.decode_call(
        q.reshape(t, 2, 4, 64), kc, vc, jnp.array([LAYER], jnp.int32), md.positions,
        md.block_tables, md.token_seq_ids, scale=0.125, soft_cap=None, sliding_window=None,
        pages_per_block=2, pages_per_split=pages_per_split, num_stages=2,
        interpret=mosaic_attention.interpret_params(detect_races=True),
        new_kv=(k.astype(kc.dtype), v.astype(vc.dtype), md.slot_mapping)))
    out, kc, vc = fn(q, *caches, *new_kv)
    assert not mosaic_attention.races_detected()
    _check((out.reshape(t, 8, 64), kc, vc), want, len(lens), jnp.bfloat16)


@pytest.mark.parametrize("pages_per_split", [64, 16])              # one key split, four
def test_mosaic_fused_write_lowers_for_cuda(pages_per_split):
    # Pallas -> Mosaic GPU MLIR without a GPU: the one-row TMA loads and stores from untiled SMEM
    # at traced rows lower, and the caches come back as outputs aliased to operands 5 and 6 of
    # the custom call (after layer, positions, seq ids, tables, q).
    from jax import export

    from pallas_kernels import mosaic_attention

    t, hkv, g, d, page = 4, 8, 4, 128, 16
    bf16 = lambda *s: jax.ShapeDtypeStruct(s, jnp.bfloat16)  # noqa: E731
    i32 = lambda *s: jax.ShapeDtypeStruct(s, jnp.int32)  # noqa: E731
    args = (bf16(t, hkv, g, d), bf16(2, hkv, 300, page, d), bf16(2, hkv, 300, page, d), i32(1),
            i32(t), i32(3, 64), i32(t), bf16(t, hkv, d), bf16(t, hkv, d), i32(t))
    fn = jax.jit(lambda q, kc, vc, layer, pos, tables, seqs, k, v, slots:
                 mosaic_attention.decode_call(
                     q, kc, vc, layer, pos, tables, seqs, scale=d ** -0.5, soft_cap=None,
                     sliding_window=None, pages_per_block=4, pages_per_split=pages_per_split,
                     num_stages=2, interpret=False, new_kv=(k, v, slots)))
    text = export.export(fn, platforms=["cuda"])(*args).mlir_module()
    assert "mosaic_gpu" in text
    aliases = re.findall(r"output_tuple_indices = \[(\d+)\], operand_index = (\d+)", text)
    first = 2 if pages_per_split < 64 else 1               # after out (o and lse with splits)
    assert sorted(aliases) == [(str(first), "5"), (str(first + 1), "6")]


def _primitives(jaxpr):
    """(primitive name, params) of every equation, sub-jaxprs included."""
    from jax.extend import core as jcore

    found = []
    for eqn in jaxpr.eqns:
        found.append((eqn.primitive.name, eqn.params))
        for value in eqn.params.values():
            for sub in value if isinstance(value, (tuple, list)) else (value,):
                sub = sub.jaxpr if isinstance(sub, jcore.ClosedJaxpr) else sub
                if isinstance(sub, jcore.Jaxpr):
                    found += _primitives(sub)
    return found


def test_model_decode_step_writes_kv_inside_the_kernel():
    # A Llama decode step on the Pallas backend: the kernel writes K/V (no scatter into the cache
    # is left in the step) and logits and caches match the XLA backend's step.
    import functools

    from flax import nnx

    from model_zoo.attention import AttentionMetadata
    from model_zoo.config import ModelConfig
    from model_zoo.llama import LlamaForCausalLM, init_kv_cache
    from model_zoo.loaders.dummy import dummy_params

    cfg = ModelConfig(architecture="LlamaForCausalLM", vocab_size=128, hidden_size=64,
                      intermediate_size=128, num_layers=2, num_heads=8, num_kv_heads=2,
                      head_dim=16)
    params = {k: v * (1 if k.endswith("norm") else 10)     # K/V far from zero
              for k, v in dummy_params(cfg, jnp.float32, seed=1).items()}
    page, num_pages = 8, 6
    kernel = functools.partial(paged_attention, interpret=True, max_query_len=1)
    steps = {}
    for name, fn in (("xla", paged_attention_xla), ("pallas", kernel)):
        graphdef, state = nnx.split(LlamaForCausalLM(cfg, params, attention_fn=fn))
        steps[name] = lambda kv, tokens, md, graphdef=graphdef, state=state: nnx.merge(
            graphdef, state)(tokens, kv, md, jnp.arange(tokens.shape[0]))
    i32 = lambda *a: jnp.asarray(np.array(a, np.int32))  # noqa: E731
    # Two sequences (10 tokens in pages 1-2, 3 tokens in page 3) prefilled by the XLA backend.
    prefill_md = AttentionMetadata(
        positions=i32(*range(10), *range(3)), token_seq_ids=i32(*[0] * 10, *[1] * 3),
        slot_mapping=i32(*range(8, 18), *range(24, 27)), block_tables=i32([1, 2], [3, 0]),
        seq_lens=i32(10, 3), query_start_loc=i32(0, 10, 13))
    kv = init_kv_cache(cfg, num_pages, page, jnp.float32)
    _, kv = jax.jit(steps["xla"])(kv, jnp.arange(13, dtype=jnp.int32) % 128, prefill_md)
    # Decode: one token each (positions 10 and 3) and one padding token (out-of-range slot).
    md = AttentionMetadata(positions=i32(10, 3, 0), token_seq_ids=i32(0, 1, 0),
                           slot_mapping=i32(18, 27, num_pages * page), block_tables=i32([1, 2], [3, 0]),
                           seq_lens=i32(11, 4), query_start_loc=i32(0, 1, 2))
    tokens = i32(5, 77, 0)
    names = {name: [(prim, params.get("name")) for prim, params in
                    _primitives(jax.make_jaxpr(step)(kv, tokens, md).jaxpr)]
             for name, step in steps.items()}
    assert ("pallas_call", "jaxllm_paged_decode_kv_write") in names["pallas"]
    assert [p for p, _ in names["xla"] if p == "scatter"]            # the unfused step scatters
    assert not [p for p, _ in names["pallas"] if p == "scatter"]
    want_logits, want_kv = jax.jit(steps["xla"])(kv, tokens, md)
    got_logits, got_kv = jax.jit(steps["pallas"])(kv, tokens, md)
    np.testing.assert_allclose(np.asarray(got_logits)[:2], np.asarray(want_logits)[:2],
                               rtol=1e-4, atol=1e-4 * np.abs(np.asarray(want_logits)).max())
    for got, want in zip(got_kv, want_kv):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-6, atol=1e-6)
