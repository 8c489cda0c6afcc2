"""Regenerate benchmarks/RESULTS.md from benchmarks/results/*.json.

Every figure in RESULTS.md comes from a results file; each section names the file, the device,
model shape, dtype, JAX version and commit it was measured with. Known result kinds (``benchmark``
key written by serving.bench.environment.result_envelope) get a table; files of other layouts are
listed with their top-level keys so nothing is silently left out.

    python benchmarks/make_results_md.py [--results-dir benchmarks/results] [--output benchmarks/RESULTS.md]
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any, NamedTuple

ROOT = Path(__file__).resolve().parents[1]


def _fmt(v: Any, digits: int = 2) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        if math.isinf(v):
            return "inf"
        return f"{v:.{digits}f}"
    return str(v)


def _shape(shape: dict | None) -> str:
    if not shape:
        return "-"
    params = shape.get("num_params")
    size = f", {params / 1e9:.2f}B params" if params and params >= 1e9 else \
        (f", {params / 1e6:.0f}M params" if params else "")
    return (f"{shape.get('architecture', '?')} {shape.get('num_layers', '?')}L h{shape.get('hidden_size', '?')} "
            f"{shape.get('num_heads', '?')}q/{shape.get('num_kv_heads', '?')}kv heads{size}")


def _environment_lines(data: dict) -> list[str]:
    env = data.get("environment", {})
    device = env.get("device_kind") or env.get("device") or "unknown"
    if env.get("device_count", 1) and env.get("device_count", 1) > 1:
        device = f"{env['device_count']} x {device}"
    lines = [f"- Device: {device} ({env.get('platform', '?')}); date {data.get('date', '?')}",
             f"- Model: {env.get('model', data.get('config', {}).get('model', '-'))}; shape: {_shape(env.get('model_shape'))}",
             f"- dtype: {env.get('dtype', '-')}; JAX {env.get('jax_version', '-')}; commit `{env.get('commit', '-')}`"]
    extra = {k: env[k] for k in ("torch_version", "transformers_version") if k in env}
    if extra:
        lines.append("- " + "; ".join(f"{k.replace('_version', '')} {v}" for k, v in extra.items()))
    return lines


def _table(header: list[str], rows: list[list[Any]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(_fmt(c) for c in row) + " |" for row in rows]
    return out


def _throughput_vs_hf(data: dict) -> list[str]:
    r = data["results"]
    j = r["jaxllm"]
    rows = [["jaxllm engine", "-", _fmt(j["elapsed_time"]), j["requests_per_second"], j["tokens_per_second"],
             j["output_tokens_per_second"], "-"]]
    for h in r["transformers"]:
        rows.append(["transformers generate", h["batch_size"], _fmt(h["elapsed_time"]), h["requests_per_second"],
                     h["tokens_per_second"], h["output_tokens_per_second"], h.get("greedy_outputs_identical_to_jaxllm")])
    c = data.get("config", {})
    lines = [f"Workload: {c.get('num_prompts')} prompts, input {c.get('input_len')}, output {c.get('output_len')} "
             f"tokens, {c.get('sampling')}.", ""]
    lines += _table(["Run", "HF batch", "Seconds", "req/s", "total tok/s", "output tok/s", "greedy = jaxllm"], rows)
    lines += ["", f"**Ratio jaxllm / transformers (best batch {r['transformers_best_batch_size']}): "
                  f"{r['output_throughput_ratio_jaxllm_over_hf']:.2f}x output tokens/s, "
                  f"{r['total_throughput_ratio_jaxllm_over_hf']:.2f}x total tokens/s.**",
              f"jaxllm engine: {j.get('num_executables')} executables compiled in {_fmt(j.get('compile_s'), 1)} s "
              f"(start-up {_fmt(j.get('startup_s'), 1)} s, not in the timing), padding waste "
              f"{_fmt(j.get('padding_waste_pct'), 1)}%, {j.get('num_steps')} steps."]
    return lines


def _throughput(data: dict) -> list[str]:
    r = data["results"]
    c = data.get("config", {})
    return [f"Dataset {c.get('dataset')}, {c.get('num_prompts')} prompts.", "",
            *_table(["req/s", "total tok/s", "output tok/s", "prompt tokens", "output tokens", "padding waste %",
                     "executables", "compile s"],
                    [[r["requests_per_second"], r["tokens_per_second"], r["output_tokens_per_second"],
                      r["total_prompt_tokens"], r["total_output_tokens"], r.get("padding_waste_pct"),
                      r.get("num_executables"), r.get("compile_s")]]),
            *_steps_by_bucket(r)]


def _steps_by_bucket(r: dict) -> list[str]:
    """Wall time by executable shape and decode batch size (files written since `bench throughput`
    saves them; older files have neither)."""
    if "steps_by_bucket" not in r:
        return []

    def pct(share: float) -> str:
        return f"{100 * share:.1f}"

    lines = ["", f"Wall time by bucket shape ({_fmt(r.get('step_wall_seconds'))} s charged to steps of "
                 f"{_fmt(r['elapsed_time'])} s elapsed; a step is charged the engine's time in step() calls "
                 "since the previous step's collect, see serving/step_tally.py; wait: of that, the time spent "
                 "collecting it, i.e. waiting for the device; runs before 2026-11-22's last have none):", "",
             *_table(["tokens", "seqs", "pages", "kind", "steps", "real tokens", "real seqs", "seconds",
                      "ms/step", "wait ms/step", "% of time"],
                     [[x["tokens"], x["seqs"], x.get("pages", "-"), x["kind"], x["steps"], x["real_tokens"],
                       x["real_seqs"], x["seconds"], x["mean_step_ms"], x.get("mean_wait_ms", "-"),
                       pct(x["share_of_time"])]
                      for x in r["steps_by_bucket"]])]
    if r.get("decode_batch_sizes"):
        lines += ["", "Decode steps (one token per sequence) by batch size:", "",
                  *_table(["seqs", "steps", "mean seqs", "seconds", "ms/step", "wait ms/step", "% of time"],
                          [[x["seqs"], x["steps"], _fmt(x["mean_seqs"], 1), x["seconds"], x["mean_step_ms"],
                            x.get("mean_wait_ms", "-"), pct(x["share_of_time"])] for x in r["decode_batch_sizes"]])]
    return lines


def _hf_baseline(data: dict) -> list[str]:
    r = data["results"]
    c = data.get("config", {})
    rows = []
    for run in r.get("runs") or [r]:       # every variant tried (eager, compiled); the best is the result
        if "requests_per_second" not in run:
            rows.append([r["batch_size"], r["static_cache"], run.get("torch_compile"), "-", "-", "-", "-",
                         f"failed: {run.get('error', '?')}"])
            continue
        rows.append([run["batch_size"], run["static_cache"], run.get("torch_compile"), run["requests_per_second"],
                     run["tokens_per_second"], run["output_tokens_per_second"], run.get("warmup_s"),
                     "**result**" if run.get("torch_compile") == r.get("torch_compile") else ""])
    return [f"Dataset {c.get('dataset')}, {c.get('num_prompts')} prompts, batches of {r['batch_size']}.", "",
            *_table(["batch", "static cache", "torch.compile", "req/s", "total tok/s", "output tok/s",
                     "warm-up s", ""], rows)]


def _serve(data: dict) -> list[str]:
    r = data["results"]
    c = data.get("config", {})
    return [f"{c.get('endpoint')} on {c.get('dataset')}, {c.get('num_prompts')} prompts, request rate "
            f"{_fmt(r.get('request_rate'))}, max concurrency {_fmt(r.get('max_concurrency'))}.", "",
            *_table(["ok", "failed", "req/s", "output tok/s", "TTFT mean/P99 ms", "TPOT mean/P99 ms",
                     "ITL mean/P99 ms", "E2EL mean ms"],
                    [[r["completed"], r["failed"], r["request_throughput"], r["output_throughput"],
                      f"{_fmt(r.get('mean_ttft_ms'))} / {_fmt(r.get('p99_ttft_ms'))}",
                      f"{_fmt(r.get('mean_tpot_ms'))} / {_fmt(r.get('p99_tpot_ms'))}",
                      f"{_fmt(r.get('mean_itl_ms'))} / {_fmt(r.get('p99_itl_ms'))}", r.get("mean_e2el_ms")]])]


def _buckets(data: dict) -> list[str]:
    r = data["results"]
    c = data.get("config", {})
    # benchmarks/gpu_bench_suite.py runs each ladder in its own process and counts the executables
    # it added to the compilation cache (the others were loaded, so their compile_s is load time).
    cached = any("new_cache_entries" in x for x in r["ladders"])
    # Lone-request latency (a prompt alone, after the workload): what small token buckets are for.
    lone = any("lone_ttft_p50_ms" in x for x in r["ladders"])
    rows = [[x["ladder"], x["num_executables"], *([x.get("new_cache_entries")] if cached else []), x["compile_s"],
             x["output_throughput"], x["itl_p50_ms"], x["itl_p99_ms"], x["padding_waste_pct"],
             *([x.get("lone_ttft_p50_ms", "-")] if lone else [])] for x in r["ladders"]]
    header = ["ladder", "executables", *(["new cache entries"] if cached else []), "compile s", "output tok/s",
              "ITL P50 ms", "ITL P99 ms", "padding %", *(["lone TTFT P50 ms"] if lone else [])]
    return [f"Dataset {c.get('dataset')}, {c.get('num_prompts')} prompts." + (f" {c['note']}." if c.get("note") else ""),
            "", *_table(header, rows), "", f"Recommended: **{r['recommended']}**. {r.get('why', '')}"]


def _startup(data: dict) -> list[str]:
    r = data["results"]
    rows = [[s["process"], "empty" if s["cache_entries_before"] == 0 else f"{s['cache_entries_before']} entries",
             s.get("new_cache_entries"), s.get("startup_s"), s.get("compile_s"),
             s.get("weights_s", s.get("weights_and_kv_s")), s.get("num_executables"), s.get("process_s")]
            for s in r.get("starts", [])]
    line = "; ".join(f"{which}: " + ("not measured" if r.get(which) is None else
                                     f"{_fmt(r[which]['startup_s'], 1)} s ({r[which]['process']})")
                     for which in ("cold", "cached"))
    note = data.get("config", {}).get("note")
    return [f"**Engine start-up {line}.**" + (f" {note}." if note else ""), "",
            *_table(["process", "compilation cache before", "new cache entries", "engine start s",
                     "compile / load s", "weights (+ KV) s", "executables", "launch to ready s"], rows)]


def _schedule_bound(data: dict) -> list[str]:
    """benchmarks/schedule_bound.py: the scheduler's steps priced per ladder, and the lower bound."""
    r, c = data["results"], data.get("config", {})
    w, sim, lb = r["workload"], r["simulation"], r["lower_bound"]
    def ladder(x: dict) -> str:
        seqs = x.get("decode_seq_buckets", x["seq_buckets"])
        decode = "" if seqs == x["seq_buckets"] else f" (decode {','.join(map(str, seqs))})"
        return f"{','.join(map(str, x['token_buckets']))} x {','.join(map(str, x['seq_buckets']))}{decode}"

    rows = [[ladder(x), x["num_steps"],
             x["padded_tokens"], x["predicted_elapsed_s"], x["requests_per_second"], x["seconds_by_kind"]["decode"],
             x["seconds_by_kind"]["mixed"], x["estimated_seconds"]] for x in r["ladders"]]
    parts = lb["parts_s"]
    lines = [f"Host-only simulation: the engine's scheduler on {w['dataset']} ({w['num_prompts']} prompts, seed "
             f"{w['seed']}, max_num_seqs {c.get('max_num_seqs')}, max_num_batched_tokens "
             f"{c.get('max_num_batched_tokens')}): {sim['num_steps']} steps, {sim['decode_only_steps']} of them "
             "decode-only; each step priced at its bucket's measured step time (interpolated by tokens where "
             "never measured: \"estimated\").", "",
             *_table(["ladder (tokens x seqs)", "steps", "padded tokens", "predicted s", "req/s", "decode s",
                      "mixed s", "s at estimated costs"], rows), "",
             f"**Lower bound for any schedule without multi-token decoding: {_fmt(lb['elapsed_s'])} s = at most "
             f"{_fmt(lb['max_requests_per_second'])} req/s** (steps and tokens {_fmt(parts['steps_and_tokens_lp'])} s "
             f"+ KV reads {_fmt(parts['kv_reads'])} s; {lb['min_steps']} steps of at least "
             f"{_fmt(lb['step_floor_ms'], 3)} ms for the longest request). {lb['formula']}."]
    m = r.get("measured")
    if m:
        lines += ["", f"Measured ({m['file']}, {m['device']}): {_fmt(m['elapsed_s'])} s, "
                      f"{_fmt(m['requests_per_second'])} req/s, {m['num_steps']} steps, {m['padded_tokens']} padded "
                      f"tokens" + ("" if m["same_workload"] else " (a different workload or limits)") + "."]
    lines += ["", "Step costs:", "", *_table(["kind", "tokens", "ms", "attention ms", "source"],
                                             [[x["kind"], x["tokens"], _fmt(x["ms"], 3), x["attention_ms"],
                                               x["source"]] for x in r["cost_points"]])]
    return lines


