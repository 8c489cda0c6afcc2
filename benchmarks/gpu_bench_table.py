"""The closing table of benchmarks/gpu_bench_suite.py: every figure the run measured, its target,
the steps' outcome and how to run what is left; also logs/summary.json. It reads only the results
files the run wrote (a figure not in a file was not measured)."""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Optional


def rate_label(rate: float) -> str:
    """How a request rate appears in result names: inf, rate2, rate0.5."""
    return "inf" if rate == float("inf") else f"rate{rate:g}"


def _load(path: Optional[Path]) -> Optional[dict]:
    return json.loads(path.read_text()) if path and path.exists() else None


def _num(v, digits=2) -> str:
    return "-" if v is None else (f"{v:.{digits}f}" if isinstance(v, float) else str(v))


def summary_table(suite) -> str:
    """``suite``: a gpu_bench_suite.Suite after its steps ran."""
    k, f = suite.k, suite.files
    env = suite.environment() if f else {}
    rows: list[tuple[str, str, str]] = []

    def add(figure, value, target=""):
        rows.append((figure, value, target))

    summary: dict = {"prefix": suite.prefix, "files": {w: p.name for w, p in f.items()}}
    off = _load(f.get("sharegpt-offline"))
    if off:
        r = off["results"]
        add(f"offline sharegpt-synthetic, {r['num_requests']} prompts",
            f"{r['requests_per_second']:.2f} req/s, {r['output_tokens_per_second']:.0f} out tok/s", ">= 40 req/s")
        summary["sharegpt_offline_rps"] = r["requests_per_second"]
    rnd = _load(f.get(f"random{k.random_in}-offline"))
    if rnd:
        r = rnd["results"]
        add(f"offline random {k.random_in}/{k.random_out}, {r['num_requests']} prompts",
            f"{r['requests_per_second']:.2f} req/s, {r['output_tokens_per_second']:.0f} out tok/s", "record")
    st = _load(f.get("startup"))
    if st:
        for which, target in (("cold", "record"), ("cached", "<= 60 s")):
            s = st["results"][which]
            add(f"start-up {which} ({s['process'] if s else '-'})",
                "-" if s is None else f"{s['startup_s']:.1f} s (compile/load {_num(s['compile_s'], 1)} s)", target)
        srv = next((s for s in st["results"]["starts"] if s["process"] == "jaxllm serve"), None)
        if srv:
            add("server launch to /health", f"{srv['process_s']:.1f} s (weights {_num(srv['weights_s'], 1)} s, "
                                            f"compile/load {_num(srv['compile_s'], 1)} s)", "")
        summary["startup"] = {w: st["results"][w] for w in ("cold", "cached")}
    for rate, _ in k.serve_rates:
        s = _load(f.get(f"sharegpt-served-{rate_label(rate)}"))
        if s:
            r = s["results"]
            add(f"served sharegpt rate {rate_label(rate).replace('rate', '')}, "
                f"{r['completed']} ok/{r['failed']} failed",
                f"{r['request_throughput']:.2f} req/s, TTFT {r['mean_ttft_ms']:.0f}/{r['p99_ttft_ms']:.0f} ms, "
                f"TPOT {r['mean_tpot_ms']:.1f}/{r['p99_tpot_ms']:.1f} ms (mean/P99)", "")
    inf = _load(f.get("sharegpt-served-inf"))
    if inf and off:
        ratio = inf["results"]["request_throughput"] / off["results"]["requests_per_second"]
        add("served (rate inf) / offline, sharegpt-synthetic", f"{ratio:.3f}", ">= 0.9")
        summary["served_over_offline"] = ratio
    c64, hf = _load(f.get(suite.hf_served_what())), _load(f.get("hf"))
    if c64:
        r = c64["results"]
        add(f"jaxllm served, {suite.hf_tag()} {c64['config'].get('num_prompts')} prompts, {k.hf_batch} in flight",
            f"{r['request_throughput']:.2f} req/s ({r['completed']} ok/{r['failed']} failed)", "")
    if hf:
        r = hf["results"]
        tried = ", ".join(f"{x['torch_compile']}: " + (f"{x['requests_per_second']:.2f}" if "requests_per_second"
                                                        in x else x.get("error", "?")[:60]) for x in r["runs"])
        add(f"HF transformers, batch {r['batch_size']}, static cache",
            f"{r['requests_per_second']:.3f} req/s (compile {r['torch_compile']}; runs {tried})", "")
    if hf and c64:
        ratio = c64["results"]["request_throughput"] / hf["results"]["requests_per_second"]
        add("jaxllm / HF transformers, same workload and GPU", f"{ratio:.2f} x", ">= 10 x")
        summary["jaxllm_over_hf"] = ratio
    bk = _load(f.get("buckets"))
    if bk:
        for r in bk["results"]["ladders"]:
            add(f"ladder {r['ladder']} ({r['num_executables']} exes, {r['new_cache_entries']} compiled)",
                f"{r['output_throughput']:.0f} out tok/s, ITL P50/P99 {r['itl_p50_ms']:.1f}/{r['itl_p99_ms']:.1f} ms, "
                f"pad {r['padding_waste_pct']:.1f}%, start {r['startup_s']:.0f} s, "
                f"lone TTFT P50 {_num(r.get('lone_ttft_p50_ms'), 1)} ms", "")
        add("recommended ladder", bk["results"]["recommended"], "")
    from serving.bench.environment import write_json

    summary["steps"] = {s.name: dataclasses.asdict(s) for s in suite.steps.values() if s.name in k.steps}
    write_json(suite.logs / "summary.json", summary)

    w0 = max([len(r[0]) for r in rows] + [10])
    w1 = max([len(r[1]) for r in rows] + [10])
    lines = [f"== jaxllm GPU bench suite: {env.get('device_kind', suite.device['device_kind'])}, {k.model} "
             f"({k.load_format}), dtype {k.dtype}, attention {k.attn}, ladder {k.token_buckets}x{k.seq_buckets}, "
             f"JAX {env.get('jax_version', '-')}, commit {env.get('commit') or '-'}, "
             f"{time.monotonic() - suite.t0:.0f} s"]
    lines += [f"{'step':<9}{'status':<10}{'s':>7}  note"]
    for s in suite.steps.values():
        if s.name in k.steps:
            lines.append(f"{s.name:<9}{s.status:<10}{s.seconds:>7.0f}  {s.note[:200]}")
    lines += ["", f"{'figure':<{w0}}  {'measured':<{w1}}  target"]
    lines += [f"{a:<{w0}}  {b:<{w1}}  {c}" for a, b, c in rows]
    lines += ["", f"files ({k.out}): " + ", ".join(sorted(p.name for p in f.values()))]
    left = [s.name for s in suite.steps.values() if s.name in k.steps and s.status != "ok"]
    if left:
        lines.append(f"not done: {', '.join(left)}; rerun them with STEPS={','.join(left)} (same CACHE_DIR: "
                     f"{k.cache_dir}, loaded while this machine stays up)")
    return "\n".join(lines)
