"""benchmarks/schedule_bound.py: the scheduler's step sequence, its buckets, the cost model and the
lower bound (host only; small workloads)."""

import importlib.util
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest

from serving.bench.datasets import SampleRequest, sharegpt_lengths

ROOT = Path(__file__).resolve().parents[1]


def _load(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod        # dataclasses look their module up while the class is built
    spec.loader.exec_module(mod)
    return mod


sb = _load("schedule_bound")
LIMITS = dict(max_model_len=2048, max_num_seqs=256, max_num_batched_tokens=2048, block_size=16)


def _ladder(token_buckets, seq_buckets, decode_seq_buckets=None, **limits):
    limits = {**LIMITS, **limits}
    return sb.ladder_for(token_buckets, seq_buckets, max_num_batched_tokens=limits["max_num_batched_tokens"],
                         max_num_seqs=limits["max_num_seqs"], max_model_len=limits["max_model_len"],
                         block_size=limits["block_size"], decode_seq_buckets=decode_seq_buckets)


def _min_steps(r, budget):
    return -(-r.prompt_len // budget) + r.expected_output_len - 1


def test_copies_match_the_engine():
    from serving.config import EngineArgs
    from serving.engine_builder import _GPU_DEFAULTS
    from serving.model_runner import ModelRunner

    assert tuple(_GPU_DEFAULTS["token_buckets"]) == sb.GPU_TOKEN_BUCKETS
    assert tuple(_GPU_DEFAULTS["seq_buckets"]) == sb.GPU_SEQ_BUCKETS
    assert _GPU_DEFAULTS["max_num_batched_tokens"] == sb.GPU_MAX_NUM_BATCHED_TOKENS
    assert _GPU_DEFAULTS["max_num_seqs"] == sb.GPU_MAX_NUM_SEQS and EngineArgs.max_num_seqs is None
    assert tuple(_GPU_DEFAULTS["decode_seq_buckets"]) == sb.GPU_DECODE_SEQ_BUCKETS
    assert ModelRunner.min_decode_tokens == sb.MIN_DECODE_TOKENS


@pytest.mark.parametrize("async_scheduling", [True, False])
def test_one_request_takes_its_chunks_then_one_step_a_token(async_scheduling):
    req = SampleRequest(None, list(range(100, 230)), 7)          # 130 prompt tokens, 7 outputs
    sim = sb.simulate([req], max_model_len=512, max_num_seqs=4, max_num_batched_tokens=32, block_size=16,
                      async_scheduling=async_scheduling)
    assert sim.steps == ((32, 1),) * 4 + ((2, 1),) + ((1, 1),) * 6  # 5 chunks (the 5th samples), 6 decodes
    assert sim.finish_step == (len(sim.steps),) == (_min_steps(req, 32),)
    assert sim.num_preemptions == 0


@pytest.mark.parametrize("async_scheduling", [True, False])
def test_one_sequence_at_a_time_runs_requests_back_to_back(async_scheduling):
    reqs = [SampleRequest(None, [i + 1] * p, n) for i, (p, n) in enumerate([(40, 3), (5, 9), (70, 1), (16, 4)])]
    sim = sb.simulate(reqs, max_model_len=256, max_num_seqs=1, max_num_batched_tokens=32, block_size=16,
                      async_scheduling=async_scheduling)
    ends = np.cumsum([_min_steps(r, 32) for r in reqs])
    assert sim.finish_step == tuple(int(e) for e in ends)
    assert len(sim.steps) == ends[-1]


def test_sharegpt_steps_meet_every_request_constraint():
    budget = 256
    reqs = sb.build_workload("sharegpt-synthetic", 40, 3, 1000)
    # The library's lengths, drawn first from the seed's generator (as bench throughput draws them).
    assert [(r.prompt_len, r.expected_output_len) for r in reqs] == sharegpt_lengths(np.random.default_rng(3), 40)
    sim = sb.simulate(reqs, max_model_len=2048, max_num_seqs=8, max_num_batched_tokens=budget, block_size=16)
    total = sum(r.prompt_len + r.expected_output_len - 1 for r in reqs)
    assert sim.scheduled_tokens == total and sim.num_preemptions == 0
    assert all(t <= budget and 1 <= s <= 8 and s <= t for t, s in sim.steps)
    for r, done in zip(reqs, sim.finish_step):
        assert done >= _min_steps(r, budget)
    assert max(sim.finish_step) == len(sim.steps)
    assert len(sim.steps) >= max(max(_min_steps(r, budget) for r in reqs), math.ceil(total / budget))


def test_decode_steps_run_their_seq_bucket_and_mixed_steps_their_token_bucket():
    reqs = sb.build_workload("sharegpt-synthetic", 60, 0, 1000)
    sim = sb.simulate(reqs, **LIMITS)
    ladder = _ladder((512, 2048), (1, 8, 32, 256))
    padded = 0
    for tokens, seqs in sim.steps:
        t_pad, s_pad, _, decode_only, _ = sb.bucket_of(ladder, tokens, seqs)
        assert s_pad == min(b for b in ladder.seq_buckets if b >= seqs)
        if tokens == seqs:
            assert decode_only and t_pad == max(s_pad, sb.MIN_DECODE_TOKENS)
        else:
            assert not decode_only and t_pad == min(b for b in ladder.token_buckets if b >= tokens)
        padded += t_pad
    pred, _ = sb.predict(sim, ladder, sb.CostModel(sb.h100_cost_points()), len(reqs), 1)
    rows = pred["steps_by_bucket"]
    assert sum(r["steps"] for r in rows) == len(sim.steps) and pred["padded_tokens"] == padded
    assert sum(r["real_tokens"] for r in rows) == sim.scheduled_tokens
    assert all(r["tokens"] == max(r["seqs"], 2) for r in rows if r["decode_only"])
    assert pred["predicted_elapsed_s"] == pytest.approx(sum(r["steps"] * r["ms_per_step"] for r in rows) / 1e3)


def test_a_decode_seq_ladder_moves_only_the_decode_steps():
    reqs = sb.build_workload("sharegpt-synthetic", 60, 0, 1000)
    sim = sb.simulate(reqs, **LIMITS)
    coarse = _ladder((512, 2048), (1, 64, 256))
    fine = sb.ladder_for((512, 2048), (1, 64, 256), decode_seq_buckets=(1, 8, 16, 32, 64, 128), **LIMITS)
    assert fine.seq_buckets == (1, 64, 256) and fine.decode_seq_buckets == (1, 8, 16, 32, 64, 128, 256)
    for tokens, seqs in sim.steps:
        a, b = sb.bucket_of(coarse, tokens, seqs), sb.bucket_of(fine, tokens, seqs)
        if tokens == seqs:
            assert b[1] == min(x for x in fine.decode_seq_buckets if x >= seqs) <= a[1]
        else:
            assert a == b
    costs = sb.CostModel(sb.h100_cost_points())
    (pa, _), (pb, _) = (sb.predict(sim, lad, costs, len(reqs), 1) for lad in (coarse, fine))
    assert pb["seconds_by_kind"]["mixed"] == pa["seconds_by_kind"]["mixed"]
    assert pb["seconds_by_kind"]["decode"] < pa["seconds_by_kind"]["decode"]


def test_cost_model_measured_interpolated_extrapolated():
    points = sb.parse_ms_list("1=5:0.5,64=9:2", "decode", "flag") + sb.parse_ms_list("2048=60", "prefill", "flag")
    costs = sb.CostModel(points)
    assert costs.step_ms(64, 64, True)[:2] == (9.0, "measured")
    assert costs.step_ms(2048, 256, False)[:2] == (60.0, "measured")
    ms, basis, _ = costs.step_ms(256, 256, True)     # between the 64- and 2048-row points
    assert basis == "interpolated" and ms == pytest.approx(9 + (256 - 64) / (2048 - 64) * 51)
    assert costs.step_ms(4096, 256, False)[1] == "extrapolated"
    assert costs.attention_split
    rate, point = costs.best_ms_per_token()
    assert point.kind == "prefill" and rate == pytest.approx(60 / 2048)
    g = costs.step_floor_ms(2048)
    assert g[1] == 4.5 and g[63] == 4.5 and g[64] == 7.0 and g[2048] == 60.0
    for bad in ("8", "8=x", "a=1", "8=1:2:3"):
        with pytest.raises(ValueError):
            sb.parse_ms_list(bad, "decode", "flag")
    with pytest.raises(ValueError):
        sb.CostPoint("decode", 8, 5.0, "x", attention_ms=6.0)


def test_default_costs_read_from_the_h100_files():
    points = {(p.kind, p.tokens): p for p in sb.h100_cost_points()}
    assert points[("decode", 1)].ms == 5.79 and points[("decode", 64)].ms == 8.557
    assert points[("decode", 8)].ms == 6.276 and points[("decode", 16)].ms == 6.525
    assert points[("decode", 32)].ms == 7.329 and points[("prefill", 2048)].ms == pytest.approx(59.3)
    assert all(p.source.split()[0] in {n for _, n in sb.H100_DECODE_SOURCES} | {sb.H100_PREFILL_SOURCE[1]}
               for p in points.values())


def test_min_cost_lp_matches_a_general_solver():
    linprog = pytest.importorskip("scipy.optimize").linprog
    rng = np.random.default_rng(0)
    for _ in range(20):
        sizes = np.sort(rng.choice(np.arange(1, 300), size=8, replace=False))
        cost = np.sort(rng.uniform(1, 30, size=8))
        steps, tokens = float(rng.integers(1, 50)), float(rng.integers(1, 5000))
        ref = linprog(cost, A_ub=-np.stack([np.ones(8), sizes]), b_ub=[-steps, -tokens], bounds=(0, None))
        assert sb.min_cost_lp(sizes, cost, steps, tokens) == pytest.approx(ref.fun, rel=1e-9)


@pytest.mark.parametrize("decode_ms", [None, "1=5.79,8=6.276,16=6.525,32=7.329,64=8.557"])
def test_lower_bound_is_below_every_prediction(decode_ms):
    reqs = sb.build_workload("sharegpt-synthetic", 80, 1, 1000)
    points = sb.h100_cost_points()
    if decode_ms:      # no attention figures: the bound keeps attention in g and drops the KV term
        points = [p for p in points if p.kind != "decode"] + sb.parse_ms_list(decode_ms, "decode", "flag")
    costs = sb.CostModel(points)
    lb = sb.lower_bound(reqs, costs, max_num_batched_tokens=2048, max_model_len=2048,
                        kv_bytes_per_token=sb.LLAMA_8B_KV_BYTES_PER_TOKEN, hbm_gbps=sb.H100_HBM_GBPS)
    parts = lb["parts_s"]
    assert (parts["kv_reads"] > 0) == (decode_ms is None)
    assert parts["steps_and_tokens_lp"] >= max(parts["longest_request_steps"], parts["all_tokens"]) - 1e-12
    assert lb["elapsed_s"] == pytest.approx(parts["steps_and_tokens_lp"] + parts["kv_reads"])
    assert lb["min_steps"] == max(_min_steps(r, 2048) for r in reqs)
    sim = sb.simulate(reqs, **LIMITS)
    assert len(sim.steps) >= lb["min_steps"]
    for seqs in [(1, 64, 256), (1, 8, 16, 32, 64, 128, 256)]:
        pred, _ = sb.predict(sim, _ladder((512, 2048), seqs), costs, len(reqs), 1)
        assert 0 < lb["elapsed_s"] <= pred["predicted_elapsed_s"]


def test_main_writes_a_result_that_results_md_renders(tmp_path):
    out = tmp_path / "2026-11-22-cpu-sharegpt-schedule-bound.json"
    sb.main(["--num-prompts", "30", "--seq-buckets", "1,8,64,256", "--measured", "", "--out", str(out)])
    data = json.loads(out.read_text())
    assert data["benchmark"] == "schedule-bound" and data["environment"]["platform"] == "cpu"
    assert "commit" in data["environment"]
    res = data["results"]
    # The GPU defaults, then the given seq ladder (the decode ladder too, as in the engine).
    assert [x["seq_buckets"] for x in res["ladders"]] == [[1, 64, 512], [1, 8, 64, 256, 512]]
    assert [x["decode_seq_buckets"] for x in res["ladders"]] == [list(sb.GPU_DECODE_SEQ_BUCKETS), [1, 8, 64, 256, 512]]
    assert res["lower_bound"]["elapsed_s"] <= min(x["predicted_elapsed_s"] for x in res["ladders"])
    text = _load("make_results_md").render(tmp_path)
    assert "## 2026-11-22-cpu-sharegpt-schedule-bound.json" in text and "Benchmark: `schedule-bound`" in text
    assert "| 512,2048 x 1,8,64,256,512 |" in text and "**Lower bound for any schedule" in text
    sb.main(["--num-prompts", "30", "--decode-seq-buckets", "1,8,64", "--measured", "", "--out", str(out)])
    text = _load("make_results_md").render(tmp_path)      # the two ladders' rows stay told apart
    assert "| 512,2048 x 1,64,512 (decode 1,8,16,32,64,128,256,512) |" in text
    assert "| 512,2048 x 1,64,512 (decode 1,8,64,512) |" in text


def test_bad_flags_raise_value_errors(tmp_path):
    with pytest.raises(ValueError):
        sb.main(["--num-prompts", "0", "--out", str(tmp_path / "x.json")])
    with pytest.raises(ValueError):
        sb.main(["--num-prompts", "5", "--seq-buckets", "1,x", "--out", str(tmp_path / "x.json")])
    with pytest.raises(ValueError):
        sb.build_workload("prefix-repetition", 5, 0, 1000)


def test_the_h100_sharegpt_run_is_reproduced():
    """The simulation of the measured run's workload and limits plans its steps exactly: same step
    count and padded tokens (a scheduler change that alters its plans fails here: re-measure)."""
    measured = ROOT / "benchmarks" / "results" / sb.H100_MEASURED_RUN
    if not measured.is_file():
        pytest.skip("no measured run")
    r = json.loads(measured.read_text())["results"]
    reqs = sb.build_workload("sharegpt-synthetic", 500, 0, sb.LLAMA_8B_VOCAB)
    limits = {**LIMITS, "max_num_seqs": sb.GPU_MAX_NUM_SEQS}       # the run used the GPU defaults
    sim = sb.simulate(reqs, **limits)
    ladder = _ladder(sb.GPU_TOKEN_BUCKETS, sb.GPU_SEQ_BUCKETS, sb.GPU_DECODE_SEQ_BUCKETS, **limits)
    pred, _ = sb.predict(sim, ladder, sb.CostModel(sb.h100_cost_points()), 500, 1)
    assert (len(sim.steps), sim.scheduled_tokens, pred["padded_tokens"]) == \
        (r["num_steps"], r["scheduled_tokens"], r["padded_tokens"])