_RENDERERS = {"throughput-vs-hf": _throughput_vs_hf, "throughput": _throughput, "hf-baseline": _hf_baseline,
              "serve": _serve, "buckets": _buckets, "startup": _startup, "schedule-bound": _schedule_bound}


def _flat(data: Any, prefix: str = "") -> list[tuple[str, Any]]:
    """Leaf values of a nested result, as dotted keys (lists of scalars kept whole)."""
    if isinstance(data, dict):
        out = []
        for k, v in data.items():
            out += _flat(v, f"{prefix}{k}.")
        return out
    if isinstance(data, list) and any(isinstance(x, (dict, list)) for x in data):
        return [(prefix.rstrip("."), f"[{len(data)} entries]")]
    return [(prefix.rstrip("."), data)]


def _get(data: dict, path: tuple):
    """The value at a key path; an int step indexes a list (e.g. ("runs", 0, "idle_fraction"))."""
    for k in path:
        if isinstance(k, int) and isinstance(data, list):
            if not -len(data) <= k < len(data):
                return None
        elif not isinstance(data, dict) or k not in data:
            return None
        data = data[k]
    return data


class Target(NamedTuple):
    """One row of a targets table. ``pattern`` is a results-file glob (the newest file counts)
    or a pair (numerator, denominator) for a ratio row; ``key`` a key path, or one per file of a pair,
    or (single files) a function of the parsed file.
    ``same_run``: a ratio only of files of one date (one run), e.g. served / offline."""
    figure: str
    target: str
    pattern: Any
    key: tuple
    unit: str
    same_run: bool = False


