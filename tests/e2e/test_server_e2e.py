"""A real `python -m serving serve` process with the embedded SmolLM2 model, driven by the official
`openai` client (sync, async, streaming) and plain HTTP.

The reference is the engine itself: an in-process `serving.LLM` with the same engine flags, loaded
while the server starts. Greedy outputs through the server must equal it token for token.
Small context, KV cache and bucket ladder keep CPU start-up (load + compile) around a minute.
"""

import asyncio
import importlib.util
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

if importlib.util.find_spec("serving.async_llm") is None:
    pytest.skip("serving.async_llm (the engine's asyncio front) does not exist yet", allow_module_level=True)

import httpx  # noqa: E402
import openai  # noqa: E402

from serving.sampling_params import SamplingParams  # noqa: E402

ENGINE_FLAGS = {"max_model_len": 256, "max_num_seqs": 4, "max_num_batched_tokens": 64,
                "kv_cache_memory": 32 * 2**20}
STARTUP_TIMEOUT_S = 420
API_KEY = "e2e-key"
MESSAGES = [{"role": "user", "content": "What is the capital of France?"}]
PROMPT = "The capital of France is"

pytestmark = pytest.mark.timeout(900)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    port = _free_port()
    log_path = tmp_path_factory.mktemp("server") / "server.log"
    argv = [sys.executable, "-m", "serving", "serve", "--host", "127.0.0.1", "--port", str(port),
            "--disable-log-stats", "--api-key", API_KEY]
    for name, value in ENGINE_FLAGS.items():
        argv += ["--" + name.replace("_", "-"), str(value)]
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = dict(os.environ, PYTHONPATH=repo + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("JAXLLM_API_KEY", None)
    log = open(log_path, "w")
    proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, cwd=repo, env=env)
    base = f"http://127.0.0.1:{port}"
    try:
        yield proc, base, log_path
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        log.close()


@pytest.fixture(scope="module")
def reference():
    """The engine's own outputs: an in-process LLM with the server's engine flags (loads while it starts)."""
    from serving import llm as llm_module
    return llm_module.LLM(**ENGINE_FLAGS)


@pytest.fixture(scope="module")
def base_url(server, reference):
    proc, base, log_path = server
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"server exited with {proc.returncode}:\n{log_path.read_text()[-3000:]}")
        try:
            if httpx.get(base + "/health", timeout=2).status_code == 200:
                break
        except httpx.TransportError:
            pass
        time.sleep(1)
    else:
        pytest.fail(f"server not healthy after {STARTUP_TIMEOUT_S}s:\n{log_path.read_text()[-3000:]}")
    assert f"Uvicorn running on {base}" in log_path.read_text()
    return base


