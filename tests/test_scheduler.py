"""Scheduler tests with the hand-computable FakeRunner (tests/fakes): exact tokens, no accelerator.

Every scheduler made through the ``make`` fixture is checked at teardown: every page back in the
pool (num_free_pages == num_pages - 1), pool invariants hold, the runner holds no request state.
"""

import random

import pytest

from serving.plan import Logprobs
from serving.request import Request, RequestStatus
from serving.sampling_params import SamplingParams
from serving.scheduler import Scheduler
from tests.fakes import FakeRunner, collect, drive, next_token, reference_generate

VOCAB = 101
GREEDY = SamplingParams(temperature=0.0, max_tokens=8)


@pytest.fixture
def make():
    made = []

    def factory(num_pages=64, page_size=4, max_model_len=64, eos_token_id=None, **kwargs):
        sched = Scheduler(num_pages=num_pages, page_size=page_size, max_model_len=max_model_len, **kwargs)
        runner = FakeRunner(num_pages, page_size, VOCAB, eos_token_id=eos_token_id)
        made.append((sched, runner))
        return sched, runner

    yield factory
    for sched, runner in made:
        assert not sched.has_requests(), "test left requests behind"
        assert sched.kv.num_free_pages == sched.kv.num_pages - 1, "pages leaked"
        sched.kv.pool.check_invariants()
        runner.assert_no_state()


def req(req_id, prompt, params=GREEDY, **kwargs):
    return Request(req_id, prompt, params, **kwargs)


def prompts_of(lengths, seed=0):
    rng = random.Random(seed)
    return [[rng.randrange(VOCAB) for _ in range(n)] for n in lengths]


def run(sched, runner, requests, **kwargs):
    for r in requests:
        sched.add_request(r)
    outputs = drive(sched, runner, **kwargs)
    return {rid: collect(outs) for rid, outs in outputs.items()}


def expected(prompt, params=GREEDY, max_model_len=64, eos_token_id=None):
    return reference_generate(prompt, params, vocab_size=VOCAB, max_model_len=max_model_len,
                              eos_token_id=eos_token_id)


def alone(make, prompt, params=GREEDY, **kwargs):
    """The request run by itself through a roomy scheduler + FakeRunner."""
    sched, runner = make(num_pages=64, **kwargs)
    return run(sched, runner, [req("alone", prompt, params)])["alone"]


# --- the basic step ---------------------------------------------------------------------------------

def test_single_request_matches_hand_computation(make):
    sched, runner = make()
    prompt = [3, 1, 4, 1, 5]
    out = run(sched, runner, [req("a", prompt)])["a"]
    # First token by hand: 31 * (1*3 + 2*1 + 3*4 + 4*1 + 5*5) + 5 = 31 * 46 + 5 = 1431; 1431 % 101 = 17.
    assert next_token(prompt, VOCAB) == 17
    assert out == expected(prompt) and out[0][0] == 17 and out[1] == "length" and len(out[0]) == 8


def test_chunked_prefill_mixed_with_decode(make):
    sched, runner = make(max_num_batched_tokens=6)
    short, long_ = prompts_of([3, 17])
    sched.add_request(req("short", short))
    p1 = sched.schedule()
    assert [n.req_id for n in p1.new_requests] == ["short"] and p1.num_scheduled_tokens == {"short": 3}
    out1 = sched.update(p1, runner.run(p1))
    assert len(out1) == 1 and len(out1[0].new_token_ids) == 1
    sched.add_request(req("long", long_))
    p2 = sched.schedule()
    # The decode (1 token) comes first, the long prompt gets the rest of the budget as a chunk.
    assert dict(p2.num_scheduled_tokens) == {"short": 1, "long": 5} and p2.total_num_scheduled_tokens == 6
    assert [c.req_id for c in p2.cached_requests] == ["short"] and p2.cached_requests[0].num_computed_tokens == 3
    r2 = runner.run(p2)
    assert r2.sampled_token_ids["long"] == ()         # a partial prefill chunk samples nothing
    outs = sched.update(p2, r2)
    assert [o.req_id for o in outs] == ["short"]
    p3 = sched.schedule()
    assert dict(p3.num_scheduled_tokens) == {"short": 1, "long": 5}
    assert {c.req_id: c.num_computed_tokens for c in p3.cached_requests} == {"short": 4, "long": 5}
    sched.update(p3, runner.run(p3))
    results = {rid: collect(o) for rid, o in drive(sched, runner).items()}
    assert results["long"][0][0] == next_token(long_, VOCAB)
    # Finish and compare the whole outputs with the hand computation.
    sched2, runner2 = make(max_num_batched_tokens=6)
    assert run(sched2, runner2, [req("s", short), req("l", long_)]) == {"s": expected(short), "l": expected(long_)}


