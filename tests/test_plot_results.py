import shutil
import sys
from pathlib import Path

import pytest

pytest.importorskip("matplotlib")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
RESULTS = ROOT / "benchmarks" / "results"

import plot_results  # noqa: E402


def test_sweep_and_ladder_figures_from_suite_files(tmp_path):
    for name in ("2026-11-21-h100-8b-sharegpt-served-inf.json", "2026-11-21-h100-8b-sharegpt-served-rate8.json",
                 "2026-11-21-h100-8b-sharegpt-served-rate2.json", "2026-11-21-h200-8b-sharegpt-served-c64.json",
                 "2026-11-21-h200-8b-sharegpt-served-inf.json", "2026-11-21-h200-8b-buckets.json"):
        shutil.copy(RESULTS / name, tmp_path / name)
    sweeps = plot_results.sweeps(tmp_path)
    # One H100 sweep of three rates, in rate order; the H200 has a single rate (no curve) and its
    # concurrency-capped c64 run is not a rate point.
    assert list(sweeps) == ["2026-11-21-h100-8b"]
    assert [r["request_rate"] for r in sweeps["2026-11-21-h100-8b"]] == [2.0, 8.0, float("inf")]
    written = plot_results.write_plots(tmp_path)
    assert sorted(p.name for p in written) == ["2026-11-21-h100-8b-serve-sweep.png", "2026-11-21-h200-8b-buckets.png"]
    for p in written:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size > 10_000