@pytest.fixture(scope="module")
def client(base_url):
    return openai.OpenAI(base_url=base_url + "/v1", api_key=API_KEY, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def model(client):
    [m] = client.models.list().data
    return m.id


def test_plain_http_endpoints(base_url, model):
    auth = {"Authorization": f"Bearer {API_KEY}"}
    assert httpx.get(base_url + "/health").status_code == 200
    assert httpx.get(base_url + "/v1/models").status_code == 401
    assert httpx.get(base_url + "/version", headers=auth).json()["version"]
    toks = httpx.post(base_url + "/tokenize", json={"prompt": PROMPT}, headers=auth).json()
    assert toks["count"] == len(toks["tokens"]) > 0 and toks["max_model_len"] == 256
    back = httpx.post(base_url + "/detokenize", json={"tokens": toks["tokens"]}, headers=auth).json()
    assert back["prompt"] == PROMPT
    assert httpx.get(base_url + "/openapi.json", headers=auth).status_code == 200


def test_greedy_completion_equals_engine(client, model, reference):
    expected = reference.generate(PROMPT, SamplingParams(temperature=0, max_tokens=10), use_tqdm=False)[0]
    r = client.completions.create(model=model, prompt=PROMPT, max_tokens=10, temperature=0, logprobs=2)
    choice = r.choices[0]
    assert choice.text == expected.outputs[0].text
    assert r.usage.prompt_tokens == len(expected.prompt_token_ids)
    assert r.usage.completion_tokens == len(expected.outputs[0].token_ids)
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    lp = choice.logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 10
    assert "".join(lp.tokens) == choice.text
    assert all(v <= 0 for v in lp.token_logprobs)
    assert all(1 <= len(top) <= 3 for top in lp.top_logprobs)
    # Greedy: the chosen token is the most likely one.
    assert all(lp.token_logprobs[i] >= max(lp.top_logprobs[i].values()) - 1e-6 for i in range(10))


def test_greedy_chat_equals_engine_and_stream(client, model, reference):
    expected = reference.chat(MESSAGES, SamplingParams(temperature=0, max_tokens=12), use_tqdm=False)[0]
    r = client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=12, temperature=0,
                                       logprobs=True, top_logprobs=2)
    assert r.choices[0].message.content == expected.outputs[0].text
    assert r.usage.prompt_tokens == len(expected.prompt_token_ids)
    assert r.usage.completion_tokens == len(expected.outputs[0].token_ids)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens and all(len(c.top_logprobs) == 2 for c in content)

    chunks = list(client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=12, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == r.choices[0].message.content
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == r.choices[0].finish_reason
    assert chunks[-1].usage.completion_tokens == r.usage.completion_tokens


def test_completion_stream_equals_non_stream(client, model):
    whole = client.completions.create(model=model, prompt=PROMPT, max_tokens=8, temperature=0)
    stream = client.completions.create(model=model, prompt=PROMPT, max_tokens=8, temperature=0, stream=True)
    assert "".join(c.choices[0].text for c in stream) == whole.choices[0].text


def test_async_client_concurrent_requests(base_url, model, client):
    prompts = ["One, two, three,", "Paris is a city in", "def add(a, b):"]
    sequential = [client.completions.create(model=model, prompt=p, max_tokens=6, temperature=0).choices[0].text
                  for p in prompts]

    async def run():
        aclient = openai.AsyncOpenAI(base_url=base_url + "/v1", api_key=API_KEY, max_retries=0, timeout=120)
        async with aclient:
            rs = await asyncio.gather(*[aclient.completions.create(model=model, prompt=p, max_tokens=6,
                                                                   temperature=0) for p in prompts])
            stream = await aclient.chat.completions.create(model=model, messages=MESSAGES, max_tokens=4,
                                                           temperature=0, stream=True)
            streamed = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
        return [r.choices[0].text for r in rs], streamed

    concurrent, streamed = asyncio.run(run())
    assert concurrent == sequential
    assert streamed


def test_responses_api(client, model):
    r = client.responses.create(model=model, input="Say hello.", max_output_tokens=6, temperature=0)
    assert r.output_text and r.usage.output_tokens <= 6
    events = list(client.responses.create(model=model, input="Say hello.", max_output_tokens=6, temperature=0,
                                          stream=True))
    assert events[0].type == "response.created" and events[-1].type in ("response.completed", "response.incomplete")
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == r.output_text


def test_errors_have_status_and_envelope(base_url, client, model):
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="no-such-model", prompt="hi", max_tokens=1)
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model=model, prompt=PROMPT, max_tokens=1000)
    assert "256" in str(info.value)
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=base_url + "/v1", api_key="wrong", max_retries=0).models.list()
    r = httpx.post(base_url + "/v1/chat/completions", json={"messages": [], "model": model},
                   headers={"Authorization": f"Bearer {API_KEY}"})
    assert r.status_code == 400 and set(r.json()["error"]) == {"message", "type", "param", "code"}


def test_metrics_after_traffic(base_url):
    text = httpx.get(base_url + "/metrics", headers={"Authorization": f"Bearer {API_KEY}"}).text
    for name in ("num_requests_running", "prompt_tokens_total", "generation_tokens_total",
                 "time_to_first_token_seconds_count", "e2e_request_latency_seconds_count", "request_success_total"):
        assert "jaxllm:" + name in text, name


def test_client_disconnect_aborts_the_request(base_url, model):
    auth = {"Authorization": f"Bearer {API_KEY}"}

    def metric(name: str) -> float:
        text = httpx.get(base_url + "/metrics", headers=auth).text
        return next(float(line.split()[-1]) for line in text.splitlines() if line.startswith(f"jaxllm:{name}{{"))

    body = {"model": model, "prompt": PROMPT, "max_tokens": 200, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", base_url + "/v1/completions", json=body, headers=auth, timeout=60) as r:
        for line in r.iter_lines():
            if line.startswith("data: "):
                break   # one chunk, then hang up
    time.sleep(1.0)
    generated = metric("generation_tokens_total")
    time.sleep(1.5)
    assert metric("generation_tokens_total") == generated   # the engine stopped generating for it
    # Engine gauges refresh on a step: run one small request, then nothing may be left running.
    httpx.post(base_url + "/v1/completions", json={"model": model, "prompt": "Hi", "max_tokens": 1},
               headers=auth, timeout=60)
    assert metric("num_requests_running") == 0 and metric("num_requests_waiting") == 0


def test_sigterm_exits_cleanly(server, base_url):
    proc, _, log_path = server
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(60) == 0, log_path.read_text()[-2000:]