def test_token_budget_and_max_num_seqs_are_respected(make):
    sched, runner = make(max_num_batched_tokens=10, max_num_seqs=3)
    prompts = prompts_of([7, 2, 9, 4, 12, 1], seed=1)
    requests = [req(f"r{i}", p) for i, p in enumerate(prompts)]

    def check(step, plan, outputs):
        assert plan.total_num_scheduled_tokens <= 10
        assert len(plan.num_scheduled_tokens) <= 3 and len(sched.running) <= 3

    results = run(sched, runner, requests, on_step=check)
    assert results == {f"r{i}": expected(p) for i, p in enumerate(prompts)}


def test_long_prefill_token_threshold(make):
    sched, runner = make(max_num_batched_tokens=100, long_prefill_token_threshold=4)
    sched.add_request(req("a", prompts_of([10])[0]))
    plan = sched.schedule()
    assert plan.num_scheduled_tokens == {"a": 4}
    sched.update(plan, runner.run(plan))
    drive(sched, runner)


def test_new_then_cached_plan_carries_pages(make):
    sched, runner = make(page_size=4)
    sched.add_request(req("a", list(range(6))))
    p1 = sched.schedule()
    [new] = p1.new_requests
    assert len(new.page_ids) == 2 and 0 not in new.page_ids and new.num_computed_tokens == 0
    assert new.output_token_ids == ()
    sched.update(p1, runner.run(p1))                  # 7 tokens now, 2 pages hold 8
    p2 = sched.schedule()
    assert p2.cached_requests[0].new_page_ids == ()
    sched.update(p2, runner.run(p2))
    p3 = sched.schedule()                             # computes position 7, the second page's last slot
    assert p3.cached_requests[0].new_page_ids == ()
    sched.update(p3, runner.run(p3))
    p4 = sched.schedule()                             # position 8 needs a third page
    assert len(p4.cached_requests[0].new_page_ids) == 1 and p4.cached_requests[0].num_computed_tokens == 8
    sched.update(p4, runner.run(p4))
    drive(sched, runner)


# --- finish reasons ---------------------------------------------------------------------------------

def test_max_tokens_and_max_model_len(make):
    sched, runner = make(max_model_len=20)
    p = prompts_of([15])[0]
    res = run(sched, runner, [req("a", p, SamplingParams(max_tokens=3)), req("b", p, SamplingParams(max_tokens=None)),
                              req("c", p, SamplingParams(max_tokens=100))])
    assert res["a"][1] == "length" and len(res["a"][0]) == 3
    # prompt + output never exceeds max_model_len.
    assert res["b"][1] == "length" and len(res["b"][0]) == 5 and res["c"] == res["b"]
    assert res["b"] == expected(p, SamplingParams(max_tokens=None), max_model_len=20)


def test_prompt_longer_than_max_model_len_is_rejected(make):
    sched, _ = make(max_model_len=16)
    with pytest.raises(ValueError, match=r"prompt \(length 17\) is longer than the maximum model length of 16"):
        sched.add_request(req("a", [1] * 17))
    with pytest.raises(ValueError, match="empty"):
        sched.add_request(req("b", []))
    sched.add_request(req("c", [1] * 16, SamplingParams(max_tokens=5)))   # exactly max_model_len: 1 token
    with pytest.raises(ValueError, match="already in use"):
        sched.add_request(req("c", [1, 2]))
    res = {rid: collect(o) for rid, o in drive(sched, _).items()}
    assert len(res["c"][0]) == 1 and res["c"][1] == "length"


def test_scheduler_rejects_a_cache_smaller_than_one_sequence():
    with pytest.raises(ValueError, match="max_model_len=64 needs 16 pages"):
        Scheduler(num_pages=10, page_size=4, max_model_len=64)
    with pytest.raises(ValueError, match="scheduling_policy"):
        Scheduler(num_pages=10, page_size=4, max_model_len=8, scheduling_policy="lifo")


