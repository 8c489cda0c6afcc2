"""benchmarks/make_results_md.py renders every results file with its environment; baseline_hf batches."""

import importlib.util
import json
from pathlib import Path

import pytest

from serving.bench.datasets import SampleRequest
from serving.bench.environment import result_envelope, write_json

ROOT = Path(__file__).resolve().parents[1]


def _load(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_results_md_names_environment_and_ratio(tmp_path):
    env = {"platform": "cpu", "device_kind": "cpu", "jax_version": "0.10.2", "dtype": "float32",
           "model": "SmolLM2-135M-Instruct",
           "model_shape": {"architecture": "LlamaForCausalLM", "num_layers": 30, "hidden_size": 576, "num_heads": 9,
                           "num_kv_heads": 3, "num_params": 134_515_008}}
    jax_res = {"elapsed_time": 10.0, "requests_per_second": 3.2, "tokens_per_second": 400.0,
               "output_tokens_per_second": 150.0, "num_executables": 4, "compile_s": 26.0, "startup_s": 40.0,
               "padding_waste_pct": 12.5, "num_steps": 60}
    hf = {"batch_size": 32, "elapsed_time": 20.0, "requests_per_second": 1.6, "tokens_per_second": 200.0,
          "output_tokens_per_second": 75.0, "greedy_outputs_identical_to_jaxllm": "30/32"}
    doc = result_envelope("throughput-vs-hf", env, {"num_prompts": 32, "input_len": "96", "output_len": 48,
                                                    "sampling": "greedy"},
                          {"jaxllm": jax_res, "transformers": [hf], "transformers_best_batch_size": 32,
                           "output_throughput_ratio_jaxllm_over_hf": 2.0, "total_throughput_ratio_jaxllm_over_hf": 2.0})
    write_json(tmp_path / "2026-11-21-cpu-throughput-vs-hf.json", doc)
    (tmp_path / "other.json").write_text(json.dumps({"device": "NVIDIA H200", "jax": "0.11.2", "commit": "abc"}))
    text = _load("make_results_md").render(tmp_path)
    assert "## 2026-11-21-cpu-throughput-vs-hf.json" in text and "## other.json" in text
    assert "JAX 0.10.2" in text and "dtype: float32" in text and "LlamaForCausalLM 30L h576" in text
    assert "commit `" in text and "2.00x output tokens/s" in text
    assert "| transformers generate | 32 | 20.00 | 1.60 | 200.00 | 75.00 | 30/32 |" in text
    assert "- device: NVIDIA H200" in text and "- commit: abc" in text


def test_hf_batches_left_pad_and_sort():
    torch = pytest.importorskip("torch")
    hf = _load("baseline_hf")

    class Echo:
        """generate() stand-in: appends token 7 `max_new_tokens` times; records the batches."""
        seen = []

        def generate(self, input_ids, attention_mask, max_new_tokens, **kw):
            Echo.seen.append((input_ids.tolist(), attention_mask.tolist(), max_new_tokens, kw["min_new_tokens"]))
            return torch.cat([input_ids, torch.full((input_ids.shape[0], max_new_tokens), 7)], dim=1)

    reqs = [SampleRequest(None, [1, 2, 3], 2), SampleRequest(None, [4], 3), SampleRequest(None, [5, 6], 1)]
    outs, seconds = hf.hf_generate(Echo(), reqs, batch_size=2, pad_token_id=0)
    assert seconds >= 0
    # Shortest prompts first; left padded; each batch runs to its longest output.
    assert Echo.seen[0] == ([[0, 4], [5, 6]], [[0, 1], [1, 1]], 3, 3)
    assert Echo.seen[1] == ([[1, 2, 3]], [[1, 1, 1]], 2, 2)
    assert outs == {0: [7, 7], 1: [7, 7, 7], 2: [7]}


def test_buckets_section_shows_lone_ttft_only_when_measured():
    md = _load("make_results_md")
    row = {"ladder": "512,2048x1,64", "num_executables": 6, "compile_s": 9.0, "output_throughput": 3300.0,
           "itl_p50_ms": 13.9, "itl_p99_ms": 74.0, "padding_waste_pct": 80.0}
    doc = {"config": {"dataset": "sharegpt-synthetic", "num_prompts": 300},
           "results": {"ladders": [row], "recommended": row["ladder"], "why": "only one"}}
    old = "\n".join(md._buckets(doc))
    assert "lone TTFT" not in old and "| 512,2048x1,64 | 6 | 9.00 |" in old
    doc["results"]["ladders"] = [dict(row, lone_ttft_p50_ms=21.5), dict(row, ladder="2048x1,64")]
    new = "\n".join(md._buckets(doc))
    assert "lone TTFT P50 ms" in new and "| 21.50 |" in new and new.rstrip().count("| - |") >= 1


def test_kernel_targets_take_the_minimum_over_the_selected_shapes(tmp_path):
    """Issue 4's rows: the worst selected shape counts; a selected shape left unmeasured (an error
    row, or the budget ran out) leaves the target unmeasured instead of reading a best case."""
    md = _load("make_results_md")
    row = lambda b, c, busy: {"batch": b, "context": c,                   # noqa: E731
                              "pallas_mosaic": {"frac_copy": busy / 2, "frac_copy_busy": busy}}
    decode = [row(1, 32768, 0.75), row(32, 2048, 0.86), row(128, 4096, 1.02), row(8, 8192, 0.4)]
    doc = {"device": "NVIDIA H200", "decode": decode, "prefill": []}
    (tmp_path / "2026-11-22-h200-kernels-decode-matrix.json").write_text(json.dumps(doc))
    text = md.render(tmp_path)
    assert "| decode, Mosaic kernel, min over batch 32-256 x context 2k-32k, fraction of copy (busy) " \
           "| >= 0.9 | 0.86 x |" in text
    assert "as above by wall clock | >= 0.9 | 0.43 x |" in text
    decode.append({"batch": 64, "context": 2048, "pallas_mosaic": {"error": "ValueError: ..."}})
    (tmp_path / "2026-11-22-h200-kernels-decode-matrix.json").write_text(json.dumps(doc))
    assert "fraction of copy (busy) | >= 0.9 | not measured |" in md.render(tmp_path)


def test_throughput_section_shows_steps_by_bucket_only_when_saved():
    md = _load("make_results_md")
    res = {"requests_per_second": 20.0, "tokens_per_second": 9000.0, "output_tokens_per_second": 4000.0,
           "total_prompt_tokens": 100000, "total_output_tokens": 90000, "padding_waste_pct": 30.0,
           "num_executables": 12, "compile_s": 40.0, "elapsed_time": 23.2}
    doc = {"config": {"dataset": "sharegpt-synthetic", "num_prompts": 500}, "results": res}
    old = "\n".join(md._throughput(doc))
    assert "| 20.00 | 9000.00 | 4000.00 | 100000 | 90000 | 30.00 | 12 | 40.00 |" in old
    assert "Wall time by bucket" not in old and "Decode steps" not in old
    res.update(step_wall_seconds=23.0, steps_by_bucket=[
        {"tokens": 256, "seqs": 256, "pages": 64, "decode_only": True, "plain": True, "kind": "decode plain", "steps": 900,
         "real_tokens": 90000, "real_seqs": 90000, "seconds": 12.0, "mean_step_ms": 13.33, "share_of_time": 0.517,
         "mean_wait_ms": 11.5},
        {"tokens": 2048, "seqs": 256, "pages": 64, "decode_only": False, "plain": False, "kind": "general", "steps": 60,
         "real_tokens": 100000, "real_seqs": 9000, "seconds": 11.0, "mean_step_ms": 183.33, "share_of_time": 0.474}],
        decode_batch_sizes=[{"seqs": "129-256", "min_seqs": 129, "max_seqs": 256, "mean_seqs": 200.0, "steps": 900,
                             "seconds": 12.0, "mean_step_ms": 13.33, "share_of_time": 0.517}])
    new = "\n".join(md._throughput(doc))
    assert new.startswith(old) and "23.00 s charged to steps of 23.20 s elapsed" in new
    # The wait column: a row's mean collect wait, "-" in files from before it was recorded.
    assert "| 256 | 256 | 64 | decode plain | 900 | 90000 | 90000 | 12.00 | 13.33 | 11.50 | 51.7 |" in new
    assert "| 2048 | 256 | 64 | general | 60 | 100000 | 9000 | 11.00 | 183.33 | - | 47.4 |" in new
    assert "| 129-256 | 900 | 200.0 | 12.00 | 13.33 | - | 51.7 |" in new
