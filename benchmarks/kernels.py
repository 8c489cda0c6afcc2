"""Attention-kernel benchmark on one GPU: correctness vs the jnp reference, then speed, in one run.

    PYTHONPATH=$PWD python benchmarks/kernels.py --out results.json [--plot results.png]
        [--quick] [--budget-s 420] [--commit HASH] [--tune [triton,mosaic]]
        [--decode-only | --prefill-only] [--profile] [--batches 32,64] [--contexts 2048,4096]
        [--no-write]
        [--interpret]

Decode: effective bandwidth = (KV bytes read + q + out bytes) / time, next to a device-to-device
copy measured in the same process, for batch x context (issue 4's matrix: 32 q heads, 8 kv heads,
head dim 128, bf16, page 16). Side by side: our Pallas kernels (the Triton-lowered default and the
Mosaic GPU one, ``kernel="mosaic"``, Hopper only), JAX's own
``jax.experimental.pallas.ops.gpu.paged_attention`` (its layout [Hkv, P, page, D] per layer), and
the XLA gather path (``model_zoo.attention.paged_attention_xla``, only where its gathered copy fits).
Prefill: causal attention TFLOP/s for 2k-8k-token chunks against a dense bf16 matmul; beside our
kernels, JAX's own FA3-style Mosaic GPU kernel (``attention_mgpu``) on the same chunk's K/V laid out
contiguously, the ceiling of a Hopper kernel without paging.

The K/V write (``write_kv`` rows): the decode kernel with this step's K/V written in (the model's
``new_kv``), timed the way a model step runs it: a scan over layers of one cache, the cache in the
carry and donated. Three variants per shape: the kernel alone, XLA's scatter then the kernel
(the unfused path), and the Triton kernel with the write fused (``triton+write``); the per-call
difference to the kernel alone is what the write costs. ``cache_copies`` counts copies of the whole
cache in the compiled fused step (should be 0: the kernel's caches alias its operands).
``--interpret`` is the CPU check of this script: our kernels in Pallas interpret mode on tiny
shapes, without the GPU-only comparisons; its timings mean nothing.

Timing: each call's inputs rotate over enough separate caches that the working set is far past L2;
calls are unrolled once per cache (decode) or query (prefill) copy inside one jitted executable (so
Python dispatch does not hide small kernels; never twice on one copy: XLA would merge identical
calls), and we take the median of several repetitions. With ``--profile`` every variant is also
traced: ``busy`` is the device time of the op's kernels per call (the union of their intervals),
``*_busy`` figures divide by it. The wall figure also holds launch gaps between the small XLA ops
around the kernel (measured on an H200: 30-45 us a call beside 90-600 us kernels), which a model
step's command buffers mostly hide; the issue's kernel targets are judged on both, busy first.
The script watches a wall-clock budget and writes what it has when it ends.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from model_zoo.attention import AttentionMetadata, paged_attention_xla
from pallas_kernels import mosaic_attention, mosaic_prefill
from pallas_kernels.paged_attention import paged_attention
from pallas_kernels.reference import paged_attention_reference
from pallas_kernels.testing import make_batch

from benchmarks.kernels_write import WRITE_IMPLS, bench_decode_write, fused_write_check, rel_err

H, HKV, D, PAGE = 32, 8, 128, 16
DECODE_IMPLS = ("pallas_triton", "pallas_mosaic", "jax_pallas_paged", "xla_gather")
BATCHES = (1, 8, 32, 64, 128, 256)
CONTEXTS = (512, 1024, 2048, 4096, 8192, 32768)
START = time.time()


def log(*a):
    print(f"[{time.time() - START:6.1f}s]", *a, flush=True)


def timed(fn, inputs, *, iters, reps=5):
    """Median seconds per call of fn(*inputs[i % len(inputs)]) over `reps` runs of `iters` calls."""
    jax.block_until_ready(fn(*inputs[0]))
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        out = None
        for i in range(iters):
            out = fn(*inputs[i % len(inputs)])
        jax.block_until_ready(out)
        times.append((time.perf_counter() - t0) / iters)
    return statistics.median(times)


def copy_bandwidth(nbytes=1 << 31, use_torch=True):
    """Bytes read + written per second by the fastest of a few 2 GiB device-to-device copies.

    The fraction-of-copy figures divide by the FASTEST one measured, which is the stricter bar.
    """
    found = {}
    for dtype in (jnp.bfloat16, jnp.float32):
        x = jax.random.normal(jax.random.key(0), (nbytes // jnp.dtype(dtype).itemsize,), dtype)
        f = jax.jit(lambda a: a + jnp.asarray(1, a.dtype))                # one read + one write
        found[f"xla_add_{jnp.dtype(dtype).name}"] = 2 * x.nbytes / timed(f, [(x,)], iters=20)
        del x
    try:
        if not use_torch:
            return max(found.values()), found
        import torch
        a = torch.empty(1 << 30, dtype=torch.bfloat16, device="cuda").normal_()
        b = torch.empty_like(a)
        for _ in range(3):
            b.copy_(a)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(20):
            b.copy_(a)
        end.record()
        torch.cuda.synchronize()
        found["torch_copy"] = 2 * a.nbytes * 20 / (start.elapsed_time(end) / 1e3)
        del a, b
        torch.cuda.empty_cache()
    except Exception as e:  # noqa: BLE001 - torch is optional; the XLA copies still count
        log("torch copy not measured:", e)
    return max(found.values()), found


def matmul_rate(n=8192):
    a = jax.random.normal(jax.random.key(1), (n, n), jnp.bfloat16)
    b = jax.random.normal(jax.random.key(2), (n, n), jnp.bfloat16)
    t = timed(jax.jit(jnp.matmul), [(a, b)], iters=10)
    return 2 * n ** 3 / t


def decode_inputs(batch, ctx, copies, dtype=jnp.bfloat16, seed=0):
    """`copies` independent single-layer caches, each exactly filled by the batch (pages shuffled)."""
    pps = ctx // PAGE
    num_pages = batch * pps + 1
    key = jax.random.key(seed)
    sets = []
    for c in range(copies):
        kk, kv, kq, kp, key = jax.random.split(key, 5)
        k = jax.random.normal(kk, (1, HKV, num_pages, PAGE, D), dtype)
        v = jax.random.normal(kv, (1, HKV, num_pages, PAGE, D), dtype)
        q = jax.random.normal(kq, (batch, H, D), dtype)
        tables = (1 + jax.random.permutation(kp, batch * pps)).reshape(batch, pps).astype(jnp.int32)
        md = AttentionMetadata(
            positions=jnp.full((batch,), ctx - 1, jnp.int32),
            token_seq_ids=jnp.arange(batch, dtype=jnp.int32),
            slot_mapping=tables[:, -1] * PAGE + PAGE - 1,
            block_tables=tables, seq_lens=jnp.full((batch,), ctx, jnp.int32),
            query_start_loc=jnp.arange(batch + 1, dtype=jnp.int32))
        sets.append((q, k, v, md))
    return sets


def correctness(results, interpret=False):
    """Small random ragged batches on the GPU: every implementation vs the jnp reference."""
    rng = np.random.default_rng(0)
    cases = []
    f32, bf16 = (np.float32, 1e-5), (jnp.bfloat16, 2e-2)
    for (dtype, tol), g, d, page, kw in ((f32, 4, 128, 16, {}),
                                         (f32, 16, 64, 16, {"sliding_window": 40}),
                                         (bf16, 4, 128, 16, {}),
                                         (bf16, 8, 128, 32, {"soft_cap": 30.0}),
                                         (bf16, 1, 64, 16, {"sliding_window": 40})):
        cases.append((dtype, tol, g, d, page, kw))
    for dtype, tol, g, d, page, kw in cases:
        hkv = 2
        dec = make_batch(rng, seq_lens=[1, 33, page * 5, 300], q_lens=[1, 1, 1, 1],
                         num_heads=g * hkv, num_kv_heads=hkv, head_dim=d, page_size=page,
                         pad_tokens=2, pad_seqs=1, dtype=dtype)
        pre = make_batch(rng, seq_lens=[1, 70, page * 6, 150], q_lens=[1, 70, 17, 64],
                         num_heads=g * hkv, num_kv_heads=hkv, head_dim=d, page_size=page,
                         pad_tokens=3, pad_seqs=1, dtype=dtype)
        for name, b, mql, n_pad in (("decode", dec, 1, 2), ("prefill", pre, None, 3)):
            args = (jnp.asarray(b.q), jnp.asarray(b.k_cache), jnp.asarray(b.v_cache),
                    jnp.int32(1), b.metadata())
            ref = paged_attention_reference(*args, scale=d ** -0.5, **kw)
            n = len(b.positions) - n_pad
            impls = {"pallas_triton": functools.partial(paged_attention, max_query_len=mql,
                                                        interpret=interpret)}
            # Where the Mosaic kernels do not support a shape the dispatcher runs Triton, which
            # must not be reported under their name.
            if mql == 1:
                why = mosaic_attention.unsupported_reason(
                    dtype=dtype, head_dim=d, group=g, page_size=page,
                    pages_per_block=max(1, 64 // page))
            else:
                why = mosaic_prefill.unsupported_reason(
                    dtype=dtype, head_dim=d, page_size=page, block_keys=128)
            if not interpret and why is None:
                impls["pallas_mosaic"] = functools.partial(paged_attention, max_query_len=mql,
                                                           kernel="mosaic")
            for impl, fn in impls.items():
                try:
                    err = rel_err(fn(*args, scale=d ** -0.5, **kw)[:n], ref[:n])
                except Exception as e:  # noqa: BLE001 - record and go on: the table says what failed
                    err = f"error: {type(e).__name__}: {str(e)[:300]}"
                ok = isinstance(err, float) and err <= tol
                results.append(dict(kind=name, impl=impl, dtype=np.dtype(dtype).name, group=g,
                                    head_dim=d, page_size=page, **kw, rel_err=err, ok=ok))
                if not ok:
                    log("CORRECTNESS FAIL", results[-1])
        # The K/V write fused into each decode kernel (Mosaic: on the GPU, where it supports the
        # shape; the interpreter runs TMA copies in order, so only the GPU shows store/load races).
        kernels = ["triton"]
        if not interpret and mosaic_attention.unsupported_reason(
                dtype=dtype, head_dim=d, group=g, page_size=page,
                pages_per_block=max(1, 64 // page)) is None:
            kernels.append("mosaic")
        for kernel in kernels:
            results.append(dict(kind="decode", impl=f"pallas_{kernel}+write",
                                dtype=np.dtype(dtype).name, group=g, head_dim=d, page_size=page,
                                **kw, **fused_write_check(rng, dec, 2, tol, interpret,
                                                          kernel=kernel, **kw)))
            if not results[-1]["ok"]:
                log("CORRECTNESS FAIL", results[-1])
    log(f"correctness: {sum(r['ok'] for r in results)}/{len(results)} ok")


def jax_paged(q, k, v, md, **kw):
    from jax.experimental.pallas.ops.gpu import paged_attention as jpa
    return jpa.paged_attention(q, k[0], v[0], md.block_tables, md.seq_lens, **kw)


def bench_decode(batch, ctx, copy_bw, tune, budget, interpret=False, profile=False, write=True):
    kv_bytes = batch * ctx * HKV * D * 2 * 2
    io_bytes = kv_bytes + 2 * batch * H * D * 2
    copies = max(1, min(8, math.ceil(512e6 / kv_bytes)))
    sets = decode_inputs(batch, ctx, copies)
    iters = 3 if interpret else max(3, min(200, int(2e9 / kv_bytes)))
    # One call per cache copy: identical calls on identical inputs would be merged by XLA's CSE.
    calls = copies
    row = dict(batch=batch, context=ctx, kv_bytes=kv_bytes,
               l2_resident=copies * kv_bytes < 3 * 60e6)  # working set within ~3x H200's L2
    scale = D ** -0.5

    def run(name, fn):
        if time.time() - START > budget:
            return
        try:
            # `calls` back-to-back calls inside ONE executable, rotating over the cache copies:
            # device time per call without Python dispatch (which would dominate small shapes).
            many = jax.jit(lambda sets: [fn(*sets[i % len(sets)]) for i in range(calls)])
            t = timed(many, [(sets,)], iters=max(3, iters // calls), reps=1 if interpret else 5)
            t /= calls
            row[name] = dict(us=t * 1e6, tb_s=io_bytes / t / 1e12, frac_copy=io_bytes / t / copy_bw)
            if profile:
                prof = device_time_per_kernel(lambda: many(sets), per=calls)
                busy = prof["busy"] * 1e-6
                row[name].update(device_us_per_call=prof, tb_s_busy=io_bytes / busy / 1e12,
                                 frac_copy_busy=io_bytes / busy / copy_bw)
        except Exception as e:  # noqa: BLE001 - a failing variant is reported, not fatal
            row[name] = dict(error=f"{type(e).__name__}: {str(e)[:300]}")

    ours = jax.jit(functools.partial(paged_attention, scale=scale, max_query_len=1,
                                     interpret=interpret))
    run("pallas_triton", lambda q, k, v, md: ours(q, k, v, jnp.int32(0), md))
    if not interpret:
        mosaic = jax.jit(functools.partial(paged_attention, scale=scale, max_query_len=1,
                                           kernel="mosaic"))
        run("pallas_mosaic", lambda q, k, v, md: mosaic(q, k, v, jnp.int32(0), md))
    max_pages = ctx // PAGE
    if "triton" in tune:
        for ppb, nw, ns in ((4, 4, 1), (4, 4, 2), (4, 4, 3), (8, 4, 1), (8, 4, 2), (8, 4, 3),
                            (8, 8, 2), (16, 8, 2)):
            for target in (1024, 4096):
                splits = max(1, min(-(-target // (batch * HKV)), max_pages // max(8, ppb)))
                f = jax.jit(functools.partial(paged_attention, scale=scale, max_query_len=1,
                                              pages_per_block=ppb, num_warps=nw, num_stages=ns,
                                              num_splits=splits))
                run(f"tune_ppb{ppb}_w{nw}_s{ns}_t{target}_splits{splits}",
                    lambda q, k, v, md, f=f: f(q, k, v, jnp.int32(0), md))
    if "mosaic" in tune and not interpret:
        # Mosaic ring: 64- or 128-key blocks, 2-4 stages; few splits (128-256 programs) too, since
        # each Mosaic CTA pays a setup (zeroed query tile, table and query TMAs) per split.
        for ppb, ns in ((4, 2), (4, 3), (4, 4), (8, 2), (8, 3)):
            for target in (128, 256, 1024):
                splits = max(1, min(-(-target // (batch * HKV)), max_pages // max(8, ppb)))
                f = jax.jit(functools.partial(paged_attention, scale=scale, max_query_len=1,
                                              kernel="mosaic", pages_per_block=ppb,
                                              num_stages=ns, num_splits=splits))
                run(f"tune_mosaic_ppb{ppb}_s{ns}_t{target}_splits{splits}",
                    lambda q, k, v, md, f=f: f(q, k, v, jnp.int32(0), md))
    if tune:
        for prefix in ("tune_ppb", "tune_mosaic"):
            key = "tb_s_busy" if profile else "tb_s"
            best = max((n for n in row if n.startswith(prefix) and key in row[n]),
                       key=lambda n: row[n][key], default=None)
            if best:
                log(f"  best variant {best}: {row[best][key]:.2f} TB/s ({key})")
    if not interpret:
        theirs = jax.jit(functools.partial(jax_paged, k_splits=min(16, ctx // PAGE // 2)))
        run("jax_pallas_paged", lambda q, k, v, md: theirs(q, k, v, md))
    if batch * ctx <= 64 * 1024:
        xla = jax.jit(functools.partial(paged_attention_xla, scale=scale))
        run("xla_gather", lambda q, k, v, md: xla(q, k, v, jnp.int32(0), md))
    line = f"decode B={batch:4d} ctx={ctx:6d} "
    for name in DECODE_IMPLS:
        if name in row and "tb_s" in row[name]:
            line += f"| {name} {row[name]['tb_s']:.2f} TB/s ({100 * row[name]['frac_copy']:.0f}%) "
        elif name in row:
            line += f"| {name} {row[name]['error'][:80]} "
    log(line)
    if write and time.time() - START <= budget:
        row["write_kv"] = bench_decode_write(sets, io_bytes, copy_bw, iters=iters,
                                             interpret=interpret)
        log(f"decode B={batch:4d} ctx={ctx:6d} K/V write, us per layer: " + " | ".join(
            f"{n} {r['us']:.1f}" if "us" in r else f"{n} {r['error'][:80]}"
            for n, r in row["write_kv"].items() if isinstance(r, dict) and n in WRITE_IMPLS)
            + f" | cache copies {row['write_kv']['cache_copies']}")
    return row


PREFILL_VARIANTS = {
    "pallas_triton": {},
    "bq16_ppb4_w4_s2": dict(block_q=16, pages_per_block=4, num_warps=4, num_stages=2),
    "bq32_ppb4_w4_s3": dict(block_q=32, pages_per_block=4, num_warps=4, num_stages=3),
    "bq32_ppb4_w8_s2": dict(block_q=32, pages_per_block=4, num_warps=8, num_stages=2),
    "bq32_ppb8_w8_s2": dict(block_q=32, pages_per_block=8, num_warps=8, num_stages=2),
    "bq64_ppb4_w8_s2": dict(block_q=64, pages_per_block=4, num_warps=8, num_stages=2),
    "bq32_ppb8_w4_s1": dict(block_q=32, pages_per_block=8, num_warps=4, num_stages=1),
}


def _jax_mgpu_dense(k, v, tables):
    """fn(q, kd, vd, block_kv) running jax.experimental.pallas.ops.gpu.attention_mgpu (causal,
    GQA) with the chunk's K/V laid out contiguously ([1, chunk, Hkv, D], as ``fn.kv``), or None
    where it cannot be imported."""
    try:
        from jax.experimental.pallas.ops.gpu import attention_mgpu
    except Exception as e:  # noqa: BLE001 - an optional comparison
        log("jax attention_mgpu not available:", e)
        return None
    pages = tables[0]
    kd = k[0][:, pages].reshape(HKV, -1, D).transpose(1, 0, 2)[None].astype(jnp.float16)
    vd = v[0][:, pages].reshape(HKV, -1, D).transpose(1, 0, 2)[None].astype(jnp.float16)

    def call(q, kd, vd, block_kv):
        config = attention_mgpu.TuningConfig(block_q=64, block_kv=block_kv,
                                             max_concurrent_steps=2, causal=True)
        return attention_mgpu.attention(q[None].astype(jnp.float16), kd, vd, config)
    call.kv = (kd, vd)
    return call


def device_time_per_kernel(f, runs=5, per=1):
    """Device microseconds per attention call, from a jax.profiler trace of ``runs`` runs of f
    (each making ``per`` attention calls): ``busy`` (the union of all kernels' intervals),
    ``wall`` (host clock) and the top kernels by name. Busy time is the op's own cost: the wall
    clock of a timing loop also holds launch gaps between the small XLA ops around the kernel
    (item lists, padding, the split combine), which a model step's command buffers mostly hide."""
    import tempfile
    from benchmarks.gpu_profile import _normalize, device_events, load_trace, union_us
    jax.block_until_ready(f())
    with tempfile.TemporaryDirectory() as d:
        jax.profiler.start_trace(d, create_perfetto_trace=True)
        t0 = time.perf_counter()
        for _ in range(runs):
            out = f()
        jax.block_until_ready(out)
        wall = time.perf_counter() - t0
        jax.profiler.stop_trace()
        events, _ = device_events(load_trace(d))
    calls = runs * per
    by_name = {}
    for e in events:
        by_name[_normalize(e["name"])] = by_name.get(_normalize(e["name"]), 0.0) + e["dur"]
    busy = union_us([(e["ts"], e["ts"] + e["dur"]) for e in events])
    top = sorted(by_name.items(), key=lambda kv: -kv[1])[:8]
    return dict(busy=round(busy / calls, 2), wall=round(wall / calls * 1e6, 2),
                kernels={k: round(v / calls, 2) for k, v in top})


def bench_prefill(chunk, mm_rate, budget, tune, interpret=False, profile=False):
    if time.time() - START > budget:
        return None
    pps = chunk // PAGE
    key = jax.random.key(7)
    kk, kv, kq, kp = jax.random.split(key, 4)
    k = jax.random.normal(kk, (1, HKV, pps + 1, PAGE, D), jnp.bfloat16)
    v = jax.random.normal(kv, (1, HKV, pps + 1, PAGE, D), jnp.bfloat16)
    # Distinct query copies, one call each inside ONE executable (as decode does): Python
    # dispatch of single calls hid the 2k chunk's kernel (0.36 ms a call for ~0.15 ms of device
    # time), and identical calls would be merged by CSE.
    copies = 2 if interpret else 4
    qs = [jax.random.normal(jax.random.fold_in(kq, i), (chunk, H, D), jnp.bfloat16)
          for i in range(copies)]
    tables = (1 + jax.random.permutation(kp, pps)).reshape(1, pps).astype(jnp.int32)
    md = AttentionMetadata(
        positions=jnp.arange(chunk, dtype=jnp.int32), token_seq_ids=jnp.zeros(chunk, jnp.int32),
        slot_mapping=jnp.zeros(chunk, jnp.int32), block_tables=tables,
        seq_lens=jnp.array([chunk], jnp.int32), query_start_loc=jnp.array([0, chunk], jnp.int32))
    flops = 4 * H * D * chunk * (chunk + 1) / 2                         # causal: QK^T and PV
    row = dict(chunk=chunk, flops=flops)

    def run(name, fn, args):
        # fn(q, *args) -> out; args are the other (shared, read-only) operands.
        try:
            many = jax.jit(lambda qs, args: [fn(qi, *args) for qi in qs])
            t = timed(many, [(qs, args)], iters=1 if interpret else 5,
                      reps=1 if interpret else 5) / copies
            row[name] = dict(ms=t * 1e3, tflops=flops / t / 1e12, frac_matmul=flops / t / mm_rate)
            if profile:
                prof = device_time_per_kernel(lambda: many(qs, args), per=copies)
                busy = prof["busy"] * 1e-6
                row[name].update(device_us_per_call=prof, tflops_busy=flops / busy / 1e12,
                                 frac_matmul_busy=flops / busy / mm_rate)
        except Exception as e:  # noqa: BLE001 - a failing variant is reported, not fatal
            row[name] = dict(error=f"{type(e).__name__}: {str(e)[:300]}")

    variants = dict(PREFILL_VARIANTS if "triton" in tune else {"pallas_triton": {}})
    if not interpret:
        variants["pallas_mosaic"] = dict(kernel="mosaic")
    if "mosaic" in tune and not interpret:
        # block_q 128 = two compute warpgroups fed by a producer warpgroup, 64 = one; 64- or
        # 128-key blocks; 2-3 stages (plans that do not fit shared memory shrink the ring).
        for bq, ppb, ns in ((128, 8, 2), (128, 4, 2), (128, 4, 3), (64, 8, 2), (64, 4, 2),
                            (64, 4, 3)):
            variants[f"mosaic_bq{bq}_ppb{ppb}_s{ns}"] = dict(kernel="mosaic", block_q=bq,
                                                             pages_per_block=ppb, num_stages=ns)
    for name, kw in variants.items():
        f = functools.partial(paged_attention, scale=D ** -0.5, interpret=interpret, **kw)
        run(name, lambda q, k, v, md, f=f: f(q, k, v, jnp.int32(0), md), (k, v, md))
    if not interpret:
        # The ceiling of a Hopper kernel on this problem: JAX's own FA3-style Mosaic GPU kernel
        # (two compute warpgroups + a TMA warpgroup) on CONTIGUOUS K/V of one sequence, i.e. with
        # none of the paging, ragged batching or layout work ours does.
        dense = _jax_mgpu_dense(k, v, tables)   # fp16: the kernel's SMEM tiles are fp16
        if dense is not None:
            for block_kv in (64, 128):
                run(f"jax_mgpu_dense_bkv{block_kv}",
                    lambda q, kd, vd, block_kv=block_kv: dense(q, kd, vd, block_kv), dense.kv)
    log(f"prefill chunk={chunk}", {n: r for n, r in row.items() if isinstance(r, dict)})
    return row


def plot(report, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    impls = ("pallas_triton", "pallas_mosaic", "jax_pallas_paged")
    fig, axes = plt.subplots(1, len(impls), figsize=(6.5 * len(impls), 5))
    for ax, impl in zip(axes, impls):
        for b in BATCHES:
            pts = [(r["context"], r[impl].get("frac_copy_busy", r[impl]["frac_copy"]) * 100)
                   for r in report["decode"]
                   if r["batch"] == b and "frac_copy" in r.get(impl, {})]
            if pts:
                ax.plot(*zip(*pts), marker="o", label=f"batch {b}")
        ax.axhline(90, ls="--", c="gray")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("context")
        ax.set_ylabel("% of D2D copy bandwidth (device busy time where traced)")
        ax.set_title(f"decode, {impl} ({report['device']})")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--plot")
    ap.add_argument("--quick", action="store_true", help="a few shapes only")
    ap.add_argument("--tune", nargs="?", const="triton,mosaic", default="",
                    help="sweep block sizes too: 'triton', 'mosaic' or both (the default), "
                         "for decode and prefill")
    ap.add_argument("--decode-only", action="store_true", help="skip the prefill chunks")
    ap.add_argument("--profile", action="store_true",
                    help="also trace our main decode and prefill variants: device time per kernel and "
                         "busy time per call")
    ap.add_argument("--prefill-only", action="store_true",
                    help="skip the decode matrix (the correctness rows still run)")
    ap.add_argument("--interpret", action="store_true",
                    help="CPU check of this script: our kernels in Pallas interpret mode on tiny "
                         "shapes, GPU-only comparisons skipped (its timings mean nothing)")
    ints = lambda text: tuple(int(x) for x in text.split(","))  # noqa: E731
    ap.add_argument("--batches", type=ints, default=BATCHES,
                    help="decode matrix rows, comma-separated (default: issue 4's)")
    ap.add_argument("--contexts", type=ints, default=CONTEXTS,
                    help="decode matrix columns, comma-separated (default: issue 4's)")
    ap.add_argument("--no-write", action="store_true",
                    help="skip the fused K/V write rows (a scan over layers per shape)")
    ap.add_argument("--budget-s", type=float, default=420)
    ap.add_argument("--commit", default="unknown")
    args = ap.parse_args(argv)
    dev = jax.devices()[0]
    report = dict(device=dev.device_kind, jax=jax.__version__, commit=args.commit,
                  shape=dict(q_heads=H, kv_heads=HKV, head_dim=D, page_size=PAGE, dtype="bfloat16"),
                  interpret=args.interpret, correctness=[], decode=[], prefill=[])

    def save():
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)

    small = args.interpret                  # the CPU check: small ceilings, no torch
    report["copy_bytes_per_s"], report["copy_measurements"] = copy_bandwidth(
        1 << 24 if small else 1 << 31, use_torch=not small)
    report["matmul_flops"] = matmul_rate(256 if small else 8192)
    log(f"{dev.device_kind} jax {jax.__version__}: copy {report['copy_bytes_per_s'] / 1e12:.2f} TB/s"
        f" {({k: round(v / 1e12, 2) for k, v in report['copy_measurements'].items()})},"
        f" bf16 matmul {report['matmul_flops'] / 1e12:.0f} TFLOP/s")
    correctness(report["correctness"], interpret=args.interpret)
    save()
    shapes = [(b, c) for b in args.batches for c in args.contexts]
    if args.quick:
        shapes = [(32, 2048), (128, 4096), (1, 32768), (8, 8192), (256, 1024)]
    if args.interpret:
        shapes = [(2, 128)]
    if args.prefill_only:
        shapes = []
    # Prefill first: three chunks, quick; the decode matrix then runs until the budget ends.
    chunks = (64,) if args.interpret else (2048, 4096, 8192)
    for chunk in () if args.decode_only else chunks:
        row = bench_prefill(chunk, report["matmul_flops"], args.budget_s,
                            set(args.tune.split(",")) - {""},
                            interpret=args.interpret, profile=args.profile)
        if row:
            report["prefill"].append(row)
            save()
    for b, c in shapes:
        tune = set(args.tune.split(",")) - {""} if not args.interpret and (b, c) in (
            (32, 2048), (128, 4096), (1, 32768), (256, 1024), (8, 8192)) else set()
        report["decode"].append(bench_decode(b, c, report["copy_bytes_per_s"], tune,
                                             args.budget_s, interpret=args.interpret,
                                             profile=args.profile, write=not args.no_write))
        save()
    print("\n| batch | context | pallas triton (TB/s, % copy) | pallas mosaic | jax pallas paged "
          "| xla gather |")
    print("|---|---|---|---|---|---|")
    for r in report["decode"]:
        cells = []
        for name in DECODE_IMPLS:
            c = r.get(name)
            busy = (f"; busy {c['tb_s_busy']:.2f} ({100 * c['frac_copy_busy']:.0f}%)"
                    if c and "tb_s_busy" in c else "")
            cells.append("-" if not c else (f"{c['tb_s']:.2f} ({100 * c['frac_copy']:.0f}%){busy}"
                                            if "tb_s" in c else "error"))
        mark = " (L2)" if r.get("l2_resident") else ""
        print(f"| {r['batch']} | {r['context']}{mark} | " + " | ".join(cells) + " |")
    print("\n| batch | context | layers | " + " | ".join(f"{n} (us/layer)" for n in WRITE_IMPLS)
          + " | write saves (us/layer) | cache copies (scatter / write) |")
    print("|---|---|---|" + "---|" * (len(WRITE_IMPLS) + 2))
    for r in report["decode"]:
        w = r.get("write_kv")
        if not w:
            continue
        us = {n: w[n]["us"] if "us" in w.get(n, {}) else None for n in WRITE_IMPLS}
        cells = ["-" if n not in w else "error" if us[n] is None else f"{us[n]:.1f}"
                 for n in WRITE_IMPLS]
        a, b = us["triton+scatter"], us["triton+write"]
        saved = "-" if None in (a, b) else f"{a - b:.1f}"
        copies = w["cache_copies"]
        print(f"| {r['batch']} | {r['context']} | {w['layers']} | " + " | ".join(cells)
              + f" | {saved} | {copies.get('triton+scatter', '-')} / "
              f"{copies.get('triton+write', '-')} |")
    for r in report["prefill"]:
        for name, c in r.items():
            if isinstance(c, dict) and "tflops" in c:
                busy = (f"; device busy {c['tflops_busy']:.0f} TFLOP/s = "
                        f"{100 * c['frac_matmul_busy']:.0f}%" if "tflops_busy" in c else "")
                print(f"prefill {r['chunk']} {name}: {c['tflops']:.0f} TFLOP/s = "
                      f"{100 * c['frac_matmul']:.0f}% of bf16 matmul{busy}")
    if args.plot:
        try:
            plot(report, args.plot)
        except Exception as e:  # noqa: BLE001 - the JSON is the result; the plot is a courtesy
            log("plot failed:", e)
    log("done")
    return 0


if __name__ == "__main__":
    sys.exit(main())
