"""Pipeline parallelism: the stacked decoder layers split into stages over one mesh axis.

`make_pipeline(mesh, axis, num_micro_batches)` returns a layer stack with the model's hook
signature (model_zoo/llama.py `scan_layers`): ``(layer_fn, h, kv, params, per_token, shared) ->
(h, kv)``. Parameters and KV caches are sharded on their leading (layers) axis over `axis`, so
stage s holds layers [s*L/S, (s+1)*L/S) and their cache. Inside a `shard_map` that is manual over
the pipeline axis only (tensor-parallel axes stay automatic, partitioned by GSPMD), the flat batch
of T tokens is cut into M micro-batches and run as a GPipe-style wavefront:

    tick:      0     1     2     3            (S = 2 stages, M = 3 micro-batches)
    stage 0:  mb0   mb1   mb2    -
    stage 1:   -    mb0   mb1   mb2

At each tick every stage runs its layers on what it holds and passes the result to the next stage
(one collective-permute of [T/M, E]); M + S - 1 ticks in all, so the bubble is (S-1)/(M+S-1).
A stage in a bubble computes on stale data but its K/V writes go to the null page (``valid``), so
the cache only ever sees real tokens. Micro-batches of one prompt stay causal: micro-batch i reaches
stage s one tick before micro-batch i+1, so its keys are in that stage's cache when i+1 reads them.
The last stage's outputs reach every device with one all-reduce over the pipeline axis (a sum
with zeros, which is exact).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P


def micro_batches_for(num_tokens: int, requested: int) -> int:
    """The largest count <= requested that divides the token bucket (1 always does)."""
    for m in range(max(1, min(requested, num_tokens)), 0, -1):
        if num_tokens % m == 0:
            return m
    return 1


def make_pipeline(mesh: jax.sharding.Mesh, axis: str, num_micro_batches: int, *,
                  unroll: bool = False):
    """`unroll`: each stage runs its layers as straight-line code (faster decode on GPU, where a
    scan materialises each layer's weight slice; compile time grows with depth)."""
    stages = mesh.shape[axis]
    if num_micro_batches < 1:
        raise ValueError(f"num_micro_batches must be at least 1; got {num_micro_batches}")

    def layer_stack(layer_fn, h, kv, params, per_token, shared):
        num_tokens, hidden = h.shape
        m = micro_batches_for(num_tokens, num_micro_batches)
        mb = num_tokens // m
        layer_spec = jax.tree.map(lambda _: P(axis), (kv, params))

        @functools.partial(
            jax.shard_map, mesh=mesh, axis_names=frozenset({axis}), check_vma=False,
            in_specs=(P(), layer_spec[0], layer_spec[1], P(), P()),
            out_specs=(P(), layer_spec[0]))
        def run(h, kv, params, per_token, shared):
            stage = jax.lax.axis_index(axis)
            layers_per_stage = jax.tree.leaves(params)[0].shape[0]
            h_mb = h.reshape(m, mb, hidden)
            tok_mb = jax.tree.map(lambda a: a.reshape(m, mb, *a.shape[1:]), per_token)

            def run_stage(x, kv, tok, valid):
                if unroll:
                    for i in range(layers_per_stage):
                        p = jax.tree.map(lambda a, i=i: a[i], params)
                        x, kv = layer_fn(x, kv, p, jnp.int32(i), tok, shared, valid)
                    return x, kv

                def body(carry, xs):
                    x, kv = carry
                    p, layer = xs
                    return layer_fn(x, kv, p, layer, tok, shared, valid), None

                ids = jnp.arange(layers_per_stage, dtype=jnp.int32)
                (x, kv), _ = jax.lax.scan(body, (x, kv), (params, ids))
                return x, kv

            def tick(carry, t):
                cur, kv, outs = carry
                i = t - stage                      # the micro-batch this stage holds now
                valid = (i >= 0) & (i < m)
                idx = jnp.clip(i, 0, m - 1)
                x = jnp.where(stage == 0, h_mb[idx], cur)
                tok = jax.tree.map(lambda a: a[idx], tok_mb)
                y, kv = run_stage(x, kv, tok, valid)
                store = valid & (stage == stages - 1)
                outs = outs.at[idx].set(jnp.where(store, y, outs[idx]))
                cur = jax.lax.ppermute(y, axis, [(s, (s + 1) % stages) for s in range(stages)])
                return (cur, kv, outs), None

            init = (jnp.zeros((mb, hidden), h.dtype), kv, jnp.zeros((m, mb, hidden), h.dtype))
            (_, kv, outs), _ = jax.lax.scan(tick, init, jnp.arange(m + stages - 1))
            out = jnp.where(stage == stages - 1, outs.reshape(num_tokens, hidden), 0)
            return jax.lax.psum(out, axis), kv

        return run(h, kv, params, per_token, shared)

    return layer_stack
