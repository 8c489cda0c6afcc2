"""The server asks the engine for DELTA outputs for streams and FINAL_ONLY for whole responses, and
the two tell the same story.

The sweep runs the real LLMEngine and AsyncLLM over the hand-computable FakeRunner and the byte
tokenizer (tests/test_engine_outputs.py): real incremental detokenizing, stop strings held back
across steps, n > 1 children, logprobs, prompt logprobs over chunked prefill (16-token steps), and
no model, so a few hundred requests take seconds. A streamed response's chunks, added up per choice,
must equal the whole response: text, logprobs, finish and stop reasons, usage.
"""

import asyncio
import itertools
import threading
import time

import httpx
import pytest
from fastapi.testclient import TestClient

from serving.async_llm import AsyncLLM
from serving.outputs import RequestOutputKind
from serving.server.app import build_app
from serving.server.args import ServerArgs
from serving.server.streaming import OutputAccumulator
from tests.server_helpers import make_client, sse_events
from tests.test_engine_outputs import _SteppedFakeRunner, comparable, make_engine, run_all
from tests.test_reliability import serve

DELTA, FINAL_ONLY = RequestOutputKind.DELTA, RequestOutputKind.FINAL_ONLY
CHAT = [{"role": "user", "content": "hi there"}]
LONG = "The quick brown fox jumps over the lazy dog"     # 44 tokens: a prefill of three chunks


# ------------------------------------------------------------------ which kind the engine is asked for
@pytest.mark.parametrize("path,body,num_jobs", [
    ("/v1/completions", {"prompt": ["abc", "xy"], "n": 2, "max_tokens": 3}, 2),
    ("/v1/chat/completions", {"messages": CHAT, "max_tokens": 3, "logprobs": True}, 1),
    ("/v1/responses", {"input": "hi", "max_output_tokens": 3}, 1),
])
@pytest.mark.parametrize("bounded_queue", [False, True])
def test_streams_ask_for_delta_and_whole_responses_for_final_only(path, body, num_jobs, bounded_queue):
    c, engine = make_client(max_queued_requests=8 if bounded_queue else None)
    with c:
        whole = c.post(path, json=body)
        streamed = c.post(path, json={**body, "stream": True})
    assert whole.status_code == streamed.status_code == 200
    kinds = [engine.output_kinds[rid] for _, _, rid, _ in engine.requests]
    # A bounded queue releases a job's slot at its first output, so whole responses need DELTA there.
    assert kinds == [DELTA if bounded_queue else FINAL_ONLY] * num_jobs + [DELTA] * num_jobs


def test_final_only_responses_record_the_same_metrics_as_streams():
    c, _ = make_client()
    with c:
        body = {"prompt": "abc", "n": 2, "max_tokens": 3}
        c.post("/v1/completions", json=body)
        text = c.get("/metrics").text
        # 6 tokens over 2 choices: a stream sees 2 per step, observing the gaps of the last 2 steps.
        assert 'jaxllm:inter_token_latency_seconds_count{model_name="fake-model"} 4.0' in text
        assert 'jaxllm:request_generation_tokens_sum{model_name="fake-model"} 6.0' in text
        c.post("/v1/completions", json={**body, "stream": True})
        text = c.get("/metrics").text
        assert 'jaxllm:inter_token_latency_seconds_count{model_name="fake-model"} 8.0' in text
        assert 'jaxllm:request_generation_tokens_sum{model_name="fake-model"} 12.0' in text
        assert 'jaxllm:request_success_total{finished_reason="length",model_name="fake-model"} 4.0' in text


# ------------------------------------------------------------------ DELTA outputs add up
def test_accumulated_deltas_equal_the_cumulative_output():
    cumulative, delta, final = (run_all(kind) for kind in (RequestOutputKind.CUMULATIVE, DELTA, FINAL_ONLY))
    for rid, outs in delta.items():
        total = OutputAccumulator()
        for out in outs:
            total.add(out)
        assert comparable(total.result()) == comparable(cumulative[rid][-1])
        [only] = final[rid]
        single = OutputAccumulator()
        single.add(only)
        assert single.result() is only


