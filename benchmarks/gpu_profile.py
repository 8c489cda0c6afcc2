"""Where does a decode step's time go? A device profile of the engine, summarised as a table.

For each batch size: B requests with a ``--ctx``-token prompt are prefilled, then ``--steps`` decode
steps run under ``jax.profiler.trace`` (Perfetto JSON). The trace is parsed here, with no
TensorBoard: device kernels are grouped by category and by name, and the step's wall time is split
into device-busy time (the union of kernel intervals) and device-idle time (gaps inside and between
steps: launch latency, host work on the critical path). The same run times the step without the
profiler, and measures a device-to-device copy so the weight-streaming roofline is this device's.

    PYTHONPATH=$PWD python benchmarks/gpu_profile.py --batch 1,64 --out $OUT
    PYTHONPATH=$PWD python benchmarks/gpu_profile.py --batch 1,64 --async-scheduling --tag async --out $OUT
    python benchmarks/gpu_profile.py --model /tmp/tiny --dtype float32 --attention-backend xla --batch 1,4  # CPU smoke

Issue 8 reads two figures from it: batch-1 ITL against the roofline, and the GPU idle share at batch 64.
"""

from __future__ import annotations

import argparse
import collections
import datetime
import glob
import gzip
import json
import os
import re
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.gpu_engine import _commit, write_result  # noqa: E402

# Kernel name -> category, first match wins. Names come from XLA (fusions, cuBLAS/cuBLASLt, nvjet,
# cutlass), Pallas (the kernel body's Python name) and the CUDA runtime (memcpy/memset).
_CATEGORIES = (
    ("collective", re.compile(r"nccl|all[-_]?reduce|all[-_]?gather|reduce[-_]scatter|collective", re.I)),
    ("memcpy", re.compile(r"memcpy|memset|MemcpyH2D|MemcpyD2H|MemcpyD2D", re.I)),
    ("attention (pallas)", re.compile(r"decode|prefill|attention|_kernel$|paged", re.I)),
    ("gemm", re.compile(r"gemm|gemv|nvjet|cutlass|sm90_|sm80_|cublas|triton_dot|__cublas|dot", re.I)),
    ("scatter (kv write)", re.compile(r"scatter", re.I)),
    ("reduce/softmax/sort", re.compile(r"reduce|sort|topk|top_k|argmax|cub::", re.I)),
    ("fusion (elementwise)", re.compile(r"fusion|loop_|input_|wrapped_|convert|add|multiply|select", re.I)),
)


def categorize(name: str) -> str:
    for cat, rx in _CATEGORIES:
        if rx.search(name):
            return cat
    return "other"


def _normalize(name: str) -> str:
    """Group kernels that differ only by XLA's numeric suffixes (fusion.123, loop_add_fusion_4)."""
    return re.sub(r"(?<=[a-z_])[._]?\d+$", "", name)[:90]


def load_trace(log_dir: str) -> dict:
    paths = glob.glob(os.path.join(log_dir, "**", "perfetto_trace.json.gz"), recursive=True)
    if not paths:
        raise FileNotFoundError(f"no perfetto_trace.json.gz under {log_dir}")
    with gzip.open(max(paths, key=os.path.getmtime), "rt") as f:
        return json.load(f)


def _meta(events, kind: str) -> dict:
    key = "pid" if kind == "process_name" else "tid"
    return {e[key]: e.get("args", {}).get("name", "") for e in events
            if e.get("ph") == "M" and e.get("name") == kind}


def device_events(trace: dict) -> tuple[list[dict], str]:
    """Complete events (ph 'X') on the accelerator: kernels and copies.

    The trace names each process and thread in metadata events; XLA's GPU tracer puts kernels under
    ``/device:GPU:N`` processes (one thread per stream). On the CPU there is no device process, so
    the XLA threads of ``/host:CPU`` stand in (the smoke run only checks the plumbing)."""
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    procs = _meta(events, "process_name")
    # Under tensor parallelism every device runs the same step: GPU 0's timeline stands for all
    # (summing devices would count busy time twice).
    gpus = sorted((n, pid) for pid, n in procs.items() if "/device:GPU" in n)
    gpu = {gpus[0][1]} if gpus else set()
    if gpu:
        return [e for e in events if e.get("ph") == "X" and e.get("pid") in gpu and "dur" in e], "gpu"
    threads = _meta(events, "thread_name")
    xla = {tid for tid, n in threads.items() if n.startswith("tf_XLA")}
    return [e for e in events if e.get("ph") == "X" and e.get("tid") in xla and "dur" in e], "cpu"


