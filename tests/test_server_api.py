"""The OpenAI-compatible endpoints against the hand-computable fake engine (tests/fakes/fake_async_llm.py).

Fake arithmetic: "abc" encodes to [1, 100, 101, 102] (BOS + bytes+3); sample j repeats the prompt's
text from offset j, so "abc" with max_tokens=5 completes "abcab" (sample 1: "bcabc").
The fake chat template renders [{"role": "user", "content": "hi"}] as "<|user|>hi\\n<|assistant|>"
(24 tokens, no BOS for chat), so the reply starts "<|user|>hi".
"""


from tests.fakes.fake_async_llm import FakeAsyncLLM
from tests.server_helpers import make_client, sse_events

CHAT = [{"role": "user", "content": "hi"}]


def test_completion_text_usage_and_finish(client):
    r = client.post("/v1/completions", json={"model": "fake-model", "prompt": "abc", "max_tokens": 5})
    assert r.status_code == 200
    body = r.json()
    assert body["object"] == "text_completion" and body["id"].startswith("cmpl-") and body["model"] == "fake-model"
    [choice] = body["choices"]
    assert choice["text"] == "abcab" and choice["finish_reason"] == "length" and choice["logprobs"] is None
    assert body["usage"] == {"prompt_tokens": 4, "completion_tokens": 5, "total_tokens": 9}


def test_completion_default_max_tokens_is_16(client):
    body = client.post("/v1/completions", json={"prompt": "abc"}).json()
    assert body["usage"]["completion_tokens"] == 16


def test_completion_many_prompts_and_n(client):
    r = client.post("/v1/completions", json={"prompt": ["abc", "xy"], "n": 2, "max_tokens": 3})
    body = r.json()
    assert [(c["index"], c["text"]) for c in body["choices"]] == [(0, "abc"), (1, "bca"), (2, "xyx"), (3, "yxy")]
    assert body["usage"] == {"prompt_tokens": 4 + 3, "completion_tokens": 12, "total_tokens": 19}


def test_completion_token_prompts_and_echo(client):
    body = client.post("/v1/completions", json={"prompt": [100, 101], "max_tokens": 3, "echo": True}).json()
    assert body["choices"][0]["text"] == "ab" + "aba"
    body = client.post("/v1/completions", json={"prompt": [[100], [101, 102]], "max_tokens": 2}).json()
    assert [c["text"] for c in body["choices"]] == ["aa", "bc"]
    assert body["usage"]["prompt_tokens"] == 3


def test_completion_logprobs_with_echo(client):
    body = client.post("/v1/completions", json={"prompt": "abc", "max_tokens": 2, "logprobs": 1, "echo": True,
                                                "add_special_tokens": False}).json()
    choice = body["choices"][0]
    assert choice["text"] == "abcab"
    lp = choice["logprobs"]
    assert lp["tokens"] == ["a", "b", "c", "a", "b"]
    assert lp["token_logprobs"] == [None, -1.0, -1.0, -0.5, -0.5]
    assert lp["text_offset"] == [0, 1, 2, 3, 4]
    assert lp["top_logprobs"][0] is None
    assert lp["top_logprobs"][3] == {"a": -0.5}   # top-1 is the sampled token itself
    body = client.post("/v1/completions", json={"prompt": "abc", "max_tokens": 1, "logprobs": 2}).json()
    assert body["choices"][0]["logprobs"]["top_logprobs"] == [{"a": -0.5, "b": -1.5}]


def test_completion_stop_strings(client):
    body = client.post("/v1/completions", json={"prompt": "abc", "max_tokens": 10, "stop": "ca"}).json()
    assert body["choices"][0]["text"] == "ab"
    assert body["choices"][0]["finish_reason"] == "stop" and body["choices"][0]["stop_reason"] == "ca"
    body = client.post("/v1/completions", json={"prompt": "abc", "max_tokens": 10, "stop": ["ca"],
                                                "include_stop_str_in_output": True}).json()
    assert body["choices"][0]["text"] == "abca"


