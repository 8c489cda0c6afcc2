"""How fast can `bench throughput` finish a workload? The real scheduler's step sequence, priced
with measured step costs, and a lower bound no schedule beats (issue 8: sharegpt-synthetic, 500
prompts, on one H100). Host only: no jax, no device; seconds on two CPU cores.

1. The workload is built as ``jaxllm bench throughput --dataset-name sharegpt-synthetic
   --num-prompts 500 --seed 0`` builds it for a dummy-weight model (serving.bench.datasets, token
   ids of ``--vocab-size``), and each request is added as the benchmark adds it (ignore_eos,
   max_tokens = its output length).
2. serving.scheduler.Scheduler (the engine's, with the GPU defaults of serving/engine_builder.py and
   enough KV pages that nothing is preempted) plans every step; a counting runner stands in for
   the model (it samples where serving.model_runner samples; ignore_eos makes the token values
   irrelevant). Steps are issued as LLMEngine issues them: with async scheduling (the default)
   step N+1 is scheduled before step N's results are applied.
3. Each step goes to the bucket the runner would pad it to (serving.buckets.BucketLadder.select;
   a decode-only step, one token per sequence, runs the decode executable of its sequence bucket
   with max(seq bucket, MIN_DECODE_TOKENS) token rows: ModelRunner._decode_tokens), for the GPU
   ladder and optionally one given by --token-buckets / --seq-buckets.
4. Cost model, one number per executable (ms), whatever the real tokens, context or sampler:
   - measured points: decode steps by batch and a prefill step of one full-chunk prompt
     (default: the H100 Llama-3.1-8B bf16 files in benchmarks/results named in H100_DECODE_SOURCES
     and H100_PREFILL_SOURCE, context 512; or --cost-table FILE.json / --decode-ms / --prefill-ms);
   - a decode bucket of a measured batch, or a mixed bucket of a measured prefill size, costs that
     point ("measured");
   - any other bucket is interpolated linearly by the executable's token rows between the two
     nearest points of all of them ("interpolated"; beyond the last, extended along the last two
     points; below the first, the first: "extrapolated"). Step cost is flat (weight reads) until the
     matmuls turn compute-bound, so a chord across that knee likely over-prices the bucket.
   Predicted elapsed = the sum over steps; host time and idle gaps are not modelled.
5. The lower bound holds for any engine that computes at most one new token per request per step
   (no speculative or multi-token decoding), runs one step at a time and the kernels of a step one
   after another, puts at most B = max_num_batched_tokens tokens in a step, and gets no prefix-cache
   hits (random prompts). A step's cost is split into attention and the rest, because the measured
   points ran at context 512 while attention's cost follows each sequence's context:
   (a) apart from attention, a step of t tokens costs at least every measured step of <= t tokens
       less its attention kernels (the profile's "attention (pallas)" time), and at least r ms per
       token, r = the least such cost per token over the points (the full-chunk prefill; a point
       with no attention figure, like that one, keeps its attention in);
   (b) attention reads, for every decode token, the cached K and V of its whole context, no
       faster than --hbm-gbps (default the H100 SXM datasheet peak, above the measured copy rate).
   So a step of t tokens costs at least g(t) = max(max{ms_j - attention_j : tokens_j <= t}, r * t)
   plus its attention reads. Request i (prompt p_i, output L_i) is in at least
   ceil(p_i / B) + L_i - 1 steps (each output token needs its own), so every schedule has at least
   S = max_i(ceil(p_i / B) + L_i - 1) steps and computes T = sum_i(p_i + L_i - 1) tokens, and its
   decode tokens read at least KV = sum_i sum_{k=1}^{L_i-1} (p_i + k - 1) cached tokens:

       bound = LP + KV * kv_bytes_per_token / hbm_bandwidth,
       LP    = min over step counts n_t >= 0 of sum_t n_t g(t)
               subject to sum_t n_t >= S and sum_t n_t t >= T   (t = 1 .. B),

   a linear program (fractional step counts: only weaker than the integer problem) solved exactly
   by trying every step size alone and every pair. LP is at least S * g(1) (the longest request's
   steps) and T * r (every token at the full-chunk rate). Without attention figures for the decode
   points, g keeps their attention (context 512) and the KV term is left out. The bound is printed
   with its parts; it holds for step kernels no faster than the measured ones.

    python benchmarks/schedule_bound.py --seq-buckets 1,8,16,32,64,128,256
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import sys
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from serving.bench import datasets as ds  # noqa: E402
from serving.bench.environment import result_envelope, write_json  # noqa: E402
from serving.bench.step_breakdown import decode_batch_histogram, steps_by_bucket  # noqa: E402
from serving.buckets import BucketLadder  # noqa: E402
from serving.plan import RunnerOutput, StepPlan  # noqa: E402
from serving.request import Request  # noqa: E402
from serving.sampling_params import SamplingParams  # noqa: E402
from serving.scheduler import Scheduler  # noqa: E402
from serving.step_tally import StepTally  # noqa: E402

from benchmarks.step_costs import (  # noqa: E402  (the cost names are re-exported: __all__)
    H100_DECODE_SOURCES, H100_PREFILL_SOURCE, MIN_DECODE_TOKENS, CostModel, CostPoint, h100_cost_points,
    load_cost_table, parse_ms_list)

RESULTS = ROOT / "benchmarks" / "results"
__all__ = ["CostModel", "CostPoint", "H100_DECODE_SOURCES", "H100_PREFILL_SOURCE", "MIN_DECODE_TOKENS",
           "build_workload", "h100_cost_points", "load_cost_table", "lower_bound", "main", "parse_ms_list",
           "predict", "simulate"]
# serving/engine_builder.py _GPU_DEFAULTS and ModelRunner.min_decode_tokens (importing those pulls in
# jax; tests/test_bench_schedule_bound.py checks the copies).
GPU_TOKEN_BUCKETS = (512, 2048)
GPU_SEQ_BUCKETS = (1, 64, 512)
GPU_DECODE_SEQ_BUCKETS = (1, 8, 16, 32, 64, 128, 256, 512)
GPU_MAX_NUM_BATCHED_TOKENS = 2048
GPU_MAX_NUM_SEQS = 512
LLAMA_8B_VOCAB = 128256
# The run with the GPU defaults above (gpu_sharegpt_configs.sh's C-seqs512 before they were the defaults).
H100_MEASURED_RUN = "2026-11-22-h100-8b-sharegpt-offline-C-seqs512.json"
# Llama-3.1-8B's KV cache per token: 32 layers x 8 KV heads x 128 dims x (K, V) x 2 bytes (bf16).
LLAMA_8B_KV_BYTES_PER_TOKEN = 32 * 8 * 128 * 2 * 2
# H100 SXM5 80 GB datasheet HBM3 peak: no kernel reads faster (the profile files' measured copy,
# bytes read + written, is 2939-3016 GB/s), so the bound's KV term is at its smallest.
H100_HBM_GBPS = 3350.0


# --- workload and simulation ------------------------------------------------------------------------
def build_workload(dataset: str, num_prompts: int, seed: int, vocab_size: int) -> list[ds.SampleRequest]:
    """The requests `bench throughput` sends for a dummy-weight model of this vocabulary."""
    if dataset not in ("sharegpt-synthetic", "random"):
        # Shared prefixes would be served from the prefix cache, which the bound does not allow for.
        raise ValueError(f"dataset must be sharegpt-synthetic or random, got {dataset!r}")
    return ds.build_dataset(dataset, ds.TokenSource(vocab_size=vocab_size), num_prompts, seed=seed)


class _CountingRunner:
    """The runner side of the step contract, counting only: a request samples a token (always 0)
    when the step reaches the end of its known tokens, a token sampled by a step still in flight
    included (serving.model_runner's rule). With ignore_eos only max_tokens ends a request, so the
    token values never matter."""

    def __init__(self):
        self.known: dict[str, int] = {}

    def run(self, plan: StepPlan) -> RunnerOutput:
        for req_id in plan.finished_req_ids:
            self.known.pop(req_id, None)
        computed = {}
        for new in plan.new_requests:
            self.known[new.req_id] = len(new.prompt_token_ids) + len(new.output_token_ids)
            computed[new.req_id] = new.num_computed_tokens
        for cached in plan.cached_requests:
            computed[cached.req_id] = cached.num_computed_tokens
        sampled = {}
        for req_id, n in plan.num_scheduled_tokens.items():
            samples = computed[req_id] + n >= self.known[req_id]
            self.known[req_id] += samples
            sampled[req_id] = (0,) if samples else ()
        return RunnerOutput(tuple(plan.num_scheduled_tokens), sampled, {}, {})


@dataclasses.dataclass(frozen=True)
class Simulation:
    steps: tuple[tuple[int, int], ...]       # (tokens, sequences) of every step, in order
    finish_step: tuple[int, ...]             # per request: the 1-based step whose token finished it
    num_pages: int
    num_preemptions: int
    prefix_cache_hits: int

    @property
    def scheduled_tokens(self) -> int:
        return sum(t for t, _ in self.steps)


def simulate(requests: Sequence[ds.SampleRequest], *, max_model_len: int, max_num_seqs: int,
             max_num_batched_tokens: int, block_size: int, num_pages: Optional[int] = None,
             async_scheduling: bool = True) -> Simulation:
    """Every step the engine's scheduler plans for these requests (see the module docstring)."""
    for i, r in enumerate(requests):
        if r.prompt_len >= max_model_len:
            raise ValueError(f"request {i}: prompt of {r.prompt_len} tokens does not fit max-model-len {max_model_len}")
    if num_pages is None:     # every request's pages at once (no preemption), plus the null page
        num_pages = 1 + max(-(-max_model_len // block_size),     # the scheduler's minimum
                            sum(-(-(r.prompt_len + r.expected_output_len) // block_size) for r in requests))
    sched = Scheduler(num_pages=num_pages, page_size=block_size, max_model_len=max_model_len,
                      max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens)
    for i, r in enumerate(requests):
        sched.add_request(Request(str(i), r.prompt_token_ids,
                                  SamplingParams(max_tokens=r.expected_output_len, ignore_eos=True)))
    runner = _CountingRunner()
    steps: list[tuple[int, int]] = []
    finish = [0] * len(requests)
    in_flight = None                         # (plan, result, step number) scheduled, not applied
    while sched.has_requests() or in_flight is not None:
        plan = sched.schedule()
        result = runner.run(plan)       # an empty plan only tells the runner which requests finished
        current = None
        if not plan.is_empty:           # the engine counts (and a device runs) only these
            steps.append((plan.total_num_scheduled_tokens, len(plan.num_scheduled_tokens)))
            current = (plan, result, len(steps))
        # LLMEngine._step_async applies step N after scheduling N+1; the sync engine at once.
        apply, in_flight = (in_flight, current) if async_scheduling else (current, None)
        if apply is None:
            if in_flight is None and sched.has_unfinished_requests():
                raise RuntimeError("the scheduler planned nothing with requests waiting")
            continue
        for out in sched.update(apply[0], apply[1]):
            if out.finish_reason is not None:
                finish[int(out.req_id)] = apply[2]
    stats = sched.get_stats()
    return Simulation(tuple(steps), tuple(finish), num_pages, sched.num_preemptions, stats.prefix_cache_hits)


# --- per-ladder prediction --------------------------------------------------------------------------
def ladder_for(token_buckets, seq_buckets, *, max_num_batched_tokens: int, max_num_seqs: int,
               max_model_len: int, block_size: int, decode_seq_buckets=None) -> BucketLadder:
    # One page width: the Pallas kernels' (GPU default attention) ladder.
    return BucketLadder.build(max_num_batched_tokens=max_num_batched_tokens, max_num_seqs=max_num_seqs,
                              max_pages_per_seq=-(-max_model_len // block_size), token_buckets=token_buckets,
                              seq_buckets=seq_buckets, decode_seq_buckets=decode_seq_buckets,
                              paged_width_buckets=False)


def bucket_of(ladder: BucketLadder, tokens: int, seqs: int) -> tuple[int, int, int, bool, bool]:
    """The executable key (tokens, seqs, pages, decode_only, plain) the runner picks for a step; the
    sampler variant (plain) is not modelled: always False."""
    t_pad, s_pad, p_pad = ladder.select(tokens, seqs, ladder.page_buckets[-1])
    decode_only = tokens == seqs
    s_pad = ladder.decode_seqs(seqs) if decode_only else s_pad      # the runner's decode seq ladder
    return (max(s_pad, MIN_DECODE_TOKENS) if decode_only else t_pad), s_pad, p_pad, decode_only, False


def predict(sim: Simulation, ladder: BucketLadder, costs: CostModel, num_requests: int,
            output_tokens: int) -> tuple[dict, StepTally]:
    """The simulated steps priced on one ladder: totals and `bench throughput`'s bucket rows."""
    tally, clock, padded = StepTally(), 0.0, 0
    priced: dict[tuple, tuple[float, str, str]] = {}
    for tokens, seqs in sim.steps:
        key = bucket_of(ladder, tokens, seqs)
        if key not in priced:
            priced[key] = costs.step_ms(key[0], key[1], key[3])
        tally.begin_call(clock)
        clock += priced[key][0] / 1e3
        tally.record(key, tokens, seqs, clock)
        padded += key[0]
    rows = steps_by_bucket(tally, clock)
    for row in rows:
        row["ms_per_step"], row["basis"], row["cost_source"] = priced[
            (row["tokens"], row["seqs"], row["pages"], row["decode_only"], row["plain"])]
    by_kind = {kind: sum(r["seconds"] for r in rows if r["decode_only"] == (kind == "decode"))
               for kind in ("decode", "mixed")}
    return {"token_buckets": list(ladder.token_buckets), "seq_buckets": list(ladder.seq_buckets),
            "decode_seq_buckets": list(ladder.decode_seq_buckets),
            "num_steps": len(sim.steps), "predicted_elapsed_s": clock,
            "requests_per_second": num_requests / clock, "output_tokens_per_second": output_tokens / clock,
            "padded_tokens": padded, "seconds_by_kind": by_kind,
            "estimated_seconds": sum(r["seconds"] for r in rows if r["basis"] != "measured"),
            "steps_by_bucket": rows}, tally


# --- lower bound ------------------------------------------------------------------------------------
def min_cost_lp(sizes: np.ndarray, cost: np.ndarray, min_steps: float, total_tokens: float) -> float:
    """min sum n_i cost_i  s.t.  sum n_i >= min_steps, sum n_i sizes_i >= total_tokens, n >= 0, for
    ascending sizes. Two constraints, so an optimal vertex uses one size (one constraint tight) or
    two (both tight)."""
    u, c = sizes.astype(float), cost.astype(float)
    best = float(np.min(c * np.maximum(min_steps, total_tokens / u)))
    for i in range(len(u)):
        if u[i] * min_steps >= total_tokens:
            break                            # this size alone, and every larger one, meets both
        j = u > u[i]
        n_big = (total_tokens - u[i] * min_steps) / (u[j] - u[i])
        ok = n_big <= min_steps
        if ok.any():
            best = min(best, float(np.min(((min_steps - n_big) * c[i] + n_big * c[j])[ok])))
    return best


def lower_bound(requests: Sequence[ds.SampleRequest], costs: CostModel, *, max_num_batched_tokens: int,
                max_model_len: int, kv_bytes_per_token: int, hbm_gbps: float) -> dict:
    """The bound of the module docstring, in seconds, with its parts."""
    b = max_num_batched_tokens
    prompts = np.array([r.prompt_len for r in requests], dtype=np.int64)
    outputs = np.minimum([r.expected_output_len for r in requests], max_model_len - prompts)
    steps_each = -(-prompts // b) + outputs - 1
    min_steps = int(steps_each.max())
    total_prompt, total_tokens = int(prompts.sum()), int((prompts + outputs - 1).sum())
    kv_reads = int(((outputs - 1) * prompts + (outputs - 1) * (outputs - 2) // 2).sum())
    rate, rate_point = costs.best_ms_per_token()
    g = costs.step_floor_ms(b)
    # Step sizes worth trying: the largest of each cost (g never falls: more tokens for the same cost).
    t = np.arange(1, b + 1)
    keep = np.append(g[1:-1] < g[2:], True)
    lp_ms = min_cost_lp(t[keep], g[1:][keep], min_steps, total_tokens)
    kv_ms = 1e3 * kv_reads * kv_bytes_per_token / (hbm_gbps * 1e9) if costs.attention_split else 0.0
    bound_s = (lp_ms + kv_ms) / 1e3
    return {"elapsed_s": bound_s, "max_requests_per_second": len(requests) / bound_s,
            "parts_s": {"longest_request_steps": float(min_steps * g[1]) / 1e3, "all_tokens": total_tokens * rate / 1e3,
                        "steps_and_tokens_lp": lp_ms / 1e3, "kv_reads": kv_ms / 1e3},
            "attention_split": costs.attention_split,
            "min_steps": min_steps, "min_steps_request": int(steps_each.argmax()),
            "total_prompt_tokens": total_prompt, "total_computed_tokens": total_tokens,
            "decode_kv_token_reads": kv_reads, "mean_decode_context": kv_reads / max(int((outputs - 1).sum()), 1),
            "kv_bytes_per_token": kv_bytes_per_token, "hbm_gbps": hbm_gbps, "max_num_batched_tokens": b,
            "step_floor_ms": float(g[1]), "best_ms_per_token": rate, "best_ms_per_token_source": rate_point.source,
            "formula": "LP + KV * kv_bytes_per_token / hbm_bandwidth; LP = min sum_t n_t g(t) s.t. sum n_t >= S, "
                       "sum n_t t >= T (t <= B); g(t) = max(max{ms_j - attention_j: tokens_j <= t}, r*t), "
                       "r = min (ms_j - attention_j)/tokens_j; S = max_i(ceil(p_i/B) + L_i - 1), "
                       "T = sum_i(p_i + L_i - 1), KV = sum_i sum_{k<L_i} (p_i + k - 1)",
            "assumptions": "at most one new token per request per step; one step, and one kernel, at a time; at "
                           "most B tokens a step; no prefix-cache hits; apart from attention a step costs at least "
                           "every measured step of no more tokens, and r ms per token; decode attention reads "
                           "each cached context token's K and V at most at hbm_gbps"}


# --- the measured run -------------------------------------------------------------------------------
def measured_comparison(path: Path, config: dict, default_ladder: dict) -> Optional[dict]:
    """The measured `bench throughput` run beside the simulation of the GPU ladder."""
    if not path.is_file():
        return None
    data = json.loads(path.read_text())
    r, c = data["results"], data.get("config", {})
    engine = c.get("engine_args", {})
    same = (c.get("dataset") == config["dataset"] and c.get("num_prompts") == config["num_prompts"]
            and c.get("seed") == config["seed"]
            and all(engine.get(k) in (None, config[k]) for k in ("max_model_len", "max_num_seqs",
                                                                  "max_num_batched_tokens")))
    out = {"file": path.name, "device": data.get("environment", {}).get("device_kind"),
           "commit": data.get("environment", {}).get("commit"), "same_workload": same,
           "elapsed_s": r["elapsed_time"], "requests_per_second": r["requests_per_second"],
           "num_steps": r.get("num_steps"), "padded_tokens": r.get("padded_tokens"),
           "scheduled_tokens": r.get("scheduled_tokens")}
    if "steps_by_bucket" in r:              # runs since 71a690a: measured ms per step of each bucket
        seen: dict[tuple, list[float]] = {}
        for x in r["steps_by_bucket"]:
            s = seen.setdefault((x["tokens"], x["seqs"], x["decode_only"]), [0, 0.0])
            s[0] += x["steps"]
            s[1] += x["seconds"]
        for row in default_ladder["steps_by_bucket"]:
            s = seen.get((row["tokens"], row["seqs"], row["decode_only"]))
            row["measured_ms_per_step"] = 1e3 * s[1] / s[0] if s and s[0] else None
    return out


# --- output -----------------------------------------------------------------------------------------
def format_report(res: dict) -> str:
    w, sim, lb = res["workload"], res["simulation"], res["lower_bound"]
    lines = [f"Workload: {w['dataset']}, {w['num_prompts']} prompts, seed {w['seed']}: {w['total_prompt_tokens']} "
             f"prompt + {w['total_output_tokens']} output tokens, longest output {w['max_output_len']}.",
             f"Scheduler: {sim['num_steps']} steps ({sim['decode_only_steps']} decode-only, {sim['mixed_steps']} "
             f"mixed, {sim['mixed_steps_over_512_tokens']} of them > 512 tokens), {sim['scheduled_tokens']} tokens, "
             f"{sim['num_preemptions']} preemptions, {'async' if sim['async_scheduling'] else 'sync'} scheduling.",
             "Decode-only steps by batch: " + ", ".join(f"{x['seqs']}: {x['steps']}" for x in sim["decode_batch_sizes"])]
    for lad in res["ladders"]:
        lines += ["", f"Ladder tokens {','.join(map(str, lad['token_buckets']))} x seqs "
                      f"{','.join(map(str, lad['seq_buckets']))}"
                      + (f" (decode seqs {','.join(map(str, lad['decode_seq_buckets']))})"
                         if lad.get("decode_seq_buckets", lad["seq_buckets"]) != lad["seq_buckets"] else "")
                      + f": predicted {lad['predicted_elapsed_s']:.2f} s = "
                      f"{lad['requests_per_second']:.2f} req/s (decode {lad['seconds_by_kind']['decode']:.2f} s, "
                      f"mixed {lad['seconds_by_kind']['mixed']:.2f} s; {lad['estimated_seconds']:.2f} s at "
                      f"estimated costs), padded tokens {lad['padded_tokens']}",
                  f"  {'tokens':>6} {'seqs':>5} {'kind':<7} {'steps':>6} {'real tok':>9} {'ms/step':>8} "
                  f"{'basis':<13} {'seconds':>8} {'share':>6}" +
                  (f" {'measured ms':>11}" if any("measured_ms_per_step" in r for r in lad["steps_by_bucket"]) else "")]
        for r in lad["steps_by_bucket"]:
            m = r.get("measured_ms_per_step", "")
            lines.append(f"  {r['tokens']:>6} {r['seqs']:>5} {'decode' if r['decode_only'] else 'mixed':<7} "
                         f"{r['steps']:>6} {r['real_tokens']:>9} {r['ms_per_step']:>8.3f} {r['basis']:<13} "
                         f"{r['seconds']:>8.2f} {100 * r['share_of_time']:>5.1f}%"
                         + (f" {m:>11.3f}" if isinstance(m, float) else ""))
    p = lb["parts_s"]
    lines += ["", f"Lower bound (any engine without multi-token decoding; see the docstring): {lb['elapsed_s']:.2f} s "
                  f"= at most {lb['max_requests_per_second']:.2f} req/s",
              f"  S = {lb['min_steps']} steps (request {lb['min_steps_request']}), T = {lb['total_computed_tokens']} "
              f"tokens, g(1) = {lb['step_floor_ms']:.3f} ms, r = {1e3 * lb['best_ms_per_token']:.2f} us/token "
              f"({lb['best_ms_per_token_source']})",
              f"  S*g(1) {p['longest_request_steps']:.2f} s; T*r {p['all_tokens']:.2f} s; LP (steps and tokens "
              f"together) {p['steps_and_tokens_lp']:.2f} s; + KV reads {p['kv_reads']:.2f} s "
              + (f"({lb['decode_kv_token_reads']} cached tokens read by decode tokens, mean context "
                 f"{lb['mean_decode_context']:.0f}, x {lb['kv_bytes_per_token']} B at {lb['hbm_gbps']:g} GB/s)"
                 if lb["attention_split"] else "(left out: the decode points have no attention figures, so g "
                                               "keeps their attention at context 512)"),
              f"  bound = {lb['formula']}"]
    if res.get("target_requests_per_second"):
        target = res["target_requests_per_second"]
        need = w["num_prompts"] / target
        lines.append(f"  target {target:g} req/s needs <= {need:.2f} s: "
                     + ("unreachable under these step costs" if lb["elapsed_s"] > need else "not excluded by the bound"))
    m = res.get("measured")
    if m:
        g = res["ladders"][0]
        lines += ["", f"Measured ({m['file']}, {m['device']}, commit {m['commit']}"
                      + ("" if m["same_workload"] else "; NOT the same workload or limits") + "): "
                      f"{m['elapsed_s']:.2f} s, {m['requests_per_second']:.2f} req/s, {m['num_steps']} steps, "
                      f"padded tokens {m['padded_tokens']}; simulated (GPU ladder): {g['num_steps']} steps, padded "
                      f"tokens {g['padded_tokens']}, predicted {g['predicted_elapsed_s']:.2f} s "
                      f"({g['predicted_elapsed_s'] / m['elapsed_s']:.2f} of measured)"]
    lines += ["", "Step costs (measured points; attention = its attention kernels' share):"]
    lines += [f"  {c['kind']:<7} {c['tokens']:>5} tokens {c['ms']:>8.3f} ms, attention "
              + ("-" if c["attention_ms"] is None else f"{c['attention_ms']:.3f}") + f"  {c['source']}"
              for c in res["cost_points"]]
    return "\n".join(lines)


def _int_list(text: Optional[str]) -> Optional[tuple[int, ...]]:
    if text is None:
        return None
    try:
        return tuple(int(x) for x in text.split(","))
    except ValueError:
        raise ValueError(f"expected comma-separated integers, got {text!r}") from None


def run(ns: argparse.Namespace) -> dict:
    for name in ("num_prompts", "max_model_len", "max_num_seqs", "max_num_batched_tokens", "block_size",
                 "kv_bytes_per_token", "hbm_gbps"):
        if not getattr(ns, name) >= 1:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(ns, name)}")
    if ns.cost_table:
        points = load_cost_table(ns.cost_table)
    else:
        points = h100_cost_points(Path(ns.results_dir))
    for kind in ("decode", "prefill"):
        text = getattr(ns, f"{kind}_ms")
        if text:     # replaces the table's points of this kind
            points = [p for p in points if p.kind != kind] + parse_ms_list(text, kind, f"--{kind}-ms")
    costs = CostModel(points)
    requests = build_workload(ns.dataset_name, ns.num_prompts, ns.seed, ns.vocab_size)
    limits = dict(max_model_len=ns.max_model_len, max_num_seqs=ns.max_num_seqs,
                  max_num_batched_tokens=ns.max_num_batched_tokens)
    sim = simulate(requests, **limits, block_size=ns.block_size, num_pages=ns.num_pages,
                   async_scheduling=not ns.sync_scheduling)
    outputs = sum(r.expected_output_len for r in requests)
    ladder_specs = [(GPU_TOKEN_BUCKETS, GPU_SEQ_BUCKETS, GPU_DECODE_SEQ_BUCKETS)]
    if ns.token_buckets or ns.seq_buckets or ns.decode_seq_buckets:
        # As the engine: a given --seq-buckets without --decode-seq-buckets is the decode ladder too.
        seqs = _int_list(ns.seq_buckets)
        ladder_specs.append((_int_list(ns.token_buckets) or GPU_TOKEN_BUCKETS, seqs or GPU_SEQ_BUCKETS,
                             _int_list(ns.decode_seq_buckets) or (None if seqs else GPU_DECODE_SEQ_BUCKETS)))
    ladders, tallies = [], []
    for tokens, seqs, decode_seqs in ladder_specs:
        ladder = ladder_for(tokens, seqs, block_size=ns.block_size, decode_seq_buckets=decode_seqs, **limits)
        row, tally = predict(sim, ladder, costs, len(requests), outputs)
        ladders.append(row)
        tallies.append(tally)
    config = {"dataset": ns.dataset_name, "num_prompts": ns.num_prompts, "seed": ns.seed, **limits,
              "block_size": ns.block_size, "num_pages": sim.num_pages, "async_scheduling": not ns.sync_scheduling,
              "vocab_size": ns.vocab_size, "cost_table": ns.cost_table or "H100 results files (default)",
              "kv_bytes_per_token": ns.kv_bytes_per_token, "hbm_gbps": ns.hbm_gbps,
              "decode_ms": ns.decode_ms, "prefill_ms": ns.prefill_ms}
    mixed = [t for t, s in sim.steps if t != s]
    res = {"workload": {"dataset": ns.dataset_name, "num_prompts": len(requests), "seed": ns.seed,
                        "total_prompt_tokens": sum(r.prompt_len for r in requests), "total_output_tokens": outputs,
                        "max_output_len": max(r.expected_output_len for r in requests),
                        "max_prompt_len": max(r.prompt_len for r in requests)},
           "simulation": {"num_steps": len(sim.steps), "decode_only_steps": len(sim.steps) - len(mixed),
                          "mixed_steps": len(mixed), "mixed_steps_over_512_tokens": sum(t > 512 for t in mixed),
                          "scheduled_tokens": sim.scheduled_tokens, "num_preemptions": sim.num_preemptions,
                          "prefix_cache_hits": sim.prefix_cache_hits, "async_scheduling": not ns.sync_scheduling,
                          # seconds in these rows: the GPU ladder's prediction
                          "decode_batch_sizes": decode_batch_histogram(tallies[0], ladders[0]["predicted_elapsed_s"])},
           "ladders": ladders,
           "cost_points": [dataclasses.asdict(p) | {"rows": p.rows} for p in costs.points],
           "lower_bound": lower_bound(requests, costs, max_num_batched_tokens=ns.max_num_batched_tokens,
                                      max_model_len=ns.max_model_len, kv_bytes_per_token=ns.kv_bytes_per_token,
                                      hbm_gbps=ns.hbm_gbps),
           "target_requests_per_second": ns.target_rps}
    if ns.measured:
        path = Path(ns.measured) if "/" in ns.measured else Path(ns.results_dir) / ns.measured
        res["measured"] = measured_comparison(path, config, ladders[0])
    env = {"platform": "cpu", "device_kind": "host-only simulation, no device",
           "model": "llama-3.1-8b (the step costs: H100 files)" if not ns.cost_table else "-",
           "dtype": "bfloat16 (the step costs)" if not ns.cost_table else "-"}
    return result_envelope("schedule-bound", env, config, res)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dataset-name", default="sharegpt-synthetic", choices=("sharegpt-synthetic", "random"))
    p.add_argument("--num-prompts", type=int, default=500)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--vocab-size", type=int, default=LLAMA_8B_VOCAB,
                   help="token ids of the prompts (Llama-3.1-8B's); only lengths decide the steps")
    p.add_argument("--max-model-len", type=int, default=2048)
    p.add_argument("--max-num-seqs", type=int, default=GPU_MAX_NUM_SEQS)
    p.add_argument("--max-num-batched-tokens", type=int, default=GPU_MAX_NUM_BATCHED_TOKENS)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--num-pages", type=int, default=None, help="KV pages incl. the null page (default: no preemption)")
    p.add_argument("--sync-scheduling", action="store_true", help="as the engine with --no-async-scheduling")
    p.add_argument("--token-buckets", default=None, help="a second ladder's token buckets (default: the GPU's)")
    p.add_argument("--seq-buckets", default=None, help="a second ladder's sequence buckets (default: the GPU's)")
    p.add_argument("--decode-seq-buckets", default=None,
                   help="a second ladder's decode-only sequence buckets (the engine's --decode-seq-buckets)")
    p.add_argument("--cost-table", default=None, help='JSON {"decode": {"BATCH": ms}, "prefill": {"TOKENS": ms}}')
    p.add_argument("--decode-ms", default=None, help="BATCH=MS[:ATTENTION_MS],...: replaces the decode points")
    p.add_argument("--prefill-ms", default=None, help="PROMPT_TOKENS=MS,...: replaces the prefill points")
    p.add_argument("--kv-bytes-per-token", type=int, default=LLAMA_8B_KV_BYTES_PER_TOKEN,
                   help="the bound's KV term: cache bytes per token, all layers (default Llama-3.1-8B bf16)")
    p.add_argument("--hbm-gbps", type=float, default=H100_HBM_GBPS,
                   help="the bound's KV term: the fastest a kernel reads memory (default the H100 SXM peak)")
    p.add_argument("--results-dir", default=str(RESULTS), help="where the default cost files and --measured are")
    p.add_argument("--measured", default=H100_MEASURED_RUN, help="a bench throughput result to compare with ('' = none)")
    p.add_argument("--target-rps", type=float, default=40.0)
    p.add_argument("--out", default=None, help="JSON path (default results/<date>-cpu-<dataset>-schedule-bound.json)")
    ns = p.parse_args(argv)
    data = run(ns)
    print(format_report(data["results"]))
    dataset = "sharegpt" if ns.dataset_name == "sharegpt-synthetic" else ns.dataset_name
    out = ns.out or str(RESULTS / f"{datetime.date.today().isoformat()}-cpu-{dataset}-schedule-bound.json")
    print("wrote", write_json(out, data))
    return data


if __name__ == "__main__":
    main()
