"""The K/V-write rows of benchmarks/kernels.py (its docstring says what they measure): the fused
write's correctness check and the layer-scan timing of kernel alone / XLA scatter + kernel / the
write fused into the Triton decode kernel, with the whole-cache copies counted in the HLO."""

from __future__ import annotations

import dataclasses
import functools
import re
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from model_zoo.attention import write_kv
from pallas_kernels.paged_attention import paged_attention
from pallas_kernels.reference import paged_attention_reference

# The write_kv rows: kernel alone, XLA scatter then kernel, write fused into the kernel; on the GPU
# also the Mosaic decode kernel after the scatter and with its own fused write, and kernel="auto"
# (the engine's "pallas" backend, which picks a kernel by the grid's size): per-layer cost of each
# way to run a decode layer. The Mosaic interpreter is too slow for the GPU-only rows on the CPU.
WRITE_IMPLS = ("triton", "triton+scatter", "triton+write", "mosaic+scatter", "mosaic+write",
               "auto+write")
GPU_ONLY_WRITE_IMPLS = ("mosaic+scatter", "mosaic+write", "auto+write")


def rel_err(out, ref):
    out = np.asarray(out, np.float64)
    ref = np.asarray(ref, np.float64)
    if not np.isfinite(out).all():
        return float("nan")
    return float(np.linalg.norm(out - ref) / np.linalg.norm(ref))


def fused_write_check(rng, b, n_pad, tol, interpret, kernel="triton", **kw):
    """The decode kernel with this step's K/V written in (``new_kv``) against write_kv then the
    reference: output within ``tol``, the returned caches equal to write_kv's bit for bit. The new
    keys differ from what the cache holds at their slots; padding slots are out of range."""
    t, d = len(b.positions), b.q.shape[-1]
    slots = b.slot_mapping.copy()
    slots[t - n_pad:] = b.k_cache.shape[2] * b.k_cache.shape[3]
    md = dataclasses.replace(b.metadata(), slot_mapping=jnp.asarray(slots))
    new_kv = tuple(jnp.asarray(rng.standard_normal((t, b.k_cache.shape[1], d)), b.q.dtype)
                   for _ in range(2))
    q, caches = jnp.asarray(b.q), (jnp.asarray(b.k_cache), jnp.asarray(b.v_cache))
    want_k, want_v = write_kv(*caches, 1, *new_kv, md.slot_mapping)
    ref = paged_attention_reference(q, want_k, want_v, jnp.int32(1), md, scale=d ** -0.5, **kw)
    try:
        out, k, v = paged_attention(q, *caches, jnp.int32(1), md, scale=d ** -0.5,
                                    max_query_len=1, new_kv=new_kv, interpret=interpret,
                                    kernel=kernel, **kw)
        err = rel_err(out[:t - n_pad], ref[:t - n_pad])
        exact = bool(jnp.array_equal(k, want_k) and jnp.array_equal(v, want_v))
    except Exception as e:  # noqa: BLE001 - record and go on: the table says what failed
        err, exact = f"error: {type(e).__name__}: {str(e)[:300]}", False
    return dict(rel_err=err, caches_exact=exact,
                ok=isinstance(err, float) and err <= tol and exact)


def _cache_copies(hlo: str, shape) -> int:
    """Copies of a whole [L, Hkv, P, page, D] cache in compiled HLO text."""
    dims = ",".join(map(str, shape))
    return len(re.findall(rf"\[{dims}\]\{{[^}}]*\}} copy(?:-start)?\(", hlo))


def bench_decode_write(sets, io_bytes, copy_bw, *, iters, interpret):
    """The K/V write rows (module docstring): the cache copies stacked as the layers of one cache,
    one scan over them per call, cache carried and donated, copy 0's queries and metadata."""
    q, _, _, md = sets[0]
    layers = len(sets)
    caches = [jnp.concatenate([s[1] for s in sets]), jnp.concatenate([s[2] for s in sets])]
    hkv, d = sets[0][1].shape[1], q.shape[-1]
    new_k, new_v = (jax.random.normal(key, (layers, q.shape[0], hkv, d), q.dtype)
                    for key in jax.random.split(jax.random.key(9)))
    def step(variant, kc, vc, q, md, new_k, new_v):
        kernel, _, how = variant.partition("+")
        attn = functools.partial(paged_attention, scale=d ** -0.5, max_query_len=1,
                                 interpret=interpret, kernel=kernel)

        def layer(carry, xs):
            kc, vc = carry
            i, k, v = xs
            if how == "write":
                out, kc, vc = attn(q, kc, vc, i, md, new_kv=(k, v))
            else:
                if how == "scatter":
                    kc, vc = write_kv(kc, vc, i, k, v, md.slot_mapping)
                out = attn(q, kc, vc, i, md)
            return (kc, vc), out
        (kc, vc), outs = jax.lax.scan(layer, (kc, vc), (jnp.arange(layers, dtype=jnp.int32),
                                                        new_k, new_v))
        return kc, vc, outs

    result = dict(layers=layers, cache_copies={})
    calls = max(2, iters // layers)
    for variant in WRITE_IMPLS:
        if interpret and variant in GPU_ONLY_WRITE_IMPLS:
            continue
        try:
            args = (q, md, new_k, new_v)
            fn = jax.jit(functools.partial(step, variant), donate_argnums=(0, 1)).lower(
                *caches, *args).compile()
            result["cache_copies"][variant] = _cache_copies(fn.as_text(), caches[0].shape)
            kc, vc, out = fn(*caches, *args)                               # warm-up
            jax.block_until_ready(out)
            times = []
            for _ in range(1 if interpret else 5):
                t0 = time.perf_counter()
                for _ in range(calls):
                    kc, vc, out = fn(kc, vc, *args)
                jax.block_until_ready((kc, vc, out))
                times.append((time.perf_counter() - t0) / (calls * layers))
            caches = [kc, vc]      # the donated inputs are gone; the returned caches carry on
            t = statistics.median(times)
            result[variant] = dict(us=t * 1e6, tb_s=io_bytes / t / 1e12,
                                   frac_copy=io_bytes / t / copy_bw)
        except Exception as e:  # noqa: BLE001 - a failing variant is reported, not fatal
            result[variant] = dict(error=f"{type(e).__name__}: {str(e)[:300]}")
    return result
