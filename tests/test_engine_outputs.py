"""LLMEngine's RequestOutputs and AsyncLLM's hand-over, over the real scheduler, the hand-computable
FakeRunner (tests/fakes) and a byte-level tokenizer: no model, milliseconds per test.

The three RequestOutputKinds must tell the same story: the last CUMULATIVE output, the one
FINAL_ONLY output and the concatenation of the DELTA outputs are equal field by field, and every
CUMULATIVE output is a snapshot that later steps do not change.
"""

import asyncio
import dataclasses
import types

import pytest

from serving.async_llm import AsyncLLM
from serving.config import EngineArgs
from serving.engine import LLMEngine
from serving.outputs import RequestOutputKind
from serving.sampling_params import SamplingParams
from serving.scheduler import Scheduler
from tests.fakes import FakeRunner
from tests.fakes.fake_async_llm import EOS, FakeTokenizer

VOCAB = FakeTokenizer.vocab_size
MAX_MODEL_LEN = 96


class _SteppedFakeRunner(FakeRunner):
    """FakeRunner behind the engine's dispatch/collect split (the step runs at collect)."""
    last_step = None

    def dispatch(self, plan):
        return plan

    def collect(self, plan):
        return self.run(plan)


def make_engine(num_pages=64, page_size=4, **sched_kwargs) -> LLMEngine:
    scheduler = Scheduler(num_pages=num_pages, page_size=page_size, max_model_len=MAX_MODEL_LEN,
                          max_num_batched_tokens=sched_kwargs.pop("max_num_batched_tokens", 16), **sched_kwargs)
    # The stepped fake runs a plan when it is collected, which models the synchronous engine; the
    # same (prompt, params) pairs under async scheduling are compared in test_async_scheduling.py.
    return LLMEngine(engine_args=EngineArgs(max_logprobs=5, async_scheduling=False), model_config=types.SimpleNamespace(vocab_size=VOCAB),
                     tokenizer=FakeTokenizer(), scheduler=scheduler,
                     runner=_SteppedFakeRunner(num_pages, page_size, VOCAB, eos_token_id=EOS),
                     max_model_len=MAX_MODEL_LEN, eos_token_ids=(EOS,), default_sampling={}, model_name="fake")


PROMPTS = ["Hello, world", "abc", "The quick brown fox jumps over the lazy dog", "zz"]
PARAMS = [
    SamplingParams(temperature=0.0, max_tokens=20),
    SamplingParams(temperature=0.0, max_tokens=12, logprobs=2, prompt_logprobs=1),
    SamplingParams(temperature=0.0, max_tokens=30, n=3, seed=1),
    SamplingParams(temperature=0.0, max_tokens=40, stop=["\u0105", "Q"], include_stop_str_in_output=True),
    SamplingParams(temperature=0.0, max_tokens=25, min_tokens=5, stop=["x"], logprobs=1),
]


def run_all(kind: RequestOutputKind, **engine_kwargs) -> dict[str, list]:
    """Every (prompt, params) pair at once; request id -> its outputs in order."""
    engine = make_engine(**engine_kwargs)
    for i, prompt in enumerate(PROMPTS):
        for j, params in enumerate(PARAMS):
            engine.add_request(f"{i}-{j}", prompt, params, output_kind=kind)
    return engine_run(engine)


def engine_run(engine) -> dict[str, list]:
    outputs: dict[str, list] = {}
    while engine.has_unfinished_requests() or engine.scheduler.has_requests():
        for out in engine.step():
            outputs.setdefault(out.request_id, []).append(out)
    engine.runner.assert_no_state()
    return outputs


def merge_deltas(deltas):
    """The cumulative output a stream of DELTA outputs adds up to."""
    last = deltas[-1]
    completions = []
    for i, final in enumerate(last.outputs):
        parts = [d.outputs[i] for d in deltas]
        lps = None if final.logprobs is None else [lp for p in parts for lp in p.logprobs]
        completions.append(dataclasses.replace(
            final, text="".join(p.text for p in parts), token_ids=[t for p in parts for t in p.token_ids],
            logprobs=lps))
    prompt_lps = None if last.prompt_logprobs is None else [lp for d in deltas for lp in d.prompt_logprobs]
    return dataclasses.replace(last, outputs=completions, prompt_logprobs=prompt_lps)


def comparable(out):
    return dataclasses.replace(out, metrics=None)


def test_output_kinds_tell_the_same_story():
    cumulative = run_all(RequestOutputKind.CUMULATIVE)
    delta = run_all(RequestOutputKind.DELTA)
    final = run_all(RequestOutputKind.FINAL_ONLY)
    assert set(cumulative) == set(delta) == set(final) == {f"{i}-{j}" for i in range(len(PROMPTS))
                                                           for j in range(len(PARAMS))}
    for rid, outs in cumulative.items():
        assert outs[-1].finished and not any(o.finished for o in outs[:-1])
        assert len(final[rid]) == 1 and final[rid][0].finished
        assert len(delta[rid]) == len(outs)
        assert comparable(final[rid][0]) == comparable(outs[-1])
        assert comparable(merge_deltas(delta[rid])) == comparable(outs[-1])
        # The stories are not empty: tokens, text (tokenizer on), logprobs where asked.
        for c in outs[-1].outputs:
            assert c.token_ids and c.finish_reason in ("stop", "length")
            if outs[-1].prompt_logprobs is not None:
                assert len(outs[-1].prompt_logprobs) == len(outs[-1].prompt_token_ids)
            if c.logprobs is not None:
                assert len(c.logprobs) == len(c.token_ids)


