"""One host->device copy in, one device->host copy out, per engine step.

A step's inputs are ~20 small arrays (tokens, attention metadata, sampling metadata). Passed one by
one, each is its own host-to-device transfer with its own driver round trip: on an H100 the 23
transfers of a batch-1 decode step cost ~2 ms of host time on the step's critical path
(benchmarks/gpu_profile.py, results/2026-11-21-h100-decode-profile-*.json), more than a quarter of
the step. Here the host packs every input into one int32 vector (float32/uint32 bit patterns kept,
bools as 0/1) and the compiled step unpacks it with static slices; the outputs come back the same
way, as one int32 matrix.

Every leaf starts at a multiple of 64 words (256 bytes) of the vector. XLA hands a static slice of a
parameter to a custom call as a sub-buffer of it, without a copy, and Mosaic GPU kernels reject
operands that are not 256-byte aligned: the block tables once reached the fused-write Mosaic decode
kernel at an unaligned offset ("Input buffer 3 is not 256-byte aligned", H100, batch 8).

The layout is the flattened pytree of an example (or abstract) value, so a step's packer and its
executable always agree: both are built from ``_abstract_inputs`` of the same bucket.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np


# Leaf offsets in the packed vector are multiples of this many int32 words (256 bytes; see above).
ALIGN_WORDS = 64


def _aligned(n: int) -> int:
    return -(-n // ALIGN_WORDS) * ALIGN_WORDS


@dataclasses.dataclass(frozen=True)
class PackedLayout:
    treedef: object
    shapes: tuple[tuple[int, ...], ...]
    dtypes: tuple[np.dtype, ...]

    @classmethod
    def of(cls, tree) -> "PackedLayout":
        leaves, treedef = jax.tree.flatten(tree)
        for leaf in leaves:
            dt = np.dtype(leaf.dtype)
            if dt.itemsize != 4 and dt != np.bool_:
                raise TypeError(f"only 4-byte and bool leaves can be packed, got {dt}")
        return cls(treedef, tuple(tuple(x.shape) for x in leaves), tuple(np.dtype(x.dtype) for x in leaves))

    @functools.cached_property
    def offsets(self) -> tuple[int, ...]:
        """Each leaf's first word in the packed vector: 256-byte aligned."""
        out, off = [], 0
        for shape in self.shapes:
            out.append(off)
            off += _aligned(math.prod(shape))
        return tuple(out)

    @functools.cached_property
    def size(self) -> int:
        return sum(_aligned(math.prod(s)) for s in self.shapes)

    def pack(self, tree) -> np.ndarray:
        """Host side: the leaves of ``tree`` (numpy-convertible, matching the layout) as one int32 vector."""
        leaves = jax.tree.leaves(tree)
        out = np.zeros(self.size, np.int32)                   # the alignment gaps stay 0
        for leaf, shape, dt, off in zip(leaves, self.shapes, self.dtypes, self.offsets, strict=True):
            a = np.asarray(leaf, dtype=dt)
            if a.shape != shape:
                raise ValueError(f"packed leaf has shape {a.shape}, layout says {shape}")
            n = a.size
            out[off:off + n] = a.reshape(-1).astype(np.int32) if dt == np.bool_ else a.reshape(-1).view(np.int32)
        return out

    def unpack(self, packed):
        """Device side (inside jit): the pytree back from the int32 vector, by static slices."""
        leaves = []
        for shape, dt, off in zip(self.shapes, self.dtypes, self.offsets):
            n = math.prod(shape)
            words = packed[off:off + n].reshape(shape)
            if dt == np.bool_:
                leaves.append(words != 0)
            elif dt == np.int32:
                leaves.append(words)
            else:
                leaves.append(jax.lax.bitcast_convert_type(words, dt))
        return jax.tree.unflatten(self.treedef, leaves)


def pack_rows(arrays) -> jax.Array:
    """Device side: [S] / [S, k] int32 or float32 arrays side by side as one int32 [S, sum(k)] matrix."""
    cols = []
    for a in arrays:
        a = a.reshape(a.shape[0], -1)
        cols.append(a if a.dtype == jnp.int32 else jax.lax.bitcast_convert_type(a.astype(jnp.float32), jnp.int32))
    return jnp.concatenate(cols, axis=1)


def unpack_rows(matrix: np.ndarray, spec) -> list[np.ndarray]:
    """Host side: split ``pack_rows``' matrix back; ``spec`` lists (width, dtype, squeeze) per array."""
    out, off = [], 0
    for width, dt, squeeze in spec:
        block = matrix[:, off:off + width]
        block = block if np.dtype(dt) == np.int32 else np.ascontiguousarray(block).view(dt)
        out.append(block[:, 0] if squeeze else block)
        off += width
    return out
