"""Async scheduling (EngineArgs.async_scheduling, vLLM's --async-scheduling): step N+1 is launched
before step N is collected, its inputs naming step N's tokens by placeholder. Whatever the batch,
the outputs must equal the synchronous engine's.

The scheduler's placeholder bookkeeping is checked directly (no model); the engine end to end on
the embedded SmolLM2, one engine for both modes (the flag is read every step), so each check
compares the two orders over the same executables.
"""

import concurrent.futures
import contextlib

import pytest

from serving import SamplingParams
from serving.compile_counter import compile_counter
from serving.plan import RunnerOutput
from serving.request import Request
from serving.scheduler import Scheduler

# The smollm module's engine and prompts (module-scoped fixtures: this module builds its own engine).
from tests.fakes import FakeRunner
from tests.fakes.fake_async_llm import EOS
from tests.test_engine_outputs import PARAMS as OUTPUT_PARAMS, PROMPTS as OUTPUT_PROMPTS, VOCAB, engine_run, make_engine
from tests.test_engine_smollm import llm, prompt_ids, swapped_scheduler  # noqa: F401

# --------------------------------------------------------------------------- scheduler, no model


def _scheduler(**kw):
    args = dict(num_pages=32, page_size=4, max_model_len=64, max_num_batched_tokens=64)
    args.update(kw)
    return Scheduler(**args)


def _result(plan, tokens):
    """A RunnerOutput sampling ``tokens[req_id]`` for the plan's requests that are in ``tokens``."""
    return RunnerOutput(tuple(plan.num_scheduled_tokens), {r: (tokens[r],) if r in tokens else ()
                                                           for r in plan.num_scheduled_tokens}, {}, {})


def test_one_step_in_flight_schedules_the_placeholder():
    sched = _scheduler()
    sched.add_request(Request("a", [1, 2, 3, 4, 5], SamplingParams(temperature=0.0, max_tokens=3)))
    plan1 = sched.schedule()                         # prefill: samples token 0
    req = sched.requests["a"]
    assert plan1.num_scheduled_tokens == {"a": 5} and req.num_output_placeholders == 1
    plan2 = sched.schedule()                         # before plan1's result: decodes the placeholder
    assert plan2.num_scheduled_tokens == {"a": 1} and req.num_output_placeholders == 2
    # Two tokens in flight + none known = max_tokens - 1: one more may be scheduled, then none.
    plan3 = sched.schedule()
    assert plan3.num_scheduled_tokens == {"a": 1} and req.num_output_placeholders == 3
    assert sched.schedule().is_empty
    sched.update(plan1, _result(plan1, {"a": 7}))
    assert req.output_token_ids == [7] and req.num_output_placeholders == 2
    assert sched.schedule().is_empty                 # 1 known + 2 in flight = max_tokens
    sched.update(plan2, _result(plan2, {"a": 8}))
    outs = sched.update(plan3, _result(plan3, {"a": 9}))
    assert outs[-1].finish_reason == "length" and outs[-1].new_token_ids == (9,)
    assert "a" not in sched.requests
    assert sched.kv.num_free_pages == sched.kv.num_pages - 1


def test_finished_request_drops_the_step_in_flight():
    sched = _scheduler()
    sched.add_request(Request("a", [1, 2, 3], SamplingParams(temperature=0.0, max_tokens=10),
                              eos_token_ids=(0,)))
    plan1 = sched.schedule()
    plan2 = sched.schedule()
    outs = sched.update(plan1, _result(plan1, {"a": 0}))       # EOS
    assert outs[0].finish_reason == "stop"
    assert sched.update(plan2, _result(plan2, {"a": 5})) == []  # the request is gone: dropped
    assert sched.kv.num_free_pages == sched.kv.num_pages - 1


def test_preemption_discards_the_token_in_flight():
    # 3 usable pages of 4 tokens: two requests of 5 prompt tokens need 2 pages each to decode.
    sched = _scheduler(num_pages=4, max_model_len=12)
    for rid in ("a", "b"):
        sched.add_request(Request(rid, [1, 2, 3, 4], SamplingParams(temperature=0.0, max_tokens=8)))
    plan1 = sched.schedule()                          # both prefill (1 page each), both sample
    plan2 = sched.schedule()                          # both decode position 4: a 2nd page each; b yields
    b = sched.requests["b"]
    assert "b" not in plan2.num_scheduled_tokens and b.num_output_placeholders == 0
    assert b.num_computed_tokens == 0 and "b" in plan2.finished_req_ids
    outs = sched.update(plan1, _result(plan1, {"a": 5, "b": 6}))
    assert [o.req_id for o in outs] == ["a"] and b.output_token_ids == []   # b's token: dropped
    assert sched.requests["a"].num_output_placeholders == 1


