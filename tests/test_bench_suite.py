"""benchmarks/gpu_bench_suite.py's own logic on CPU: knobs, time guards, budget, step isolation.
(The suite end to end on a tiny model takes minutes; its docstring gives that command.)"""

import importlib.util
import math
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def suite_mod():
    spec = importlib.util.spec_from_file_location("gpu_bench_suite", ROOT / "benchmarks" / "gpu_bench_suite.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod        # dataclasses look their module up while the class is built
    spec.loader.exec_module(mod)
    return mod


def _env(tmp_path, **kw):
    return {"OUT": str(tmp_path / "out"), "CACHE_DIR": str(tmp_path / "cache"), **kw}


def test_knobs_parse_and_reject_bad_values(suite_mod, tmp_path):
    k = suite_mod.Knobs.from_env(_env(tmp_path, SERVE_RATES="inf:500, 2:60", STEPS="serve,hf"))
    assert k.serve_rates == [(math.inf, 500), (2.0, 60)] and k.steps == ["serve", "hf"]
    assert k.model == "llama-3.1-8b" and k.number("HF_BATCH") == 64
    for bad, match in [({"STEPS": "offline,bogus"}, "unknown step"), ({"SERVE_RATES": "2"}, "rate:prompts"),
                       ({"SERVE_RATES": "0:10"}, "rate:prompts"), ({"HF_COMPILE": "maybe"}, "HF_COMPILE"),
                       ({"SHAREGPT_PROMPTS": "many"}, "SHAREGPT_PROMPTS")]:
        with pytest.raises(ValueError, match=match):
            suite_mod.Knobs.from_env(_env(tmp_path, **bad))
    with pytest.raises(ValueError, match="OUT"):
        suite_mod.Knobs.from_env({})


def test_result_names(suite_mod):
    assert suite_mod.model_tag("llama-3.1-8b") == "8b"
    assert suite_mod.model_tag("Qwen/Qwen2.5-7B") == "7b"
    assert suite_mod.model_tag("/tmp/tiny/") == "tiny"
    assert suite_mod.rate_label(math.inf) == "inf" and suite_mod.rate_label(2.0) == "rate2"


def test_child_past_its_guard_is_stopped(suite_mod, tmp_path, capsys):
    suite = suite_mod.Suite(suite_mod.Knobs.from_env(_env(tmp_path)))
    pid_file = tmp_path / "pid"
    assert suite.run("sleeper", ["sh", "-c", f"echo $$ > {pid_file}; sleep 60"], timeout=1) is None
    with pytest.raises(ProcessLookupError):
        os.kill(int(pid_file.read_text()), 0)
    assert suite.run("fails", ["sh", "-c", "echo boom; exit 3"], timeout=30) == 3
    out = capsys.readouterr().out
    assert "sleeper: timed out" in out and "boom" in out and "fails: exit 3" in out


def test_no_budget_left_skips_every_step_and_says_how_to_rerun(suite_mod, tmp_path, capsys):
    knobs = suite_mod.Knobs.from_env(_env(tmp_path, BUDGET_S="0"))
    assert suite_mod.Suite(knobs).main() == 1
    out = capsys.readouterr().out
    for step in suite_mod.STEPS:
        assert f"\n{step:<9}skipped" in out
    assert "rerun them with STEPS=offline,serve,hf,buckets" in out
    assert (tmp_path / "out" / "logs" / "summary.txt").read_text().strip() in out


def test_a_failed_step_does_not_stop_the_next(suite_mod, tmp_path, capsys):
    knobs = suite_mod.Knobs.from_env(_env(tmp_path, MODEL=str(tmp_path / "missing-model"), STEPS="offline,buckets",
                                          LADDERS="64x8"))
    suite = suite_mod.Suite(knobs)
    assert suite.main() == 1
    out = capsys.readouterr().out
    assert suite.steps["offline"].status == "failed" and "sharegpt-offline" in suite.steps["offline"].note
    assert suite.steps["buckets"].status == "failed" and "64x8" in suite.steps["buckets"].note
    assert "is neither an existing file or directory" in out          # the child's error, from its log tail
    assert not suite.files and not suite.starts


def test_commit_comes_from_the_environment_when_set(tmp_path, monkeypatch):
    """$JAXLLM_COMMIT wins even inside a checkout: the tree copied to a GPU machine carries the .git
    of the session's start, whose HEAD is not the code that ran (seen 2026-11-21)."""
    from serving.bench.environment import git_commit

    monkeypatch.setenv("JAXLLM_COMMIT", "abc1234")
    assert git_commit(tmp_path) == "abc1234"
    assert git_commit(ROOT) == "abc1234"
    monkeypatch.delenv("JAXLLM_COMMIT")
    head = git_commit(ROOT)
    assert head is not None and len(head.split("-")[0]) == 40      # a checkout names its own HEAD
    assert git_commit(tmp_path) is None


def test_startup_cold_is_the_first_start_that_compiled(suite_mod):
    # A cache already holding other executables (30 entries) does not make the first start cached.
    starts = [{"process": "a", "cache_entries_before": 30, "new_cache_entries": 20, "process_s": 232.0,
               "startup_s": 200.0, "compile_s": 197.0},
              {"process": "b", "cache_entries_before": 50, "new_cache_entries": 0, "process_s": 41.0,
               "startup_s": 13.5, "compile_s": 10.9},
              {"process": "c", "cache_entries_before": 50, "new_cache_entries": 0, "process_s": 30.0,
               "compile_s": 9.0}]
    cold, cached = suite_mod.startup_cold_and_cached(starts)
    assert cold == {"process": "a", "startup_s": 200.0, "compile_s": 197.0}
    assert cached == {"process": "b", "startup_s": 13.5, "compile_s": 10.9}
    assert suite_mod.startup_cold_and_cached(starts[:1]) == (cold, None)
    assert suite_mod.startup_cold_and_cached(starts[2:])[1] == {"process": "c", "startup_s": 30.0, "compile_s": 9.0}
