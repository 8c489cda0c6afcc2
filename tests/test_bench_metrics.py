"""Benchmark arithmetic on hand-built timelines, and the datasets' shapes (no engine, no server)."""

import math

import numpy as np
import pytest

from serving.bench import datasets as ds
from serving.bench.buckets import choose_ladder, parse_ladder_spec
from serving.bench.metrics import (RequestResult, compute_metrics, format_report, parse_goodput,
                                   parse_metric_names, parse_percentiles, peak_concurrency)
from serving.bench.serve import arrival_gaps


def _timeline():
    # A: 4 tokens, chunks at 0.10, 0.12, 0.15, 0.20 s after it was sent at t=0.
    a = RequestResult(True, prompt_len=10, output_tokens=4, start_time=0.0, ttft=0.1, itl=[0.02, 0.03, 0.05],
                      latency=0.2)
    # B: 2 tokens, sent at t=0.05, chunks 0.30 and 0.40 s later, done at 0.45 s.
    b = RequestResult(True, prompt_len=20, output_tokens=2, start_time=0.05, ttft=0.3, itl=[0.1], latency=0.45)
    # C: failed after 10 ms; its 7 prompt tokens must not count.
    c = RequestResult(False, prompt_len=7, start_time=0.1, latency=0.01, error="HTTP 500: boom")
    # D: a single token (no TPOT sample; TPOT 0 for goodput, as vLLM).
    d = RequestResult(True, prompt_len=5, output_tokens=1, start_time=0.3, ttft=0.05, latency=0.05)
    return [a, b, c, d]


def test_metrics_against_hand_computed_values():
    m = compute_metrics(_timeline(), 1.0, goodput_slos={"ttft": 200, "tpot": 100}, percentiles=(50, 99))
    assert (m.completed, m.failed) == (3, 1)
    assert m.errors == ["HTTP 500: boom"]
    assert m.total_input_tokens == 35 and m.total_output_tokens == 7
    assert m.request_throughput == pytest.approx(3.0)
    assert m.output_throughput == pytest.approx(7.0)
    assert m.total_token_throughput == pytest.approx(42.0)
    ttft = m.latencies["ttft"]
    assert ttft["mean"] == pytest.approx(150.0) and ttft["median"] == pytest.approx(100.0)
    assert ttft["p99"] == pytest.approx(100 + 0.98 * 200)         # linear between 100 and 300
    tpot = m.latencies["tpot"]                                     # A: 100 ms / 3, B: 150 ms / 1; D excluded
    assert tpot["mean"] == pytest.approx((100 / 3 + 150) / 2)
    itl = m.latencies["itl"]                                       # pooled gaps 20, 30, 50, 100 ms
    assert itl["mean"] == pytest.approx(50.0) and itl["median"] == pytest.approx(40.0)
    assert itl["p99"] == pytest.approx(50 + 0.97 * 50)
    assert m.latencies["e2el"]["mean"] == pytest.approx((200 + 450 + 50) / 3)
    assert m.request_goodput == pytest.approx(2.0)                 # A and D meet both SLOs, B's TTFT does not
    assert m.peak_concurrent_requests == 3                         # A, B and C overlap at t=0.1
    # Chunks arrive at 0.10 0.12 0.15 0.20 (A), 0.35 0.45 (B), 0.35 (D): all in the first second.
    assert m.peak_output_throughput == pytest.approx(7.0)


def test_goodput_e2el_and_no_slos():
    m = compute_metrics(_timeline(), 2.0, goodput_slos={"e2el": 300})
    assert m.request_goodput == pytest.approx(2 / 2.0)             # A (200) and D (50) within 300 ms
    assert compute_metrics(_timeline(), 2.0).request_goodput is None


def test_all_failed_reports_zeros_not_an_error():
    m = compute_metrics([RequestResult(False, 3, error="x"), RequestResult(False, 4, error="y")], 1.0)
    assert (m.completed, m.failed, m.total_input_tokens) == (0, 2, 0)
    assert m.latencies["ttft"]["mean"] == 0.0 and m.request_throughput == 0.0
    text = format_report(m)
    assert "Failed requests:                         2" in text


def test_report_block_reads_like_vllm():
    m = compute_metrics(_timeline(), 1.0, goodput_slos={"ttft": 200})
    text = format_report(m, header=[("Request rate configured (RPS):", "inf")])
    lines = text.splitlines()
    assert lines[0] == "============ Serving Benchmark Result ============"
    assert lines[1] == f"{'Successful requests:':<40} {3:<10}"
    assert f"{'Mean TTFT (ms):':<40} {150.0:<10.2f}" in lines
    assert f"{'Request goodput (req/s):':<40} {2.0:<10.2f}" in lines
    for title in ("Time to First Token", "Time per Output Token (excl. 1st token)", "Inter-token Latency",
                  "End-to-end Latency"):
        assert any(title in line for line in lines)
    assert lines[-1] == "=" * 50


