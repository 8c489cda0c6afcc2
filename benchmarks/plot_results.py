"""PNG figures of the GPU suite's result files (benchmarks/results), for RESULTS.md readers.

    python benchmarks/plot_results.py [--results benchmarks/results]

Per device and date (files of benchmarks/gpu_bench_suite.py, <date>-<device>-<model>-<what>.json):
  <date>-<device>-<model>-serve-sweep.png  bench serve's sharegpt-synthetic request-rate sweep
                                           (throughput vs TTFT/TPOT/ITL, one point a rate)
  <date>-<device>-<model>-buckets.png      bench buckets' ladder comparison
The plotting itself is serving.bench.plots (the same figures `bench serve --plot` and
`bench buckets --plot` write).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from serving.bench.plots import plot_ladders, plot_rate_sweep  # noqa: E402

# <date>-<device>-<model>-sharegpt-served-<inf|rateN>.json (the suite's SERVE_RATES runs; the HF
# comparison's -served-c64 run has a concurrency cap, not a rate, and is left out).
_SWEEP = re.compile(r"^(\d{4}-\d{2}-\d{2}-[^-]+-[^-]+)-sharegpt-served-(inf|rate[\d.]+)\.json$")


def sweeps(results: Path) -> dict[str, list[dict]]:
    """prefix (date-device-model) -> the sweep's result rows, by request rate."""
    out = defaultdict(list)
    for path in sorted(results.glob("*-sharegpt-served-*.json")):
        m = _SWEEP.match(path.name)
        if m:
            out[m.group(1)].append(json.loads(path.read_text())["results"])
    return {k: sorted(v, key=lambda r: float(r["request_rate"])) for k, v in out.items() if len(v) > 1}


def write_plots(results: Path) -> list[Path]:
    written = []
    for prefix, rows in sweeps(results).items():
        written.append(plot_rate_sweep(rows, results / f"{prefix}-serve-sweep.png",
                                       title=f"{prefix}: bench serve, sharegpt-synthetic, request-rate sweep"))
    for path in sorted(results.glob("*-buckets.json")):
        doc = json.loads(path.read_text())
        rows = doc["results"]["ladders"]
        written.append(plot_ladders(rows, path.with_suffix(".png"),
                                    title=f"{path.stem}: recommended {doc['results']['recommended']}"))
    return written


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "results")
    ns = ap.parse_args(argv)
    for path in write_plots(ns.results):
        print(f"Wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
