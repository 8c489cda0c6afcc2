"""serving.step_io: a step's inputs packed into one int32 vector and its outputs into one matrix."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from serving.step_io import ALIGN_WORDS, PackedLayout, pack_rows, unpack_rows


def _tree(rng):
    return {"tokens": rng.randint(-2**31, 2**31 - 1, size=7).astype(np.int32),
            "temps": rng.standard_normal((3, 2)).astype(np.float32) * 1e30,
            "seeds": rng.randint(0, 2**32 - 1, size=(3, 2), dtype=np.uint64).astype(np.uint32),
            "mask": rng.rand(5) > 0.5,
            "step": np.uint32(rng.randint(0, 2**32 - 1, dtype=np.uint64))}


def test_pack_then_unpack_in_jit_is_bit_exact():
    rng = np.random.RandomState(0)
    tree = _tree(rng)
    tree["temps"][0, 0] = np.float32("nan")
    tree["temps"][1, 1] = -np.float32("inf")
    layout = PackedLayout.of(tree)
    packed = layout.pack(tree)
    assert packed.dtype == np.int32 and packed.shape == (layout.size,) == (5 * ALIGN_WORDS,)
    back = jax.device_get(jax.jit(layout.unpack)(packed))
    for key, value in tree.items():
        got = np.asarray(back[key])
        assert got.dtype == np.asarray(value).dtype and got.shape == np.asarray(value).shape, key
        assert np.asarray(value).tobytes() == got.tobytes(), key


def test_every_leaf_starts_256_byte_aligned():
    """XLA passes a static slice of the packed parameter to a custom call as a sub-buffer, and Mosaic
    GPU kernels reject operands that are not 256-byte aligned (block tables at batch 8 on an H100)."""
    tree = {"a": np.zeros(3, np.int32), "b": np.zeros((64,), np.float32), "c": np.zeros((5, 13), np.int32),
            "d": np.zeros(1, np.bool_), "e": np.zeros((2, 64), np.int32)}
    layout = PackedLayout.of(tree)
    assert ALIGN_WORDS * 4 == 256
    assert layout.offsets == (0, 64, 128, 256, 320)        # c (65 words) takes two blocks
    assert layout.size == 448
    packed = layout.pack({k: np.full(v.shape, i + 1, v.dtype) for i, (k, v) in enumerate(tree.items())})
    gaps = np.ones(layout.size, bool)
    for off, shape in zip(layout.offsets, layout.shapes):
        gaps[off:off + int(np.prod(shape))] = False
    assert (packed[gaps] == 0).all() and (packed[~gaps] != 0).all()


def test_layout_from_abstract_values_and_shape_mismatch():
    abstract = (jax.ShapeDtypeStruct((4,), jnp.int32), jax.ShapeDtypeStruct((2, 3), jnp.float32))
    layout = PackedLayout.of(abstract)
    assert layout.size == 2 * ALIGN_WORDS
    with pytest.raises(ValueError, match="shape"):
        layout.pack((np.zeros(5, np.int32), np.zeros((2, 3), np.float32)))
    with pytest.raises(TypeError, match="4-byte"):
        PackedLayout.of((jax.ShapeDtypeStruct((4,), jnp.bfloat16),))


def test_rows_round_trip():
    rng = np.random.RandomState(1)
    s, k = 5, 3
    ids = rng.randint(0, 1000, s).astype(np.int32)
    lp = -rng.rand(s).astype(np.float32)
    top_ids = rng.randint(0, 1000, (s, k)).astype(np.int32)
    top_lp = -rng.rand(s, k).astype(np.float32)
    m = np.asarray(jax.jit(lambda *a: pack_rows(a))(ids, lp, top_ids, top_lp))
    assert m.shape == (s, 2 + 2 * k) and m.dtype == np.int32
    got = unpack_rows(m, [(1, np.int32, True), (1, np.float32, True), (k, np.int32, False), (k, np.float32, False)])
    for want, have in zip((ids, lp, top_ids, top_lp), got):
        np.testing.assert_array_equal(want, have)
    # k = 0 (max_logprobs 0) still round-trips
    m0 = np.asarray(pack_rows([jnp.asarray(ids), jnp.zeros((s, 0), jnp.float32)]))
    a, b = unpack_rows(m0, [(1, np.int32, True), (0, np.float32, False)])
    np.testing.assert_array_equal(a, ids)
    assert b.shape == (s, 0)
