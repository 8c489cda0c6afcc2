"""Tensor / pipeline parallel on GPUs (issue 6): Llama-3.1-8B at TP 1, 2, 4 and PP 2; 70B at TP 4.

    # 4 x H200, in two calls of under 9 minutes each (compile time included):
    PYTHONPATH=$PWD python benchmarks/gpu_sharding.py --configs tp1,tp2,tp4 --out $OUT
    PYTHONPATH=$PWD python benchmarks/gpu_sharding.py --configs pp2,70b-tp4 --out $OUT
    # + tp2-no-thread (not in the default list): TP2 without the runner's launch thread, the control
    #   for what that thread buys, in the same run (JAXLLM_LAUNCH_THREAD=0 in its worker)
    # then, here, one results file, table and figure from both:
    python benchmarks/gpu_sharding.py --merge RUN1.json RUN2.json
    # CPU, a tiny model on forced host devices (checks the script end to end):
    python benchmarks/gpu_sharding.py --cpu-smoke --model /path/to/tiny --configs tp1,tp2,70b-tp4

Every configuration runs in its own subprocess (a fresh JAX client: memory freed, devices limited
with CUDA_VISIBLE_DEVICES) under its own timeout and the run's overall deadline, so one failure or
hang loses only itself. All use dummy bf16 weights and the Pallas attention kernels. Measured:

  itl_ms (batch 1)       a 512-token prompt, then the wall time of 32 engine steps in pure decode
  decode tok/s (batch 64) 64 such prompts, all in decode: 64 x steps / wall time (8B only); the
                         first prompts decode while the last prefill, so contexts span ~512-590
  memory per device      memory_stats() bytes_in_use / peak of each device of the mesh, plus the
                         exact resident weight and KV-cache shard bytes
  roofline (70B)         weight bytes / (devices x device-to-device copy bandwidth), the copy rate
                         measured in the same process before the weights load

Targets (issue 6): TP 2 batch-1 ITL <= 0.6 x TP 1; 70B TP 4 ITL within 1.3 x its roofline.
Writes `<out>/<date>-<device>x<N>-sharding.{json,png}` (N: the most devices a configuration used)
and the workers' logs under `<out>/logs/`. Neither the parent process nor the workers import the
HTTP server stack.
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import json
import os
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

# name -> (model key, tp, pp, measure batch-64 decode, roofline)
CONFIGS = {
    "tp1": ("8b", 1, 1, True, False),
    "tp2": ("8b", 2, 1, True, False),
    "tp4": ("8b", 4, 1, True, False),
    "pp2": ("8b", 1, 2, True, False),
    "70b-tp4": ("70b", 4, 1, False, True),
    "tp2-no-thread": ("8b", 2, 1, True, False),
}
# Environment of a configuration's worker: tp2-no-thread is TP2 without the runner's launch thread
# (on by default for several devices), the control for what that thread buys in the same run.
CONFIG_ENV = {"tp2-no-thread": {"JAXLLM_LAUNCH_THREAD": "0"}}
DEFAULT_CONFIGS = [c for c in CONFIGS if c not in CONFIG_ENV]
MODELS = {"8b": "llama-3.1-8b", "70b": "llama-3.1-70b"}
# Seconds a configuration may take (start-up, dummy weights, compile, measurements): an 8B
# executable with unrolled layers compiles in ~20 s on an H200, 70B's 80 layers in more. 8B TP2
# ran past 240 s on 2026-11-22 (004c540: 9 executables, ~57 s each for the 512-token ones under
# shard_map with the Mosaic kernels; TP1 took 75 s): 330 s, so run TP2 in a call of its own.
TIMEOUTS = {"8b": 330, "70b": 420}
TARGET_TP2_ITL_RATIO = 0.6
TARGET_ROOFLINE_RATIO = 1.3


# ------------------------------------------------------------------------------------------ worker
def copy_bandwidth(nbytes: int) -> dict:
    """Device-to-device copy rate (bytes read + written per second) of one device: the faster of
    two XLA element-wise passes over `nbytes` (float32 and bfloat16), best of 5 x 10 calls. The
    same measure as benchmarks/kernels.py (whose 2 GiB size is fixed; the CPU smoke run needs a
    small one), without its torch copy, which would hold a CUDA context beside the 70B weights."""
    import jax
    import jax.numpy as jnp

    rates = {}
    for dtype in (jnp.float32, jnp.bfloat16):
        x = jnp.ones((nbytes // jnp.dtype(dtype).itemsize,), dtype)
        step = jax.jit(lambda a: a + jnp.asarray(1, a.dtype))
        jax.block_until_ready(step(x))
        best = float("inf")
        for _ in range(5):
            t = time.perf_counter()
            for _ in range(10):
                y = step(x)
            jax.block_until_ready(y)
            best = min(best, (time.perf_counter() - t) / 10)
        rates[jnp.dtype(dtype).name] = 2 * x.nbytes / best
        del x, y
    return {"bytes_per_s": max(rates.values()), "measurements": rates, "bytes": nbytes}


_REQUEST_IDS = itertools.count()


def decode_rate(engine, prompts: list[list[int]], steps: int, max_tokens: int) -> dict:
    """Wall time of `steps` engine steps while every prompt is decoding (prefill done before the
    clock starts); the requests are aborted afterwards.

    `max_tokens` must outlast the prefill of the last prompt plus `steps`: the first prompts
    decode while the later ones prefill, and none may finish inside the timed window.
    """
    from serving import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True, detokenize=False)
    ids = [f"decode-{next(_REQUEST_IDS)}" for _ in prompts]
    for rid, p in zip(ids, prompts):
        engine.add_request(rid, {"prompt_token_ids": p}, params)
    started: set = set()
    limit = sum(len(p) for p in prompts) + 16        # a step schedules at least one prompt token
    while len(started) < len(ids) and limit > 0:
        started.update(o.request_id for o in engine.step() if o.outputs[0].token_ids)
        limit -= 1
    if len(started) < len(ids):
        raise RuntimeError(f"only {len(started)} of {len(ids)} requests reached decode")
    for _ in range(2):
        engine.step()                                # outputs trail a step: all decode from here
    context = [r.num_tokens for r in engine.scheduler.running]
    step_tokens = set()
    start = time.perf_counter()
    for _ in range(steps):
        engine.step()
        step_tokens.add(engine.runner.last_step.num_tokens)
    seconds = time.perf_counter() - start
    if step_tokens != {len(prompts)} or len(context) != len(prompts):
        raise RuntimeError(f"the timed steps were not all decode steps of the {len(prompts)} "
                           f"requests: {sorted(step_tokens)} tokens a step, {len(context)} running")
    engine.abort_request(ids)
    for _ in range(4):                               # the last outputs in flight
        if not engine.has_unfinished_requests():
            break
        engine.step()
    return {"batch": len(prompts), "steps": steps, "seconds": round(seconds, 4),
            "step_ms": round(1e3 * seconds / steps, 3),
            "output_tokens_per_s": round(len(prompts) * steps / seconds, 1),
            "context_tokens": [min(context), max(context)]}


def run_config(name: str, args) -> dict:
    """One configuration, in this (worker) process."""
    import jax
    import numpy as np

    import sharding_layouts as layouts
    from serving import LLM, SamplingParams
    from serving.bench.environment import device_info, git_commit, model_shape

    model_key, tp, pp, batch64, roofline = CONFIGS[name]
    model = args.model_70b if model_key == "70b" else args.model
    result = {"config": name, "model": model, "tp": tp, "pp": pp, "dtype": args.dtype,
              **device_info(), "commit": git_commit() or os.environ.get("JAXLLM_COMMIT", "unknown")}
    if roofline:
        # Before the weights: the copy's buffers must not compete with them for memory.
        result["copy_bandwidth"] = copy_bandwidth(args.copy_bytes)
    batch = args.batch if batch64 else 1
    t0 = time.perf_counter()
    llm = LLM(model, load_format=args.load_format, dtype=args.dtype, attention_backend="pallas",
              tensor_parallel_size=tp, pipeline_parallel_size=pp,
              token_buckets=[args.token_bucket], seq_buckets=sorted({1, batch}),
              max_num_batched_tokens=args.token_bucket, max_num_seqs=batch,
              max_model_len=args.max_model_len, kv_cache_memory=args.kv_cache_bytes,
              enable_prefix_caching=False)
    result["startup_s"] = round(time.perf_counter() - t0, 1)
    engine = llm.engine
    runner = engine.runner
    result["model_shape"] = model_shape(engine.model_config)
    result["executables"] = runner.num_executables
    result["launch_thread"] = runner.launch_thread      # on by default for several devices
    vocab = engine.model_config.vocab_size
    rng = np.random.RandomState(0)
    prompt = lambda: rng.randint(0, vocab, args.prompt_len).tolist()  # noqa: E731

    # Serves a request (the 70B's "loads, serves"): greedy tokens come back.
    out = llm.generate([{"prompt_token_ids": prompt()}],
                       SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True, detokenize=False),
                       use_tqdm=False)[0]
    result["served_tokens"] = list(out.outputs[0].token_ids)
    max_tokens = args.max_model_len - args.prompt_len
    decode_rate(engine, [prompt()], 4, max_tokens)   # first-call overheads out of the way
    one = decode_rate(engine, [prompt()], args.steps, max_tokens)
    result["itl_ms"] = one["step_ms"]
    result["batch1"] = one
    if batch64:
        result["batch_decode"] = decode_rate(engine, [prompt() for _ in range(batch)], args.steps,
                                             max_tokens)

    devices = sorted({d for a in jax.tree_util.tree_leaves(runner.kv_cache) for d in a.devices()},
                     key=lambda d: d.id)
    weights = layouts.per_device_bytes(runner.state)
    kv = layouts.per_device_bytes(runner.kv_cache)
    stats = [d.memory_stats() or {} for d in devices]
    result["memory"] = [{"device": d.id, "weights_bytes": weights.get(d, 0), "kv_bytes": kv.get(d, 0),
                         **{k: s[k] for k in ("bytes_in_use", "peak_bytes_in_use", "bytes_limit") if k in s}}
                        for d, s in zip(devices, stats)]
    result["devices_used"] = len(devices)
    # The batch-1 decode executable (the last variant: greedy batches take the plain sampler).
    decode_shape = [s for s in runner.all_shapes() if s[3] and s[1] == 1][-1]
    result["collectives_decode_step"] = layouts.collective_counts(runner, decode_shape)
    if roofline:
        weight_bytes = sum(a.nbytes for a in jax.tree_util.tree_leaves(runner.state))
        bw = result["copy_bandwidth"]["bytes_per_s"]
        result["weight_bytes"] = weight_bytes
        result["roofline_ms"] = round(1e3 * weight_bytes / (len(devices) * bw), 3)
        result["itl_over_roofline"] = round(result["itl_ms"] / result["roofline_ms"], 3)
    return result


# ------------------------------------------------------------------------------------------ parent
def _worker_env(tp: int, pp: int, args) -> dict:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        filter(None, [ROOT, HERE, os.environ.get("PYTHONPATH")])))
    need = tp * pp
    if args.cpu_smoke:
        env["JAX_PLATFORMS"] = "cpu"
        env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") +
                            f" --xla_force_host_platform_device_count={need}").strip()
    else:
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        ids = visible.split(",") if visible else [str(i) for i in range(need)]
        if len(ids) < need:
            raise ValueError(f"{need} GPUs needed but CUDA_VISIBLE_DEVICES={visible}")
        env["CUDA_VISIBLE_DEVICES"] = ",".join(ids[:need])
    return env


def run_all(args) -> list[dict]:
    """Each configuration in a worker subprocess; a failure or timeout is recorded, not raised."""
    deadline = time.monotonic() + args.deadline_s
    logs = os.path.join(args.out, "logs")
    os.makedirs(logs, exist_ok=True)
    results = []
    for name in args.configs:
        model_key, tp, pp = CONFIGS[name][:3]
        left = deadline - time.monotonic()
        timeout = min(args.timeout_s or TIMEOUTS[model_key], left)
        if timeout < 60:
            print(f"== {name}: skipped, {left:.0f} s left of the run's deadline", flush=True)
            results.append({"config": name, "error": f"skipped: {left:.0f} s left of --deadline-s"})
            continue
        print(f"== {name} (timeout {timeout:.0f} s)", flush=True)
        log_path = os.path.join(logs, f"{name}.log")
        with tempfile.TemporaryDirectory() as tmp, open(log_path, "w") as log:
            out_file = os.path.join(tmp, "result.json")
            cmd = [sys.executable, os.path.abspath(__file__), "--worker", name, "--result-file", out_file,
                   *_forwarded(args)]
            start = time.monotonic()
            proc = subprocess.Popen(cmd, env={**_worker_env(tp, pp, args), **CONFIG_ENV.get(name, {})}, stdout=log,
                                    stderr=subprocess.STDOUT, start_new_session=True)
            try:
                rc = proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, 9)               # the worker's whole session: frees its GPUs
                proc.wait()
                rc = "timeout"
            wall = round(time.monotonic() - start, 1)
            if rc == 0 and os.path.exists(out_file):
                with open(out_file) as f:
                    result = json.load(f)
            else:
                result = {"config": name, "error": f"exit {rc} after {wall} s (log: logs/{name}.log)",
                          "log_tail": _tail(log_path)}
                print("\n".join(result["log_tail"]), flush=True)
        result["wall_s"] = wall
        results.append(result)
        print(f"   {_one_line(result)}", flush=True)
    return results


def _forwarded(args) -> list[str]:
    keys = ("model", "model_70b", "dtype", "load_format", "batch", "prompt_len", "steps",
            "token_bucket", "max_model_len", "kv_cache_bytes", "copy_bytes")
    out = []
    for k in keys:
        out += [f"--{k.replace('_', '-')}", str(getattr(args, k))]
    return out + (["--cpu-smoke"] if args.cpu_smoke else [])


def _tail(path: str, lines: int = 15) -> list[str]:
    with open(path, errors="replace") as f:
        return f.read().splitlines()[-lines:]


def _one_line(r: dict) -> str:
    if "error" in r:
        return f"FAILED: {r['error']}"
    s = f"ITL {r['itl_ms']:.2f} ms"
    if "batch_decode" in r:
        s += f", batch {r['batch_decode']['batch']}: {r['batch_decode']['output_tokens_per_s']:.0f} tok/s"
    if "roofline_ms" in r:
        s += f", roofline {r['roofline_ms']:.2f} ms ({r['itl_over_roofline']:.2f}x)"
    return s + f", start-up {r['startup_s']} s"


# ------------------------------------------------------------------------------------------ report
def targets(results: list[dict]) -> dict:
    by = {r["config"]: r for r in results if "error" not in r}
    out = {}
    if "tp1" in by and "tp2" in by:
        ratio = by["tp2"]["itl_ms"] / by["tp1"]["itl_ms"]
        out["tp2_itl_over_tp1"] = {"value": round(ratio, 3), "target": TARGET_TP2_ITL_RATIO,
                                   "met": ratio <= TARGET_TP2_ITL_RATIO}
    if "70b-tp4" in by:
        ratio = by["70b-tp4"]["itl_over_roofline"]
        out["70b_tp4_itl_over_roofline"] = {"value": ratio, "target": TARGET_ROOFLINE_RATIO,
                                            "met": ratio <= TARGET_ROOFLINE_RATIO}
    return out


def print_table(results: list[dict], goals: dict) -> None:
    print(f"\n{'config':<9}{'devices':>8}{'ITL ms':>9}{'batch tok/s':>13}{'weights GiB/dev':>17}"
          f"{'KV GiB/dev':>12}{'in use GiB/dev':>16}{'roofline ms':>13}{'start s':>9}")
    gib = 2 ** 30
    for r in results:
        if "error" in r:
            print(f"{r['config']:<9}  {r['error']}")
            continue
        mem = r["memory"]
        in_use = max((m.get("bytes_in_use", 0) for m in mem), default=0)
        tok = r.get("batch_decode", {}).get("output_tokens_per_s")
        print(f"{r['config']:<9}{r['devices_used']:>8}{r['itl_ms']:>9.2f}{tok if tok else '-':>13}"
              f"{max(m['weights_bytes'] for m in mem) / gib:>17.2f}{max(m['kv_bytes'] for m in mem) / gib:>12.2f}"
              f"{(in_use / gib if in_use else float('nan')):>16.2f}{r.get('roofline_ms', '-'):>13}"
              f"{r['startup_s']:>9}")
    for key, g in goals.items():
        print(f"target {key}: {g['value']} (<= {g['target']}): {'met' if g['met'] else 'NOT met'}")


def plot(results: list[dict], path: str, title: str) -> bool:
    try:
        import matplotlib
    except ImportError:
        print("matplotlib not installed: no figure (rerun with --merge where it is)")
        return False
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in results if "error" not in r]
    names = [r["config"] for r in ok]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    axes[0].bar(names, [r["itl_ms"] for r in ok], label="measured")
    roof = [r.get("roofline_ms", 0) for r in ok]
    if any(roof):
        axes[0].bar(names, roof, width=0.4, label="roofline (weights / copy bw)")
        axes[0].legend(fontsize=8)
    axes[0].set_title("batch-1 ITL (ms), 512-token context", fontsize=10)
    batch = [r for r in ok if "batch_decode" in r]
    axes[1].bar([r["config"] for r in batch], [r["batch_decode"]["output_tokens_per_s"] for r in batch])
    axes[1].set_title("decode output tok/s at batch " +
                      (str(batch[0]["batch_decode"]["batch"]) if batch else "-"), fontsize=10)
    gib = 2 ** 30
    w = [max(m["weights_bytes"] for m in r["memory"]) / gib for r in ok]
    k = [max(m["kv_bytes"] for m in r["memory"]) / gib for r in ok]
    axes[2].bar(names, w, label="weights")
    axes[2].bar(names, k, bottom=w, label="KV cache")
    axes[2].legend(fontsize=8)
    axes[2].set_title("per device (GiB)", fontsize=10)
    for ax in axes:
        ax.tick_params(axis="x", labelsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def write_report(results: list[dict], args, config: dict) -> str:
    from serving.bench.environment import device_slug, result_envelope, write_json

    ok = [r for r in results if "error" not in r]
    first = ok[0] if ok else {}
    n = max((r["devices_used"] for r in ok), default=0)
    env = {k: first.get(k) for k in ("platform", "device_kind", "jax_version", "jaxlib_version", "commit")}
    env.update(device_count=n, dtype=first.get("dtype"), model=first.get("model"),
               model_shape=first.get("model_shape"))
    goals = targets(results)
    print_table(results, goals)
    data = result_envelope("gpu_sharding", env, config, {"configs": results, "targets": goals})
    stem = f"{datetime.date.today().isoformat()}-{device_slug(env)}x{n}-sharding"
    path = write_json(os.path.join(args.out, stem + ".json"), data)
    title = f"{n} x {env.get('device_kind')}, dummy {env.get('dtype')} weights, Pallas attention"
    drew = plot(results, os.path.join(args.out, stem + ".png"), title)
    print(f"wrote {path}" + (f" and {stem}.png" if drew else ""))
    return str(path)


def merge(paths: list[str]) -> tuple[list[dict], dict]:
    """Results of several runs (e.g. two calls on the GPU machine), later runs winning per config."""
    by, runs = {}, []
    for p in paths:
        with open(p) as f:
            data = json.load(f)
        runs.append({"file": os.path.basename(p), "date": data.get("date"), **data.get("config", {})})
        for r in data["results"]["configs"]:
            if r["config"] not in by or "error" in by[r["config"]] or "error" not in r:
                by[r["config"]] = r
    order = list(CONFIGS)
    return sorted(by.values(), key=lambda r: order.index(r["config"])), {"merged_runs": runs}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--configs", default=",".join(DEFAULT_CONFIGS),
                   help=f"comma-separated, from {', '.join(CONFIGS)}")
    p.add_argument("--model", default=None, help="the 8B configurations' model (default llama-3.1-8b)")
    p.add_argument("--model-70b", default=None, help="the 70B configuration's model (default "
                   "llama-3.1-70b; with --cpu-smoke, --model)")
    p.add_argument("--dtype", default=None, help="bfloat16 (default; float32 with --cpu-smoke)")
    p.add_argument("--load-format", default="dummy")
    p.add_argument("--batch", type=int, default=None, help="decode batch (64; 4 with --cpu-smoke)")
    p.add_argument("--prompt-len", type=int, default=None, help="512 (32 with --cpu-smoke)")
    p.add_argument("--steps", type=int, default=None, help="timed decode steps (32; 4 with --cpu-smoke)")
    p.add_argument("--token-bucket", type=int, default=None,
                   help="the one token bucket (512: a prompt prefills in one step and the batch's "
                        "prompts in ~75, so their contexts stay near 512; 32 with --cpu-smoke)")
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument("--kv-cache-bytes", type=int, default=None, help="KV cache per device (8 GiB)")
    p.add_argument("--copy-bytes", type=int, default=None, help="copy-bandwidth buffer (2 GiB)")
    p.add_argument("--timeout-s", type=float, default=None, help="per configuration (default: "
                   + ", ".join(f"{k} {v} s" for k, v in TIMEOUTS.items()) + ")")
    p.add_argument("--deadline-s", type=float, default=540, help="the whole run (default 540 s)")
    p.add_argument("--cpu-smoke", action="store_true",
                   help="CPU, forced host devices, small shapes: checks the script, measures nothing")
    p.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results"))
    p.add_argument("--merge", nargs="+", metavar="JSON", help="combine earlier runs' results files")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--result-file", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    smoke = args.cpu_smoke
    defaults = dict(model=None if smoke else MODELS["8b"], dtype="float32" if smoke else "bfloat16",
                    batch=4 if smoke else 64, prompt_len=32 if smoke else 512, steps=4 if smoke else 32,
                    token_bucket=32 if smoke else 512, max_model_len=128 if smoke else 1024,
                    kv_cache_bytes=(16 if smoke else 8 * 1024) * 2 ** 20,
                    copy_bytes=(16 if smoke else 2 * 1024) * 2 ** 20)
    for k, v in defaults.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if args.model is None:
        p.error("--cpu-smoke needs --model (a small local model, e.g. tests/tiny_models.py's)")
    args.model_70b = args.model_70b or (args.model if smoke else MODELS["70b"])
    args.configs = [c.strip() for c in args.configs.split(",") if c.strip()]
    unknown = [c for c in args.configs if c not in CONFIGS]
    if unknown:
        p.error(f"unknown configuration(s) {unknown}; choose from {', '.join(CONFIGS)}")
    sys.path[:0] = [ROOT, HERE]

    if args.worker:
        result = run_config(args.worker, args)
        with open(args.result_file, "w") as f:
            json.dump(result, f)
        return 0
    if args.merge:
        results, config = merge(args.merge)
        write_report(results, args, config)
        return 0
    config = {k: v for k, v in vars(args).items() if k not in ("out", "merge", "worker", "result_file")}
    results = run_all(args)
    write_report(results, args, config)
    return 0 if all("error" not in r for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