def _tokens_without_eos(prompt, n=12):
    return expected(prompt, SamplingParams(max_tokens=n))[0]


def test_eos_stop_token_ids_ignore_eos_and_min_tokens(make):
    prompt = prompts_of([6], seed=3)[0]
    free_run = _tokens_without_eos(prompt)
    eos = free_run[3]
    stop_id = free_run[5]
    k_eos = free_run.index(eos)                       # first occurrence
    assert eos not in free_run[:3] or k_eos < 3
    sched, runner = make(eos_token_id=eos)
    params = {
        "eos": SamplingParams(max_tokens=12),
        "ignore": SamplingParams(max_tokens=12, ignore_eos=True),
        "stop": SamplingParams(max_tokens=12, ignore_eos=True, stop_token_ids=[stop_id]),
        "min": SamplingParams(max_tokens=12, min_tokens=k_eos + 2),
    }
    requests = [Request(name, prompt, sp, eos_token_ids=[eos]) for name, sp in params.items()]
    for r in requests:
        sched.add_request(r)
    raw = drive(sched, runner)
    res = {rid: collect(o) for rid, o in raw.items()}
    for name, sp in params.items():
        assert res[name] == expected(prompt, sp, eos_token_id=eos), name
    assert res["eos"] == (free_run[:k_eos + 1], "stop") and raw["eos"][-1].stop_reason is None
    assert res["ignore"] == (free_run, "length")
    k_stop = free_run.index(stop_id)
    assert res["stop"] == (free_run[:k_stop + 1], "stop") and raw["stop"][-1].stop_reason == stop_id
    # min_tokens: EOS is masked (the fake sampler, like vLLM's, picks the next token) and not checked.
    assert len(res["min"][0]) >= k_eos + 2 and eos not in res["min"][0][:k_eos + 2]


def test_finish_requests_for_stop_strings(make):
    sched, runner = make()
    sched.add_request(req("a", [1, 2, 3], SamplingParams(max_tokens=50)))
    plan = sched.schedule()
    sched.update(plan, runner.run(plan))
    [out] = sched.finish_requests("a", "stop", stop_reason="\n\n")
    assert out.finish_reason == "stop" and out.stop_reason == "\n\n" and not sched.has_unfinished_requests()
    plan = sched.schedule()
    assert "a" in plan.finished_req_ids
    runner.run(plan)
    with pytest.raises(ValueError):
        sched.finish_requests("a", "done")


# --- abort ------------------------------------------------------------------------------------------

def test_abort_frees_pages_at_once_and_tells_the_runner(make):
    sched, runner = make(num_pages=20, max_num_seqs=1)
    sched.add_request(req("run", prompts_of([9])[0], SamplingParams(max_tokens=30)))
    sched.add_request(req("wait", prompts_of([5])[0], SamplingParams(max_tokens=30)))
    for _ in range(3):
        plan = sched.schedule()
        sched.update(plan, runner.run(plan))
    assert sched.kv.num_free_pages < 19 and "run" in runner.requests
    outs = sched.abort_requests(["run", "wait", "unknown"])
    assert [(o.req_id, o.finish_reason) for o in outs] == [("run", "abort"), ("wait", "abort")]
    assert sched.kv.num_free_pages == 19 and not sched.has_unfinished_requests()
    plan = sched.schedule()
    assert plan.is_empty and plan.finished_req_ids == {"run", "wait"}
    runner.run(plan)
    assert not sched.has_requests()


def test_abort_between_schedule_and_update(make):
    sched, runner = make()
    sched.add_request(req("a", [5, 6, 7]))
    plan = sched.schedule()
    result = runner.run(plan)
    sched.abort_requests("a")
    assert sched.update(plan, result) == []
    drive(sched, runner)


# --- preemption -------------------------------------------------------------------------------------

def test_preemption_under_a_tiny_pool_gives_the_same_outputs(make):
    params = SamplingParams(max_tokens=14)
    prompts = prompts_of([5, 9, 3, 12, 7, 10], seed=4)
    sched, runner = make(num_pages=9, page_size=4, max_model_len=32)   # 8 pages: 32 tokens in all
    res = run(sched, runner, [req(f"r{i}", p, params) for i, p in enumerate(prompts)])
    assert sched.get_stats().num_preemptions > 0
    for i, p in enumerate(prompts):
        assert res[f"r{i}"] == alone(make, p, params, max_model_len=32) == expected(p, params, max_model_len=32)