def test_completion_stream_matches_non_stream(client):
    req = {"prompt": ["abc", "xy"], "n": 2, "max_tokens": 4}
    expected = {c["index"]: c["text"] for c in client.post("/v1/completions", json=req).json()["choices"]}
    r = client.post("/v1/completions", json={**req, "stream": True, "stream_options": {"include_usage": True}})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    assert r.text.endswith("data: [DONE]\n\n")
    events = sse_events(r.text)
    assert events[-1] == "[DONE]"
    usage_chunk = events[-2]
    assert usage_chunk["choices"] == [] and usage_chunk["usage"] == {
        "prompt_tokens": 7, "completion_tokens": 16, "total_tokens": 23}
    texts, finish = {}, {}
    for e in events[:-2]:
        assert e["object"] == "text_completion" and "usage" not in e
        for c in e["choices"]:
            texts[c["index"]] = texts.get(c["index"], "") + c["text"]
            if c["finish_reason"]:
                finish[c["index"]] = c["finish_reason"]
    assert texts == expected and finish == {i: "length" for i in range(4)}


def test_completion_stream_continuous_usage_and_logprobs(client):
    r = client.post("/v1/completions", json={
        "prompt": "abc", "max_tokens": 3, "logprobs": 0, "stream": True, "add_special_tokens": False,
        "stream_options": {"include_usage": False, "continuous_usage_stats": True}})
    events = sse_events(r.text)[:-1]
    assert [e["usage"]["completion_tokens"] for e in events] == [1, 2, 3]
    assert all(e["usage"]["prompt_tokens"] == 3 for e in events)
    offsets = [e["choices"][0]["logprobs"]["text_offset"] for e in events]
    assert offsets == [[0], [1], [2]]
    assert [e["choices"][0]["logprobs"]["top_logprobs"] for e in events] == [[{"a": -0.5}], [{"b": -0.5}],
                                                                               [{"c": -0.5}]]


def test_chat_completion_with_logprobs(client):
    r = client.post("/v1/chat/completions", json={"messages": CHAT, "max_tokens": 4, "logprobs": True,
                                                  "top_logprobs": 2})
    body = r.json()
    assert body["object"] == "chat.completion" and body["id"].startswith("chatcmpl-")
    choice = body["choices"][0]
    assert choice["message"]["role"] == "assistant" and choice["message"]["content"] == "<|us"
    assert body["usage"] == {"prompt_tokens": 24, "completion_tokens": 4, "total_tokens": 28}
    first = choice["logprobs"]["content"][0]
    assert first == {"token": "<", "logprob": -0.5, "bytes": [60],
                     "top_logprobs": [{"token": "<", "logprob": -0.5, "bytes": [60]},
                                      {"token": "=", "logprob": -1.5, "bytes": [61]}]}
    assert len(choice["logprobs"]["content"]) == 4


def test_chat_content_parts_equal_string(client):
    parts = [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]
    a = client.post("/v1/chat/completions", json={"messages": CHAT, "max_tokens": 6}).json()
    b = client.post("/v1/chat/completions", json={"messages": parts, "max_tokens": 6}).json()
    assert a["choices"][0]["message"]["content"] == b["choices"][0]["message"]["content"] == "<|user"


def test_chat_stream_matches_non_stream(client):
    req = {"messages": CHAT, "max_completion_tokens": 5, "n": 2}
    expected = {c["index"]: c["message"]["content"]
                for c in client.post("/v1/chat/completions", json=req).json()["choices"]}
    r = client.post("/v1/chat/completions", json={**req, "stream": True, "stream_options": {"include_usage": True}})
    events = sse_events(r.text)
    assert events[-1] == "[DONE]" and events[-2]["usage"]["completion_tokens"] == 10
    texts, roles, finish = {}, {}, {}
    for e in events[:-2]:
        assert e["object"] == "chat.completion.chunk"
        [c] = e["choices"]
        if "role" in c["delta"]:
            assert c["index"] not in texts   # the role comes first, once per choice
            roles[c["index"]] = c["delta"]["role"]
        texts[c["index"]] = texts.get(c["index"], "") + c["delta"].get("content", "")
        if c["finish_reason"]:
            finish[c["index"]] = c["finish_reason"]
    assert texts == expected and roles == {0: "assistant", 1: "assistant"} and finish == {0: "length", 1: "length"}