def test_cumulative_outputs_are_snapshots_that_only_grow():
    for outs in run_all(RequestOutputKind.CUMULATIVE).values():
        for before, after in zip(outs, outs[1:]):
            for b, a in zip(before.outputs, after.outputs):
                assert a.token_ids[:len(b.token_ids)] == b.token_ids
                assert a.text.startswith(b.text)
                if b.logprobs is not None:
                    assert a.logprobs[:len(b.logprobs)] == b.logprobs
                if b.finish_reason is None:
                    assert len(b.logprobs or b.token_ids) == len(b.token_ids)   # no later step leaked in


def test_cumulative_prompt_logprobs_are_snapshots_under_chunked_prefill():
    """A prompt prefilled over several steps: each CUMULATIVE output keeps the prompt logprobs it was
    sent with (the engine's list grows later; a consumer on another thread must not see that)."""
    engine = make_engine(max_num_batched_tokens=8)
    prompt = "The quick brown fox jumps over the lazy dog"
    engine.add_request("r", prompt, SamplingParams(temperature=0.0, max_tokens=3, prompt_logprobs=1),
                       output_kind=RequestOutputKind.CUMULATIVE)
    seen = []
    while engine.has_unfinished_requests() or engine.scheduler.has_requests():
        seen += [(out, len(out.prompt_logprobs)) for out in engine.step()]
    assert [n for _, n in seen] == [len(out.prompt_logprobs) for out, _ in seen]
    assert seen[-1][1] == len(seen[-1][0].prompt_token_ids)


@pytest.mark.parametrize("include", [False, True])
@pytest.mark.parametrize("kind", [RequestOutputKind.CUMULATIVE, RequestOutputKind.DELTA])
def test_stop_string_truncates_the_text_and_finishes_the_request(kind, include):
    plain = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)
    engine = make_engine()
    engine.add_request("plain", PROMPTS[2], plain, output_kind=RequestOutputKind.FINAL_ONLY)
    text = engine_run(engine)["plain"][0].outputs[0].text
    k = next(k for k in range(4, len(text) - 2) if "\ufffd" not in text[k:k + 2])
    stop = text[k:k + 2]
    at = text.find(stop)
    engine = make_engine()
    engine.add_request("stop", PROMPTS[2], dataclasses.replace(plain, stop=[stop], include_stop_str_in_output=include),
                       output_kind=kind)
    outs = engine_run(engine)["stop"]
    out = (outs[-1] if kind is RequestOutputKind.CUMULATIVE else merge_deltas(outs)).outputs[0]
    assert (out.finish_reason, out.stop_reason) == ("stop", stop)
    assert out.text == text[:at + len(stop)] if include else text[:at]
    assert len(out.token_ids) < 40


def test_same_outputs_under_chunked_prefill_and_preemption():
    roomy = run_all(RequestOutputKind.FINAL_ONLY)
    tight = run_all(RequestOutputKind.FINAL_ONLY, num_pages=40, max_num_batched_tokens=8)
    assert {k: comparable(v[0]) for k, v in tight.items()} == {k: comparable(v[0]) for k, v in roomy.items()}


def test_bad_output_kind_is_a_value_error():
    engine = make_engine()
    with pytest.raises(ValueError, match="output_kind"):
        engine.add_request("r", "abc", SamplingParams(max_tokens=2), output_kind="delta")


# --------------------------------------------------------------------------------------- AsyncLLM
def _stream_all(kind: RequestOutputKind, abort_after: dict | None = None):
    """AsyncLLM over a fresh engine, every request consumed concurrently; request id -> outputs.
    ``abort_after``: request id -> leave its stream after this many outputs."""
    engine = make_engine()
    llm = AsyncLLM(engine)

    async def consume(rid, prompt, params):
        outs = []
        async for out in llm.generate(prompt, params, rid, output_kind=kind):
            outs.append(out)
            if abort_after and len(outs) == abort_after.get(rid):
                break
        return rid, outs

    async def main():
        try:
            return await asyncio.gather(*(consume(f"{i}-{j}", p, params) for i, p in enumerate(PROMPTS)
                                          for j, params in enumerate(PARAMS)))
        finally:
            await llm.shutdown()

    results = dict(asyncio.run(main()))
    assert not llm.is_dead
    return results, engine


@pytest.mark.parametrize("kind", [RequestOutputKind.CUMULATIVE, RequestOutputKind.DELTA])
def test_async_llm_streams_what_the_engine_steps(kind):
    expected = run_all(kind)
    streamed, _ = _stream_all(kind)
    assert set(streamed) == set(expected)
    for rid, outs in streamed.items():
        want = expected[rid][-1] if kind is RequestOutputKind.CUMULATIVE else merge_deltas(expected[rid])
        got = outs[-1] if kind is RequestOutputKind.CUMULATIVE else merge_deltas(outs)
        assert outs[-1].finished and comparable(got) == comparable(want)


def test_async_llm_abandoned_streams_are_aborted():
    abort_after = {"0-0": 1, "2-2": 3, "3-4": 2}
    streamed, engine = _stream_all(RequestOutputKind.CUMULATIVE, abort_after)
    for rid, n in abort_after.items():
        assert len(streamed[rid]) == n and not streamed[rid][-1].finished
    assert all(outs[-1].finished for rid, outs in streamed.items() if rid not in abort_after)
    assert not engine.has_unfinished_requests()
    assert engine.scheduler.kv.num_free_pages == engine.scheduler.kv.num_pages - 1
