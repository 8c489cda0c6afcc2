"""`jaxllm bench buckets`: one workload under several bucket ladders, side by side.

A ladder spec is ``TOKENS[xSEQS]``: comma lists of token-count and sequence-count buckets, e.g.
``64,256,1024x8,32,128``; ``default`` is the engine's own ladder. For each ladder the engine is built
(weights, KV cache, every bucket compiled), warmed up, and runs the same requests; the table reports
throughput, ITL P50/P99, padding waste, executables, compile time and memory.

An offline workload fills the step's token budget, so it never shows what a small token bucket is
for: a prompt that arrives alone is padded to the smallest token bucket that holds it, so a ladder
without small buckets makes low-load prefill (TTFT) several times slower. After the workload, in the
same engine, a few of its prompts run one at a time ("lone" requests) to measure exactly that.

The recommendation prefers fewer executables among the ladders whose output throughput is within
``tolerance`` of the best and whose lone-request TTFT is within ``latency_tolerance`` of the best:
each executable costs compile time at every start and device memory for its code and scratch,
while a ladder finer than needed buys little once padding is a small share.
"""

from __future__ import annotations

import gc
import random
from typing import Callable, Optional, Sequence, Union

from serving.bench.datasets import SampleRequest
from serving.bench.metrics import summarize
from serving.bench.throughput import build_llm, run_engine_workload, throughput_results, warm_up

LONE_PROMPTS = 16          # prompts timed alone per ladder (a few seconds of an 8B model on one GPU)
LONE_OUTPUT_LEN = 8        # tokens each: enough for a decode ITL, short enough to stay cheap


def parse_ladder_spec(spec: str) -> tuple[str, Optional[tuple[int, ...]], Optional[tuple[int, ...]]]:
    """``"64,256x8,32"`` -> (label, token_buckets, seq_buckets); ``"default"`` -> (label, None, None)."""
    text = spec.strip()
    if not text:
        raise ValueError("an empty ladder spec; use TOKENS[xSEQS] like 64,256x8,32 or 'default'")
    if text.lower() == "default":
        return "default", None, None
    tokens, _, seqs = text.lower().partition("x")

    def ladder(part: str, what: str) -> tuple[int, ...]:
        try:
            values = [int(v) for v in part.replace(" ", "").split(",") if v]
        except ValueError:
            raise ValueError(f"ladder spec {spec!r}: {what} buckets must be integers") from None
        if not values or min(values) < 1:
            raise ValueError(f"ladder spec {spec!r}: {what} buckets must be positive integers")
        return tuple(sorted(set(values)))

    return text, ladder(tokens, "token"), (ladder(seqs, "sequence") if seqs else None)


def _memory_figures(llm) -> dict:
    runner = llm.engine.runner
    out = {"device_bytes_in_use": None, "max_executable_scratch_bytes": None}
    try:
        import jax

        stats = jax.devices()[0].memory_stats()
        if stats:
            out["device_bytes_in_use"] = stats.get("bytes_in_use")
    except Exception:   # noqa: BLE001 - CPU devices report no memory stats
        pass
    # The runner keeps its compiled step executables by bucket; XLA's memory analysis gives each
    # one's scratch (activations) size, which is what a larger bucket costs beyond the weights and
    # KV cache.
    from serving.model_runner import executable_scratch_bytes

    scratch = [b for exe in getattr(runner, "_executables", {}).values()
               if (b := executable_scratch_bytes(exe)) is not None]
    if scratch:
        out["max_executable_scratch_bytes"] = max(scratch)
    return out


def _drain(engine) -> None:
    """Step until nothing is in flight (async scheduling leaves the last step uncollected), so the
    next request starts on an idle engine and no page is held."""
    while engine.has_unfinished_requests():
        engine.step()


