"""Latency and throughput arithmetic for benchmark runs (no I/O, no jax), with vLLM's definitions.

Per request, with times measured by the client from the moment it sends the request:

    TTFT  = arrival of the first chunk carrying output
    E2EL  = arrival of the last byte of the response
    TPOT  = (E2EL - TTFT) / (output_tokens - 1)          only requests with output_tokens > 1
    ITL   = the gaps between consecutive output-carrying chunks (one sample per gap, all requests pooled)

A request that failed (HTTP error, an error event, no output, an exception) counts in ``failed`` and
in no latency or token figure; it is never silently dropped. Goodput counts the successful requests
that meet every given SLO (milliseconds), per second of benchmark duration.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Iterable, Optional, Sequence

import numpy as np

METRICS = ("ttft", "tpot", "itl", "e2el")
METRIC_TITLES = {"ttft": ("Time to First Token", "TTFT"),
                 "tpot": ("Time per Output Token (excl. 1st token)", "TPOT"),
                 "itl": ("Inter-token Latency", "ITL"),
                 "e2el": ("End-to-end Latency", "E2EL")}
GOODPUT_KEYS = ("ttft", "tpot", "e2el")


@dataclasses.dataclass
class RequestResult:
    """One request's timeline as the client saw it (seconds)."""
    success: bool
    prompt_len: int
    output_tokens: int = 0
    start_time: float = 0.0          # when the request was sent (any monotonic clock)
    ttft: float = 0.0
    itl: list[float] = dataclasses.field(default_factory=list)
    latency: float = 0.0             # E2EL
    error: str = ""
    generated_text: str = ""

    @property
    def tpot(self) -> Optional[float]:
        if not self.success or self.output_tokens <= 1:
            return None
        return (self.latency - self.ttft) / (self.output_tokens - 1)

    def chunk_times(self) -> list[float]:
        """Absolute arrival time of each output-carrying chunk."""
        if not self.success:
            return []
        t = self.start_time + self.ttft
        out = [t]
        for gap in self.itl:
            t += gap
            out.append(t)
        return out


def parse_goodput(specs: Optional[Sequence[str]]) -> dict[str, float]:
    """``["ttft:500", "tpot:50"]`` -> ``{"ttft": 500.0, "tpot": 50.0}`` (milliseconds)."""
    slos: dict[str, float] = {}
    for spec in specs or ():
        for item in str(spec).replace(",", " ").split():
            key, sep, value = item.partition(":")
            key = key.strip().lower()
            if not sep or key not in GOODPUT_KEYS:
                raise ValueError(f"--goodput takes KEY:MILLISECONDS with KEY one of {', '.join(GOODPUT_KEYS)}; "
                                 f"got {item!r}")
            try:
                ms = float(value)
            except ValueError:
                raise ValueError(f"--goodput {key}: {value!r} is not a number of milliseconds") from None
            if not ms > 0 or math.isinf(ms):
                raise ValueError(f"--goodput {key} must be a positive number of milliseconds, got {value}")
            slos[key] = ms
    return slos


def parse_percentiles(spec: str | Iterable[float]) -> tuple[float, ...]:
    items = spec.replace(",", " ").split() if isinstance(spec, str) else list(spec)
    try:
        values = tuple(float(x) for x in items)
    except ValueError:
        raise ValueError(f"--metric-percentiles must be numbers in (0, 100], got {spec!r}") from None
    if not values or any(not 0 < p <= 100 for p in values):
        raise ValueError(f"--metric-percentiles must be numbers in (0, 100], got {spec!r}")
    return values


def parse_metric_names(spec: str | Iterable[str]) -> tuple[str, ...]:
    items = spec.replace(",", " ").split() if isinstance(spec, str) else list(spec)
    bad = [m for m in items if m not in METRICS]
    if bad or not items:
        raise ValueError(f"--percentile-metrics takes a comma list of {', '.join(METRICS)}; got {spec!r}")
    return tuple(dict.fromkeys(items))


def _pct_key(p: float) -> str:
    return f"p{p:g}".replace(".", "_")


def summarize(values_ms: Sequence[float], percentiles: Sequence[float]) -> dict[str, float]:
    """mean / median / std / percentiles (linear interpolation, numpy's default) of milliseconds;
    all zero when there are no samples (vLLM prints zeros rather than failing)."""
    arr = np.asarray(values_ms, dtype=np.float64)
    if arr.size == 0:
        return {"mean": 0.0, "median": 0.0, "std": 0.0, **{_pct_key(p): 0.0 for p in percentiles}}
    out = {"mean": float(arr.mean()), "median": float(np.median(arr)), "std": float(arr.std())}
    for p in percentiles:
        out[_pct_key(p)] = float(np.percentile(arr, p))
    return out


def _meets_slos(r: RequestResult, slos: dict[str, float]) -> bool:
    values = {"ttft": r.ttft, "tpot": r.tpot or 0.0, "e2el": r.latency}
    return all(values[k] * 1000.0 <= ms for k, ms in slos.items())