_RPS, _SERVED_RPS = ("results", "requests_per_second"), ("results", "request_throughput")
# Files of benchmarks/gpu_bench_suite.py (<date>-h100-8b-<what>.json).
_SUITE = "*-h100-8b-"
# Files of benchmarks/gpu_profile.py: steady decode steps timed without the profiler, then profiled.
# 1-packed: batch 1 and 64 plus a 2k-token prefill; 2-B-mindec2: batch 1 with the 2-row decode
# executables (ModelRunner.min_decode_tokens = 2, the default since); 3-async: batch 1 and 64 with
# async scheduling (the default since); E-kvwrite: batch 1 and 64 with the K/V write fused into the
# Triton decode kernel (the default since bdbea8f); A-auto-fused: the engine's default kernel="auto"
# with the K/V write fused into the Mosaic decode kernel too (d641353).
_PROFILE = "*-h100-decode-profile-"


_SUITE_H200 = "*-h200-8b-"


def _served_over(figure: str, target: str, served: str, base: str, suite: str = _SUITE) -> Target:
    """A ratio row of the suite's files of one run: bench serve's req/s over an offline req/s."""
    return Target(figure, target, (suite + served, suite + base), (_SERVED_RPS, _RPS), "x", same_run=True)


# Rows read the newest file of each pattern. The first engine files (*-engine.json: one script that
# measured batch-1 ITL, random 1024/128 and a cold start, before async scheduling and the suite) are
# superseded by the gpu_profile and suite rows below; their sections further down keep them.
_TARGETS = [
    Target("batch-1 decode step, 8B bf16, context 512, H100 (gpu_profile, unprofiled median)", "<= 5.8 ms",
           _PROFILE + "A-auto-fused.json", ("runs", 0, "step_ms_unprofiled_median"), "ms"),
    Target("prefill of a 2k-token prompt: model TFLOP/s / dense bf16 matmul TFLOP/s, same run, H100", ">= 0.5",
           _PROFILE + "1-packed.json", ("prefill", "mfu_vs_matmul"), "x"),
    Target("GPU idle share of a decode step at batch 64, context 512 (profile), H100", "<= 0.1",
           _PROFILE + "A-auto-fused.json", ("runs", 1, "idle_fraction"), ""),
    Target("start-up, 8B, 8 executables, with the compilation cache, H100 (gpu_profile)", "<= 60 s",
           _PROFILE + "1-packed-t1-cached.json", ("startup_s",), "s"),
    Target("offline throughput, sharegpt-synthetic, 500 prompts, 8B bf16, H100", ">= 40 req/s (vLLM v0.6 ~36.5)",
           _SUITE + "sharegpt-offline.json", _RPS, "req/s"),
    # benchmarks/gpu_sharegpt_configs.sh, one run family: C-seqs512 ran the flags that are the GPU
    # defaults since 5b2286a (512 sequences, seqs 1,64,512, decode-only 1,8,...,512), A-default the
    # defaults before them. The row above reads the suite's newest file, whatever defaults it ran.
    Target("offline throughput, sharegpt-synthetic, 500 prompts, 8B bf16, H100, the GPU defaults since 5b2286a "
           "(gpu_sharegpt_configs.sh C-seqs512)", ">= 40 req/s", _SUITE + "sharegpt-offline-C-seqs512.json",
           _RPS, "req/s"),
    Target("offline throughput, sharegpt-synthetic, 500 prompts, 8B bf16, H100, the GPU defaults before 5b2286a, "
           "same run family (A-default)", "record", _SUITE + "sharegpt-offline-A-default.json", _RPS, "req/s"),
    # benchmarks/schedule_bound.py: the engine's scheduler on the same workload, H100 step costs.
    Target("offline throughput bound, sharegpt-synthetic 500, any engine without multi-token decoding, at "
           "the measured H100 step costs (schedule_bound)", "record (>= 40 needs it above 40)",
           "*-cpu-sharegpt-schedule-bound.json", ("results", "lower_bound", "max_requests_per_second"), "req/s"),
    Target("offline throughput, random 1024-in/128-out, 8B bf16, H100 (bench throughput)", "record",
           _SUITE + "random1024-offline.json", _RPS, "req/s"),
    Target("start-up, 8B, engine build on an empty compilation cache, H100", "record",
           _SUITE + "startup.json", ("results", "cold", "startup_s"), "s"),
    Target("start-up, 8B, engine build with the compilation cache, H100", "<= 60 s",
           _SUITE + "startup.json", ("results", "cached", "startup_s"), "s"),
    Target("batch-1 decode step, 8B bf16, context 512, H200 (gpu_profile, unprofiled median)",
           "record (below the H100 figure)", "*-h200-decode-profile-tp1-h200.json",
           ("runs", 0, "step_ms_unprofiled_median"), "ms"),
    Target("offline throughput, random 1024-in/128-out, 8B bf16, H200 (bench throughput)", "record",
           _SUITE_H200 + "random1024-offline.json", _RPS, "req/s"),
    Target("offline throughput ratio H200 / H100, random 1024-in/128-out (bench throughput)", ">= 1.25x",
           (_SUITE_H200 + "random1024-offline.json", _SUITE + "random1024-offline.json"), _RPS, "x"),
    Target("offline throughput, sharegpt-synthetic, 500 prompts, 8B bf16, H200", "record",
           _SUITE_H200 + "sharegpt-offline.json", _RPS, "req/s"),
    _served_over("served (bench serve, rate inf) / offline throughput, sharegpt-synthetic, 8B, H200", ">= 0.9",
                 "sharegpt-served-inf.json", "sharegpt-offline.json", suite=_SUITE_H200),
    _served_over("served (bench serve, rate inf) / offline throughput, random 1024/128, 300 prompts, 8B, H100",
                 ">= 0.9", "random1024-served-inf.json", "random1024-offline.json"),
    _served_over("served (bench serve, rate inf) / offline throughput, sharegpt-synthetic, 8B, H100", ">= 0.9",
                 "sharegpt-served-inf.json", "sharegpt-offline.json"),
    _served_over("jaxllm (served, 64 in flight) / HF transformers (batch 64), random 1024/128, 8B bf16, H100",
                 ">= 10x", "random1024-served-c64.json", "random1024-hf-b64.json"),
    _served_over("jaxllm (served, 64 in flight) / HF transformers (batch 64), random 1024/128, 8B bf16, H200",
                 ">= 10x", "random1024-served-c64.json", "random1024-hf-b64.json", suite=_SUITE_H200),
    # Ragged lengths: HF's static batch of 64 runs until its longest request ends, and torch.compile
    # would recompile for every batch's shapes, so HF runs eager here (the suite's HF_COMPILE=off).
    _served_over("jaxllm (served, 64 in flight) / HF transformers (batch 64, eager), sharegpt-synthetic, "
                 "64 prompts, 8B bf16, H200", ">= 10x", "sharegpt-served-c64.json", "sharegpt-hf-b64.json",
                 suite=_SUITE_H200),
    _served_over("jaxllm (served, 64 in flight) / HF transformers (batch 64, eager), sharegpt-synthetic, "
                 "64 prompts, 8B bf16, H100", ">= 10x", "sharegpt-served-c64.json", "sharegpt-hf-b64.json"),
]


