"""`jaxllm bench throughput` and `jaxllm bench buckets` end to end on the embedded model.

Tiny ladders and a handful of short prompts keep the compiles few; the shapes repeat across the
tests so a shared persistent compilation cache turns the later builds into cache loads.
"""

import json
import re

import pytest

from serving.bench.cli import main as bench_main

NUM_PROMPTS = 4
INPUT_LEN = 20
OUTPUT_LEN = 5


@pytest.fixture(scope="module")
def engine_flags(tmp_path_factory):
    cache = tmp_path_factory.mktemp("xla-cache")
    return ["--dataset-name", "random", "--num-prompts", str(NUM_PROMPTS), "--random-input-len", str(INPUT_LEN),
            "--random-output-len", str(OUTPUT_LEN), "--max-model-len", "64", "--max-num-seqs", "8",
            "--max-num-batched-tokens", "64", "--dtype", "float32", "--compilation-cache-dir", str(cache)]


def test_bench_throughput_end_to_end(engine_flags, tmp_path, capsys):
    out_json = tmp_path / "tp.json"
    rc = bench_main(["throughput", *engine_flags, "--token-buckets", "16,64", "--seq-buckets", "8",
                     "--output-json", str(out_json)])
    out = capsys.readouterr().out
    assert rc == 0, out
    m = re.search(r"Throughput: ([\d.]+) requests/s, ([\d.]+) total tokens/s, ([\d.]+) output tokens/s", out)
    assert m and float(m.group(3)) > 0
    assert f"Total num output tokens:  {NUM_PROMPTS * OUTPUT_LEN}" in out
    data = json.loads(out_json.read_text())
    env, res = data["environment"], data["results"]
    assert env["platform"] == "cpu" and env["dtype"] == "float32" and env["jax_version"] and env["commit"]
    assert env["model_shape"]["num_layers"] == 30 and env["model_shape"]["hidden_size"] == 576
    assert res["num_requests"] == NUM_PROMPTS and res["num_failed"] == 0
    assert res["total_prompt_tokens"] == NUM_PROMPTS * INPUT_LEN
    assert res["total_output_tokens"] == NUM_PROMPTS * OUTPUT_LEN      # ignore_eos: exact lengths
    assert res["total_num_tokens"] == res["total_prompt_tokens"] + res["total_output_tokens"]
    assert res["output_tokens_per_second"] == pytest.approx(res["total_output_tokens"] / res["elapsed_time"])
    assert res["num_executables"] == 2 and res["compilations_during_run"] == 0
    # Every prompt token and every output token but the last is computed once (no prefix hits here).
    assert res["scheduled_tokens"] == NUM_PROMPTS * (INPUT_LEN + OUTPUT_LEN - 1)
    assert res["padding_waste_pct"] == pytest.approx(
        100 * (res["padded_tokens"] - res["scheduled_tokens"]) / res["scheduled_tokens"])
    assert res["padding_waste_pct"] > 0          # 4 decoding sequences never fill a 16-token bucket
    assert res["itl_ms"]["median"] > 0 and res["num_steps"] >= OUTPUT_LEN
    # Where the time went, by executable shape (the XLA backend has no decode-only executables).
    rows = res["steps_by_bucket"]
    assert sum(r["steps"] for r in rows) == res["num_steps"] and not any(r["decode_only"] for r in rows)
    assert sum(r["real_tokens"] for r in rows) == res["scheduled_tokens"]
    # Of each step's charge, the part spent collecting it (waiting for the device) is a part.
    assert all(0 <= r["mean_wait_ms"] <= r["mean_step_ms"] for r in rows)
    assert 0 < res["step_wall_seconds"] <= res["elapsed_time"] and "Steps by bucket" in out


def test_bench_buckets_end_to_end(engine_flags, tmp_path, capsys):
    out_json, png = tmp_path / "ladders.json", tmp_path / "ladders.png"
    rc = bench_main(["buckets", *engine_flags, "--ladder", "64x8", "--ladder", "16,64x8",
                     "--output-json", str(out_json), "--plot", str(png)])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "Recommended ladder:" in out and "Pad waste %" in out
    data = json.loads(out_json.read_text())
    rows = {r["ladder"]: r for r in data["results"]["ladders"]}
    assert rows["64x8"]["num_executables"] == 1 and rows["16,64x8"]["num_executables"] == 2
    # Decode steps of 4 tokens pad to 64 in the one-bucket ladder but to 16 in the other.
    assert rows["64x8"]["padding_waste_pct"] > rows["16,64x8"]["padding_waste_pct"]
    for r in rows.values():
        assert r["num_failed"] == 0 and r["compilations_during_run"] == 0 and r["output_throughput"] > 0
        assert r["token_buckets"][-1] == 64 and r["seq_buckets"] == [8]
    assert data["results"]["recommended"] in rows and data["results"]["why"]
    assert png.stat().st_size > 10_000


def test_bench_buckets_rejects_bad_spec_before_building(capsys):
    assert bench_main(["buckets", "--ladder", "64x8", "--ladder", "sixteen"]) == 2
    assert "ladder spec 'sixteen'" in capsys.readouterr().err


def test_bench_throughput_takes_the_decode_seq_ladder(capsys):
    from serving.bench.cli import build_parser, engine_kwargs

    ns = build_parser().parse_args(["throughput", "--seq-buckets", "1,64", "--decode-seq-buckets", "1,8,64"])
    assert engine_kwargs(ns)["decode_seq_buckets"] == "1,8,64"    # EngineArgs parses it
    assert "decode_seq_buckets" not in engine_kwargs(build_parser().parse_args(["throughput"]))
    assert bench_main(["throughput", "--decode-seq-buckets", "1,x"]) == 2
    assert "decode_seq_buckets" in capsys.readouterr().err