def peak_output_throughput(results: Sequence[RequestResult], window_s: float = 1.0) -> float:
    """Most output chunks that arrived in one ``window_s`` window (fixed windows from the first
    request), per second."""
    times = sorted(t for r in results for t in r.chunk_times())
    if not times:
        return 0.0
    t0 = min(r.start_time for r in results if r.success)
    counts = np.bincount(((np.asarray(times) - t0) // window_s).astype(np.int64))
    return float(counts.max()) / window_s


def peak_concurrency(results: Sequence[RequestResult]) -> int:
    """Most requests in flight at once (successful and failed alike: both held a slot)."""
    events = []
    for r in results:
        events.append((r.start_time, 1))
        events.append((r.start_time + max(r.latency, 0.0), -1))
    peak = cur = 0
    for _, delta in sorted(events, key=lambda e: (e[0], e[1])):   # an end before a start at the same instant
        cur += delta
        peak = max(peak, cur)
    return peak


@dataclasses.dataclass
class BenchmarkMetrics:
    completed: int
    failed: int
    duration_s: float
    total_input_tokens: int
    total_output_tokens: int
    request_throughput: float
    output_throughput: float
    total_token_throughput: float
    request_goodput: Optional[float]
    peak_output_throughput: float
    peak_concurrent_requests: int
    latencies: dict[str, dict[str, float]]       # metric -> summarize(...) in ms
    percentiles: tuple[float, ...]
    errors: list[str]

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["percentiles"] = list(self.percentiles)
        return d


def compute_metrics(results: Sequence[RequestResult], duration_s: float, *,
                    goodput_slos: Optional[dict[str, float]] = None,
                    percentiles: Sequence[float] = (99,)) -> BenchmarkMetrics:
    if duration_s <= 0:
        raise ValueError(f"benchmark duration must be positive, got {duration_s}")
    ok = [r for r in results if r.success]
    failed = [r for r in results if not r.success]
    samples = {
        "ttft": [r.ttft * 1000 for r in ok],
        "tpot": [r.tpot * 1000 for r in ok if r.tpot is not None],
        "itl": [gap * 1000 for r in ok for gap in r.itl],
        "e2el": [r.latency * 1000 for r in ok],
    }
    total_in = sum(r.prompt_len for r in ok)
    total_out = sum(r.output_tokens for r in ok)
    goodput = None
    if goodput_slos:
        goodput = sum(_meets_slos(r, goodput_slos) for r in ok) / duration_s
    return BenchmarkMetrics(
        completed=len(ok), failed=len(failed), duration_s=duration_s,
        total_input_tokens=total_in, total_output_tokens=total_out,
        request_throughput=len(ok) / duration_s, output_throughput=total_out / duration_s,
        total_token_throughput=(total_in + total_out) / duration_s, request_goodput=goodput,
        peak_output_throughput=peak_output_throughput(ok), peak_concurrent_requests=peak_concurrency(results),
        latencies={k: summarize(v, percentiles) for k, v in samples.items()},
        percentiles=tuple(percentiles), errors=[r.error for r in failed])


def _line(label: str, value) -> str:
    if isinstance(value, float):
        return f"{label:<40} {value:<10.2f}"
    return f"{label:<40} {value!s:<10}"


def format_report(m: BenchmarkMetrics, *, title: str = "Serving Benchmark Result",
                  metrics: Sequence[str] = METRICS, header: Sequence[tuple[str, object]] = ()) -> str:
    """The block vLLM's ``benchmark_serving`` prints, line for line where the figure exists."""
    lines = [f"{' ' + title + ' ':=^50}", _line("Successful requests:", m.completed),
             _line("Failed requests:", m.failed)]
    lines += [_line(label, value) for label, value in header]
    lines += [_line("Benchmark duration (s):", m.duration_s), _line("Total input tokens:", m.total_input_tokens),
              _line("Total generated tokens:", m.total_output_tokens),
              _line("Request throughput (req/s):", m.request_throughput),
              _line("Output token throughput (tok/s):", m.output_throughput),
              _line("Peak output token throughput (tok/s):", m.peak_output_throughput),
              _line("Peak concurrent requests:", m.peak_concurrent_requests),
              _line("Total Token throughput (tok/s):", m.total_token_throughput)]
    if m.request_goodput is not None:
        lines.append(_line("Request goodput (req/s):", m.request_goodput))
    for key in metrics:
        long_name, short = METRIC_TITLES[key]
        stats = m.latencies[key]
        lines.append(f"{long_name:-^50}")
        lines.append(_line(f"Mean {short} (ms):", stats["mean"]))
        lines.append(_line(f"Median {short} (ms):", stats["median"]))
        for p in m.percentiles:
            lines.append(_line(f"P{p:g} {short} (ms):", stats[_pct_key(p)]))
    lines.append("=" * 50)
    return "\n".join(lines)