# Issue 6, on 2 / 4 x H200. gpu_profile files: tp1-f82dc35 (TP1, two runs in one call), tp2-launch-thread
# and tp2-no-launch-thread (one call, 48a41ac: the runner's launch thread on / off); TP1's path has
# no launch thread, so its figure from the call before stands. gpu_sharding: the TP2/TP1 row reads the
# merged file of 2026-11-21 (227f561, before the launch thread; TP2 hit its compile timeout in the
# 2026-11-22 run), the 70B row the newest.
_PROFILE_H200 = "*-h200-decode-profile-"
_SHARDING_H200 = "*-h200x4-sharding.json"
_MULTI_GPU_TARGETS = [
    Target("batch-1 decode step, 8B bf16, context 512, TP2 on 2 x H200 (gpu_profile, launch thread)", "record",
           _PROFILE_H200 + "tp2-launch-thread.json", ("runs", 0, "step_ms_unprofiled_median"), "ms"),
    Target("batch-1 decode step, TP2 with / without the launch thread, 8B, 2 x H200 (one run)", "< 1",
           (_PROFILE_H200 + "tp2-launch-thread.json", _PROFILE_H200 + "tp2-no-launch-thread.json"),
           ("runs", 0, "step_ms_unprofiled_median"), "x", same_run=True),
    Target("batch-1 decode step TP2 / TP1, 8B, 2 x H200 (gpu_profile; TP2 launch thread 48a41ac, TP1 f82dc35: "
           "two calls on the same kind)", "<= 0.6",
           (_PROFILE_H200 + "tp2-launch-thread.json", _PROFILE_H200 + "tp1-f82dc35.json"),
           ("runs", 0, "step_ms_unprofiled_median"), "x"),
    Target("batch-64 decode step TP2 / TP1, 8B, 2 x H200 (as above)", "record",
           (_PROFILE_H200 + "tp2-launch-thread.json", _PROFILE_H200 + "tp1-f82dc35.json"),
           ("runs", 1, "step_ms_unprofiled_median"), "x"),
    Target("batch-1 ITL TP2 / TP1, 8B (gpu_sharding, before the launch thread)", "<= 0.6",
           "2026-11-21-h200x4-sharding.json", ("results", "targets", "tp2_itl_over_tp1", "value"), "x"),
    Target("70B TP4 batch-1 ITL / roofline (weights / (4 x copy bandwidth)), 4 x H200 (gpu_sharding)",
           "<= 1.3", _SHARDING_H200, ("results", "targets", "70b_tp4_itl_over_roofline", "value"), "x"),
    # gpu_profile of the same shape: the step's device time by category (GEMMs, all-reduces, ...).
    Target("70B TP4 batch-1 decode step / roofline, 4 x H200 (gpu_profile, unprofiled median)", "<= 1.3",
           (_PROFILE_H200 + "70b-tp4-control.json", _PROFILE_H200 + "70b-tp4-control.json"),
           (("runs", 0, "step_ms_unprofiled_median"), ("roofline_ms",)), "x"),
]