# Host functions on the step's critical path (the Python tracer names them "$file.py:line name").
_HOST_FUNCS = ("engine.py:\\d+ step$", "scheduler.py:\\d+ schedule$", "model_runner.py:\\d+ dispatch$",
               "model_runner.py:\\d+ collect$", "scheduler.py:\\d+ update$", "engine.py:\\d+ _process")


def host_events(trace: dict, steps: int) -> dict:
    """Milliseconds per step in each host function of ``_HOST_FUNCS`` (inclusive times)."""
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    out = {}
    for pat in _HOST_FUNCS:
        rx = re.compile(pat)
        tot = sum(e["dur"] for e in events if e.get("ph") == "X" and "dur" in e and rx.search(e.get("name", "")))
        if tot:
            out[pat.split(":")[0].split(".")[0] + "." + pat.split(" ")[-1].strip("$")] = round(tot / steps / 1e3, 3)
    return out


def union_us(intervals: list[tuple[float, float]]) -> float:
    total, end = 0.0, -np.inf
    for s, e in sorted(intervals):
        if e <= end:
            continue
        total += e - max(s, end)
        end = e
    return total


def summarize(events: list[dict], steps: int, window: tuple[float, float] | None = None) -> dict:
    if window is not None:
        events = [e for e in events if window[0] <= e["ts"] <= window[1]]
    if not events:
        return {"error": "no device events in the trace"}
    t0 = min(e["ts"] for e in events)
    t1 = max(e["ts"] + e["dur"] for e in events)
    busy = union_us([(e["ts"], e["ts"] + e["dur"]) for e in events])
    by_cat = collections.Counter()
    by_name = collections.Counter()
    counts = collections.Counter()
    for e in events:
        by_cat[categorize(e["name"])] += e["dur"]
        n = _normalize(e["name"])
        by_name[n] += e["dur"]
        counts[n] += 1
    span = t1 - t0
    return {
        "span_ms_per_step": round(span / steps / 1e3, 3),
        "busy_ms_per_step": round(busy / steps / 1e3, 3),
        "idle_fraction": round(1 - busy / span, 4),
        "kernels_per_step": round(len(events) / steps, 1),
        "by_category_ms_per_step": {k: round(v / steps / 1e3, 3) for k, v in by_cat.most_common()},
        "top_kernels": [{"name": n, "ms_per_step": round(v / steps / 1e3, 4),
                         "calls_per_step": round(counts[n] / steps, 1),
                         "us_per_call": round(v / counts[n], 2), "category": categorize(n)}
                        for n, v in by_name.most_common(25)],
    }


def copy_bandwidth() -> float | None:
    """Device-to-device copy in GB/s (bytes read + written), torch if present (XLA's copy is slower)."""
    try:
        import torch
        if not torch.cuda.is_available():
            return None
        a = torch.empty(2 << 30, dtype=torch.uint8, device="cuda").random_(0, 255)
        b = torch.empty_like(a)
        for _ in range(3):
            b.copy_(a)
        torch.cuda.synchronize()
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        times = []
        for _ in range(10):
            s.record()
            b.copy_(a)
            e.record()
            torch.cuda.synchronize()
            times.append(s.elapsed_time(e) / 1e3)
        gbps = 2 * a.numel() / float(np.median(times)) / 1e9
        del a, b
        torch.cuda.empty_cache()
        return gbps
    except Exception as exc:   # a profile without the roofline is still a profile
        print("copy bandwidth not measured:", exc)
        return None


def matmul_tflops() -> float:
    """Dense bf16 matmul rate (TFLOP/s) through XLA, 8192^3, chained so nothing is hoisted or merged."""
    import jax
    import jax.numpy as jnp

    n, reps = 8192, 20
    x = jax.random.normal(jax.random.PRNGKey(0), (n, n), jnp.bfloat16)
    w = jax.random.normal(jax.random.PRNGKey(1), (n, n), jnp.bfloat16) * (n ** -0.5)

    @jax.jit
    def chain(x, w):
        return jax.lax.fori_loop(0, reps, lambda i, x: (x @ w).astype(jnp.bfloat16), x)

    chain(x, w).block_until_ready()
    times = []
    for _ in range(5):
        t = time.perf_counter()
        chain(x, w).block_until_ready()
        times.append(time.perf_counter() - t)
    return 2 * n ** 3 * reps / float(np.median(times)) / 1e12


