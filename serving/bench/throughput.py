"""`jaxllm bench throughput`: the engine without HTTP on a benchmark dataset.

All requests enter the engine at once (vLLM's offline throughput benchmark); the engine is stepped
here rather than through ``LLM.generate`` so each request's token arrivals can be timed per step,
which the bucket-ladder sweep needs for ITL. Sampling follows vLLM's throughput benchmark:
temperature 1, top_p 1, ``ignore_eos`` so every request produces exactly its output length.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import time
from typing import Optional, Sequence

from serving.bench.datasets import SampleRequest
from serving.bench.metrics import RequestResult, summarize
from serving.bench.step_breakdown import format_step_breakdown, step_breakdown

_request_ids = itertools.count()


@contextlib.contextmanager
def _record_compile_seconds(record: list):
    """Capture what ModelRunner.compile_all returns while an engine is built (it runs inside the
    constructor, whose total also includes loading weights)."""
    from serving.model_runner import ModelRunner

    original = ModelRunner.compile_all

    def wrapped(self, *args, **kwargs):
        seconds = original(self, *args, **kwargs)
        record.append(seconds)
        return seconds

    ModelRunner.compile_all = wrapped
    try:
        yield
    finally:
        ModelRunner.compile_all = original


@dataclasses.dataclass
class BuiltEngine:
    llm: object                  # serving.LLM
    startup_s: float             # weights + KV cache + compilation
    compile_s: float


def build_llm(engine_kwargs: dict) -> BuiltEngine:
    from serving.llm import LLM

    kwargs = dict(engine_kwargs)
    model = kwargs.pop("model", None)
    compile_times: list[float] = []
    start = time.perf_counter()
    with _record_compile_seconds(compile_times):
        llm = LLM(model, **kwargs)
    return BuiltEngine(llm, time.perf_counter() - start, sum(compile_times))


def _engine_counters(engine) -> dict:
    st = engine.stats
    return {"padded_tokens": st.padded_tokens, "scheduled_tokens": st.scheduled_tokens, "num_steps": st.num_steps,
            "compilations": st.compilations, "num_preemptions": st.num_preemptions,
            "prefix_cache_queries": st.prefix_cache_queries, "prefix_cache_hits": st.prefix_cache_hits}


def run_engine_workload(llm, requests: Sequence[SampleRequest], *, ignore_eos: bool = True,
                        temperature: float = 1.0, top_p: float = 1.0, detokenize: Optional[bool] = None,
                        seed: Optional[int] = None) -> tuple[list[RequestResult], float, dict]:
    """Run ``requests`` to completion on ``llm.engine``; returns (per-request timelines, seconds,
    engine counter deltas over the run, with the run's StepTally under "step_tally")."""
    from serving.sampling_params import SamplingParams

    if not requests:
        raise ValueError("no requests to run")
    engine = llm.engine
    if detokenize is None:
        detokenize = engine.tokenizer is not None
    before = _engine_counters(engine)
    tally_before = engine.step_tally.copy()
    ids = [f"bench-{next(_request_ids)}" for _ in requests]
    results = {rid: RequestResult(success=False, prompt_len=req.prompt_len) for rid, req in zip(ids, requests)}
    last_time: dict[str, float] = {}
    start = time.perf_counter()
    try:
        for i, (rid, req) in enumerate(zip(ids, requests)):
            params = SamplingParams(n=1, temperature=temperature, top_p=top_p, ignore_eos=ignore_eos,
                                    max_tokens=req.expected_output_len, detokenize=detokenize,
                                    seed=None if seed is None else seed + i)
            try:
                engine.add_request(rid, {"prompt_token_ids": req.prompt_token_ids}, params)
            except ValueError as e:
                raise ValueError(f"request {i} (prompt {req.prompt_len} tokens, output "
                                 f"{req.expected_output_len}): {e}") from None
            results[rid].start_time = start
        pending = set(ids)
        while pending:
            outputs = engine.step()
            now = time.perf_counter()
            for out in outputs:
                res = results.get(out.request_id)
                if res is None:
                    continue
                n = len(out.outputs[0].token_ids)
                if n > res.output_tokens:
                    if res.output_tokens == 0:
                        res.ttft = now - start
                    else:
                        res.itl.append(now - last_time[out.request_id])
                    last_time[out.request_id] = now
                    res.output_tokens = n
                if out.finished and out.request_id in pending:
                    pending.discard(out.request_id)
                    res.latency = now - start
                    reason = out.outputs[0].finish_reason
                    res.success = reason in ("stop", "length")
                    if not res.success:
                        res.error = f"finished with reason {reason!r}"
    except BaseException:
        engine.abort_request(ids)
        raise
    duration = time.perf_counter() - start
    after = _engine_counters(engine)
    delta = {k: after[k] - before[k] for k in after}
    delta["step_tally"] = engine.step_tally.since(tally_before)
    return [results[rid] for rid in ids], duration, delta


def warm_up(llm, requests: Sequence[SampleRequest]) -> None:
    """One tiny request first, so one-off host work (first transfers, lazy imports) is not timed.
    Its prompt is shorter than a KV page, so it leaves nothing in the prefix cache for the real run."""
    ids = list(reversed(requests[0].prompt_token_ids))[: max(1, min(8, llm.engine_args.block_size - 1))]
    run_engine_workload(llm, [SampleRequest(None, ids, 2)])


def throughput_results(results: Sequence[RequestResult], duration: float, counters: dict,
                       percentiles: Sequence[float] = (50, 99)) -> dict:
    """The figures `bench throughput` prints and saves (vLLM's keys first)."""
    ok = [r for r in results if r.success]
    prompt_tokens = sum(r.prompt_len for r in ok)
    output_tokens = sum(r.output_tokens for r in ok)
    total = prompt_tokens + output_tokens
    scheduled = counters.get("scheduled_tokens", 0)
    padded = counters.get("padded_tokens", 0)
    out = {
        "elapsed_time": duration, "num_requests": len(ok), "num_failed": len(results) - len(ok),
        "total_num_tokens": total, "total_prompt_tokens": prompt_tokens, "total_output_tokens": output_tokens,
        "requests_per_second": len(ok) / duration, "tokens_per_second": total / duration,
        "output_tokens_per_second": output_tokens / duration,
        # Padded tokens the device computed for nothing, as a share of the real ones.
        "padding_waste_pct": 100.0 * (padded - scheduled) / scheduled if scheduled else 0.0,
        "scheduled_tokens": scheduled, "padded_tokens": padded,
        "num_steps": counters.get("num_steps", 0),
        "compilations_during_run": counters.get("compilations", 0),
        "num_preemptions": counters.get("num_preemptions", 0),
        "prefix_cache_hit_rate": (counters["prefix_cache_hits"] / counters["prefix_cache_queries"]
                                  if counters.get("prefix_cache_queries") else 0.0),
        "ttft_ms": summarize([r.ttft * 1e3 for r in ok], percentiles),
        "itl_ms": summarize([g * 1e3 for r in ok for g in r.itl], percentiles),
    }
    if "step_tally" in counters:
        out.update(step_breakdown(counters["step_tally"], duration))
    return out


def format_throughput(res: dict) -> str:
    lines = [f"Throughput: {res['requests_per_second']:.2f} requests/s, {res['tokens_per_second']:.2f} total tokens/s, "
             f"{res['output_tokens_per_second']:.2f} output tokens/s",
             f"Total num prompt tokens:  {res['total_prompt_tokens']}",
             f"Total num output tokens:  {res['total_output_tokens']}"]
    if res.get("num_failed"):
        lines.append(f"Failed requests:  {res['num_failed']}")
    lines.append(f"Engine: {res['num_steps']} steps, padding waste {res['padding_waste_pct']:.1f}%, "
                 f"{res['num_preemptions']} preemptions, prefix-cache hit rate {100 * res['prefix_cache_hit_rate']:.1f}%, "
                 f"{res['compilations_during_run']} compilations during the run")
    if "steps_by_bucket" in res:
        lines.append(format_step_breakdown(res))
    return "\n".join(lines)
