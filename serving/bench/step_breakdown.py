"""Where a benchmark run's wall time went, by bucket shape: the rows `bench throughput` saves and
prints from the engine's StepTally (serving.step_tally, which says how a step's seconds are charged)."""

from __future__ import annotations

from serving.step_tally import StepTally, StepTotals


def _timing(t: StepTotals, elapsed: float) -> dict:
    return {"steps": t.steps, "seconds": t.seconds, "mean_step_ms": 1e3 * t.seconds / t.steps if t.steps else 0.0,
            "share_of_time": t.seconds / elapsed if elapsed > 0 else 0.0,
            # of mean_step_ms, the engine's wait for the device (serving.step_tally): device-bound share
            "mean_wait_ms": 1e3 * t.wait_seconds / t.steps if t.steps else 0.0}


def executable_kind(decode_only: bool, plain: bool) -> str:
    """The executable variant (ModelRunner.all_shapes): general, decode, or decode with the plain sampler."""
    if not decode_only:
        return "general"
    return "decode plain" if plain else "decode"


def steps_by_bucket(tally: StepTally, elapsed: float) -> list[dict]:
    """One row per executable shape that ran, most wall time first; ``share_of_time`` is of
    ``elapsed`` (the run's), so the rows' shares sum to the part of the run charged to steps."""
    rows = [{"tokens": k[0], "seqs": k[1], "pages": k[2], "decode_only": k[3], "plain": k[4],
             "kind": executable_kind(k[3], k[4]),
             "real_tokens": t.real_tokens, "real_seqs": t.real_seqs, **_timing(t, elapsed)}
            for k, t in tally.by_shape.items()]
    return sorted(rows, key=lambda r: (-r["seconds"], r["tokens"], r["seqs"], r["pages"]))


def _bins(largest: int) -> list[tuple[int, int]]:
    """1, 2-8, 9-16, 17-32, ... doubling until ``largest`` is covered."""
    bins, hi = [(1, 1)], 8
    while bins[-1][1] < largest:
        bins.append((bins[-1][1] + 1, hi))
        hi *= 2
    return bins


def decode_batch_histogram(tally: StepTally, elapsed: float) -> list[dict]:
    """Steps that computed one token per sequence, binned by their real number of sequences (bins
    up to the largest batch seen, empty ones included)."""
    if not tally.decode_batches:
        return []
    rows = []
    for lo, hi in _bins(max(tally.decode_batches)):
        t = StepTotals()
        for n, d in tally.decode_batches.items():
            if lo <= n <= hi:
                t.add(d.steps, d.real_tokens, d.real_seqs, d.seconds, d.wait_seconds)
        rows.append({"seqs": str(lo) if lo == hi else f"{lo}-{hi}", "min_seqs": lo, "max_seqs": hi,
                     "mean_seqs": t.real_seqs / t.steps if t.steps else 0.0, **_timing(t, elapsed)})
    return rows


def step_breakdown(tally: StepTally, elapsed: float) -> dict:
    """The keys `bench throughput` adds to its results."""
    return {"steps_by_bucket": steps_by_bucket(tally, elapsed),
            "decode_batch_sizes": decode_batch_histogram(tally, elapsed),
            "step_wall_seconds": sum(t.seconds for t in tally.by_shape.values())}


def format_step_breakdown(res: dict) -> str:
    """The text tables of ``step_breakdown``'s rows (``res``: the throughput results)."""
    elapsed = res["elapsed_time"]
    share = res["step_wall_seconds"] / elapsed if elapsed > 0 else 0.0
    lines = [f"Steps by bucket (wall time charged to steps: {res['step_wall_seconds']:.2f} s, "
             f"{100 * share:.1f}% of {elapsed:.2f} s elapsed):",
             f"  {'tokens':>6} {'seqs':>5} {'pages':>5}  {'kind':<12} {'steps':>6} {'real tok':>9} "
             f"{'real seqs':>9} {'seconds':>8} {'ms/step':>8} {'wait ms':>8} {'share':>6}"]
    for r in res["steps_by_bucket"]:
        lines.append(f"  {r['tokens']:>6} {r['seqs']:>5} {r['pages']:>5}  {r['kind']:<12} {r['steps']:>6} "
                     f"{r['real_tokens']:>9} {r['real_seqs']:>9} {r['seconds']:>8.2f} {r['mean_step_ms']:>8.2f} "
                     f"{r['mean_wait_ms']:>8.2f} {100 * r['share_of_time']:>5.1f}%")
    if res["decode_batch_sizes"]:
        lines += ["Decode steps (one token per sequence) by batch size:",
                  f"  {'seqs':<8} {'steps':>6} {'mean seqs':>9} {'seconds':>8} {'ms/step':>8} {'wait ms':>8} {'share':>6}"]
        for r in res["decode_batch_sizes"]:
            lines.append(f"  {r['seqs']:<8} {r['steps']:>6} {r['mean_seqs']:>9.1f} {r['seconds']:>8.2f} "
                         f"{r['mean_step_ms']:>8.2f} {r['mean_wait_ms']:>8.2f} "
                         f"{100 * r['share_of_time']:>5.1f}%")
    return "\n".join(lines)
