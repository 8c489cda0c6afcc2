"""One workload under several sharding layouts: batch-1 ITL, decode throughput, per-device memory.

    # GPU (2 or 4 devices), Llama-3.1-8B shape with dummy weights:
    PYTHONPATH=$PWD python benchmarks/sharding_layouts.py --model llama-3.1-8b --load-format dummy \\
        --dtype bfloat16 --layouts tp=1 tp=2 tp=4 pp=2 tp=2,pp=2 tp=2:replicated-vocab
    # CPU, the embedded model on forced host devices:
    python benchmarks/sharding_layouts.py --cpu-devices 8 --layouts tp=1 tp=3 pp=2 tp=3,pp=2

A layout is `tp=N[,pp=M][:RULES]` where RULES is a preset name (sharding/rules.py) or a rules file.
Every layout runs the same prompts in the same process, so the ratios are comparable; a table is
printed and `benchmarks/results/<date>-<device>-sharding-layouts.{json,png}` are written.

Measured per layout:
  itl_ms           batch-1 decode: (time for 1 + K tokens - time for 1 token) / K, best of --repeats
  tokens_per_s     --batch prompts x --max-tokens greedy tokens / wall time (prefill included)
  weights_bytes / kv_bytes per device: the largest per-device sum of resident shards (exact, any
                   platform); device_bytes_in_use where the platform reports it (GPU)
  collectives      all-reduce / all-gather / reduce-scatter / collective-permute / all-to-all ops
                   in the compiled step (scan bodies count once: per layer, plus per step)
Collective *time* is not measured here: it needs a profiler trace (jax.profiler) on the GPU.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import os
import re
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def parse_layout(spec: str) -> dict:
    rules = None
    if ":" in spec:
        spec, rules = spec.split(":", 1)
    sizes = {"tp": 1, "pp": 1}
    for part in filter(None, spec.split(",")):
        key, _, value = part.partition("=")
        if key not in sizes or not value.isdigit() or int(value) < 1:
            raise ValueError(f"bad layout {spec!r}: expected tp=N[,pp=M][:RULES]")
        sizes[key] = int(value)
    return {"name": spec + (f":{rules}" if rules else ""), "tp": sizes["tp"], "pp": sizes["pp"],
            "rules": rules}


def per_device_bytes(arrays) -> dict:
    """device -> bytes of the shards of `arrays` it holds."""
    import jax

    out: dict = {}
    for a in jax.tree_util.tree_leaves(arrays):
        for shard in getattr(a, "addressable_shards", ()):
            out[shard.device] = out.get(shard.device, 0) + shard.data.nbytes
    return out


def collective_counts(runner, shape=None) -> dict:
    """Collective ops in one compiled step: the executable of bucket `shape` (default: the first)."""
    exe = runner._executables[shape] if shape is not None else next(iter(runner._executables.values()))
    hlo = exe.as_text()
    return {op: len(re.findall(rf"= \S+ {op}(?:-start)?\(", hlo))
            for op in ("all-reduce", "all-gather", "reduce-scatter", "collective-permute", "all-to-all")}


def measure(layout: dict, args) -> tuple[dict, object]:
    from serving import LLM, SamplingParams

    t0 = time.perf_counter()
    llm = LLM(model=args.model, load_format=args.load_format, dtype=args.dtype,
              tensor_parallel_size=layout["tp"], pipeline_parallel_size=layout["pp"],
              sharding_rules=layout["rules"], max_model_len=args.max_model_len,
              max_num_seqs=max(args.batch, 1), max_num_batched_tokens=args.max_num_batched_tokens,
              token_buckets=args.token_buckets, seq_buckets=args.seq_buckets,
              kv_cache_memory=args.kv_cache_memory)
    build_s = time.perf_counter() - t0
    runner = llm.engine.runner
    vocab = llm.engine.model_config.vocab_size
    prompt = [{"prompt_token_ids": [(7 * i + 3) % vocab for i in range(args.prompt_len)]}]

    def timed(prompts, max_tokens):
        sp = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
        start = time.perf_counter()
        outs = llm.generate(prompts, sp, use_tqdm=False)
        return time.perf_counter() - start, outs

    timed(prompt, 2)   # warm-up: first-call overheads (transfers, host caches)
    itl = []
    for _ in range(args.repeats):
        t1, _ = timed(prompt, 1)
        tk, _ = timed(prompt, 1 + args.itl_tokens)
        itl.append((tk - t1) / args.itl_tokens)
    batch = [{"prompt_token_ids": [(11 * i + b) % vocab for i in range(args.prompt_len)]}
             for b in range(args.batch)]
    wall, outs = timed(batch, args.max_tokens)
    generated = sum(len(o.outputs[0].token_ids) for o in outs)
    weights = per_device_bytes(runner.state)
    kv = per_device_bytes(runner.kv_cache)
    in_use = None
    try:
        stats = [d.memory_stats() for d in weights]
        if all(s and "bytes_in_use" in s for s in stats):
            in_use = max(s["bytes_in_use"] for s in stats)
    except Exception:  # noqa: BLE001 — CPU devices report no memory stats
        pass
    result = {
        "layout": layout["name"], "tp": layout["tp"], "pp": layout["pp"],
        "rules": runner.layout.rules.name if runner.layout is not None else "none",
        "devices": len(weights), "build_s": round(build_s, 2),
        "itl_ms": round(min(itl) * 1e3, 3), "tokens_per_s": round(generated / wall, 2),
        "weights_bytes_per_device": max(weights.values()), "kv_bytes_per_device": max(kv.values()),
        "device_bytes_in_use": in_use, "collectives": collective_counts(runner),
        "first_tokens": list(outs[0].outputs[0].token_ids[:8]),
    }
    return result, llm


def plot(results: list[dict], path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r["layout"] for r in results]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    panels = [("itl_ms", "batch-1 ITL (ms)"), ("tokens_per_s", "throughput (tokens/s)"),
              ("weights_bytes_per_device", "weights + KV per device (MiB)")]
    for ax, (key, label) in zip(axes, panels):
        if key == "weights_bytes_per_device":
            w = [r["weights_bytes_per_device"] / 2 ** 20 for r in results]
            k = [r["kv_bytes_per_device"] / 2 ** 20 for r in results]
            ax.bar(names, w, label="weights")
            ax.bar(names, k, bottom=w, label="KV cache")
            ax.legend(fontsize=8)
        else:
            ax.bar(names, [r[key] for r in results])
        ax.set_title(label, fontsize=10)
        ax.tick_params(axis="x", rotation=30, labelsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="model (default: the embedded SmolLM2)")
    p.add_argument("--load-format", default="auto")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--layouts", nargs="+", default=["tp=1", "tp=3", "pp=2", "tp=3,pp=2"])
    p.add_argument("--cpu-devices", type=int, default=None,
                   help="force N host CPU devices (sets XLA_FLAGS before jax starts)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--itl-tokens", type=int, default=16)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--max-model-len", type=int, default=256)
    p.add_argument("--max-num-batched-tokens", type=int, default=64)
    p.add_argument("--token-buckets", default="8,64")
    p.add_argument("--seq-buckets", default="1,8")
    p.add_argument("--kv-cache-memory", type=int, default=None, help="bytes (CPU default if unset)")
    p.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results"))
    args = p.parse_args(argv)
    if args.cpu_devices:
        if "jax" in sys.modules:
            raise SystemExit("--cpu-devices must be applied before jax is imported")
        os.environ["JAX_PLATFORMS"] = "cpu"
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                                   f" --xla_force_host_platform_device_count={args.cpu_devices}")
    sys.path.insert(0, ROOT)
    from serving.bench.environment import (device_slug, engine_environment, result_envelope,
                                           write_json)

    layouts = [parse_layout(s) for s in args.layouts]
    results, env = [], None
    for layout in layouts:
        print(f"== {layout['name']}", flush=True)
        result, llm = measure(layout, args)
        env = env or engine_environment(llm)
        results.append(result)
        del llm
        gc.collect()
    ref = results[0]["first_tokens"]
    for r in results:
        r["same_tokens_as_first_layout"] = r["first_tokens"] == ref

    header = f"{'layout':<24}{'devices':>8}{'ITL ms':>10}{'tok/s':>10}{'weights MiB/dev':>17}" \
             f"{'KV MiB/dev':>12}{'all-reduce':>11}{'permute':>9}{'same':>6}"
    print(header)
    for r in results:
        c = r["collectives"]
        print(f"{r['layout']:<24}{r['devices']:>8}{r['itl_ms']:>10.2f}{r['tokens_per_s']:>10.1f}"
              f"{r['weights_bytes_per_device'] / 2 ** 20:>17.1f}{r['kv_bytes_per_device'] / 2 ** 20:>12.1f}"
              f"{c['all-reduce']:>11}{c['collective-permute']:>9}{str(r['same_tokens_as_first_layout']):>6}")
    config = {k: v for k, v in vars(args).items() if k != "out"}
    data = result_envelope("sharding_layouts", env, config, {"layouts": results})
    stem = f"{datetime.date.today().isoformat()}-{device_slug(env)}-sharding-layouts"
    path = write_json(os.path.join(args.out, stem + ".json"), data)
    plot(results, os.path.join(args.out, stem + ".png"),
         f"{env.get('model')} on {env.get('device_count')} x {env.get('device_kind')} ({env.get('dtype')})")
    print(f"wrote {path} and {stem}.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