def test_prefix_cache_never_hashes_a_placeholder_position():
    sched = _scheduler(page_size=4)
    sched.add_request(Request("a", [1, 2, 3], SamplingParams(temperature=0.0, max_tokens=10)))
    plan1 = sched.schedule()                          # positions 0-2, samples position 3
    plan2 = sched.schedule()                          # position 3 is a placeholder: page 0 is full
    req = sched.requests["a"]
    assert plan2.num_scheduled_tokens == {"a": 1} and req.num_computed_tokens == 4
    assert req.page_hashes == [] and sched.kv._num_hashed_pages["a"] == 0
    sched.update(plan1, _result(plan1, {"a": 9}))
    sched.schedule()                                  # the token is known now: page 0 is hashed
    assert sched.kv._num_hashed_pages["a"] == 1
    assert sched.kv.get_computed_pages(Request("x", [1, 2, 3, 9, 4], SamplingParams()))[1] == 4


# --------------------------------------------------------------------------- the engine, SmolLM2


def _drain(engine):
    while engine.has_unfinished_requests():
        engine.step()
    engine.step()                 # hands the last finished ids to the runner


def _summary(out):
    """Everything a RequestOutput says, logprobs rounded (the batches of the two orders differ)."""
    def lps(entries):
        return None if entries is None else [
            None if d is None else {t: round(lp.logprob, 3) for t, lp in d.items()} for d in entries]
    return (out.prompt_logprobs and lps(out.prompt_logprobs),
            [(c.token_ids, c.text, c.finish_reason, c.stop_reason, lps(c.logprobs)) for c in out.outputs])


def _run(llm, async_on, prompts, params):
    """Generate in one order; returns the summaries and the most tokens a step saw in flight."""
    engine, runner = llm.engine, llm.engine.runner
    _drain(engine)
    engine.async_scheduling = async_on
    in_flight = []
    dispatch = runner.dispatch

    def counting_dispatch(plan):
        # Tokens that held slots have scheduled but not received yet (a placeholder is sent for them).
        held = [st.slot for st in runner._reqs.values()]
        in_flight.append(int((runner._num_tokens[held] - runner._num_known[held]).max(initial=0)))
        return dispatch(plan)

    runner.dispatch = counting_dispatch
    before = compile_counter.count
    try:
        outs = llm.generate([{"prompt_token_ids": ids} for ids in prompts], params, use_tqdm=False)
        _drain(engine)
    finally:
        del runner.dispatch
        engine.async_scheduling = False
    assert compile_counter.count == before, "the engine compiled after warm-up"
    stats = engine.scheduler.get_stats()
    assert stats.num_running == 0 and stats.num_waiting == 0
    assert stats.num_free_pages == stats.num_usable_pages
    assert not runner._reqs and engine._in_flight is None
    for out, p in zip(outs, params if isinstance(params, list) else [params] * len(outs)):
        for c in out.outputs:
            assert len(c.token_ids) <= p.max_tokens
    return [_summary(o) for o in outs], max(in_flight)


def _assert_same(llm, prompts, params):
    sync, sync_depth = _run(llm, False, prompts, params)
    async_, async_depth = _run(llm, True, prompts, params)
    assert sync_depth == 0 and async_depth >= 1, "async scheduling never had a step in flight"
    for i, (a, b) in enumerate(zip(sync, async_)):
        assert a == b, f"request {i}: sync {a} != async {b}"
    return sync


def test_mixed_batch_equals_sync(llm, prompt_ids):
    g = dict(temperature=0.0)
    params = [
        SamplingParams(**g, max_tokens=1),
        SamplingParams(**g, max_tokens=2, logprobs=2),
        SamplingParams(**g, max_tokens=7, prompt_logprobs=1),
        SamplingParams(**g, max_tokens=32, stop=[" the", "\n"]),
        SamplingParams(temperature=0.9, seed=11, max_tokens=20, n=3),
        SamplingParams(**g, max_tokens=24, repetition_penalty=1.3, min_tokens=4),
        SamplingParams(temperature=0.7, top_p=0.9, seed=5, max_tokens=16, stop_token_ids=[13]),
        SamplingParams(**g, max_tokens=5, include_stop_str_in_output=True, stop=["("]),
        SamplingParams(**g, max_tokens=80),
        SamplingParams(**g, max_tokens=80),
    ]
    sync = _assert_same(llm, prompt_ids, params)
    reasons = [(c[2], c[3]) for _, cs in sync for c in cs]
    assert ("stop", None) in reasons, "no request stopped at EOS: the check lost its EOS case"
    assert any(r == "stop" and isinstance(s, str) for r, s in reasons), "no stop string matched"
    assert ("length", None) in reasons