# ------------------------------------------------------------------ streamed == whole, real engine
@pytest.fixture(scope="module", params=[False, True], ids=["unbounded", "bounded-queue"])
def engine_client(request):
    engine = AsyncLLM(make_engine(num_pages=512))
    args = ServerArgs(disable_log_stats=True, disable_log_requests=True,
                      max_queued_requests=1000 if request.param else None)
    with TestClient(build_app(engine, args)) as c:
        yield c


def _choices_from_stream(events: list, chat: bool) -> tuple[dict, dict]:
    """Per choice index: its text, logprobs and finish/stop reasons added up from the chunks; and the usage."""
    assert events[-1] == "[DONE]"
    usage = events[-2]["usage"]
    assert events[-2]["choices"] == []
    got: dict[int, dict] = {}
    for e in events[:-2]:
        assert "usage" not in e
        [c] = e["choices"]
        i = c["index"]
        assert not got.get(i, {}).get("finish_reason"), "a choice continued after its finish"
        if chat:
            if i not in got:
                assert c["delta"]["role"] == "assistant" and c["logprobs"] is None   # the role comes first
                got[i] = {"text": "", "logprobs": None, "finish_reason": None}
            text = c["delta"].get("content", "")
        else:
            got.setdefault(i, {"text": "", "logprobs": None, "finish_reason": None})
            text = c["text"]
        cur = got[i]
        cur["text"] += text
        if c["logprobs"] is not None:
            if chat:
                cur["logprobs"] = (cur["logprobs"] or []) + c["logprobs"]["content"]
            else:
                lp = cur["logprobs"] = cur["logprobs"] or {k: [] for k in c["logprobs"]}
                for k, v in c["logprobs"].items():
                    lp[k] += v
        if c["finish_reason"]:
            cur["finish_reason"], cur["stop_reason"] = c["finish_reason"], c.get("stop_reason")
    return got, usage


def _choices_from_whole(body: dict, chat: bool) -> dict:
    out = {}
    for c in body["choices"]:
        lp = c["logprobs"]
        out[c["index"]] = {"text": c["message"]["content"] if chat else c["text"],
                           "logprobs": lp["content"] if chat and lp else lp,
                           "finish_reason": c["finish_reason"], "stop_reason": c["stop_reason"]}
    return out


def _assert_stream_equals_whole(client, path: str, body: dict) -> dict:
    chat = path == "/v1/chat/completions"
    whole = client.post(path, json=body)
    assert whole.status_code == 200, whole.text
    whole = whole.json()
    r = client.post(path, json={**body, "stream": True, "stream_options": {"include_usage": True}})
    assert r.status_code == 200, r.text
    streamed, usage = _choices_from_stream(sse_events(r.text), chat)
    assert streamed == _choices_from_whole(whole, chat), body
    counts = ("prompt_tokens", "completion_tokens", "total_tokens")
    assert {k: usage[k] for k in counts} == {k: whole["usage"][k] for k in counts}, body
    return whole


def _stops(client, path: str, body: dict) -> list:
    """Stop strings the greedy output really contains (so that they match mid-generation)."""
    whole = client.post(path, json={**body, "max_tokens": 20}).json()["choices"][0]
    text = whole["message"]["content"] if "message" in whole else whole["text"]
    return [None, ([text[4:6]], False), ([text[9:10], text[5:7]], True)]


def _with(body: dict, stop, **fields) -> dict:
    body = {**body, **{k: v for k, v in fields.items() if v is not None}}
    if stop is not None:
        body["stop"], body["include_stop_str_in_output"] = stop
    return body


@pytest.mark.parametrize("prompt", ["Hello, world", ["abc", LONG]])
def test_completion_streams_add_up_to_the_whole_response(engine_client, prompt):
    base = {"prompt": prompt, "temperature": 0}
    stops = _stops(engine_client, "/v1/completions", base)
    for n, logprobs, echo, stop, max_tokens in itertools.product((1, 3), (None, 2), (False, True), stops, (1, 20)):
        body = _with(base, stop, n=n, logprobs=logprobs, echo=echo or None, max_tokens=max_tokens)
        whole = _assert_stream_equals_whole(engine_client, "/v1/completions", body)
        if echo and logprobs is not None:
            # Every echoed prompt position but the first has its logprob, also for a chunked prefill.
            for c in whole["choices"]:
                assert c["logprobs"]["token_logprobs"][0] is None
                assert None not in c["logprobs"]["token_logprobs"][1:]


