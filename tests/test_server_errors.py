"""Errors: the OpenAI envelope with vLLM's statuses, auth on the routed path, body limits, stream failures."""

import asyncio
import json

import pytest

from serving.server.errors import MAX_ECHO_CHARS
from serving.server.guard import json_depth_exceeds
from serving.server.streaming import merged_outputs
from tests.fakes.fake_async_llm import FakeAsyncLLM
from tests.server_helpers import assert_envelope, make_client, sse_events

CHAT = [{"role": "user", "content": "hi"}]


BAD_REQUESTS = [
    ("/v1/completions", {"prompt": "a", "temperature": -1}, "temperature"),
    ("/v1/completions", {"prompt": "a", "top_p": 0}, "top_p"),
    ("/v1/completions", {"prompt": "a", "n": 0}, "n"),
    ("/v1/completions", {"prompt": "a", "n": 100000}, "n"),
    ("/v1/completions", {"prompt": "a", "max_tokens": 0}, "max_tokens"),
    ("/v1/completions", {"prompt": "a", "max_tokens": -5}, "max_tokens"),
    ("/v1/completions", {"prompt": "a", "logprobs": 6}, "logprobs"),
    ("/v1/completions", {"prompt": ""}, "prompt"),
    ("/v1/completions", {"prompt": []}, "prompt"),
    ("/v1/completions", {"prompt": [5, 9999]}, "prompt"),
    ("/v1/completions", {"prompt": "a", "logit_bias": {"9999": 1}}, "logit_bias"),
    ("/v1/completions", {"prompt": "a", "stop": [""]}, "stop"),
    ("/v1/completions", {"prompt": "a", "stop": ["x"] * 65}, "stop"),
    ("/v1/completions", {"prompt": "a", "suffix": "z"}, "suffix"),
    ("/v1/completions", {}, "prompt"),
    ("/v1/chat/completions", {"messages": []}, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "wizard", "content": "x"}]}, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "messages"),
    ("/v1/chat/completions", {"messages": CHAT, "top_logprobs": 2}, "top_logprobs"),
    ("/v1/chat/completions", {"messages": CHAT, "logprobs": True, "top_logprobs": 6}, "logprobs"),
    ("/v1/chat/completions", {"messages": CHAT, "chat_template": "{{ 1 }}"}, "chat_template"),
    ("/v1/chat/completions", {"messages": CHAT, "chat_template_kwargs": {"messages": []}}, "chat_template_kwargs"),
    ("/v1/chat/completions", {"messages": CHAT, "max_completion_tokens": 200}, "max_completion_tokens"),
    ("/v1/chat/completions", {"messages": CHAT, "response_format": {"type": "json_object"}}, "response_format"),
    ("/v1/responses", {"input": ""}, "input"),
    ("/v1/responses", {"input": "hi", "previous_response_id": "resp_1"}, "previous_response_id"),
    ("/detokenize", {"tokens": [-1]}, "tokens"),
    ("/tokenize", {}, "prompt"),
]


@pytest.mark.parametrize("path,body,param", BAD_REQUESTS)
def test_bad_requests_are_400_with_param(client, path, body, param):
    assert_envelope(client.post(path, json=body), 400, param)
    assert not client.engine.requests   # nothing reached the engine


def test_server_still_answers_after_bad_requests(client):
    for path, body, _ in BAD_REQUESTS:
        client.post(path, json=body)
    assert client.post("/v1/completions", json={"prompt": "abc", "max_tokens": 3}).json()["choices"][0]["text"] == "abc"


def test_context_overflow_messages_have_the_numbers(client):
    err = assert_envelope(client.post("/v1/completions", json={"prompt": "a" * 130}), 400, "prompt")
    assert "128" in err["message"] and "131" in err["message"]
    err = assert_envelope(client.post("/v1/completions", json={"prompt": "abc", "max_tokens": 125}), 400, "max_tokens")
    assert "128" in err["message"] and "129" in err["message"] and "125" in err["message"]


def test_malformed_bodies(client):
    headers = {"content-type": "application/json"}
    assert_envelope(client.post("/v1/completions", content=b"[1, 2]", headers=headers), 400)
    assert_envelope(client.post("/v1/completions", content=b"{not json", headers=headers), 400)
    assert_envelope(client.post("/v1/completions", content=b"\xff\xfe{}", headers=headers), 400)
    deep = b'{"prompt": ' + b"[" * 5000 + b"]" * 5000 + b"}"
    assert_envelope(client.post("/v1/completions", content=deep, headers=headers), 400)


def test_json_depth_scan_ignores_brackets_in_strings():
    assert not json_depth_exceeds(json.dumps({"prompt": "[" * 1000}).encode())
    assert json_depth_exceeds(b"[" * 65 + b"]" * 65)
    assert not json_depth_exceeds(b"[" * 64 + b"]" * 64)