@contextlib.contextmanager
def _launch_thread(runner):
    """The runner's launch thread on (the default only for a mesh of several devices)."""
    assert runner._launcher is None, "one CPU device: the launch thread is off by default"
    runner._launcher = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="test-launch")
    try:
        yield
    finally:
        runner.close()
        runner._launcher = None


def test_launch_thread_equals_inline(llm, prompt_ids):
    """Device calls on the launch thread (runner.dispatch returns before the step is even launched)
    give the outputs of inline launches: penalties' sampler rows, prompt logprobs, n > 1, stops,
    with and without async scheduling."""
    g = dict(temperature=0.0)
    params = [
        SamplingParams(**g, max_tokens=3, prompt_logprobs=2, logprobs=1),
        SamplingParams(**g, max_tokens=24, repetition_penalty=1.3, min_tokens=4),
        SamplingParams(temperature=0.9, seed=11, max_tokens=12, n=2),
        SamplingParams(**g, max_tokens=32, stop=[" the", "\n"], logit_bias={13: -5.0}),
        SamplingParams(**g, max_tokens=40),
    ]
    runner = llm.engine.runner
    inline = [_run(llm, a, prompt_ids[:5], params)[0] for a in (False, True)]
    with _launch_thread(runner):
        threaded = [_run(llm, a, prompt_ids[:5], params)[0] for a in (False, True)]
    assert inline[0] == inline[1] == threaded[0] == threaded[1]


def test_launch_thread_error_surfaces_at_collect(llm, prompt_ids):
    engine, runner = llm.engine, llm.engine.runner
    _drain(engine)
    saved = dict(runner._executables)

    def broken(*args):
        raise RuntimeError("device step failed")

    with _launch_thread(runner):
        runner._executables = {k: broken for k in saved}
        try:
            engine.add_request("bad", {"prompt_token_ids": prompt_ids[0]}, SamplingParams(max_tokens=2))
            flight = runner.dispatch(engine.scheduler.schedule())   # returns: the call runs on the thread
            with pytest.raises(RuntimeError, match="device step failed"):
                runner.collect(flight)
        finally:
            runner._executables = saved
            engine.abort_request(["bad"])
            _drain(engine)


def test_chunked_prefill_prefix_hits_and_preemption_equal_sync(llm, prompt_ids):
    # Shared prefixes (prompts twice) for cache hits, a 16-token budget for chunked prefill, and
    # 8 usable pages of 16 tokens (max_model_len's worth) for 10 requests: preemption.
    prompts = prompt_ids[-5:] + [ids + [13] for ids in prompt_ids[-5:]]
    params = SamplingParams(temperature=0.0, max_tokens=24)
    results, stats = [], []
    for async_on in (False, True):
        with swapped_scheduler(llm, max_num_batched_tokens=16, num_pages=9) as sched:
            results.append(_run(llm, async_on, prompts, params))
            stats.append(sched.get_stats())
    (sync, sync_depth), (async_, async_depth) = results
    assert sync_depth == 0 and async_depth >= 1
    assert sync == async_
    for st in stats:
        assert st.num_preemptions > 0 and st.prefix_cache_hits > 0


def test_abort_mid_flight(llm, prompt_ids):
    engine = llm.engine
    params = SamplingParams(temperature=0.0, max_tokens=30)
    got = []
    for async_on in (False, True):
        _drain(engine)
        engine.async_scheduling = async_on
        try:
            for i, ids in enumerate(prompt_ids[:4]):
                engine.add_request(f"r{i}", {"prompt_token_ids": ids}, params)
            outs = {}
            for step in range(60):
                if step == 4:
                    engine.abort_request(["r1", "r3"])   # after tokens came out, with a step in flight
                for o in engine.step():
                    outs[o.request_id] = o
                if not engine.has_unfinished_requests():
                    break
            _drain(engine)
        finally:
            engine.async_scheduling = False
        assert not engine.has_unfinished_requests() and not engine.runner._reqs
        stats = engine.scheduler.get_stats()
        assert stats.num_free_pages == stats.num_usable_pages
        assert outs["r0"].finished and outs["r2"].finished
        got.append({rid: o.outputs[0].token_ids for rid, o in outs.items() if rid in ("r0", "r2")})
    assert got[0] == got[1]