def prefill_mfu(llm, prompt_len: int) -> dict:
    """One prompt of ``prompt_len`` tokens, one output token: the prefill step's model FLOP rate."""
    from serving import SamplingParams

    c = llm.engine.model_config
    rng = np.random.RandomState(7)
    params = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True, detokenize=False)
    times = []
    for i in range(6):
        prompt = {"prompt_token_ids": rng.randint(0, c.vocab_size, prompt_len).tolist()}
        t = time.perf_counter()
        llm.generate([prompt], params, use_tqdm=False)
        times.append(time.perf_counter() - t)
    secs = float(np.median(times[1:]))
    state = llm.engine.runner.state
    import jax
    n_params = sum(x.size for x in jax.tree.leaves(state))
    embed = c.vocab_size * c.hidden_size * (1 if c.tie_word_embeddings else 2)
    # Matmul FLOPs: 2 per weight per token (the LM head only for the sampled row), plus causal
    # attention: QK^T and PV over T^2/2 pairs, 2 FLOPs per multiply-add, each head and layer.
    flops = 2 * (n_params - embed) * prompt_len + 2 * c.vocab_size * c.hidden_size \
        + 2 * 2 * (prompt_len ** 2 / 2) * c.num_heads * c.head_dim * c.num_layers
    return {"prompt_len": prompt_len, "seconds": round(secs, 4), "tflops": round(flops / secs / 1e12, 1)}


def scatter_free_pages(engine, seed: int) -> None:
    """Put the page pool's free queue in a random order, as a server's is after many requests have
    come and gone (a fresh pool hands out pages 1, 2, 3, ...: each sequence's pages are adjacent)."""
    pool = engine.scheduler.kv.pool
    pages = pool.allocate(pool.num_free_pages)
    np.random.RandomState(seed).shuffle(pages)
    pool.free(pages)


