"""Pallas paged-attention kernels vs the pure-jnp reference, in interpret mode on the CPU.

The sweep covers (not as a full product, to stay fast): ragged lengths including 1, exact page
multiples and the block-table maximum; pages in random order; GQA groups 1, 2, 4, 8, 16; head dims
64 and 128; page sizes 8, 16 and 32; fp32 (rel err <= 1e-5) and bf16 (<= 2e-2); soft-cap and
sliding window; bucket padding tokens and sequence rows. Cache slots no valid key occupies hold
large random values (see pallas_kernels/testing.py), and interpret mode fills every output buffer
with NaN before the kernel runs, so an unwritten output or a read of a masked slot fails the test.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from model_zoo.attention import paged_attention_xla
from pallas_kernels.paged_attention import paged_attention
from pallas_kernels.reference import paged_attention_reference
from pallas_kernels.testing import make_batch

TOL = {np.float32: 1e-5, jnp.bfloat16: 2e-2}

# (group, head_dim, page_size, dtype, options)
CASES = [
    (1, 64, 16, np.float32, {}),
    (4, 128, 16, np.float32, {"soft_cap": 7.0}),
    (8, 64, 32, jnp.bfloat16, {"sliding_window": 21}),
    (16, 128, 16, jnp.bfloat16, {}),
    (4, 64, 8, jnp.bfloat16, {"soft_cap": 7.0, "sliding_window": 9}),
    (2, 128, 8, np.float32, {"sliding_window": 16}),
]
MAX_PAGES = 4


def _check(batch, out, num_real_tokens, dtype, **kw):
    args = (jnp.asarray(batch.q), jnp.asarray(batch.k_cache), jnp.asarray(batch.v_cache),
            jnp.int32(1), batch.metadata())
    ref = np.asarray(paged_attention_reference(*args, scale=batch.q.shape[-1] ** -0.5, **kw),
                     np.float64)[:num_real_tokens]
    out = np.asarray(out, np.float64)[:num_real_tokens]
    assert np.isfinite(out).all(), "kernel left unwritten (NaN) or non-finite outputs"
    err = np.linalg.norm(out - ref) / np.linalg.norm(ref)
    assert err <= TOL[dtype], f"relative error {err:.3g} > {TOL[dtype]}"


def _run(batch, **kw):
    args = (jnp.asarray(batch.q), jnp.asarray(batch.k_cache), jnp.asarray(batch.v_cache),
            jnp.int32(1), batch.metadata())
    return paged_attention(*args, scale=batch.q.shape[-1] ** -0.5, interpret=True, **kw)


@pytest.mark.parametrize("group,head_dim,page,dtype,opts", CASES)
def test_decode_matches_reference(group, head_dim, page, dtype, opts):
    rng = np.random.default_rng(group * 1000 + head_dim + page)
    # 1 token, exact page multiples, the block-table maximum, and an odd length.
    lens = [1, page, 3 * page, MAX_PAGES * page, 2 * page + 5]
    batch = make_batch(rng, seq_lens=lens, q_lens=[1] * len(lens), num_heads=2 * group,
                       num_kv_heads=2, head_dim=head_dim, page_size=page, max_pages=MAX_PAGES,
                       pad_tokens=2, pad_seqs=1, dtype=dtype)
    out = _run(batch, max_query_len=1, **opts)
    _check(batch, out, len(lens), dtype, **opts)
    # Forced key splits: partial results combined across splits, some splits empty.
    out = _run(batch, max_query_len=1, num_splits=3, **opts)
    _check(batch, out, len(lens), dtype, **opts)


@pytest.mark.parametrize("group,head_dim,page,dtype,opts", CASES)
def test_ragged_prefill_matches_reference(group, head_dim, page, dtype, opts):
    rng = np.random.default_rng(7 + group * 1000 + head_dim + page)
    # A 1-token decode, a fresh full prefill to the maximum, a chunk continuing a prefix (prefix
    # cache hit / chunked prefill) ending on a page boundary, and a chunk longer than block_q.
    seq_lens = [9, MAX_PAGES * page, 2 * page, 3 * page - 3]
    q_lens = [1, MAX_PAGES * page, page - 3, 2 * page]
    batch = make_batch(rng, seq_lens=seq_lens, q_lens=q_lens, num_heads=2 * group,
                       num_kv_heads=2, head_dim=head_dim, page_size=page, max_pages=MAX_PAGES,
                       pad_tokens=3, pad_seqs=1, dtype=dtype)
    out = _run(batch, **opts)
    _check(batch, out, sum(q_lens), dtype, **opts)


def test_decode_kernel_is_correct_on_multi_token_batches():
    # The decode kernel treats every token on its own, so a wrong max_query_len hint costs
    # speed only: it must still match the reference on a prefill batch.
    rng = np.random.default_rng(3)
    batch = make_batch(rng, seq_lens=[20, 7], q_lens=[6, 7], num_heads=4, num_kv_heads=1,
                       head_dim=64, page_size=8, pad_tokens=1)
    out = _run(batch, max_query_len=1)
    _check(batch, out, 13, np.float32)


def test_reference_agrees_with_model_xla_path():
    rng = np.random.default_rng(4)
    batch = make_batch(rng, seq_lens=[5, 40, 17], q_lens=[5, 1, 9], num_heads=8, num_kv_heads=2,
                       head_dim=64, page_size=16, pad_tokens=2, pad_seqs=1)
    args = (jnp.asarray(batch.q), jnp.asarray(batch.k_cache), jnp.asarray(batch.v_cache),
            jnp.int32(0), batch.metadata())
    for kw in ({}, {"soft_cap": 5.0, "sliding_window": 8}):
        ref = paged_attention_reference(*args, scale=0.125, **kw)
        xla = paged_attention_xla(*args, scale=0.125, **kw)
        np.testing.assert_allclose(np.asarray(ref)[:15], np.asarray(xla)[:15], rtol=1e-4,
                                   atol=1e-5)


def test_layer_index_is_traced_not_baked_in():
    # One compiled function must serve every layer (the model scans over layers).
    rng = np.random.default_rng(5)
    batch = make_batch(rng, seq_lens=[12, 30], q_lens=[1, 1], num_heads=4, num_kv_heads=2,
                       head_dim=64, page_size=8, num_layers=3)
    md = batch.metadata()
    q, k, v = (jnp.asarray(x) for x in (batch.q, batch.k_cache, batch.v_cache))

    @jax.jit
    def all_layers(q, k, v, md):
        def step(_, layer):
            return None, paged_attention(q, k, v, layer, md, scale=0.125, max_query_len=1,
                                         interpret=True)
        return jax.lax.scan(step, None, jnp.arange(3, dtype=jnp.int32))[1]

    outs = all_layers(q, k, v, md)
    for layer in range(3):
        ref = paged_attention_reference(q, k, v, jnp.int32(layer), md, scale=0.125)
        np.testing.assert_allclose(np.asarray(outs[layer]), np.asarray(ref), rtol=1e-5,
                                   atol=1e-6)


def test_validation_errors():
    rng = np.random.default_rng(6)
    batch = make_batch(rng, seq_lens=[4], q_lens=[1], num_heads=4, num_kv_heads=2,
                       head_dim=64, page_size=8)
    q, k, v = (jnp.asarray(x) for x in (batch.q, batch.k_cache, batch.v_cache))
    md = batch.metadata()
    with pytest.raises(ValueError, match="multiple of kv heads"):
        paged_attention(q[:, :3], k, v, 0, md, scale=1.0, interpret=True)
    with pytest.raises(ValueError, match="head_dim of q"):
        paged_attention(q[..., :32], k, v, 0, md, scale=1.0, interpret=True)
    with pytest.raises(ValueError, match="sliding_window"):
        paged_attention(q, k, v, 0, md, scale=1.0, sliding_window=0, interpret=True)
    with pytest.raises(ValueError, match="equal shapes"):
        paged_attention(q, k, v[:, :1], 0, md, scale=1.0, interpret=True)
    with pytest.raises(ValueError, match="pages_per_block"):
        paged_attention(q, k, v, 0, md, scale=1.0, pages_per_block=3, interpret=True)
    with pytest.raises(ValueError, match="max_query_len"):
        paged_attention(q, k, v, 0, md, scale=1.0, max_query_len=0, interpret=True)
