"""`bench throughput`'s steps_by_bucket on a real engine: a tiny random Llama with the Pallas
backend (interpreted on the CPU), so decode-only executables run beside the general ones, with
and without async scheduling."""

import numpy as np
import pytest

from serving import LLM
from serving.bench.datasets import SampleRequest
from serving.bench.throughput import format_throughput, run_engine_workload, throughput_results, warm_up
from tests.tiny_models import PALLAS_DECODE_ENGINE, make_tiny_pallas_llama

ENGINE = PALLAS_DECODE_ENGINE


@pytest.fixture(scope="module")
def llm(tmp_path_factory):
    path = make_tiny_pallas_llama(tmp_path_factory.mktemp("llama-tally"))
    return LLM(str(path), **ENGINE)


@pytest.mark.parametrize("async_scheduling", [True, False])
def test_steps_by_bucket_add_up_to_the_run(llm, async_scheduling):
    engine = llm.engine
    engine.async_scheduling = async_scheduling
    rng = np.random.RandomState(0)
    # Prompts of 1 to 40 tokens (86 in all: 3 steps of 32, the 40 chunked), 2 to 16 outputs:
    # prefills, mixed steps, and decode batches shrinking as requests finish, the last one alone.
    requests = [SampleRequest(None, rng.randint(0, 256, size=n).tolist(), out)
                for n, out in [(1, 16), (15, 2), (40, 6), (7, 4), (20, 3), (3, 8)]]
    warm_up(llm, requests)
    results, duration, counters = run_engine_workload(llm, requests, seed=0)
    res = throughput_results(results, duration, counters)
    assert res["num_failed"] == 0
    rows = res["steps_by_bucket"]
    runner = engine.runner
    shapes = {(r["tokens"], r["seqs"], r["pages"], r["decode_only"], r["plain"]) for r in rows}
    assert shapes <= set(runner.all_shapes())
    assert sum(r["steps"] for r in rows) == res["num_steps"]
    assert sum(r["real_tokens"] for r in rows) == res["scheduled_tokens"]
    seconds = sum(r["seconds"] for r in rows)
    assert seconds == pytest.approx(res["step_wall_seconds"]) and 0 < seconds <= res["elapsed_time"]
    assert [r["seconds"] for r in rows] == sorted((r["seconds"] for r in rows), reverse=True)
    assert sum(r["share_of_time"] for r in rows) == pytest.approx(seconds / res["elapsed_time"])
    decode = [r for r in rows if r["decode_only"]]
    assert decode and any(not r["decode_only"] for r in rows)
    for r in decode:
        # Decode-only executables run one token row per sequence bucket (at least min_decode_tokens).
        assert r["tokens"] == max(r["seqs"], runner.min_decode_tokens)
        assert r["real_tokens"] == r["real_seqs"] <= r["steps"] * r["seqs"]
    for r in rows:
        assert r["mean_step_ms"] == pytest.approx(1e3 * r["seconds"] / r["steps"])
    # With decode buckets every one-token-per-sequence step runs a decode-only executable.
    hist = res["decode_batch_sizes"]
    assert sum(h["steps"] for h in hist) == sum(r["steps"] for r in decode)
    assert sum(h["seconds"] for h in hist) == pytest.approx(sum(r["seconds"] for r in decode))
    assert hist[0]["seqs"] == "1" and hist[0]["steps"] > 0      # the 16-token output ends alone
    text = format_throughput(res)
    assert "Steps by bucket" in text and "decode plain" in text and "Decode steps" in text
