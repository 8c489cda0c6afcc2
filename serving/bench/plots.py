"""PNG figures for the benchmarks (matplotlib, the `bench` extra: ``pip install 'jaxllm[bench]'``)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import numpy as np

from serving.bench.metrics import METRIC_TITLES, RequestResult


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise ValueError("--plot needs matplotlib: pip install 'jaxllm[bench]' (or matplotlib)") from None
    matplotlib.use("Agg")     # files only; no display on servers
    import matplotlib.pyplot as plt

    return plt


def plot_latency_distributions(results: Sequence[RequestResult], path: str | Path, *, title: str = "") -> Path:
    """Histograms of TTFT, TPOT, ITL and E2EL (ms) of the successful requests, median and P99 marked."""
    plt = _pyplot()
    ok = [r for r in results if r.success]
    samples = {"ttft": [r.ttft * 1e3 for r in ok], "tpot": [r.tpot * 1e3 for r in ok if r.tpot is not None],
               "itl": [g * 1e3 for r in ok for g in r.itl], "e2el": [r.latency * 1e3 for r in ok]}
    fig, axes = plt.subplots(2, 2, figsize=(11, 7))
    for ax, (key, values) in zip(axes.flat, samples.items()):
        name = METRIC_TITLES[key][1]
        if values:
            ax.hist(values, bins=min(50, max(5, len(values) // 4)), color="tab:blue", alpha=0.8)
            for q, style in ((50, "--"), (99, ":")):
                v = float(np.percentile(values, q))
                ax.axvline(v, color="tab:red", linestyle=style, label=f"P{q} {v:.1f} ms")
            ax.legend(fontsize=8)
        else:
            ax.text(0.5, 0.5, "no samples", ha="center", va="center", transform=ax.transAxes)
        ax.set_title(f"{name} (ms)")
        ax.set_xlabel("ms")
        ax.set_ylabel("count")
    fig.suptitle(title or "Latency distributions")
    fig.tight_layout()
    return _save(fig, path, plt)


def plot_rate_sweep(rows: Sequence[dict], path: str | Path, *, title: str = "") -> Path:
    """Throughput-latency curves of a --request-rate sweep. Each row: request_rate, output_throughput,
    and median/p99 of ttft, tpot, itl (ms) as flat keys (serving.bench.serve.flat_metrics)."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    thr = [r["output_throughput"] for r in rows]
    labels = ["inf" if math.isinf(r["request_rate"]) else f"{r['request_rate']:g}" for r in rows]
    for ax, metric in zip(axes, ("ttft", "tpot", "itl")):
        for stat, marker in (("median", "o-"), ("p99", "s--")):
            ax.plot(thr, [r[f"{stat}_{metric}_ms"] for r in rows], marker, label=stat)
        for x, y, lab in zip(thr, [r[f"median_{metric}_ms"] for r in rows], labels):
            ax.annotate(f"{lab} req/s", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
        ax.set_xlabel("output throughput (tok/s)")
        ax.set_ylabel(f"{METRIC_TITLES[metric][1]} (ms)")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.suptitle(title or "Throughput vs latency over request rates")
    fig.tight_layout()
    return _save(fig, path, plt)


def plot_ladders(rows: Sequence[dict], path: str | Path, *, title: str = "") -> Path:
    """One bar chart a figure of merit, one bar a ladder (serving.bench.buckets rows)."""
    plt = _pyplot()
    panels = [("output_throughput", "output tok/s"), ("itl_p50_ms", "ITL P50 (ms)"), ("itl_p99_ms", "ITL P99 (ms)"),
              ("padding_waste_pct", "padding waste %"), ("num_executables", "executables"),
              ("compile_s", "compile time (s)")]
    if any(r.get("lone_ttft_p50_ms") is not None for r in rows):   # measured since 04f8a48
        panels[3:3] = [("lone_ttft_p50_ms", "lone-request TTFT P50 (ms)")]
    fig, axes = plt.subplots(2, -(-len(panels) // 2), figsize=(5 * -(-len(panels) // 2), 7.5))
    names = [r["ladder"] for r in rows]
    x = np.arange(len(rows))
    for ax, (key, label) in zip(axes.flat, panels):
        values = [r.get(key) or 0 for r in rows]
        ax.bar(x, values, color="tab:green" if key == "output_throughput" else "tab:blue")
        ax.set_xticks(x, names, rotation=30, ha="right", fontsize=7)
        ax.set_title(label)
        ax.grid(axis="y", alpha=0.3)
    for ax in axes.flat[len(panels):]:
        ax.axis("off")
    fig.suptitle(title or "Bucket ladders")
    fig.tight_layout()
    return _save(fig, path, plt)


def _save(fig, path, plt) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
