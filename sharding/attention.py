"""Shard-local attention under tensor parallelism: each device attends with its own heads only.

A Pallas kernel is an opaque custom call that GSPMD cannot partition: left to it, a kernel whose
query heads and KV cache are split over tp would be all-gathered (or refused) around every call.
`shard_local_attention` wraps the model's attention function in a `jax.shard_map` that is manual
over the mesh axes the query heads are split on, so every device runs the kernel on its own shard
with no collective at all; the XLA backend goes through the same wrap (it is per-head too, and the
wrap makes "no collectives in attention" hold by construction rather than by propagation).

    q [T, Hq, D]:                 heads split  -> [T, Hq/n, D] per device
    k/v cache [L, Hkv, P, pg, D]: heads split  -> [L, Hkv/n, ...]    (n divides Hkv)
                                  replicated   -> [L, Hkv, ...]      (otherwise: see below)
    metadata, layer index:        replicated
    output [T, Hq, D]:            heads split, as q
    new_kv k/v [T, Hkv, D]:       heads split as the cache, written inside the map (the backend
                                  may fuse the write into its kernel); with a replicated cache,
                                  written by GSPMD outside the map (see below)

A replicated cache (n exceeds or does not divide the KV heads; sharding/layout.py) holds every KV
head on every device, and device i's query heads [i*Hq/n, (i+1)*Hq/n) use KV heads
[lo_i, hi_i) = [i*Hq/n // G, ((i+1)*Hq/n - 1) // G + 1), G = Hq/Hkv. The cache is viewed, without
a copy (a reshape of its leading dims), as [L*Hkv/b, b, P, pg, D]: row ``layer*Hkv/b + lo_i//b``
is the aligned block of b KV heads holding that window, with b the smallest divisor of Hkv for
which every device's window fits one block. The kernel then reads only those b heads' pages:

    Hq 8, Hkv 2, n 4:  G 4, 2 q heads a device, window 1 KV head  -> b 1 (no extra work)
    Hq 12, Hkv 3, n 2: G 4, 6 q heads a device, windows [0,2) and [1,3) -> b 3 (whole cache)

On a GPU the view is a bitcast feeding the kernel's custom call: on 2 x H200 (JAX 0.11.2) the
compiled step of a TP 2 model with the cache replicated by a rule holds no copy of the cache, no
all-gather, and matches one device. Pallas' CPU interpreter instead carries the cache through its
loops and XLA copies it around the view there (a few per layer): interpret-mode tests only.

When b*G exceeds the device's query heads (its window covers part of a group, as in the second
example) its queries are placed in a zero [T, b*G, D] block and the output sliced back: the
kernel then reads b/(hi-lo) times the pages it needs and computes the zero rows, at worst all KV
heads (the single-device cost, no TP speed-up for attention). Only shapes where n neither divides
nor is a multiple of Hkv pay it; b == 1 (n a multiple of Hkv, e.g. MQA) costs nothing extra.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
from typing import Callable

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from pallas_kernels.reference import attend_after_write

logger = logging.getLogger("jaxllm")


@dataclasses.dataclass(frozen=True)
class KVWindows:
    """Which block of a replicated KV cache each of n head shards reads (see the module docstring)."""

    block_heads: int             # b: KV heads in one block of the cache view
    blocks: tuple[int, ...]      # per shard: its block index (the view's row within a layer)
    q_offsets: tuple[int, ...]   # per shard: where its query heads start among the block's b*G

    @classmethod
    def for_heads(cls, num_heads: int, num_kv_heads: int, shards: int) -> "KVWindows":
        if num_heads % num_kv_heads or num_heads % shards:
            raise ValueError(f"{num_heads} query heads must be a multiple of the {num_kv_heads} KV "
                             f"heads and of the {shards} head shards")
        group = num_heads // num_kv_heads
        local = num_heads // shards
        lo = [i * local // group for i in range(shards)]
        hi = [((i + 1) * local - 1) // group + 1 for i in range(shards)]
        for b in (d for d in range(1, num_kv_heads + 1) if num_kv_heads % d == 0):
            if all(lo_i // b == (hi_i - 1) // b for lo_i, hi_i in zip(lo, hi)):
                blocks = tuple(lo_i // b for lo_i in lo)
                return cls(b, blocks, tuple(i * local - blk * b * group
                                            for i, blk in enumerate(blocks)))
        raise AssertionError("unreachable: b = num_kv_heads always fits")


def shard_local_attention(attention_fn: Callable, mesh, config, head_axes: tuple[str, ...],
                          kv_split: bool) -> Callable:
    """`attention_fn` (signature of model_zoo.attention.paged_attention_xla) run per head shard.

    Keeps the backend contract (model_zoo/attention.py): with ``new_kv=(k, v)`` it returns
    ``(out, k_cache, v_cache)``. A head-split cache gets its new K/V inside the map, shard-local
    (a backend may fuse the write into its kernel); a replicated one is written outside it.

    head_axes: the mesh axes the query heads are split over (not a pipeline axis: that one is
    manual already inside a stage); kv_split: the KV cache is split over the same axes (else it
    is replicated over them). `mesh` is used outside a pipeline stage; inside one the ambient
    abstract mesh (pipeline axis manual) is.
    """
    shards = math.prod(mesh.shape[a] for a in head_axes)
    heads = head_axes[0] if len(head_axes) == 1 else head_axes
    hq, hkv = config.num_heads, config.num_kv_heads
    windows = None if kv_split else KVWindows.for_heads(hq, hkv, shards)
    if windows is not None and 1 < windows.block_heads and windows.block_heads * (hq // hkv) > hq // shards:
        logger.warning("Attention: %d query heads per device cover part of a KV group (%d KV heads "
                       "replicated over %d devices); each device's kernel reads %d KV heads",
                       hq // shards, hkv, shards, windows.block_heads)
    cache_spec = P(None, heads) if kv_split else P()

    def local(q, k_cache, v_cache, layer, md, **kwargs):
        # q [T, Hq/n, D]; caches [L, Hkv/n or Hkv, P, pg, D]; md and layer whole.
        if windows is None:
            return attention_fn(q, k_cache, v_cache, layer, md, **kwargs)
        b = windows.block_heads
        shard = jax.lax.axis_index(head_axes)
        num_layers = k_cache.shape[0]
        view = lambda c: c.reshape(num_layers * (hkv // b), b, *c.shape[2:])  # noqa: E731 (no copy)
        row = layer * (hkv // b) + jnp.asarray(windows.blocks, jnp.int32)[shard]
        t, local_heads, d = q.shape
        width = b * (hq // hkv)
        if width == local_heads or b == 1:
            # The whole window (b == 1: one KV head, any number of its queries) is the kernel's.
            return attention_fn(q, view(k_cache), view(v_cache), row, md, **kwargs)
        offset = jnp.asarray(windows.q_offsets, jnp.int32)[shard]
        zero = jnp.zeros((), jnp.int32)
        q_block = jax.lax.dynamic_update_slice(jnp.zeros((t, width, d), q.dtype), q, (zero, offset, zero))
        out = attention_fn(q_block, view(k_cache), view(v_cache), row, md, **kwargs)
        return jax.lax.dynamic_slice(out, (zero, offset, zero), (t, local_heads, d))

    def attend(q, k_cache, v_cache, layer, md, *, new_kv=None, **kwargs):
        ambient = jax.sharding.get_abstract_mesh()
        in_stage = not ambient.empty and bool(ambient.manual_axes)
        layer = jnp.asarray(layer, jnp.int32)
        shard_map = functools.partial(jax.shard_map, mesh=ambient if in_stage else mesh,
                                      axis_names=frozenset(head_axes), check_vma=False)
        if new_kv is not None and windows is not None:
            # A replicated cache: GSPMD scatters the new K/V into every copy, outside the map
            # (the kernel's view of a KV-head block has no slot for heads outside it).
            return attend_after_write(attend, q, k_cache, v_cache, layer, md, new_kv, **kwargs)
        if new_kv is None:
            mapped = shard_map(
                lambda q, kc, vc, layer, md: local(q, kc, vc, layer, md, **kwargs),
                in_specs=(P(None, heads), cache_spec, cache_spec, P(), P()),
                out_specs=P(None, heads))
            return mapped(q, k_cache, v_cache, layer, md)
        # Heads split: each device writes its own KV heads' new K/V (split like the cache: [T, Hkv, D]
        # on axis 1) and returns its cache shard; still no collective.
        mapped = shard_map(
            lambda q, kc, vc, layer, md, new_kv: local(q, kc, vc, layer, md, new_kv=new_kv,
                                                       **kwargs),
            in_specs=(P(None, heads), cache_spec, cache_spec, P(), P(), P(None, heads)),
            out_specs=(P(None, heads), cache_spec, cache_spec))
        return mapped(q, k_cache, v_cache, layer, md, tuple(new_kv))

    attend.shard_local = attention_fn   # marks the wrap (attach does not wrap twice)
    return attend
