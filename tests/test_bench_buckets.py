"""`jaxllm bench buckets`' lone-request latency: choose_ladder's latency rule on hand-made rows, and the
figures a run on the embedded model writes."""

import json

import pytest

from serving.bench.buckets import choose_ladder, format_ladder_table, measure_lone_latency
from serving.bench.cli import main as bench_main


def _row(ladder, throughput, exes, compile_s, lone_ttft=None):
    row = {"ladder": ladder, "output_throughput": throughput, "num_executables": exes, "compile_s": compile_s,
           "padding_waste_pct": 10.0}
    if lone_ttft is not None:
        row.update(lone_ttft_p50_ms=lone_ttft, lone_itl_p50_ms=7.0)
    return row


# The H100 case: the one-bucket ladder is close on offline throughput, but pads a lone prompt to 2048.
H100_LIKE = [_row("512,2048", 3313.7, 12, 8.8, lone_ttft=50.0), _row("2048", 3255.0, 9, 6.9, lone_ttft=145.0),
             _row("512,1024,2048", 3347.9, 15, 66.7, lone_ttft=49.0)]


def test_latency_excludes_a_cheaper_ladder_and_the_sentence_says_so():
    pick, why = choose_ladder(H100_LIKE)
    assert pick["ladder"] == "512,2048"
    assert "'2048' was within 5% on throughput" in why and "lone-request TTFT was 3.0x the best" in why
    assert "'512,1024,2048'" in why                       # the best, on throughput and on lone TTFT
    # A loose enough latency tolerance lets the cheaper ladder back in, and then nothing is excluded.
    pick, why = choose_ladder(H100_LIKE, latency_tolerance=2.0)
    assert pick["ladder"] == "2048" and "was within" not in why


def test_rows_without_lone_figures_keep_the_throughput_rule():
    old = [{k: v for k, v in r.items() if not k.startswith("lone_")} for r in H100_LIKE]
    pick, why = choose_ladder(old)
    assert pick["ladder"] == "2048" and "TTFT" not in why
    # Mixed: a row without the figure is judged on throughput alone, the others on both.
    mixed = [H100_LIKE[0], old[1], H100_LIKE[2]]
    assert choose_ladder(mixed)[0]["ladder"] == "2048"


def test_ties_within_both_tolerances_go_to_fewer_executables_then_shorter_compile():
    rows = [_row("a", 100.0, 6, 30.0, lone_ttft=50.0), _row("b", 99.0, 6, 20.0, lone_ttft=54.0),
            _row("c", 98.0, 8, 10.0, lone_ttft=50.0)]
    assert choose_ladder(rows)[0]["ladder"] == "b"
    # The latency bound is inclusive: 55 ms is exactly 10% above 50 ms.
    rows[1]["lone_ttft_p50_ms"] = 55.0
    assert choose_ladder(rows)[0]["ladder"] == "b"
    rows[1]["lone_ttft_p50_ms"] = 56.0
    pick, why = choose_ladder(rows)
    assert pick["ladder"] == "a" and "'b' was within 5% on throughput" in why


def test_no_ladder_passing_both_rules_picks_the_lowest_lone_ttft_of_the_close_ones():
    rows = [_row("fast-but-slow-alone", 100.0, 4, 5.0, lone_ttft=100.0),
            _row("close", 97.0, 9, 9.0, lone_ttft=80.0), _row("quick-alone", 60.0, 20, 30.0, lone_ttft=40.0)]
    pick, why = choose_ladder(rows)
    assert pick["ladder"] == "close"
    assert "no ladder within 5%" in why and "'quick-alone', 40.0 ms" in why and "2.0x" in why


def test_choose_ladder_rejects_negative_tolerances():
    with pytest.raises(ValueError, match="non-negative"):
        choose_ladder(H100_LIKE, latency_tolerance=-0.1)


def test_ladder_table_shows_lone_columns_and_dashes_for_older_rows():
    rows = [dict(H100_LIKE[0], total_throughput=1.0, itl_p50_ms=1.0, itl_p99_ms=2.0),
            dict({k: v for k, v in H100_LIKE[1].items() if not k.startswith("lone_")},
                 total_throughput=1.0, itl_p50_ms=1.0, itl_p99_ms=2.0)]
    lines = format_ladder_table(rows).splitlines()
    assert "Lone TTFT P50 ms" in lines[0] and "Lone ITL P50 ms" in lines[0]
    assert "50.0" in lines[2].split() and lines[3].split().count("-") == 3    # two lone columns + scratch


def test_measure_lone_latency_rejects_bad_sizes():
    with pytest.raises(ValueError, match="at least 1"):
        measure_lone_latency(None, [], num_prompts=0)
    with pytest.raises(ValueError, match="at least 2"):
        measure_lone_latency(None, [], output_len=1)


def test_bench_buckets_rejects_negative_lone_prompts_before_building(capsys):
    assert bench_main(["buckets", "--ladder", "64x8", "--lone-prompts", "-1"]) == 2
    assert "--lone-prompts" in capsys.readouterr().err


def test_bench_buckets_writes_lone_request_figures(tmp_path, capsys):
    out_json = tmp_path / "ladders.json"
    rc = bench_main(["buckets", "--dataset-name", "random", "--num-prompts", "4", "--random-input-len", "20",
                     "--random-output-len", "5", "--max-model-len", "64", "--max-num-seqs", "8",
                     "--max-num-batched-tokens", "64", "--dtype", "float32", "--compilation-cache-dir",
                     str(tmp_path / "xla-cache"), "--ladder", "64x8", "--ladder", "16,64x8", "--lone-prompts", "3",
                     "--output-json", str(out_json)])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "Lone TTFT P50 ms" in out
    data = json.loads(out_json.read_text())
    assert data["config"]["lone_prompts"] == 3 and data["config"]["latency_tolerance"] == 0.10
    for r in data["results"]["ladders"]:
        assert r["compilations_during_run"] == 0 and r["num_failed"] == 0
        assert r["lone_num_prompts"] == 3 and r["lone_prompt_len_mean"] == 20
        for key in ("lone_ttft_p50_ms", "lone_ttft_p90_ms", "lone_ttft_mean_ms", "lone_itl_p50_ms", "lone_itl_p90_ms"):
            assert isinstance(r[key], float) and r[key] > 0, key
        assert r["lone_ttft_p90_ms"] >= r["lone_ttft_p50_ms"] and "lone_compilations" not in r