def test_async_llm_streams_equal_sync(llm, prompt_ids):
    """The server's path: AsyncLLM's device thread stepping the engine, DELTA streams and a client
    that goes away mid-stream (the abort lands while a step is in flight)."""
    import asyncio

    from serving.async_llm import AsyncLLM
    from serving.outputs import RequestOutputKind

    engine = llm.engine
    params = SamplingParams(temperature=0.0, max_tokens=24)
    prompts = prompt_ids[:4]
    sync, _ = _run(llm, False, prompts, params)

    async def stream(server, i, ids, stop_after=None):
        tokens = []
        async for out in server.generate({"prompt_token_ids": ids}, params, f"s{i}",
                                         output_kind=RequestOutputKind.DELTA):
            tokens += out.outputs[0].token_ids
            if stop_after is not None and len(tokens) >= stop_after:
                break                                  # the client goes away: generate aborts
        return tokens

    async def main():
        server = AsyncLLM(engine)
        try:
            return await asyncio.gather(*(stream(server, i, ids, stop_after=3 if i == 1 else None)
                                          for i, ids in enumerate(prompts)))
        finally:
            await server.shutdown()

    _drain(engine)
    engine.async_scheduling = True
    try:
        got = asyncio.run(main())
        _drain(engine)
    finally:
        engine.async_scheduling = False
    for i, (tokens, (_, completions)) in enumerate(zip(got, sync)):
        expected = completions[0][0]
        assert tokens == (expected[:len(tokens)] if i == 1 else expected)
    assert 3 <= len(got[1]) < len(sync[1][1][0][0])
    stats = engine.scheduler.get_stats()
    assert stats.num_running == stats.num_waiting == 0 and stats.num_free_pages == stats.num_usable_pages
    assert not engine.runner._reqs


# --------------------------------------------------------------------------- the engine, fake runner


class _EagerFakeRunner(FakeRunner):
    """FakeRunner computing each step at dispatch, in dispatch order, as the device does; collect
    hands the result over later. It checks that a plan never schedules past the tokens its runner
    has (a placeholder is a token an earlier dispatched step sampled)."""
    last_step = None
    scheduler = None
    max_placeholders = 0        # most tokens one request had scheduled but not applied, at a dispatch

    def dispatch(self, plan):
        self.max_placeholders = max([self.max_placeholders]
                                    + [r.num_output_placeholders for r in self.scheduler.running])
        return self.run(plan)

    def collect(self, result):
        return result


@pytest.mark.parametrize("sched_kwargs", [
    dict(num_pages=64, page_size=4),
    dict(num_pages=26, page_size=4, max_num_batched_tokens=8),                 # preemption, chunks
    dict(num_pages=26, page_size=4, scheduling_policy="priority"),           # waiting-queue preemption
])
def test_fake_engine_outputs_equal_sync(sched_kwargs):
    """Every (prompt, params) pair of test_engine_outputs at once, with priorities, under pool
    pressure: the async engine's final outputs equal the synchronous engine's field by field."""
    finals = []
    for async_on in (False, True):
        engine = make_engine(**sched_kwargs)
        engine.runner = _EagerFakeRunner(sched_kwargs["num_pages"], sched_kwargs["page_size"], VOCAB, eos_token_id=EOS)
        engine.runner.scheduler = engine.scheduler
        engine.async_scheduling = async_on
        for i, prompt in enumerate(OUTPUT_PROMPTS):
            for j, params in enumerate(OUTPUT_PARAMS):
                engine.add_request(f"{i}-{j}", prompt, params, priority=(i * 7 + j) % 3)
        outputs = engine_run(engine)
        stats = engine.scheduler.get_stats()
        assert stats.num_free_pages == stats.num_usable_pages
        finals.append({rid: (outs[-1].outputs, outs[-1].prompt_logprobs) for rid, outs in outputs.items()})
        if sched_kwargs["num_pages"] < 64:
            assert stats.num_preemptions > 0
        # Synchronous: at most the token the step being dispatched samples; async: one more in flight.
        assert engine.runner.max_placeholders == (2 if async_on else 1)
    assert finals[0] == finals[1]
