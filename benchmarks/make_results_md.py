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
from typing import Any

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
                      r.get("num_executables"), r.get("compile_s")]])]


def _hf_baseline(data: dict) -> list[str]:
    r = data["results"]
    return _table(["batch", "static cache", "torch.compile", "req/s", "total tok/s", "output tok/s"],
                  [[r["batch_size"], r["static_cache"], r.get("torch_compile"), r["requests_per_second"],
                    r["tokens_per_second"], r["output_tokens_per_second"]]])


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
    rows = [[x["ladder"], x["num_executables"], x["compile_s"], x["output_throughput"], x["itl_p50_ms"],
             x["itl_p99_ms"], x["padding_waste_pct"]] for x in r["ladders"]]
    return [*_table(["ladder", "executables", "compile s", "output tok/s", "ITL P50 ms", "ITL P99 ms", "padding %"],
                    rows), "", f"Recommended: **{r['recommended']}**. {r.get('why', '')}"]


_RENDERERS = {"throughput-vs-hf": _throughput_vs_hf, "throughput": _throughput, "hf-baseline": _hf_baseline,
              "serve": _serve, "buckets": _buckets}


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
    for k in path:
        if not isinstance(data, dict) or k not in data:
            return None
        data = data[k]
    return data


# Issue 8's one-GPU targets: (figure, target, results file glob, key path, unit). A pair of globs
# (numerator, denominator) makes a ratio row: the key's value in the newest file of each, divided.
_H100 = "*-nvidia-h100-80gb-hbm3-engine.json"
_H200 = "*-nvidia-h200-engine.json"
_ITL = ("llama-3.1-8b", "batch1_itl_ms_ctx512")
_RANDOM_RPS = ("llama-3.1-8b", "random_1024_128", "requests_per_s")
_TARGETS = [
    ("batch-1 ITL, Llama-3.1-8B bf16, context <= 1k, H100", "<= 5.8 ms (vLLM 6.44 ms; roofline ~5.0)",
     _H100, _ITL, "ms"),
    ("offline throughput, random 1024-in/128-out, 8B bf16, H100", "record (H200 >= 1.25x H100)",
     _H100, _RANDOM_RPS, "req/s"),
    ("start-up, 8B, 9 executables, cold compile, H100", "record; <= 60 s with the cache",
     _H100, ("llama-3.1-8b", "startup_s"), "s"),
    ("batch-1 ITL, Llama-3.1-8B bf16, context <= 1k, H200", "record (below the H100 figure)",
     _H200, _ITL, "ms"),
    ("offline throughput, random 1024-in/128-out, 8B bf16, H200", "record",
     _H200, _RANDOM_RPS, "req/s"),
    ("offline throughput ratio H200 / H100, random 1024-in/128-out", ">= 1.25x",
     (_H200, _H100), _RANDOM_RPS, "x"),
    ("served (bench serve, rate inf) / offline throughput, random 1024/128, 300 prompts, 8B, H100", ">= 0.9",
     ("*-h100-8b-random1024-served-inf.json", "*-h100-8b-random1024-offline.json"),
     (("results", "request_throughput"), ("results", "requests_per_second")), "x"),
]


def _newest(results_dir: Path, pattern: str) -> tuple[Any, str]:
    """(parsed newest file matching pattern or None, its name or "-"); names sort by their date prefix."""
    hits = sorted(results_dir.glob(pattern))
    return (json.loads(hits[-1].read_text()), hits[-1].name) if hits else (None, "-")


def _targets(results_dir: Path) -> list[str]:
    rows = []
    for figure, target, pattern, key, unit in _TARGETS:
        if isinstance(pattern, tuple):
            (num, num_name), (den, den_name) = (_newest(results_dir, p) for p in pattern)
            num_key, den_key = key if isinstance(key[0], tuple) else (key, key)   # a key path per file, or one
            a = _get(num, num_key) if num is not None else None
            b = _get(den, den_key) if den is not None else None
            value = round(a / b, 3) if a is not None and b else None
            name = f"{num_name} / {den_name}"
        else:
            data, name = _newest(results_dir, pattern)
            value = _get(data, key) if data is not None else None
        rows.append([figure, target, "not measured" if value is None else f"{value} {unit}", name])
    return ["## One-GPU targets (issue 8) measured so far", "",
            *_table(["figure", "target", "measured", "file"], rows), ""]


def render(results_dir: Path) -> str:
    files = sorted(results_dir.glob("*.json"))
    out = ["# Benchmark results", "",
           "Generated by `python benchmarks/make_results_md.py` from `benchmarks/results/*.json`; do not edit by hand.",
           "A figure not in a results file was not measured. Ratios are measured side by side in one run; "
           "absolute times only hold on the device named.", "", *_targets(results_dir)]
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