def measure_lone_latency(llm, requests: Sequence[SampleRequest], *, num_prompts: int = LONE_PROMPTS,
                         output_len: int = LONE_OUTPUT_LEN, seed: int = 0) -> dict:
    """TTFT and ITL of requests that each have the engine to themselves (low load): a seeded sample
    of ``requests``' prompts, one at a time, ``output_len`` tokens each (``ignore_eos``).

    The prefix cache is emptied before each request: these prompts ran in the workload already, and a
    hit would time a prefill of one page instead of the prompt's. Each prompt runs once untimed
    first, so the first launch of an executable (module load, allocations) is not in the figures."""
    if num_prompts < 1:
        raise ValueError(f"lone-request prompts must be at least 1, got {num_prompts}")
    if output_len < 2:
        raise ValueError(f"lone-request output length must be at least 2 (one ITL gap), got {output_len}")
    picked = sorted(random.Random(seed).sample(range(len(requests)), min(num_prompts, len(requests))))
    # The workload's own output length caps it, so every lone request fits the context it fitted.
    lone = [SampleRequest(None, requests[i].prompt_token_ids, min(output_len, requests[i].expected_output_len))
            for i in picked]
    engine = llm.engine
    compilations = engine.stats.compilations

    def alone(req: SampleRequest):
        _drain(engine)
        if not engine.scheduler.reset_prefix_cache():
            raise RuntimeError("the prefix cache could not be emptied: pages are still held by an idle engine")
        (result,), _, counters = run_engine_workload(llm, [req], detokenize=False, seed=seed)
        if not result.success:
            raise RuntimeError(f"a lone request of {req.prompt_len} prompt tokens failed: {result.error}")
        if counters["prefix_cache_hits"]:
            raise RuntimeError("a lone request hit the prefix cache after it was emptied")
        return result

    for req in lone:
        alone(SampleRequest(None, req.prompt_token_ids, 2))
    results = [alone(req) for req in lone]
    _drain(engine)
    ttft = summarize([r.ttft * 1e3 for r in results], (50, 90))
    itl = summarize([g * 1e3 for r in results for g in r.itl], (50, 90))
    return {"lone_num_prompts": len(results), "lone_prompt_len_mean": sum(r.prompt_len for r in results) / len(results),
            "lone_ttft_p50_ms": ttft["median"], "lone_ttft_p90_ms": ttft["p90"], "lone_ttft_mean_ms": ttft["mean"],
            "lone_itl_p50_ms": itl["median"], "lone_itl_p90_ms": itl["p90"],
            "lone_compilations": engine.stats.compilations - compilations}


def run_ladder(engine_kwargs: dict, spec: str,
               requests: Union[Sequence[SampleRequest], Callable[[object], Sequence[SampleRequest]]], *,
               seed: int = 0, lone_prompts: int = LONE_PROMPTS) -> tuple[dict, list[SampleRequest]]:
    """Build the engine with this ladder, run the workload, then time ``lone_prompts`` of its prompts
    alone (``measure_lone_latency``; 0 skips it); returns (table row, the requests). ``requests``
    may be a factory of the built LLM (the dataset needs its tokenizer)."""
    label, tokens, seqs = parse_ladder_spec(spec)
    kwargs = dict(engine_kwargs)
    if tokens is not None:
        kwargs["token_buckets"] = tokens
    if seqs is not None:
        kwargs["seq_buckets"] = seqs
    built = build_llm(kwargs)
    llm = built.llm
    try:
        ladder = llm.engine.runner.ladder
        if callable(requests):
            requests = list(requests(llm))
        warm_up(llm, requests)
        results, duration, counters = run_engine_workload(llm, requests, seed=seed)
        res = throughput_results(results, duration, counters)
        lone = measure_lone_latency(llm, requests, num_prompts=lone_prompts, seed=seed) if lone_prompts else {}
        row = {"ladder": label, "token_buckets": list(ladder.token_buckets),
               "seq_buckets": list(ladder.seq_buckets), "page_buckets": list(ladder.page_buckets),
               "num_executables": llm.engine.runner.num_executables, "compile_s": built.compile_s,
               "startup_s": built.startup_s, "output_throughput": res["output_tokens_per_second"],
               "total_throughput": res["tokens_per_second"], "request_throughput": res["requests_per_second"],
               "itl_p50_ms": res["itl_ms"]["median"], "itl_p99_ms": res["itl_ms"]["p99"],
               "ttft_p50_ms": res["ttft_ms"]["median"], "padding_waste_pct": res["padding_waste_pct"],
               "num_steps": res["num_steps"], "num_failed": res["num_failed"],
               # Over the workload and the lone requests: every timed step ran a precompiled executable.
               "compilations_during_run": res["compilations_during_run"] + lone.pop("lone_compilations", 0),
               **lone, **_memory_figures(llm)}
    finally:
        # Free this ladder's weights, KV cache and executables before the next one is built.
        del llm, built
        gc.collect()
    return row, list(requests)


def _lone_ttft(row: dict) -> Optional[float]:
    return row.get("lone_ttft_p50_ms")      # None in result files written before it was measured