def test_unknown_model_and_route_are_404(client):
    assert_envelope(client.post("/v1/completions", json={"model": "gpt-9", "prompt": "a"}), 404, "model")
    assert_envelope(client.post("/v1/chat/completions", json={"model": "gpt-9", "messages": CHAT}), 404, "model")
    assert_envelope(client.get("/v1/nothing"), 404)


def test_error_messages_echo_a_bounded_slice(client):
    err = assert_envelope(client.post("/v1/completions", json={"model": "m" * 100_000, "prompt": "a"}), 404)
    assert len(err["message"]) < 4 * MAX_ECHO_CHARS + 100


def test_body_too_large_is_413():
    c, engine = make_client(max_request_body_bytes=2048)
    with c:
        assert_envelope(c.post("/v1/completions", json={"prompt": "a" * 4096}), 413)

        def chunks():  # no Content-Length: the limit is enforced while reading
            for _ in range(8):
                yield b" " * 512
        assert_envelope(c.post("/v1/completions", content=chunks(), headers={"content-type": "application/json"}),
                        413)
        assert c.post("/v1/completions", json={"prompt": "a", "max_tokens": 1}).status_code == 200
        assert not [r for r in engine.requests if len(r[0]) > 100]


ROUTES = [("get", "/v1/models"), ("post", "/v1/completions"), ("post", "/v1/chat/completions"),
          ("post", "/v1/responses"), ("post", "/tokenize"), ("post", "/detokenize"), ("get", "/metrics"),
          ("get", "/version"), ("get", "/openapi.json"), ("get", "/docs"), ("get", "/no/such/route")]


@pytest.mark.parametrize("method,path", ROUTES)
def test_api_key_required_everywhere_but_health(method, path):
    c, engine = make_client(api_key="s3cret-KEY")
    with c:
        call = getattr(c, method)
        body = {"json": {"prompt": "a", "messages": CHAT, "input": "a", "tokens": [100]}} if method == "post" else {}
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Bearer s3cret-key"},
                        {"Authorization": "s3cret-KEY"}, {"Host": "localhost", "X-Forwarded-Host": "127.0.0.1"},
                        {"Authorization": "Basic s3cret-KEY"}):
            assert_envelope(call(path, headers=headers, **body), 401)
        assert not engine.requests
        assert c.get("/health").status_code == 200
        ok = call(path, headers={"Authorization": "Bearer s3cret-KEY"}, **body)
        assert ok.status_code != 401


def test_api_key_with_root_path_and_open_metrics():
    c, _ = make_client(api_key="k", root_path="/api", metrics_without_auth=True)
    with c:
        assert c.get("/metrics").status_code == 200
        assert c.get("/health").status_code == 200
        assert_envelope(c.get("/v1/models"), 401)
        assert c.get("/v1/models", headers={"Authorization": "bearer k"}).status_code == 200


def test_failure_mid_stream_ends_with_error_chunk_and_done(client):
    client.engine.fail_after_steps = 2
    r = client.post("/v1/completions", json={"prompt": "abc", "max_tokens": 10, "stream": True})
    events = sse_events(r.text)
    assert events[-1] == "[DONE]"
    assert events[-2]["error"]["code"] == 500 and "RuntimeError" in events[-2]["error"]["message"]
    assert "".join(e["choices"][0]["text"] for e in events[:-2]) == "ab"
    r = client.post("/v1/chat/completions", json={"messages": CHAT, "stream": True})
    events = sse_events(r.text)
    assert events[-1] == "[DONE]" and events[-2]["error"]["code"] == 500
    assert_envelope(client.post("/v1/completions", json={"prompt": "abc", "max_tokens": 10}), 500)


def test_engine_value_error_before_first_output_is_400_even_when_streaming(client):
    from serving.sampling_params import SamplingParamsError

    async def refuse(*args, **kwargs):
        raise SamplingParamsError("seed is not supported here", "seed")
        yield  # pragma: no cover (makes this an async generator)

    client.engine.generate = refuse
    for stream in (False, True):
        assert_envelope(client.post("/v1/completions", json={"prompt": "a", "stream": stream}), 400, "seed")


def test_client_disconnect_aborts_the_engine_request():
    engine = FakeAsyncLLM(step_delay=0.01)

    class Disconnecting:
        def __init__(self):
            self.calls = 0

        async def receive(self):
            await asyncio.sleep(0.05)
            return {"type": "http.disconnect"}

    async def run():
        from serving.sampling_params import SamplingParams
        params = SamplingParams(max_tokens=100)
        jobs = [(f"r{i}", lambda i=i: engine.generate("abc", params, f"r{i}")) for i in range(2)]
        got = []
        with pytest.raises(Exception) as info:
            async for item in merged_outputs(engine, jobs, Disconnecting()):
                got.append(item)
        return got, info.value

    got, exc = asyncio.run(run())
    assert type(exc).__name__ == "ClientDisconnected"
    assert 0 < len(got) < 200
    assert sorted(engine.aborted) == ["r0", "r1"] and not engine.running