def _kernel_min(impl: str, field: str, section: str = "decode", where=lambda row: True):
    """A key function for kernels.py files: the smallest ``field`` of ``impl`` over the rows of
    ``section`` that ``where`` selects (None when a selected row lacks it: a target over a matrix
    holds only if every shape was measured)."""
    def key(data: dict):
        rows = [r for r in data.get(section, []) if where(r)]
        values = [(r.get(impl) or {}).get(field) for r in rows]
        return min(values) if rows and None not in values else None
    return key


# Issue 4, kernels.py files (one H200). "busy": device time of the op's kernels per call from a
# trace; "wall": the timing loop's clock, which also holds launch gaps between the small XLA ops
# around the kernel (see kernels.py's docstring).
# Several runs a day are numbered (-0-glue, -1-fused): the newest date and number wins.
_KERNELS_H200 = "*-h200-kernels-decode-matrix*.json"
_PREFILL_H200 = "*-h200-kernels-prefill-mosaic.json"
_LARGE = dict(where=lambda r: r["batch"] >= 32 and r["context"] >= 2048)
_ONE_32K = dict(where=lambda r: r["batch"] == 1 and r["context"] == 32768)
_KERNEL_TARGETS = [
    Target("decode, Mosaic kernel, min over batch 32-256 x context 2k-32k, fraction of copy (busy)",
           ">= 0.9", _KERNELS_H200, _kernel_min("pallas_mosaic", "frac_copy_busy", **_LARGE), "x"),
    Target("decode, Mosaic kernel, as above by wall clock", ">= 0.9", _KERNELS_H200,
           _kernel_min("pallas_mosaic", "frac_copy", **_LARGE), "x"),
    Target("decode, Triton kernel, as above (busy)", "record", _KERNELS_H200,
           _kernel_min("pallas_triton", "frac_copy_busy", **_LARGE), "x"),
    Target("decode, JAX's own paged_attention, as above (busy)", "record", _KERNELS_H200,
           _kernel_min("jax_pallas_paged", "frac_copy_busy", **_LARGE), "x"),
    Target("decode batch 1 x context 32k, Mosaic kernel, fraction of copy (busy)", ">= 0.7",
           _KERNELS_H200, _kernel_min("pallas_mosaic", "frac_copy_busy", **_ONE_32K), "x"),
    Target("decode batch 1 x context 32k, Mosaic kernel, by wall clock", ">= 0.7",
           _KERNELS_H200, _kernel_min("pallas_mosaic", "frac_copy", **_ONE_32K), "x"),
    Target("prefill 2k-8k causal chunks, Mosaic kernel, min fraction of bf16 matmul (busy)", ">= 0.5",
           _PREFILL_H200, _kernel_min("pallas_mosaic", "frac_matmul_busy", section="prefill"), "x"),
    Target("prefill 2k-8k, Triton kernel, min fraction of bf16 matmul (busy)", "record",
           _PREFILL_H200, _kernel_min("pallas_triton", "frac_matmul_busy", section="prefill"), "x"),
    Target("prefill 2k-8k, JAX's attention_mgpu on contiguous K/V (128-key blocks), min (busy)", "record",
           _PREFILL_H200, _kernel_min("jax_mgpu_dense_bkv128", "frac_matmul_busy", section="prefill"),
           "x"),
]