def test_fcfs_preempts_newest_priority_preempts_lowest(make):
    params = SamplingParams(max_tokens=10)
    for policy, yielding in (("fcfs", "high"), ("priority", "low")):
        sched, runner = make(num_pages=5, page_size=4, max_model_len=16, scheduling_policy=policy)
        low = req("low", [1, 2, 3, 4], params, priority=1, arrival_time=0.0)
        high = req("high", [5, 6, 7, 8], params, priority=0, arrival_time=1.0)
        res = run(sched, runner, [low, high])
        assert {r.req_id for r in (low, high) if r.num_preemptions} == {yielding}, policy
        assert res == {"low": expected([1, 2, 3, 4], params), "high": expected([5, 6, 7, 8], params)}


def test_resumed_request_is_sent_in_full_with_its_outputs(make):
    sched, runner = make(num_pages=5, page_size=4, max_model_len=16)
    params = SamplingParams(max_tokens=10)
    a, b = req("a", [1, 2, 3, 4], params), req("b", [5, 6, 7, 8], params)
    resumed = []

    def watch(step, plan, outputs):
        resumed.extend(n for n in plan.new_requests if n.output_token_ids)

    run(sched, runner, [a, b], on_step=watch)
    assert b.num_preemptions >= 1 and resumed and resumed[0].req_id == "b"
    # Its output so far is context now: computed again (or found in the prefix cache).
    assert resumed[0].num_computed_tokens < 4 + len(resumed[0].output_token_ids)


def test_priority_order_and_ties_by_arrival(make):
    sched, runner = make(max_num_seqs=1, scheduling_policy="priority")
    params = SamplingParams(max_tokens=2)
    order = []
    for rid, prio, t in (("c", 5, 0.0), ("b", 1, 2.0), ("a", 1, 1.0), ("z", 0, 3.0)):
        sched.add_request(req(rid, [1, 2, 3], params, priority=prio, arrival_time=t))
    drive(sched, runner, on_step=lambda s, p, o: order.extend(x.req_id for x in o if x.finished))
    assert order == ["z", "a", "b", "c"]


def test_priority_waiting_request_preempts_lower_priority_running(make):
    sched, runner = make(num_pages=5, page_size=4, max_model_len=16, scheduling_policy="priority")
    low_prompt, high_prompt = prompts_of([12, 8], seed=5)
    low = req("low", low_prompt, SamplingParams(max_tokens=4), priority=1, arrival_time=0.0)
    sched.add_request(low)
    p1 = sched.schedule()
    sched.update(p1, runner.run(p1))                  # low holds 4 pages' worth soon
    high = req("high", high_prompt, SamplingParams(max_tokens=3), priority=0, arrival_time=1.0)
    sched.add_request(high)
    p2 = sched.schedule()
    # low's decode was scheduled, then undone to make room for high.
    assert [n.req_id for n in p2.new_requests] == ["high"] and p2.cached_requests == ()
    assert "low" in p2.finished_req_ids and low.num_preemptions == 1
    assert dict(p2.num_scheduled_tokens) == {"high": 8}
    first = sched.update(p2, runner.run(p2))
    res = {rid: collect(o) for rid, o in drive(sched, runner).items()}
    high_tokens = list(first[0].new_token_ids) + res["high"][0]
    assert (high_tokens, res["high"][1]) == expected(high_prompt, SamplingParams(max_tokens=3))
    # low's first token came in step 1; the rest after it resumed.
    low_tokens, low_reason = expected(low_prompt, SamplingParams(max_tokens=4))
    assert (low_tokens[1:], low_reason) == res["low"]


def test_fcfs_waiting_request_does_not_preempt(make):
    sched, runner = make(num_pages=5, page_size=4, max_model_len=16)
    low_prompt, high_prompt = prompts_of([12, 8], seed=5)
    sched.add_request(req("first", low_prompt, SamplingParams(max_tokens=4)))
    p1 = sched.schedule()
    sched.update(p1, runner.run(p1))
    sched.add_request(req("second", high_prompt, SamplingParams(max_tokens=3), priority=-10))
    p2 = sched.schedule()
    assert p2.new_requests == () and dict(p2.num_scheduled_tokens) == {"first": 1}
    sched.update(p2, runner.run(p2))
    drive(sched, runner)
    assert sched.get_stats().num_preemptions == 0