def test_chat_streams_add_up_to_the_whole_response(engine_client):
    base = {"messages": CHAT, "temperature": 0}
    stops = _stops(engine_client, "/v1/chat/completions", base)
    for n, top, stop, max_tokens, echo in itertools.product((1, 2), (None, 2), stops, (1, 20), (False, True)):
        body = _with(base, stop, n=n, max_tokens=max_tokens)
        if top is not None:
            body.update(logprobs=True, top_logprobs=top)
        if echo:
            body.update(messages=CHAT + [{"role": "assistant", "content": "Hel"}], echo=True,
                        add_generation_prompt=False, continue_final_message=True)
        _assert_stream_equals_whole(engine_client, "/v1/chat/completions", body)


def test_responses_stream_adds_up_to_the_whole_response(engine_client):
    for max_tokens in (1, 5, 20):
        body = {"input": "hi", "max_output_tokens": max_tokens, "temperature": 0}
        whole = engine_client.post("/v1/responses", json=body).json()
        events = sse_events(engine_client.post("/v1/responses", json={**body, "stream": True}).text)
        text = whole["output"][0]["content"][0]["text"]
        assert "".join(e["delta"] for e in events if e["type"] == "response.output_text.delta") == text
        done = events[-1]["response"]
        assert [o["content"] for o in done["output"]] == [o["content"] for o in whole["output"]]
        counts = ("input_tokens", "output_tokens", "total_tokens")     # cached tokens grow with the prefix cache
        assert [done["usage"][k] for k in counts] == [whole["usage"][k] for k in counts]
        assert done["status"] == whole["status"]


# ------------------------------------------------------------------ a client leaving mid-stream
class _GatedRunner(_SteppedFakeRunner):
    """Holds its step number `hold_at` until `release` is set, so a client can leave while the
    request is certainly still running."""

    def __init__(self, *args, hold_at: int, **kwargs):
        super().__init__(*args, **kwargs)
        self.hold_at, self.release, self.holding = hold_at, threading.Event(), threading.Event()

    def collect(self, plan):
        if self.num_steps + 1 == self.hold_at:
            self.holding.set()
            self.release.wait(30)
        return super().collect(plan)


def _wait_for(condition, what: str) -> None:
    deadline = time.monotonic() + 30
    while not condition():
        assert time.monotonic() < deadline, f"gave up waiting for {what}"
        time.sleep(0.01)


@pytest.mark.parametrize("stream", [True, False])
def test_a_client_leaving_aborts_the_request_and_frees_its_pages(stream):
    engine = make_engine(num_pages=64)
    engine.runner = runner = _GatedRunner(64, 4, engine.runner.vocab_size, eos_token_id=engine.runner.eos_token_id,
                                          hold_at=4)
    llm = AsyncLLM(engine)
    with serve(llm) as (base, app, _, _):
        body = {"prompt": "abc", "max_tokens": 60, "ignore_eos": True, "stream": stream}

        async def leave_early():
            async with httpx.AsyncClient() as client:
                if stream:
                    async with client.stream("POST", base + "/v1/completions", json=body, timeout=30) as r:
                        async for line in r.aiter_lines():
                            if line.startswith("data: "):
                                break            # one chunk, then the client goes away
                else:
                    task = asyncio.create_task(client.post(base + "/v1/completions", json=body, timeout=30))
                    await asyncio.get_running_loop().run_in_executor(None, runner.holding.wait, 30)
                    task.cancel()
                    with pytest.raises(asyncio.CancelledError):
                        await task

        asyncio.run(leave_early())
        _wait_for(lambda: app.state.lifecycle.in_flight == 0, "the server to let the request go")
        runner.release.set()
        _wait_for(lambda: not engine.has_unfinished_requests(), "the engine to drop the request")
        stats = llm.get_stats()
    assert stats.generation_tokens < 60                      # it stopped early: aborted, not finished
    assert engine.scheduler.kv.num_free_pages == engine.scheduler.kv.num_pages - 1
