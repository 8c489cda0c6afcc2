"""Step costs for benchmarks/schedule_bound.py: measured points (one step's milliseconds for a
decode batch or a one-prompt prefill, with its attention kernels' share where a profile gave it),
read from benchmarks/results or given as a table, and the model that prices any bucket from them
(schedule_bound's docstring, item 4, says how). Host only: json and numpy."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

RESULTS = Path(__file__).resolve().parents[1] / "benchmarks" / "results"
# ModelRunner.min_decode_tokens (importing it pulls in jax; tests/test_bench_schedule_bound.py checks
# the copy): a decode executable has at least this many token rows.
MIN_DECODE_TOKENS = 2
# H100, Llama-3.1-8B bf16, context 512 (benchmarks/gpu_profile.py, step_ms_unprofiled_median):
# the newest run of the attention kernel that `auto` picks at each batch. auto runs Mosaic from 128
# programs = 16 sequences x 8 KV heads (pallas_kernels/paged_attention.py
# _AUTO_MOSAIC_DECODE_MIN_PROGRAMS), Triton below: batches 1 and 8 Triton at d641353; 16 Mosaic
# only ever measured at 41dae33 with the 128 threshold; 32 Mosaic at 41dae33 (before the fused
# KV write, which saved 0.23 ms at batch 64); 64 Mosaic with the fused write at d641353.
H100_DECODE_SOURCES = (
    (1, "2026-11-22-h100-decode-profile-A-auto-fused.json"),
    (8, "2026-11-22-h100-decode-profile-T-triton-d641353.json"),
    (16, "2026-11-22-h100-decode-profile-A-auto128-b8-16.json"),
    (32, "2026-11-22-h100-decode-profile-A-auto.json"),
    (64, "2026-11-22-h100-decode-profile-A-auto-fused.json"),
)
H100_PREFILL_SOURCE = (2048, "2026-11-21-h100-decode-profile-1-packed.json")   # "prefill": one 2048 prompt


# --- cost model -------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class CostPoint:
    kind: str          # "decode": a step of `tokens` sequences, one token each; "prefill": one prompt of `tokens`
    tokens: int        # real tokens the measured step computed
    ms: float
    source: str
    attention_ms: Optional[float] = None     # its attention kernels' share of ms; None: not known

    def __post_init__(self):
        if self.kind not in ("decode", "prefill"):
            raise ValueError(f"cost point kind must be decode or prefill, got {self.kind!r}")
        if self.tokens < 1 or not self.ms > 0:
            raise ValueError(f"cost point needs tokens >= 1 and ms > 0, got {self.tokens} tokens, {self.ms} ms")
        if self.attention_ms is not None and not 0 <= self.attention_ms < self.ms:
            raise ValueError(f"attention ms must be in [0, ms), got {self.attention_ms} of {self.ms}")

    @property
    def rows(self) -> int:
        """Token rows of the executable that ran it (decode: ModelRunner._decode_tokens)."""
        return max(self.tokens, MIN_DECODE_TOKENS) if self.kind == "decode" else self.tokens

    @property
    def non_attention_ms(self) -> float:
        return self.ms - (self.attention_ms or 0.0)


def h100_cost_points(results_dir: Path = RESULTS) -> list[CostPoint]:
    """The default step costs, read from the files named in H100_DECODE_SOURCES / H100_PREFILL_SOURCE."""
    points = []
    for batch, name in H100_DECODE_SOURCES:
        data = json.loads((results_dir / name).read_text())
        run = next((r for r in data["runs"] if r["batch"] == batch and r["ctx"] == 512), None)
        if run is None:
            raise ValueError(f"{name} has no batch-{batch} run at context 512")
        points.append(CostPoint("decode", batch, run["step_ms_unprofiled_median"],
                                f"{name} runs[batch={batch}].step_ms_unprofiled_median "
                                f"({data['attention']} @ {data['commit']}); attention: by_category_ms_per_step",
                                run["by_category_ms_per_step"]["attention (pallas)"]))
    prompt_len, name = H100_PREFILL_SOURCE
    prefill = json.loads((results_dir / name).read_text())["prefill"]
    if prefill["prompt_len"] != prompt_len:
        raise ValueError(f"{name}: prefill of {prefill['prompt_len']} tokens, expected {prompt_len}")
    points.append(CostPoint("prefill", prompt_len, 1e3 * prefill["seconds"], f"{name} prefill.seconds"))
    return points


def _point(kind: str, size, value, source: str) -> CostPoint:
    """value: ms, or [ms, attention ms]."""
    if isinstance(value, (list, tuple)) and len(value) != 2:
        raise ValueError(f"a {kind} cost is MS or [MS, ATTENTION_MS], got {value!r}")
    ms, attention = (value, None) if not isinstance(value, (list, tuple)) else value
    return CostPoint(kind, int(size), float(ms), source, None if attention is None else float(attention))


def parse_ms_list(text: str, kind: str, source: str) -> list[CostPoint]:
    """'1=5.79:0.2,8=6.3' -> decode (batch) or prefill (prompt tokens) points; ':ATTENTION_MS' optional."""
    points = []
    for item in text.split(","):
        size, sep, value = item.partition("=")
        try:
            if not sep:
                raise ValueError
            points.append(_point(kind, size, [float(v) for v in value.split(":")] if ":" in value else float(value),
                                 source))
        except (ValueError, IndexError):
            raise ValueError(f"--{kind}-ms takes SIZE=MS[:ATTENTION_MS][,...], got {item!r}") from None
    return points


def load_cost_table(path: str) -> list[CostPoint]:
    """{"decode": {"1": 5.79 or [5.79, 0.204], ...}, "prefill": {"2048": 59.3}, "source": "..."} (ms;
    the optional second number is the point's attention kernels' share)."""
    data = json.loads(Path(path).read_text())
    source = f"{path}" + (f" ({data['source']})" if data.get("source") else "")
    points = [_point(kind, k, v, source) for kind in ("decode", "prefill") for k, v in (data.get(kind) or {}).items()]
    if not points:
        raise ValueError(f"cost table {path} has no decode or prefill entries")
    return points


class CostModel:
    def __init__(self, points: Sequence[CostPoint]):
        if not points:
            raise ValueError("the cost model needs at least one measured point")
        self.points = tuple(sorted(points, key=lambda p: (p.kind, p.tokens)))
        curve: dict[int, float] = {}
        for p in self.points:      # one curve over token rows; two points on one row: the dearer
            curve[p.rows] = max(p.ms, curve.get(p.rows, 0.0))
        self._x = np.array(sorted(curve), dtype=float)
        self._y = np.array([curve[x] for x in sorted(curve)])

    def step_ms(self, tokens: int, seqs: int, decode_only: bool) -> tuple[float, str, str]:
        """(ms, basis, source) of the executable (tokens, seqs, decode_only) of a ladder."""
        for p in self.points:
            if (p.kind == "decode" and decode_only and p.tokens == seqs) or \
                    (p.kind == "prefill" and not decode_only and p.tokens == tokens):
                return p.ms, "measured", p.source
        x, y = self._x, self._y
        if len(x) > 1 and x[0] <= tokens <= x[-1]:
            i = min(max(int(np.searchsorted(x, tokens)), 1), len(x) - 1)
            return float(np.interp(tokens, x, y)), "interpolated", f"{x[i - 1]:.0f}-{x[i]:.0f} rows"
        if len(x) > 1 and tokens > x[-1]:
            slope = (y[-1] - y[-2]) / (x[-1] - x[-2])
            return float(y[-1] + slope * (tokens - x[-1])), "extrapolated", f"{x[-2]:.0f}-{x[-1]:.0f} rows"
        return float(y[0] if tokens < x[0] else y[-1]), "extrapolated", f"{x[0]:.0f} rows"

    @property
    def attention_split(self) -> bool:
        """Every decode point says how much of it was attention (the bound's KV term needs that)."""
        return all(p.attention_ms is not None for p in self.points if p.kind == "decode")

    def best_ms_per_token(self) -> tuple[float, CostPoint]:
        """r: the least non-attention cost per token over the points, and that point."""
        best = min(self.points, key=lambda p: self._floor_ms(p) / p.tokens)
        return self._floor_ms(best) / best.tokens, best

    def _floor_ms(self, p: CostPoint) -> float:
        return p.non_attention_ms if self.attention_split else p.ms

    def step_floor_ms(self, max_tokens: int) -> np.ndarray:
        """g(t) for t = 0 .. max_tokens (module docstring, assumption (a))."""
        t = np.arange(max_tokens + 1)
        floor = np.zeros(max_tokens + 1)
        for p in self.points:
            floor[p.tokens:] = np.maximum(floor[p.tokens:], self._floor_ms(p))
        return np.maximum(floor, self.best_ms_per_token()[0] * t)
