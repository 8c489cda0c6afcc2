"""benchmarks/make_results_md.py's issue-8 targets table: single figures and the H200/H100 ratio row."""

import importlib.util
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _render(results_dir):
    spec = importlib.util.spec_from_file_location("make_results_md", ROOT / "benchmarks" / "make_results_md.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.render(results_dir)


def _engine(path, itl, rps):
    path.write_text(json.dumps({"what": "gpu-engine", "llama-3.1-8b": {
        "batch1_itl_ms_ctx512": itl, "startup_s": 100.0, "random_1024_128": {"requests_per_s": rps}}}))


def test_ratio_row_divides_newest_files(tmp_path):
    _engine(tmp_path / "2026-01-01-nvidia-h100-80gb-hbm3-engine.json", 9.0, 10.0)
    _engine(tmp_path / "2026-02-01-nvidia-h100-80gb-hbm3-engine.json", 8.0, 20.0)   # newest H100 wins
    _engine(tmp_path / "2026-02-01-nvidia-h200-engine.json", 7.5, 25.0)
    text = _render(tmp_path)
    assert "| 1.25 x | 2026-02-01-nvidia-h200-engine.json / 2026-02-01-nvidia-h100-80gb-hbm3-engine.json |" in text
    assert "H200 | record (below the H100 figure) | 7.5 ms |" in text
    assert "H100 | <= 5.8 ms (vLLM 6.44 ms; roofline ~5.0) | 8.0 ms |" in text


def test_ratio_row_not_measured_without_both_files(tmp_path):
    _engine(tmp_path / "2026-02-01-nvidia-h100-80gb-hbm3-engine.json", 8.0, 20.0)
    row = next(l for l in _render(tmp_path).splitlines() if l.startswith("| offline throughput ratio H200 / H100"))
    assert "| not measured |" in row and "- / 2026-02-01-nvidia-h100-80gb-hbm3-engine.json" in row