def test_chat_continue_final_message_with_echo(client):
    messages = CHAT + [{"role": "assistant", "content": "Hel"}]
    body = client.post("/v1/chat/completions", json={
        "messages": messages, "max_tokens": 2, "echo": True, "add_generation_prompt": False,
        "continue_final_message": True}).json()
    # Prompt "<|user|>hi\n<|assistant|>Hel": the reply echoes "Hel" then repeats the prompt from its start.
    assert body["choices"][0]["message"]["content"] == "Hel<|"
    assert body["usage"]["prompt_tokens"] == len("<|user|>hi\n<|assistant|>Hel")


def test_sampling_parameters_reach_the_engine(client):
    client.post("/v1/chat/completions", json={
        "messages": CHAT, "max_tokens": 3, "temperature": 0.7, "top_p": 0.9, "top_k": 5, "min_p": 0.1,
        "repetition_penalty": 1.1, "presence_penalty": 0.5, "frequency_penalty": -0.5, "seed": 7,
        "stop_token_ids": [50], "ignore_eos": True, "min_tokens": 1, "logit_bias": {"100": 2.5},
        "priority": 3, "cache_salt": "s1", "user": "u"})
    ids, params, request_id, extra = client.engine.requests[-1]
    assert (params.temperature, params.top_p, params.top_k, params.min_p) == (0.7, 0.9, 5, 0.1)
    assert (params.repetition_penalty, params.presence_penalty, params.frequency_penalty) == (1.1, 0.5, -0.5)
    assert params.seed == 7 and params.stop_token_ids == [50] and params.ignore_eos and params.min_tokens == 1
    assert params.logit_bias == {100: 2.5} and params.max_tokens == 3
    assert extra == {"priority": 3, "cache_salt": "s1"} and request_id.startswith("chatcmpl-")


def test_chat_max_tokens_defaults_to_the_rest_of_the_context(client):
    client.post("/v1/chat/completions", json={"messages": CHAT})
    assert client.engine.requests[-1][1].max_tokens == 128 - 24


def test_generation_config_defaults_and_request_override():
    c, engine = make_client(FakeAsyncLLM(default_sampling={"temperature": 0.3, "top_k": 4, "max_tokens": 7}))
    with c:
        c.post("/v1/chat/completions", json={"messages": CHAT})
        params = engine.requests[-1][1]
        assert (params.temperature, params.top_k, params.max_tokens) == (0.3, 4, 7)
        c.post("/v1/chat/completions", json={"messages": CHAT, "temperature": 1.0, "max_tokens": 2})
        params = engine.requests[-1][1]
        assert (params.temperature, params.top_k, params.max_tokens) == (1.0, 4, 2)


def test_client_request_id_is_echoed(client):
    body = client.post("/v1/completions", json={"prompt": "a", "max_tokens": 1, "request_id": "my-id"}).json()
    assert body["id"] == "my-id"
    assert client.engine.requests[-1][2].startswith("cmpl-my-id-")


def test_responses_api(client):
    body = client.post("/v1/responses", json={"input": "hi", "instructions": "be brief",
                                              "max_output_tokens": 3}).json()
    assert body["object"] == "response" and body["id"].startswith("resp_")
    # Prompt "<|system|>be brief\n<|user|>hi\n<|assistant|>" -> reply "<|s".
    assert body["output"][0]["content"][0] == {"type": "output_text", "text": "<|s", "annotations": []}
    assert body["status"] == "incomplete" and body["incomplete_details"] == {"reason": "max_output_tokens"}
    n_prompt = len("<|system|>be brief\n<|user|>hi\n<|assistant|>")
    assert body["usage"]["input_tokens"] == n_prompt and body["usage"]["output_tokens"] == 3
    assert body["usage"]["total_tokens"] == n_prompt + 3