def test_parsers_reject_bad_values():
    assert parse_goodput(["ttft:500", "tpot:50"]) == {"ttft": 500.0, "tpot": 50.0}
    assert parse_goodput(["e2el:1e3"]) == {"e2el": 1000.0}
    for bad in (["itl:5"], ["ttft"], ["ttft:-1"], ["ttft:abc"]):
        with pytest.raises(ValueError):
            parse_goodput(bad)
    assert parse_percentiles("50,90,99") == (50.0, 90.0, 99.0)
    with pytest.raises(ValueError):
        parse_percentiles("0,99")
    with pytest.raises(ValueError):
        parse_metric_names("ttft,foo")
    assert parse_ladder_spec("256,64x32,8") == ("256,64x32,8", (64, 256), (8, 32))
    assert parse_ladder_spec("default") == ("default", None, None)
    assert parse_ladder_spec("64,128")[2] is None
    with pytest.raises(ValueError):
        parse_ladder_spec("64,-1x8")


def test_peak_concurrency_touching_intervals_do_not_overlap():
    rs = [RequestResult(True, 1, start_time=0.0, latency=1.0), RequestResult(True, 1, start_time=1.0, latency=1.0)]
    assert peak_concurrency(rs) == 1


def test_arrival_gaps_poisson_mean_and_burstiness():
    gaps = arrival_gaps(20000, 4.0, 1.0, seed=0)
    assert gaps.mean() == pytest.approx(0.25, rel=0.03)
    assert gaps.std() == pytest.approx(0.25, rel=0.05)              # exponential: std == mean
    bursty = arrival_gaps(20000, 4.0, 0.25, seed=0)
    assert bursty.mean() == pytest.approx(0.25, rel=0.05) and bursty.std() > 1.8 * gaps.std()
    assert not arrival_gaps(5, math.inf, 1.0, seed=0).any()


def test_choose_ladder_prefers_fewer_executables_within_tolerance():
    rows = [{"ladder": "fine", "output_throughput": 100.0, "num_executables": 12, "compile_s": 60.0,
             "padding_waste_pct": 2.0},
            {"ladder": "coarse", "output_throughput": 97.0, "num_executables": 4, "compile_s": 20.0,
             "padding_waste_pct": 9.0},
            {"ladder": "tiny", "output_throughput": 50.0, "num_executables": 1, "compile_s": 5.0,
             "padding_waste_pct": 80.0}]
    pick, why = choose_ladder(rows, 0.05)
    assert pick["ladder"] == "coarse" and "fine" in why
    pick, _ = choose_ladder(rows, 0.01)
    assert pick["ladder"] == "fine"


def test_datasets_shapes_without_tokenizer():
    src = ds.TokenSource(vocab_size=1000)
    rs = ds.sample_random(src, 50, input_len=100, output_len=20, range_ratio=0.5, seed=3)
    assert all(50 <= r.prompt_len <= 150 and 10 <= r.expected_output_len <= 30 for r in rs)
    assert all(r.prompt is None and max(r.prompt_token_ids) < 1000 for r in rs)
    assert [r.prompt_token_ids for r in rs] == [r.prompt_token_ids for r in
                                                ds.sample_random(src, 50, input_len=100, output_len=20,
                                                                 range_ratio=0.5, seed=3)]
    sg = ds.sample_sharegpt_synthetic(src, 3000, seed=0)
    ins = np.array([r.prompt_len for r in sg])
    outs = np.array([r.expected_output_len for r in sg])
    assert ins.mean() == pytest.approx(202, rel=0.08) and outs.mean() == pytest.approx(179, rel=0.08)
    assert ins.min() >= 4 and ins.max() <= 1024 and (ins + outs).max() <= 2048
    assert np.median(ins) < 0.8 * ins.mean()                         # long-tailed
    pr = ds.sample_prefix_repetition(src, 12, prefix_len=32, suffix_len=8, num_prefixes=3, output_len=5)
    prefixes = {tuple(r.prompt_token_ids[:32]) for r in pr}
    assert len(prefixes) == 3 and all(r.prompt_len == 40 for r in pr)
    with pytest.raises(ValueError):
        ds.sample_random(src, 5, input_len=0)
    with pytest.raises(ValueError):
        ds.build_dataset("sharegpt", src, 5)


def test_custom_jsonl(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt_token_ids": [1, 2, 3], "output_len": 7}\n\n{"prompt_token_ids": [4]}\n')
    rs = ds.load_custom(path, None, 3, output_len=9)
    assert [(r.prompt_token_ids, r.expected_output_len) for r in rs] == [([1, 2, 3], 7), ([4], 9), ([1, 2, 3], 7)]
    path.write_text('{"prompt": ""}\n')
    with pytest.raises(ValueError, match="p.jsonl:1"):
        ds.load_custom(path, None)
    path.write_text('not json\n')
    with pytest.raises(ValueError, match="not valid JSON"):
        ds.load_custom(path, None)
