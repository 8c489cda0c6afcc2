"""benchmarks/make_results_md.py's issue-8 targets table: single figures, the H200/H100 ratio row, and the
rows read from benchmarks/gpu_bench_suite.py's and gpu_profile.py's files (ratios of one run only where that matters)."""

import importlib.util
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _render(results_dir):
    spec = importlib.util.spec_from_file_location("make_results_md", ROOT / "benchmarks" / "make_results_md.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.render(results_dir)


def _profile(path, step_ms):
    path.write_text(json.dumps({"runs": [{"batch": 1, "step_ms_unprofiled_median": step_ms}]}))


def test_h200_over_h100_divides_the_newest_suite_files(tmp_path):
    _suite_file(tmp_path / "2026-01-01-h100-8b-random1024-offline.json", "throughput", _throughput(10.0))
    _suite_file(tmp_path / "2026-02-01-h100-8b-random1024-offline.json", "throughput", _throughput(20.0))  # newest
    _suite_file(tmp_path / "2026-02-01-h200-8b-random1024-offline.json", "throughput", _throughput(25.0))
    _profile(tmp_path / "2026-02-01-h200-decode-profile-tp1-h200.json", 4.4)
    text = _render(tmp_path)
    assert ("| 1.25 x | 2026-02-01-h200-8b-random1024-offline.json / 2026-02-01-h100-8b-random1024-offline.json |"
            in text)
    assert "H200 (gpu_profile, unprofiled median) | record (below the H100 figure) | 4.4 ms |" in text


def test_ratio_row_not_measured_without_both_files(tmp_path):
    _suite_file(tmp_path / "2026-02-01-h100-8b-random1024-offline.json", "throughput", _throughput(20.0))
    row = next(l for l in _render(tmp_path).splitlines() if l.startswith("| offline throughput ratio H200 / H100"))
    assert "| not measured |" in row and "- / 2026-02-01-h100-8b-random1024-offline.json" in row


def _suite_file(path, kind, results, commit=None):
    env = {} if commit is None else {"commit": commit}
    path.write_text(json.dumps({"benchmark": kind, "environment": env, "config": {}, "results": results}))


def _served(rps):
    return {"request_throughput": rps, "completed": 10, "failed": 0, "output_throughput": 100.0}


def _throughput(rps):
    return {"requests_per_second": rps, "tokens_per_second": 1.0, "output_tokens_per_second": 1.0,
            "total_prompt_tokens": 1, "total_output_tokens": 1}


def test_suite_rows_sharegpt_startup_and_hf_ratio(tmp_path):
    d = "2026-03-01-h100-8b-"
    _suite_file(tmp_path / f"{d}sharegpt-offline.json", "throughput", _throughput(40.0))
    _suite_file(tmp_path / f"{d}sharegpt-served-inf.json", "serve", _served(38.0))
    _suite_file(tmp_path / f"{d}random1024-served-c64.json", "serve", _served(12.0))
    hf_run = {"batch_size": 64, "static_cache": True, "torch_compile": "off", "requests_per_second": 0.8,
              "tokens_per_second": 900.0, "output_tokens_per_second": 100.0, "warmup_s": 5.0}
    _suite_file(tmp_path / f"{d}random1024-hf-b64.json", "hf-baseline",
                {**hf_run, "runs": [hf_run, {"torch_compile": "failed", "error": "BackendCompilerFailed: x"}]})
    _suite_file(tmp_path / f"{d}startup.json", "startup",
                {"cold": {"process": "a", "startup_s": 210.04, "compile_s": 190.0},
                 "cached": {"process": "b", "startup_s": 31.5, "compile_s": 6.0}, "starts": []})
    text = _render(tmp_path)
    rows = {l.split(" | ")[0].lstrip("| "): l for l in text.splitlines() if l.startswith("| ")}
    assert "| 40.0 req/s |" in rows["offline throughput, sharegpt-synthetic, 500 prompts, 8B bf16, H100"]
    assert "| 0.95 x |" in rows["served (bench serve, rate inf) / offline throughput, sharegpt-synthetic, 8B, H100"]
    assert "| 15.0 x |" in rows["jaxllm (served, 64 in flight) / HF transformers (batch 64), random 1024/128, 8B bf16, H100"]
    assert "| 31.5 s |" in rows["start-up, 8B, engine build with the compilation cache, H100"]
    assert "| 210.04 s |" in rows["start-up, 8B, engine build on an empty compilation cache, H100"]
    # The files' own sections: every HF variant tried, the failed compile with its error.
    assert "| 64 | True | off | 0.80 | 900.00 | 100.00 | 5.00 | **result** |" in text
    assert "| 64 | True | failed | - | - | - | - | failed: BackendCompilerFailed: x |" in text
    assert "**Engine start-up cold: 210.0 s (a); cached: 31.5 s (b).**" in text


def test_same_run_ratio_pairs_files_of_one_date_only(tmp_path):
    served = "served (bench serve, rate inf) / offline throughput, sharegpt-synthetic"

    def row():
        return next(l for l in _render(tmp_path).splitlines() if l.startswith(f"| {served}, 8B, H100"))

    _suite_file(tmp_path / "2026-03-01-h100-8b-sharegpt-served-inf.json", "serve", _served(30.0))
    _suite_file(tmp_path / "2026-03-02-h100-8b-sharegpt-offline.json", "throughput", _throughput(40.0))
    assert "| not measured |" in row()              # served and offline of different runs are not divided
    _suite_file(tmp_path / "2026-03-01-h100-8b-sharegpt-offline.json", "throughput", _throughput(32.0))
    assert "| 0.938 x | 2026-03-01-h100-8b-sharegpt-served-inf.json / 2026-03-01-h100-8b-sharegpt-offline.json |" in row()
    # Same date, another run (a later session re-ran offline at another commit): not divided either.
    _suite_file(tmp_path / "2026-03-01-h100-8b-sharegpt-offline.json", "throughput", _throughput(32.0), commit="b")
    _suite_file(tmp_path / "2026-03-01-h100-8b-sharegpt-served-inf.json", "serve", _served(30.0), commit="a")
    assert "| not measured |" in row() and "different runs: commits a / b" in row()


def test_gpu_profile_scatter_free_pages_permutes_the_free_queue():
    from benchmarks.gpu_profile import scatter_free_pages
    from serving.scheduler import Scheduler

    sched = Scheduler(num_pages=65, page_size=16, max_model_len=256, max_num_seqs=4, max_num_batched_tokens=64)
    engine = type("E", (), {"scheduler": sched})()
    pool = sched.kv.pool
    before = pool.free_page_ids()
    scatter_free_pages(engine, seed=3)
    after = pool.free_page_ids()
    assert before == list(range(1, 65)) and sorted(after) == before and after != before
    pool.check_invariants()


def test_gpu_profile_mixed_prompt_profiles_mixed_steps(tmp_path):
    """On the CPU (tiny Llama, XLA attention): with --mixed-prompt every timed step is a mixed step
    (decode rows plus a new prompt), and the row names the executables the timed steps ran."""
    import pytest

    from benchmarks.gpu_profile import main
    from tests.tiny_models import make_tiny_hf_model

    model, _ = make_tiny_hf_model("llama", tmp_path / "m", max_position_embeddings=512)
    assert main(["--model", str(model), "--dtype", "float32", "--attention-backend", "xla", "--batch", "4",
                "--ctx", "32", "--token-buckets", "64", "--mixed-prompt", "24", "--steps", "2",
                "--max-model-len", "256", "--out", str(tmp_path)]) == 0
    (out,) = tmp_path.glob("*-decode-profile.json")
    (row,) = json.loads(out.read_text())["runs"]
    assert row["mixed_prompt"] == 24 and row["busy_ms_per_step"] > 0
    # 2 x 2 timed steps, each 4+ decode rows and a 24-token chunk: the 64-token general executable.
    assert row["executables"] == [{"tokens": 64, "seqs": 16, "decode_only": False, "steps": 4}]
    with pytest.raises(SystemExit):
        main(["--model", str(model), "--batch", "4", "--token-buckets", "16", "--mixed-prompt", "24"])