def choose_ladder(rows: Sequence[dict], tolerance: float = 0.05,
                  latency_tolerance: float = 0.10) -> tuple[dict, str]:
    """The recommended row and the sentence that says why.

    Candidates are within ``tolerance`` of the best output throughput and, where a row has the
    lone-request TTFT, within ``latency_tolerance`` of the best lone TTFT among all rows; of those,
    the fewest executables, then the shortest compile. A row without the lone figure is judged on
    throughput alone. Should no ladder pass both, the lowest lone TTFT among the throughput
    candidates wins: the latency figure decides, since throughput is already close."""
    if not rows:
        raise ValueError("no ladders were measured")
    if tolerance < 0 or latency_tolerance < 0:
        raise ValueError(f"tolerances must be non-negative, got {tolerance} and {latency_tolerance}")
    cost = lambda r: (r["num_executables"], r["compile_s"], -r["output_throughput"])  # noqa: E731
    best = max(rows, key=lambda r: r["output_throughput"])
    close = [r for r in rows if r["output_throughput"] >= (1 - tolerance) * best["output_throughput"]]
    timed = [r for r in rows if _lone_ttft(r) is not None]
    fastest = min(timed, key=_lone_ttft) if timed else None
    slow = lambda r: (fastest is not None and _lone_ttft(r) is not None  # noqa: E731
                      and _lone_ttft(r) > (1 + latency_tolerance) * _lone_ttft(fastest))
    eligible = [r for r in close if not slow(r)]
    pct = lambda x: f"{100 * x:.0f}%"  # noqa: E731
    if not eligible:
        pick = min(close, key=lambda r: (_lone_ttft(r), *cost(r)))
        return pick, (
            f"no ladder within {pct(tolerance)} of the best output throughput ('{best['ladder']}', "
            f"{best['output_throughput']:.1f} tok/s) has a lone-request TTFT within {pct(latency_tolerance)} of "
            f"the best ('{fastest['ladder']}', {_lone_ttft(fastest):.1f} ms); '{pick['ladder']}' has the lowest "
            f"among them ({_lone_ttft(pick):.1f} ms, {_lone_ttft(pick) / _lone_ttft(fastest):.1f}x), "
            f"{pick['output_throughput']:.1f} tok/s, {pick['num_executables']} executables.")
    pick = min(eligible, key=cost)
    latency_rule = f" and lone-request TTFT within {pct(latency_tolerance)} of the best" if fastest else ""
    if pick is best:
        why = (f"'{pick['ladder']}' has the highest output throughput ({pick['output_throughput']:.1f} tok/s)"
               + (f" and, of the ladders within {pct(tolerance)} of it{latency_rule}, the fewest executables "
                  f"({pick['num_executables']})" if len(close) > 1 else "")
               + f"; padding waste {pick['padding_waste_pct']:.1f}%, compile {pick['compile_s']:.1f} s")
    else:
        why = (f"'{pick['ladder']}' reaches {pick['output_throughput']:.1f} tok/s, within {pct(tolerance)} of "
               f"the best ('{best['ladder']}', {best['output_throughput']:.1f} tok/s), with "
               f"{pick['num_executables']} executables instead of {best['num_executables']} "
               f"(compile {pick['compile_s']:.1f} s vs {best['compile_s']:.1f} s): the extra buckets buy "
               "less throughput than they cost in start-up time and memory")
    if _lone_ttft(pick) is not None:
        why += f"; lone-request TTFT {_lone_ttft(pick):.1f} ms"
    # Name the cheaper ladders that the latency rule alone kept out: they are why the pick costs more.
    excluded = sorted((r for r in close if slow(r) and cost(r) < cost(pick)), key=cost)
    for r in excluded:
        why += (f". '{r['ladder']}' was within {pct(tolerance)} on throughput with {r['num_executables']} "
                f"executables, but its lone-request TTFT was {_lone_ttft(r) / _lone_ttft(fastest):.1f}x the best "
                f"('{fastest['ladder']}', {_lone_ttft(r):.1f} vs {_lone_ttft(fastest):.1f} ms): a short prompt "
                "arriving alone is padded to its smallest token bucket")
    return pick, why + "."


def format_ladder_table(rows: Sequence[dict]) -> str:
    cols = [("ladder", "Ladder", "{}"), ("num_executables", "Exes", "{}"), ("compile_s", "Compile s", "{:.1f}"),
            ("output_throughput", "Out tok/s", "{:.1f}"), ("total_throughput", "Total tok/s", "{:.1f}"),
            ("itl_p50_ms", "ITL P50 ms", "{:.1f}"), ("itl_p99_ms", "ITL P99 ms", "{:.1f}"),
            ("lone_ttft_p50_ms", "Lone TTFT P50 ms", "{:.1f}"), ("lone_itl_p50_ms", "Lone ITL P50 ms", "{:.1f}"),
            ("padding_waste_pct", "Pad waste %", "{:.1f}"), ("max_executable_scratch_bytes", "Scratch MiB", "{}")]
    cells = []
    for r in rows:
        line = []
        for key, _, fmt in cols:
            v = r.get(key)
            if v is None:           # not measured (CPU memory stats, lone figures of older files)
                line.append("-")
            elif key == "max_executable_scratch_bytes":
                line.append(f"{v / 2 ** 20:.1f}")
            else:
                line.append(fmt.format(v))
        cells.append(line)
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, (_, h, _) in enumerate(cols)]
    fmt_row = lambda vals: "  ".join(v.rjust(w) if i else v.ljust(w) for i, (v, w) in enumerate(zip(vals, widths)))  # noqa: E731
    out = [fmt_row([h for _, h, _ in cols]), "  ".join("-" * w for w in widths)]
    out += [fmt_row(c) for c in cells]
    return "\n".join(out)