# --- prefix caching ---------------------------------------------------------------------------------

def test_prefix_cache_hits_and_identical_outputs(make):
    system = prompts_of([13], seed=6)[0]
    prompts = [system + tail for tail in prompts_of([3, 5, 1], seed=7)]
    results = {}
    for caching in (True, False):
        sched, runner = make(enable_prefix_caching=caching, page_size=4)
        res = run(sched, runner, [req("first", prompts[0])])
        res.update(run(sched, runner, [req(f"p{i}", p) for i, p in enumerate(prompts)]))
        results[caching] = res
        stats = sched.get_stats()
        if caching:
            # "first" misses; then p0 (its own earlier copy) hits 3 full pages (12 tokens, the
            # 16-token prompt's last page is partial), p1 and p2 hit the 3 pages of the shared
            # system prompt (12 of its 13 tokens).
            assert stats.prefix_cache_queries == 16 + 16 + 18 + 14
            assert stats.prefix_cache_hits == 0 + 12 + 12 + 12
            assert 0 < stats.prefix_cache_hit_rate < 1
        else:
            assert stats.prefix_cache_queries == 0 and stats.prefix_cache_hits == 0
    assert results[True] == results[False]
    assert results[True]["p1"] == expected(prompts[1])


def test_num_cached_tokens_reported(make):
    sched, runner = make(page_size=4)
    run(sched, runner, [req("a", list(range(10)))])
    sched.add_request(req("b", list(range(10))))
    raw = drive(sched, runner)
    assert all(o.num_cached_tokens == 8 for o in raw["b"])


def test_cache_salt_isolates(make):
    sched, runner = make(page_size=4)
    prompt = list(range(12))
    run(sched, runner, [req("a", prompt, cache_salt="alice")])
    run(sched, runner, [req("b", prompt, cache_salt="bob"), req("c", prompt)])
    assert sched.get_stats().prefix_cache_hits == 0
    run(sched, runner, [req("d", prompt, cache_salt="alice")])
    assert sched.get_stats().prefix_cache_hits == 8


def test_identical_prompts_scheduled_together_share_pages(make):
    """What the engine does for n > 1: n requests with one prompt, added together."""
    sched, runner = make(page_size=4)
    prompt = prompts_of([17], seed=8)[0]
    for i in range(4):
        sched.add_request(req(f"s{i}", prompt))
    plan = sched.schedule()
    pages = [n.page_ids for n in plan.new_requests]
    assert all(p[:4] == pages[0][:4] for p in pages)  # the 4 full prompt pages, shared
    assert len({p[4] for p in pages}) == 4            # the partial last page is private
    assert dict(plan.num_scheduled_tokens) == {"s0": 17, "s1": 1, "s2": 1, "s3": 1}
    first = {o.req_id: list(o.new_token_ids) for o in sched.update(plan, runner.run(plan))}
    res = {rid: collect(o) for rid, o in drive(sched, runner).items()}
    assert len(res) == 4
    assert all((first[rid] + toks, reason) == expected(prompt) for rid, (toks, reason) in res.items())


def test_hit_pages_survive_after_owner_finishes_and_are_evicted_lru(make):
    sched, runner = make(num_pages=9, page_size=4, max_model_len=32)
    a, b = prompts_of([9, 9], seed=9)
    run(sched, runner, [req("a", a, SamplingParams(max_tokens=1))])
    run(sched, runner, [req("b", b, SamplingParams(max_tokens=1))])
    hits = sched.get_stats().prefix_cache_hits
    run(sched, runner, [req("a2", a, SamplingParams(max_tokens=1))])   # still cached
    assert sched.get_stats().prefix_cache_hits == hits + 8
    # A request that needs all 8 pages evicts everything cached.
    run(sched, runner, [req("big", prompts_of([31], seed=10)[0], SamplingParams(max_tokens=1))])
    run(sched, runner, [req("a3", a, SamplingParams(max_tokens=1))])
    assert sched.get_stats().prefix_cache_hits == hits + 8


# --- logprobs ---------------------------------------------------------------------------------------