def run_batch(llm, batch: int, ctx: int, steps: int, log_root: str, temperature: float = 0.0,
              scatter_pages: bool = False, mixed_prompt: int = 0) -> dict:
    """``mixed_prompt`` > 0: every timed step also prefills one new prompt of that many tokens beside
    the batch's decode rows (a mixed step, as while a server admits requests); the new requests
    then decode too, so the batch grows by one a step."""
    from serving import SamplingParams

    eng = llm.engine
    if scatter_pages:
        scatter_free_pages(eng, batch)
    vocab = eng.model_config.vocab_size
    rng = np.random.RandomState(batch)
    # Every request must outlive the batch's prefill: with chunked prefill the first requests decode
    # while the last ones still prefill (batch * ctx tokens at the step's token budget).
    prefill_steps = -(-batch * ctx // eng.scheduler.max_num_batched_tokens)
    params = SamplingParams(temperature=temperature, max_tokens=steps * 4 + 64 + prefill_steps, ignore_eos=True,
                            detokenize=False)
    ids = [f"prof-{batch}-{i}" for i in range(batch)]
    for rid in ids:
        eng.add_request(rid, {"prompt_token_ids": rng.randint(0, vocab, ctx).tolist()}, params)
    # Prefill everything, then a few decode steps so the pipeline (outputs trail one step) is full.
    for _ in range(10_000):
        eng.step()
        if all(r.num_computed_tokens >= ctx for r in eng.scheduler.running) and \
                len(eng.scheduler.running) == batch:
            break
    else:
        raise RuntimeError(f"batch {batch}: the {batch} requests never ran decode steps together "
                           f"({len(eng.scheduler.running)} running)")
    for _ in range(5):
        eng.step()
    mixed_ids = []

    def add_mixed_prompt():
        if mixed_prompt:
            mixed_ids.append(f"mix-{batch}-{len(mixed_ids)}")
            eng.add_request(mixed_ids[-1], {"prompt_token_ids": rng.randint(0, vocab, mixed_prompt).tolist()},
                            params)

    # Steps are collected one call after they are launched: one mixed step first, so that every
    # step the timed calls collect (and the profile window holds) is a mixed one.
    if mixed_prompt:
        add_mixed_prompt()
        eng.step()
    tally_before = eng.step_tally.copy()
    wall = []
    for _ in range(steps):
        add_mixed_prompt()
        t = time.perf_counter()
        eng.step()
        wall.append(time.perf_counter() - t)
    log_dir = os.path.join(log_root, f"batch{batch}" + ("-scattered" if scatter_pages else ""))
    import jax
    with jax.profiler.trace(log_dir, create_perfetto_trace=True):
        for _ in range(steps):
            add_mixed_prompt()
            eng.step()
        jax.effects_barrier()
    # The executables the timed steps ran (tokens x seqs, decode-only or not): which bucket this is.
    ran = eng.step_tally.since(tally_before).by_shape
    for rid in ids + mixed_ids:
        eng.abort_request(rid)
    for _ in range(3):
        eng.step()
    trace = load_trace(log_dir)
    events, kind = device_events(trace)
    r = {"batch": batch, "ctx": ctx, "steps": steps, "trace_kind": kind, "scattered_pages": scatter_pages,
         "mixed_prompt": mixed_prompt,
         "executables": sorted(({"tokens": k[0], "seqs": k[1], "decode_only": k[3], "steps": v.steps}
                                for k, v in ran.items()), key=lambda e: -e["steps"]),
         "step_ms_unprofiled_median": round(1e3 * float(np.median(wall)), 3)}
    r.update(summarize(events, steps))
    r["host_ms_per_step_profiled"] = host_events(trace, steps)
    return r


def print_table(res: dict) -> None:
    for r in res["runs"]:
        order = ", scattered pages" if r.get("scattered_pages") else ""
        if r.get("mixed_prompt"):
            order += f", + one {r['mixed_prompt']}-token prompt a step (mixed steps)"
        print(f"\n== batch {r['batch']}, context {r['ctx']}{order}: step {r['step_ms_unprofiled_median']} ms "
              f"(unprofiled), profiled span {r.get('span_ms_per_step')} ms, device busy "
              f"{r.get('busy_ms_per_step')} ms, idle {100 * r.get('idle_fraction', float('nan')):.1f}%, "
              f"{r.get('kernels_per_step')} kernels/step")
        print("   host (profiled, inclusive):", r.get("host_ms_per_step_profiled"))
        print("   executables:", ", ".join(f"{e['tokens']}x{e['seqs']}{' decode' if e['decode_only'] else ''}: "
                                         f"{e['steps']} steps" for e in r.get("executables", [])))
        for cat, ms in r.get("by_category_ms_per_step", {}).items():
            print(f"   {cat:<24}{ms:>9.3f} ms")
        print(f"   {'kernel':<70}{'ms/step':>9}{'calls':>7}{'us/call':>9}")
        for k in r.get("top_kernels", [])[:15]:
            print(f"   {k['name'][:68]:<70}{k['ms_per_step']:>9.3f}{k['calls_per_step']:>7}{k['us_per_call']:>9}")
    if res.get("roofline_ms"):
        print(f"\nweights {res['weight_gb']:.2f} GB / copy {res['copy_gbps']:.0f} GB/s = roofline "
              f"{res['roofline_ms']:.2f} ms per decode step")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="llama-3.1-8b")
    ap.add_argument("--load-format", default=None, help="default: dummy for built-in shapes, auto otherwise")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--attention-backend", default="pallas")
    ap.add_argument("--batch", default="1,64")
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--tensor-parallel-size", type=int, default=1)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--token-buckets", default="512")
    ap.add_argument("--max-model-len", type=int, default=2048)
    ap.add_argument("--prefill-len", type=int, default=0, help="also time one prompt of this many tokens")
    ap.add_argument("--min-decode-tokens", type=int, default=None,
                    help="experiment: ModelRunner.min_decode_tokens (token rows of a decode executable)")
    ap.add_argument("--temperature", type=float, default=0.0, help="0 = greedy decoding")
    ap.add_argument("--async-scheduling", action=argparse.BooleanOptionalAction, default=None,
                    help="one step in flight (EngineArgs.async_scheduling); default: the engine's default")
    ap.add_argument("--tag", default="", help="suffix of the result name (a variant's label)")
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--trace-dir", default=None)
    ap.add_argument("--page-order", default="sequential",
                    help="comma list of sequential (a fresh pool) and scattered (the free page queue shuffled "
                         "first, as a long-running server's is): each batch runs once per order")
    ap.add_argument("--mixed-prompt", type=int, default=0,
                    help="each timed step also prefills a new prompt of this many tokens (mixed steps); "
                         "the largest token bucket must hold it beside the decode rows")
    args = ap.parse_args(argv)
    batches = [int(b) for b in args.batch.split(",")]
    budget = max(int(x) for x in args.token_buckets.split(","))
    # Mixed mode: each timed step (2 x --steps + 1 of them) admits one more request, which decodes after.
    max_num_seqs = max(batches) + (2 * args.steps + 8 if args.mixed_prompt else 0)
    if args.mixed_prompt < 0 or (args.mixed_prompt and args.mixed_prompt + max_num_seqs > budget):
        ap.error(f"--mixed-prompt {args.mixed_prompt}: with up to {max_num_seqs} decode rows a step it must be "
                 f"positive and fit the largest token bucket ({budget}) beside them")
    import jax

    from serving import LLM

    if args.min_decode_tokens is not None:
        from serving.model_runner import ModelRunner
        ModelRunner.min_decode_tokens = args.min_decode_tokens
    load_format = args.load_format or ("auto" if os.path.exists(args.model) else "dummy")
    t = time.perf_counter()
    llm = LLM(args.model, load_format=load_format, dtype=args.dtype, attention_backend=args.attention_backend,
              token_buckets=[int(x) for x in args.token_buckets.split(",")],
              seq_buckets=sorted(set(batches) | {max_num_seqs}), max_num_batched_tokens=budget,
              max_num_seqs=max_num_seqs, max_model_len=args.max_model_len,
              tensor_parallel_size=args.tensor_parallel_size,
              **({} if args.async_scheduling is None else {"async_scheduling": args.async_scheduling}),
              compilation_cache_dir=os.environ.get("JAXLLM_COMPILATION_CACHE", "off"))
    startup = time.perf_counter() - t
    weight_bytes = sum(x.nbytes for x in jax.tree.leaves(llm.engine.runner.state))
    res = {"what": "decode-step profile", "date": datetime.date.today().isoformat(), "jax": jax.__version__,
           "commit": _commit(), "device": jax.devices()[0].device_kind, "model": args.model,
           "dtype": args.dtype, "attention": args.attention_backend, "tag": args.tag,
           "tensor_parallel_size": args.tensor_parallel_size,
           "temperature": args.temperature, "min_decode_tokens": args.min_decode_tokens,
           "async_scheduling": llm.engine.async_scheduling,
           "launch_thread": llm.engine.runner.launch_thread,
           "xla_flags": os.environ.get("XLA_FLAGS", ""), "startup_s": round(startup, 1),
           "weight_gb": round(weight_bytes / 1e9, 3), "command": " ".join(["benchmarks/gpu_profile.py"] + (argv or sys.argv[1:])),
           "runs": []}
    trace_root = args.trace_dir or tempfile.mkdtemp(prefix="jaxllm-prof-")
    orders = args.page_order.split(",")
    if not orders or set(orders) - {"sequential", "scattered"}:
        ap.error(f"--page-order: a comma list of sequential and scattered, got {args.page_order!r}")
    for b in batches:
        for order in orders:
            res["runs"].append(run_batch(llm, b, args.ctx, args.steps, trace_root, args.temperature,
                                         scatter_pages=order == "scattered", mixed_prompt=args.mixed_prompt))
    # Greedy tokens of a fixed prompt: variants of one model (same dummy seed) must agree.
    from serving import SamplingParams
    check = llm.generate([{"prompt_token_ids": [(100 + i) % llm.engine.vocab_size for i in range(200)]}],
                         SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True, detokenize=False),
                         use_tqdm=False)[0].outputs[0].token_ids
    res["check_tokens"] = list(check)
    if args.prefill_len:
        res["prefill"] = prefill_mfu(llm, args.prefill_len)
    del llm
    on_gpu = jax.devices()[0].platform == "gpu"
    if args.prefill_len and on_gpu:
        res["matmul_tflops"] = round(matmul_tflops(), 1)
        res["prefill"]["mfu_vs_matmul"] = round(res["prefill"]["tflops"] / res["matmul_tflops"], 3)
    bw = copy_bandwidth() if on_gpu else None
    if bw:
        res["copy_gbps"] = round(bw, 1)
        res["roofline_ms"] = round(weight_bytes / args.tensor_parallel_size / (bw * 1e9) * 1e3, 3)
    print_table(res)
    print("check tokens:", res["check_tokens"][:12])
    if "prefill" in res:
        print(f"prefill {res['prefill']['prompt_len']} tokens: {res['prefill']['seconds'] * 1e3:.1f} ms, "
              f"{res['prefill']['tflops']} TFLOP/s; matmul {res.get('matmul_tflops')} TFLOP/s; "
              f"MFU vs matmul {res['prefill'].get('mfu_vs_matmul')}")
    dev = res["device"].split()[1].lower() if res["device"].startswith("NVIDIA") else res["device"].lower()
    write_result(args.out, f"{res['date']}-{dev}-decode-profile{('-' + args.tag) if args.tag else ''}.json", res)
    return 0


if __name__ == "__main__":
    sys.exit(main())
