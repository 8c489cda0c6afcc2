"""`jaxllm bench buckets`: one workload under several bucket ladders, side by side.

A ladder spec is ``TOKENS[xSEQS]``: comma lists of token-count and sequence-count buckets, e.g.
``64,256,1024x8,32,128``; ``default`` is the engine's own ladder. For each ladder the engine is built
(weights, KV cache, every bucket compiled), warmed up, and runs the same requests; the table reports
throughput, ITL P50/P99, padding waste, executables, compile time and memory.

The recommendation prefers fewer executables among the ladders whose output throughput is within
``tolerance`` of the best: each executable costs compile time at every start and device memory for
its code and scratch, while a ladder finer than needed buys little once padding is a small share.
"""

from __future__ import annotations

import gc
from typing import Callable, Optional, Sequence, Union

from serving.bench.datasets import SampleRequest
from serving.bench.throughput import build_llm, run_engine_workload, throughput_results, warm_up


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
    # The runner keeps its compiled executables by bucket; XLA's memory analysis gives each one's
    # scratch (activations) size, which is what a larger bucket costs beyond the weights and KV cache.
    scratch = []
    for exe in getattr(runner, "_executables", {}).values():
        try:
            scratch.append(int(exe.memory_analysis().temp_size_in_bytes))
        except Exception:   # noqa: BLE001 - not every backend implements memory_analysis
            pass
    if scratch:
        out["max_executable_scratch_bytes"] = max(scratch)
    return out


def run_ladder(engine_kwargs: dict, spec: str,
               requests: Union[Sequence[SampleRequest], Callable[[object], Sequence[SampleRequest]]], *,
               seed: int = 0) -> tuple[dict, list[SampleRequest]]:
    """Build the engine with this ladder, run the workload; returns (table row, the requests).
    ``requests`` may be a factory of the built LLM (the dataset needs its tokenizer)."""
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
        row = {"ladder": label, "token_buckets": list(ladder.token_buckets),
               "seq_buckets": list(ladder.seq_buckets), "page_buckets": list(ladder.page_buckets),
               "num_executables": llm.engine.runner.num_executables, "compile_s": built.compile_s,
               "startup_s": built.startup_s, "output_throughput": res["output_tokens_per_second"],
               "total_throughput": res["tokens_per_second"], "request_throughput": res["requests_per_second"],
               "itl_p50_ms": res["itl_ms"]["median"], "itl_p99_ms": res["itl_ms"]["p99"],
               "ttft_p50_ms": res["ttft_ms"]["median"], "padding_waste_pct": res["padding_waste_pct"],
               "num_steps": res["num_steps"], "num_failed": res["num_failed"],
               "compilations_during_run": res["compilations_during_run"], **_memory_figures(llm)}
    finally:
        # Free this ladder's weights, KV cache and executables before the next one is built.
        del llm, built
        gc.collect()
    return row, list(requests)


def choose_ladder(rows: Sequence[dict], tolerance: float = 0.05) -> tuple[dict, str]:
    """The recommended row and the sentence that says why."""
    if not rows:
        raise ValueError("no ladders were measured")
    best = max(rows, key=lambda r: r["output_throughput"])
    close = [r for r in rows if r["output_throughput"] >= (1 - tolerance) * best["output_throughput"]]
    pick = min(close, key=lambda r: (r["num_executables"], r["compile_s"], -r["output_throughput"]))
    if pick is best:
        why = (f"'{pick['ladder']}' has the highest output throughput ({pick['output_throughput']:.1f} tok/s)"
               + (f" and, of the ladders within {100 * tolerance:.0f}% of it, the fewest executables "
                  f"({pick['num_executables']})" if len(close) > 1 else "")
               + f"; padding waste {pick['padding_waste_pct']:.1f}%, compile {pick['compile_s']:.1f} s.")
    else:
        why = (f"'{pick['ladder']}' reaches {pick['output_throughput']:.1f} tok/s, within {100 * tolerance:.0f}% of "
               f"the best ('{best['ladder']}', {best['output_throughput']:.1f} tok/s), with "
               f"{pick['num_executables']} executables instead of {best['num_executables']} "
               f"(compile {pick['compile_s']:.1f} s vs {best['compile_s']:.1f} s): the extra buckets buy "
               "less throughput than they cost in start-up time and memory.")
    return pick, why


def format_ladder_table(rows: Sequence[dict]) -> str:
    cols = [("ladder", "Ladder", "{}"), ("num_executables", "Exes", "{}"), ("compile_s", "Compile s", "{:.1f}"),
            ("output_throughput", "Out tok/s", "{:.1f}"), ("total_throughput", "Total tok/s", "{:.1f}"),
            ("itl_p50_ms", "ITL P50 ms", "{:.1f}"), ("itl_p99_ms", "ITL P99 ms", "{:.1f}"),
            ("padding_waste_pct", "Pad waste %", "{:.1f}"), ("max_executable_scratch_bytes", "Scratch MiB", "{}")]
    cells = []
    for r in rows:
        line = []
        for key, _, fmt in cols:
            v = r.get(key)
            if key == "max_executable_scratch_bytes":
                line.append("-" if v is None else f"{v / 2 ** 20:.1f}")
            else:
                line.append(fmt.format(v))
        cells.append(line)
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, (_, h, _) in enumerate(cols)]
    fmt_row = lambda vals: "  ".join(v.rjust(w) if i else v.ljust(w) for i, (v, w) in enumerate(zip(vals, widths)))  # noqa: E731
    out = [fmt_row([h for _, h, _ in cols]), "  ".join("-" * w for w in widths)]
    out += [fmt_row(c) for c in cells]
    return "\n".join(out)