def test_logprobs_and_prompt_logprobs_survive_preemption(make):
    params = SamplingParams(max_tokens=10, logprobs=2, prompt_logprobs=1)
    prompt_a, prompt_b = [1, 2, 3, 4, 5, 6], [7, 8, 9, 10]
    sched, runner = make(num_pages=5, page_size=4, max_model_len=16, max_num_batched_tokens=3)
    for rid, p in (("a", prompt_a), ("b", prompt_b)):
        sched.add_request(req(rid, p, params))
    raw = drive(sched, runner)
    assert sched.get_stats().num_preemptions > 0
    for rid, prompt in (("a", prompt_a), ("b", prompt_b)):
        outs = raw[rid]
        plps = [lp for o in outs for lp in o.new_prompt_logprobs]
        assert len(plps) == len(prompt) and plps[0] is None       # each position once
        for p in range(1, len(prompt)):
            pred = next_token(prompt[:p], VOCAB)
            assert plps[p].token_id == prompt[p] and plps[p].rank == (prompt[p] - pred) % VOCAB + 1
        tokens = [t for o in outs for t in o.new_token_ids]
        lps = [lp for o in outs for lp in o.new_logprobs]
        assert len(lps) == len(tokens) and all(isinstance(lp, Logprobs) for lp in lps)
        assert [lp.token_id for lp in lps] == tokens and all(lp.rank == 1 and len(lp.top_ids) == 2 for lp in lps)
        assert (tokens, outs[-1].finish_reason) == expected(prompt, params, max_model_len=16)


# --- many requests ----------------------------------------------------------------------------------

@pytest.mark.parametrize("config", [
    dict(num_pages=400, max_num_batched_tokens=512),                       # roomy
    dict(num_pages=400, max_num_batched_tokens=16),                        # chunked prefill
    dict(num_pages=24, max_num_batched_tokens=32),                         # preemption
    dict(num_pages=24, max_num_batched_tokens=32, enable_prefix_caching=False),
    dict(num_pages=24, max_num_batched_tokens=32, scheduling_policy="priority"),
])
def test_32_concurrent_requests_match_running_alone(make, config):
    rng = random.Random(11)
    system = prompts_of([9], seed=12)[0]
    prompts = [(system if i % 3 == 0 else []) + p
               for i, p in enumerate(prompts_of([rng.randrange(1, 40) for _ in range(32)], seed=13))]
    params = [SamplingParams(max_tokens=rng.randrange(1, 20)) for _ in prompts]
    sched, runner = make(page_size=4, max_model_len=64, max_num_seqs=16, **config)
    requests = [req(f"r{i}", p, sp, priority=i % 4) for i, (p, sp) in enumerate(zip(prompts, params))]
    res = run(sched, runner, requests)
    for i, (p, sp) in enumerate(zip(prompts, params)):
        assert res[f"r{i}"] == expected(p, sp), f"r{i}"
    if config["num_pages"] == 24:
        assert sched.get_stats().num_preemptions > 0
    for i in (0, 5, 31):
        assert res[f"r{i}"] == alone(make, prompts[i], params[i])
    assert all(r.status.is_finished for r in requests)


def test_stats_while_running(make):
    sched, runner = make(num_pages=21, page_size=4, max_num_seqs=1)
    sched.add_request(req("a", list(range(8))))
    sched.add_request(req("b", list(range(3))))
    plan = sched.schedule()
    stats = sched.get_stats()
    assert (stats.num_running, stats.num_waiting) == (1, 1)
    assert stats.num_free_pages == 18 and stats.num_usable_pages == 20 and stats.kv_cache_usage == pytest.approx(0.1)
    sched.update(plan, runner.run(plan))
    drive(sched, runner)
    assert sched.get_stats().kv_cache_usage == 0.0
    assert RequestStatus.FINISHED_ABORTED.finish_reason == "abort"