def test_responses_api_stream(client):
    r = client.post("/v1/responses", json={"input": [{"role": "user", "content": [
        {"type": "input_text", "text": "hi"}]}], "max_output_tokens": 3, "stream": True})
    events = sse_events(r.text)
    kinds = [e["type"] for e in events]
    assert kinds[:4] == ["response.created", "response.in_progress", "response.output_item.added",
                         "response.content_part.added"]
    assert kinds[-4:] == ["response.output_text.done", "response.content_part.done", "response.output_item.done",
                          "response.incomplete"]
    assert "".join(e["delta"] for e in events if e["type"] == "response.output_text.delta") == "<|u"
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    assert "event: response.created\ndata: " in r.text


def test_models_version_health(client):
    models = client.get("/v1/models").json()
    assert models["object"] == "list"
    assert [(m["id"], m["object"], m["max_model_len"]) for m in models["data"]] == [("fake-model", "model", 128)]
    assert client.get("/version").json()["version"]
    assert client.get("/health").status_code == 200
    client.engine.is_dead = True
    assert client.get("/health").status_code == 503
    r = client.post("/v1/completions", json={"prompt": "a"})
    assert r.status_code == 503 and r.json()["error"]["code"] == 503


def test_served_model_aliases():
    c, _ = make_client(served_model_names=("smol", "alias"))
    with c:
        assert [m["id"] for m in c.get("/v1/models").json()["data"]] == ["smol", "alias"]
        body = c.post("/v1/completions", json={"model": "alias", "prompt": "a", "max_tokens": 1}).json()
        assert body["model"] == "alias"
        assert c.post("/v1/completions", json={"model": "fake-model", "prompt": "a"}).status_code == 404


def test_tokenize_and_detokenize(client):
    assert client.post("/tokenize", json={"prompt": "ab", "return_token_strs": True}).json() == {
        "count": 3, "max_model_len": 128, "tokens": [1, 100, 101], "token_strs": ["<s>", "a", "b"]}
    assert client.post("/tokenize", json={"prompt": "ab", "add_special_tokens": False}).json()["tokens"] == [100, 101]
    chat = client.post("/tokenize", json={"messages": CHAT}).json()
    assert chat["count"] == 24 and chat["tokens"][0] == 3 + ord("<")
    assert client.post("/detokenize", json={"tokens": [100, 101]}).json() == {"prompt": "ab"}


def test_metrics_series(client):
    client.post("/v1/completions", json={"prompt": "abc", "max_tokens": 2})
    text = client.get("/metrics").text
    for name in ("num_requests_running", "num_requests_waiting", "kv_cache_usage_perc", "prefix_cache_queries_total",
                 "prefix_cache_hits_total", "num_preemptions_total", "prompt_tokens_total",
                 "generation_tokens_total", "time_to_first_token_seconds_count", "inter_token_latency_seconds_count",
                 "e2e_request_latency_seconds_count", "request_queue_time_seconds_count", "bucket_padding_ratio",
                 "compilations_total"):
        assert f"jaxllm:{name}{{" in text, name
    assert 'jaxllm:request_success_total{finished_reason="length",model_name="fake-model"} 1.0' in text
    assert 'jaxllm:generation_tokens_total{model_name="fake-model"} 2.0' in text
    assert 'jaxllm:inter_token_latency_seconds_count{model_name="fake-model"} 1.0' in text


def test_docs_and_openapi(client):
    assert client.get("/openapi.json").json()["paths"]["/v1/chat/completions"]
    assert client.get("/docs").status_code == 200
    c, _ = make_client(disable_fastapi_docs=True)
    with c:
        assert c.get("/openapi.json").status_code == 404 and c.get("/docs").status_code == 404


def test_request_id_header():
    c, _ = make_client(enable_request_id_headers=True)
    with c:
        assert c.get("/health", headers={"X-Request-Id": "abc"}).headers["x-request-id"] == "abc"
        assert len(c.get("/v1/models").headers["x-request-id"]) == 32