def _newest(results_dir: Path, pattern: str, date: str | None = None) -> tuple[Any, str]:
    """(parsed newest file matching pattern or None, its name or "-"); names sort by their date prefix.
    With ``date``, only files whose name starts with it."""
    hits = [p for p in sorted(results_dir.glob(pattern)) if date is None or p.name.startswith(date)]
    return (json.loads(hits[-1].read_text()), hits[-1].name) if hits else (None, "-")


def _commit_of(data: dict) -> Any:
    """The commit a results file names (suite files: under "environment")."""
    return (data.get("environment") or {}).get("commit", data.get("commit"))


def _shared_date(results_dir: Path, patterns) -> str | None:
    """The newest date prefix (yyyy-mm-dd) that files of every pattern have."""
    dates = [{p.name[:10] for p in results_dir.glob(pat)} for pat in patterns]
    common = set.intersection(*dates) if dates else set()
    return max(common) if common else None


def _targets(results_dir: Path, targets=None, heading="One-GPU targets (issue 8) measured so far") -> list[str]:
    rows = []
    for figure, target, pattern, key, unit, same_run in (_TARGETS if targets is None else targets):
        if isinstance(pattern, tuple):
            date = _shared_date(results_dir, pattern) if same_run else None
            if same_run and date is None:
                (num, num_name), (den, den_name) = (None, "-"), (None, "-")
            else:
                (num, num_name), (den, den_name) = (_newest(results_dir, p, date) for p in pattern)
            num_key, den_key = key if isinstance(key[0], tuple) else (key, key)   # a key path per file, or one
            a = _get(num, num_key) if num is not None else None
            b = _get(den, den_key) if den is not None else None
            value = round(a / b, 3) if a is not None and b else None
            name = f"{num_name} / {den_name}"
            if same_run and value is not None and _commit_of(num) != _commit_of(den):
                # Same date, different runs (several sessions a day): not a side-by-side ratio.
                value, name = None, f"{name} (different runs: commits {_commit_of(num)} / {_commit_of(den)})"
        else:
            data, name = _newest(results_dir, pattern)
            value = None if data is None else key(data) if callable(key) else _get(data, key)
            if isinstance(value, float):
                value = round(value, 3)
        rows.append([figure, target, "not measured" if value is None else f"{value} {unit}", name])
    return [f"## {heading}", "",
            *_table(["figure", "target", "measured", "file"], rows), ""]