def test_undone_step_leaves_no_unwritten_page_in_the_prefix_cache(make):
    """A priority preemption undoes the victim's part of the step; the page that part would have
    filled was already hashed and must leave the cache, or the victim's resume would hit a page
    whose KV was never written."""
    sched, runner = make(num_pages=4, page_size=4, max_model_len=12, max_num_batched_tokens=6,
                         scheduling_policy="priority")
    low_prompt, high_prompt = prompts_of([10, 2], seed=14)
    low = req("low", low_prompt, SamplingParams(max_tokens=2), priority=1, arrival_time=0.0)
    sched.add_request(low)
    p1 = sched.schedule()                             # low: positions 0..5, page 0 full and cached
    assert p1.num_scheduled_tokens == {"low": 6}
    sched.update(p1, runner.run(p1))
    sched.add_request(req("high", high_prompt, SamplingParams(max_tokens=2), priority=0, arrival_time=1.0))
    p2 = sched.schedule()                             # low's 6..9 (fills page 1) is undone for high
    assert dict(p2.num_scheduled_tokens) == {"high": 2} and low.num_preemptions == 1
    assert sched.kv.pool.num_cached_pages == 1
    sched.update(p2, runner.run(p2))
    res = {rid: collect(o) for rid, o in drive(sched, runner).items()}
    assert res["low"] == expected(low_prompt, SamplingParams(max_tokens=2), max_model_len=12)


def test_priority_running_requests_get_the_budget_in_priority_order(make):
    sched, runner = make(max_num_batched_tokens=3, scheduling_policy="priority")
    sched.add_request(req("low", [1, 2, 3], SamplingParams(max_tokens=20), priority=1, arrival_time=0.0))
    p1 = sched.schedule()
    sched.update(p1, runner.run(p1))
    sched.add_request(req("high", [4, 5, 6, 7, 8], SamplingParams(max_tokens=2), priority=0, arrival_time=1.0))
    p2 = sched.schedule()
    assert dict(p2.num_scheduled_tokens) == {"low": 1, "high": 2}
    sched.update(p2, runner.run(p2))
    p3 = sched.schedule()
    assert dict(p3.num_scheduled_tokens) == {"high": 3}
    sched.update(p3, runner.run(p3))
    drive(sched, runner)


def test_min_tokens_suppresses_the_eos_check_in_the_scheduler(make):
    """With a runner that does not mask EOS, the scheduler itself must not stop before min_tokens."""
    prompt = prompts_of([6], seed=3)[0]
    free_run = _tokens_without_eos(prompt, n=30)
    eos = free_run[2]
    min_tokens = free_run.index(eos) + 2
    sched, runner = make()                            # runner: no EOS masking
    res = run(sched, runner, [Request("m", prompt, SamplingParams(max_tokens=30, min_tokens=min_tokens),
                                      eos_token_ids=[eos])])
    later = [i for i, t in enumerate(free_run) if t == eos and i + 1 >= min_tokens]
    assert res["m"] == ((free_run[:later[0] + 1], "stop") if later else (free_run, "length"))
    assert len(res["m"][0]) >= min_tokens


def test_no_preemption_of_a_victim_whose_unwritten_page_is_already_shared(make):
    """low fills its page 1 in step 2; w1, admitted later in the same step, hits that page. Taking
    low back for w2 would leave w1 reading KV that is never written, so w2 must wait instead."""
    sched, runner = make(num_pages=4, page_size=4, max_model_len=12, long_prefill_token_threshold=4,
                         scheduling_policy="priority")
    low_prompt, w2_prompt = prompts_of([10, 3], seed=15)
    w1_prompt = low_prompt[:8] + [1]
    low = req("low", low_prompt, SamplingParams(max_tokens=2), priority=1, arrival_time=0.0)
    sched.add_request(low)
    p1 = sched.schedule()
    sched.update(p1, runner.run(p1))
    sched.add_request(req("w1", w1_prompt, SamplingParams(max_tokens=1), priority=0, arrival_time=1.0))
    sched.add_request(req("w2", w2_prompt, SamplingParams(max_tokens=2), priority=0, arrival_time=2.0))
    p2 = sched.schedule()
    assert dict(p2.num_scheduled_tokens) == {"low": 4, "w1": 1}
    assert p2.new_requests[0].page_ids[:2] == tuple(sched.kv.get_page_ids("low")[:2])
    assert low.num_preemptions == 0
    first = {o.req_id: (list(o.new_token_ids), o.finish_reason) for o in sched.update(p2, runner.run(p2))}
    assert first["w1"] == expected(w1_prompt, SamplingParams(max_tokens=1), max_model_len=12)
    res = {rid: collect(o) for rid, o in drive(sched, runner).items()}
    assert res["low"] == expected(low_prompt, SamplingParams(max_tokens=2), max_model_len=12)
    assert res["w2"] == expected(w2_prompt, SamplingParams(max_tokens=2), max_model_len=12)