def render(results_dir: Path) -> str:
    files = sorted(results_dir.glob("*.json"))
    out = ["# Benchmark results", "",
           "Generated by `python benchmarks/make_results_md.py` from `benchmarks/results/*.json`; do not edit by hand.",
           "A figure not in a results file was not measured. Ratios are measured side by side in one run; "
           "absolute times only hold on the device named.", "", *_targets(results_dir),
           *_targets(results_dir, _MULTI_GPU_TARGETS, "Multi-GPU targets (issue 6) measured so far"),
           *_targets(results_dir, _KERNEL_TARGETS, "Attention-kernel targets (issue 4), one H200")]
    pngs = sorted(results_dir.glob("*.png"))
    if pngs:       # benchmarks/plot_results.py, kernels.py and sharding_layouts.py write them
        out += ["## Figures", "", *[f"- [{p.name}](results/{p.name})" for p in pngs], ""]
    for path in files:
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            out += [f"## {path.name}", "", f"(unreadable: {e.msg})", ""]
            continue
        kind = data.get("benchmark") if isinstance(data, dict) else None
        out += [f"## {path.name}", ""]
        if kind in _RENDERERS and "environment" in data:
            out += [f"Benchmark: `{kind}`", *_environment_lines(data), "", *_RENDERERS[kind](data), ""]
        else:
            keys = ", ".join(sorted(data)[:12]) if isinstance(data, dict) else type(data).__name__
            out += [f"A results file of another layout (keys: {keys}); see the file itself."]
            if isinstance(data, dict):
                # Other writers (e.g. benchmarks/kernels.py) name the same facts at the top level.
                facts = [f"{k}: {data[k]}" for k in ("device", "jax", "jax_version", "commit", "dtype")
                         if k in data and not isinstance(data[k], (dict, list))]
                out += [f"- {f}" for f in facts]
                leaves = [(k, v) for k, v in _flat(data) if isinstance(v, (int, float)) and not isinstance(v, bool)]
                out += [f"- {k}: {_fmt(v)}" for k, v in leaves[:40]]
                if len(leaves) > 40:
                    out.append(f"- ... {len(leaves) - 40} more figures in the file")
            out.append("")
    return "\n".join(out).rstrip() + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--results-dir", default=str(ROOT / "benchmarks" / "results"))
    p.add_argument("--output", default=str(ROOT / "benchmarks" / "RESULTS.md"))
    ns = p.parse_args(argv)
    text = render(Path(ns.results_dir))
    Path(ns.output).write_text(text, encoding="utf-8")
    print(f"Wrote {ns.output} from {len(list(Path(ns.results_dir).glob('*.json')))} result file(s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
