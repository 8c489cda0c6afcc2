"""Reliability of a real `python -m serving serve` process with the embedded SmolLM2 model.

One module-scoped server (small bucket ladder, API key) takes, in order: a battery of bad requests,
the auth matrix, a soak (400 requests at concurrency 64, a third of the clients hanging up at random
points), and finally SIGTERM with requests in flight. A second server runs with the test-only fault
hook (JAXLLM_TEST_FAIL_AT_STEP) and must fail its requests readably, turn /health 503 and exit non-zero.
Both share an XLA compilation cache so the second start skips most compiling.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import pytest

from tests.server_helpers import sse_events

SERVER_FLAGS = ["--max-num-batched-tokens", "64", "--max-num-seqs", "16", "--token-buckets", "16,64",
                "--seq-buckets", "16", "--max-model-len", "256", "--kv-cache-memory", "64000000",
                "--disable-log-stats", "--disable-log-requests", "--uvicorn-log-level", "warning"]
API_KEY = "rel-key"
AUTH = {"Authorization": f"Bearer {API_KEY}"}
STARTUP_TIMEOUT_S = 300
CHAT = [{"role": "user", "content": "hi"}]

pytestmark = pytest.mark.timeout(900)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, tmp_path, extra_flags=(), env=None):
        self.port = _free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.log_path = tmp_path / f"server-{self.port}.log"
        repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        argv = [sys.executable, "-m", "serving", "serve", "--host", "127.0.0.1", "--port", str(self.port),
                *SERVER_FLAGS, *extra_flags]
        full_env = dict(os.environ, PYTHONPATH=repo + os.pathsep + os.environ.get("PYTHONPATH", ""), **(env or {}))
        full_env.pop("JAXLLM_API_KEY", None)
        self.log = open(self.log_path, "w")
        self.proc = subprocess.Popen(argv, stdout=self.log, stderr=subprocess.STDOUT, cwd=repo, env=full_env)

    def wait_healthy(self):
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"server exited with {self.proc.returncode}:\n{self.tail()}")
            try:
                if httpx.get(self.base + "/health", timeout=2).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.5)
        pytest.fail(f"server not healthy after {STARTUP_TIMEOUT_S}s:\n{self.tail()}")

    def tail(self) -> str:
        self.log.flush()
        return self.log_path.read_text()[-3000:]

    def stop(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.log.close()

    def metric(self, name: str) -> float:
        text = httpx.get(self.base + "/metrics", headers=AUTH, timeout=10).text
        return next(float(line.split()[-1]) for line in text.splitlines() if line.startswith(f"jaxllm:{name}{{"))


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("xla-cache"))


@pytest.fixture(scope="module")
def server(tmp_path_factory, cache_dir):
    s = Server(tmp_path_factory.mktemp("server"), ["--api-key", API_KEY, "--compilation-cache-dir", cache_dir])
    try:
        yield s.wait_healthy()
    finally:
        s.stop()


def _post(server, path, body, **kw):
    return httpx.post(server.base + path, json=body, headers=AUTH, timeout=60, **kw)


def _greedy(server, prompt, max_tokens=6):
    r = _post(server, "/v1/completions", {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0})
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["text"]


# (path, body, status, param): each must be refused before the engine sees it.
LONG = "word " * 300
BAD_REQUESTS = [
    ("/v1/completions", {"prompt": "a", "temperature": -1}, 400, "temperature"),
    ("/v1/completions", {"prompt": "a", "temperature": "hot"}, 400, "temperature"),
    ("/v1/completions", {"prompt": "a", "top_p": 0}, 400, "top_p"),
    ("/v1/completions", {"prompt": "a", "top_p": 1.5}, 400, "top_p"),
    ("/v1/completions", {"prompt": "a", "top_k": -7}, 400, "top_k"),
    ("/v1/completions", {"prompt": "a", "min_p": 2}, 400, "min_p"),
    ("/v1/completions", {"prompt": "a", "presence_penalty": 9}, 400, "presence_penalty"),
    ("/v1/completions", {"prompt": "a", "frequency_penalty": -9}, 400, "frequency_penalty"),
    ("/v1/completions", {"prompt": "a", "repetition_penalty": 0}, 400, "repetition_penalty"),
    ("/v1/completions", {"prompt": "a", "n": 0}, 400, "n"),
    ("/v1/completions", {"prompt": "a", "n": 10**9}, 400, "n"),
    ("/v1/completions", {"prompt": "a", "best_of": 10**6}, 400, "best_of"),
    ("/v1/completions", {"prompt": "a", "n": 3, "best_of": 2}, 400, "best_of"),
    ("/v1/completions", {"prompt": "a", "max_tokens": 0}, 400, "max_tokens"),
    ("/v1/completions", {"prompt": "a", "max_tokens": -1}, 400, "max_tokens"),
    ("/v1/completions", {"prompt": "a", "max_tokens": 100000}, 400, "max_tokens"),
    ("/v1/completions", {"prompt": LONG}, 400, "prompt"),
    ("/v1/completions", {"prompt": "a", "logprobs": 21}, 400, "logprobs"),
    ("/v1/completions", {"prompt": "a", "logprobs": -1}, 400, "logprobs"),
    ("/v1/completions", {"prompt": "a", "prompt_logprobs": 50}, 400, "prompt_logprobs"),
    ("/v1/completions", {"prompt": ""}, 400, "prompt"),
    ("/v1/completions", {"prompt": []}, 400, "prompt"),
    ("/v1/completions", {"prompt": [5, 10**7]}, 400, "prompt"),
    ("/v1/completions", {"prompt": [-3]}, 400, "prompt"),
    ("/v1/completions", {"prompt": ["a"] * 1000}, 400, "prompt"),
    ("/v1/completions", {"prompt": {"text": "a"}}, 400, "prompt"),
    ("/v1/completions", {}, 400, "prompt"),
    ("/v1/completions", {"prompt": "a", "logit_bias": {"99999999": 1}}, 400, "logit_bias"),
    ("/v1/completions", {"prompt": "a", "logit_bias": {"abc": 1}}, 400, "logit_bias"),
    ("/v1/completions", {"prompt": "a", "stop": [""]}, 400, "stop"),
    ("/v1/completions", {"prompt": "a", "stop": ["x"] * 65}, 400, "stop"),
    ("/v1/completions", {"prompt": "a", "stop": ["y" * 5000]}, 400, "stop"),
    ("/v1/completions", {"prompt": "a", "stop_token_ids": [10**8]}, 400, "stop_token_ids"),
    ("/v1/completions", {"prompt": "a", "allowed_token_ids": [10**8]}, 400, "allowed_token_ids"),
    ("/v1/completions", {"prompt": "a", "min_tokens": 50, "max_tokens": 5}, 400, "min_tokens"),
    ("/v1/completions", {"prompt": "a", "suffix": "z"}, 400, "suffix"),
    ("/v1/completions", {"prompt": "a", "model": "gpt-9"}, 404, "model"),
    ("/v1/chat/completions", {"messages": []}, 400, "messages"),
    ("/v1/chat/completions", {}, 400, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "wizard", "content": "x"}]}, 400, "messages"),
    ("/v1/chat/completions", {"messages": [{"content": "x"}]}, 400, "messages.0.role"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, 400, "messages"),
    ("/v1/chat/completions", {"messages": CHAT, "top_logprobs": 2}, 400, "top_logprobs"),
    ("/v1/chat/completions", {"messages": CHAT, "logprobs": True, "top_logprobs": 21}, 400, "logprobs"),
    ("/v1/chat/completions", {"messages": CHAT, "chat_template": "{{ 7 * 7 }}"}, 400, "chat_template"),
    ("/v1/chat/completions", {"messages": CHAT, "chat_template_kwargs": {"messages": []}}, 400,
     "chat_template_kwargs"),
    ("/v1/chat/completions", {"messages": CHAT, "chat_template_kwargs": {"__class__": 1}}, 400,
     "chat_template_kwargs"),
    ("/v1/chat/completions", {"messages": CHAT, "max_completion_tokens": 5000}, 400, "max_completion_tokens"),
    ("/v1/chat/completions", {"messages": CHAT, "response_format": {"type": "json_object"}}, 400, "response_format"),
    ("/v1/chat/completions", {"messages": CHAT, "tool_choice": "required"}, 400, "tool_choice"),
    ("/v1/chat/completions", {"messages": CHAT, "n": -1}, 400, "n"),
    ("/v1/chat/completions", {"messages": CHAT, "model": "x" * 10000}, 404, "model"),
    ("/v1/responses", {"input": ""}, 400, "input"),
    ("/v1/responses", {"input": "hi", "previous_response_id": "resp_1"}, 400, "previous_response_id"),
    ("/detokenize", {"tokens": [-1]}, 400, "tokens"),
    ("/detokenize", {"tokens": [10**9]}, 400, "tokens"),
    ("/tokenize", {}, 400, "prompt"),
    ("/tokenize", {"prompt": "a", "messages": CHAT}, 400, "prompt"),
]


def _check_envelope(r, status, param):
    assert r.status_code == status, (r.status_code, r.text[:300])
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    assert body["error"]["code"] == status and body["error"]["message"]
    assert len(r.content) < 2000   # never a big echo of the input
    if param is not ...:
        assert body["error"]["param"] == param, (body, param)


def test_bad_request_battery_then_still_correct(server):
    before = _greedy(server, "The capital of France is")
    generated = server.metric("generation_tokens_total")
    assert len(BAD_REQUESTS) >= 40
    failures = []
    for path, body, status, param in BAD_REQUESTS:
        t0 = time.monotonic()
        r = _post(server, path, body)
        try:
            _check_envelope(r, status, param)
            assert time.monotonic() - t0 < 1.0, "validation must be fast"
        except AssertionError as e:
            failures.append(f"{path} {str(body)[:80]}: {e}")
    raw = [(b"[1, 2]", 400), (b"{not json", 400), (b"\xff\xfe{}", 400), (b'{"prompt": ' + b"[" * 5000, 400),
           (b"null", 400), (b'"just a string"', 400)]
    for content, status in raw:
        r = httpx.post(server.base + "/v1/completions", content=content, timeout=30,
                       headers={**AUTH, "content-type": "application/json"})
        try:
            _check_envelope(r, status, ...)
        except AssertionError as e:
            failures.append(f"raw {content[:30]!r}: {e}")
    r = httpx.post(server.base + "/v1/completions", content=b"{" + b" " * (5 * 2**20) + b"}", timeout=30,
                   headers={**AUTH, "content-type": "application/json"})
    _check_envelope(r, 413, ...)
    assert not failures, "\n".join(failures)
    assert server.metric("generation_tokens_total") == generated   # nothing reached the engine
    assert _greedy(server, "The capital of France is") == before
    assert httpx.get(server.base + "/health").status_code == 200


ROUTES = [("GET", "/v1/models"), ("POST", "/v1/completions"), ("POST", "/v1/chat/completions"),
          ("POST", "/v1/responses"), ("POST", "/tokenize"), ("POST", "/detokenize"), ("GET", "/metrics"),
          ("GET", "/version"), ("GET", "/openapi.json"), ("GET", "/docs"), ("GET", "/redoc"),
          ("GET", "/no/such/route")]


def test_auth_matrix_every_route(server):
    body = {"prompt": "a", "messages": CHAT, "input": "a", "tokens": [100], "max_tokens": 1, "max_output_tokens": 1}
    attempts = {"no key": {}, "wrong key": {"Authorization": "Bearer nope"},
                "wrong case": {"Authorization": f"Bearer {API_KEY.upper()}"},
                "forged host": {"Host": "localhost", "X-Forwarded-Host": "127.0.0.1", "X-Forwarded-For": "127.0.0.1"},
                "key without scheme": {"Authorization": API_KEY}}
    with httpx.Client(timeout=30) as client:
        for method, path in ROUTES:
            for what, headers in attempts.items():
                r = client.request(method, server.base + path, headers=headers,
                                   json=body if method == "POST" else None)
                assert r.status_code == 401, (method, path, what, r.status_code)
                assert r.json()["error"]["code"] == 401 and r.headers["www-authenticate"] == "Bearer"
            r = client.request(method, server.base + path, headers=AUTH, json=body if method == "POST" else None)
            assert r.status_code != 401, (method, path)
        assert client.get(server.base + "/health").status_code == 200


# ----------------------------------------------------------------------------------------------- soak
SOAK_PROMPTS = ["The capital of France is", "One, two, three,", "def add(a, b):", "The quick brown fox",
                "Water boils at", "My favourite colour is", "import numpy as", "Once upon a time"]
SOAK_REQUESTS = 400
SOAK_CONCURRENCY = 64
SOAK_MAX_TOKENS = 6


def test_soak_with_disconnects(server):
    expected = {p: _greedy(server, p, SOAK_MAX_TOKENS) for p in SOAK_PROMPTS}   # single-request outputs
    rng = random.Random(1234)
    plan = [(rng.choice(SOAK_PROMPTS), rng.random() < 0.5, i % 3 == 0, rng.random()) for i in range(SOAK_REQUESTS)]
    statuses, mismatches, completed, hung_up = [], [], [0], [0]

    async def one(client, sem, prompt, stream, disconnect, when):
        body = {"prompt": prompt, "max_tokens": SOAK_MAX_TOKENS, "temperature": 0, "stream": stream}
        async with sem:
            if disconnect and stream:
                # Hang up after a random number of chunks (0 = right after the headers).
                async with client.stream("POST", "/v1/completions", json=body) as r:
                    statuses.append(r.status_code)
                    chunks = int(when * SOAK_MAX_TOKENS)
                    async for line in r.aiter_lines():
                        if chunks <= 0:
                            break
                        if line.startswith("data: "):
                            chunks -= 1
                hung_up[0] += 1
                return
            if disconnect:
                # Non-streaming: give up after a random time while queued or running.
                try:
                    r = await asyncio.wait_for(client.post("/v1/completions", json=body), timeout=0.05 + when * 1.5)
                except asyncio.TimeoutError:
                    hung_up[0] += 1
                    return
            else:
                r = await client.post("/v1/completions", json=body)
            statuses.append(r.status_code)
            if r.status_code != 200:
                return
            if stream:
                events = sse_events(r.text)
                assert events[-1] == "[DONE]"
                text = "".join(e["choices"][0]["text"] for e in events[:-1] if e.get("choices"))
            else:
                text = r.json()["choices"][0]["text"]
            completed[0] += 1
            if text != expected[prompt]:
                mismatches.append((prompt, text, expected[prompt]))

    async def run():
        sem = asyncio.Semaphore(SOAK_CONCURRENCY)
        limits = httpx.Limits(max_connections=SOAK_CONCURRENCY + 8, max_keepalive_connections=SOAK_CONCURRENCY)
        async with httpx.AsyncClient(base_url=server.base, headers=AUTH, timeout=300, limits=limits) as client:
            await asyncio.gather(*[one(client, sem, *p) for p in plan])

    t0 = time.monotonic()
    asyncio.run(run())
    elapsed = time.monotonic() - t0
    assert not [s for s in statuses if s >= 500], sorted(set(statuses))
    assert set(statuses) <= {200}, sorted(set(statuses))
    assert not mismatches, mismatches[:5]
    assert completed[0] >= SOAK_REQUESTS // 2 and hung_up[0] > 0, (completed, hung_up)
    # Everything returns to idle: no request left running or waiting, every KV page back in the pool.
    deadline = time.monotonic() + 20
    while True:
        gauges = [server.metric(n) for n in ("num_requests_running", "num_requests_waiting", "kv_cache_usage_perc")]
        if gauges == [0.0, 0.0, 0.0]:
            break
        assert time.monotonic() < deadline, f"not idle after the soak: running, waiting, kv usage = {gauges}"
        time.sleep(0.25)
    print(f"soak: {SOAK_REQUESTS} requests in {elapsed:.1f}s, {completed[0]} completed, {hung_up[0]} hung up")
    assert _greedy(server, SOAK_PROMPTS[0], SOAK_MAX_TOKENS) == expected[SOAK_PROMPTS[0]]


# ---------------------------------------------------------------------------------------- shutdown
def test_sigterm_drains_in_flight_and_refuses_new(server):
    """Last in the module: it stops the shared server."""
    results = []

    def in_flight(i):
        body = {"prompt": SOAK_PROMPTS[i], "max_tokens": 40, "ignore_eos": True, "temperature": 0,
                "stream": i % 2 == 0}
        r = httpx.post(server.base + "/v1/completions", json=body, headers=AUTH, timeout=120)
        results.append((r.status_code, r.text))

    threads = [threading.Thread(target=in_flight, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 30
    # All four accepted (running, waiting or already answered) before the signal: one still on
    # its way to the server when SIGTERM lands would rightly be refused.
    while (server.metric("num_requests_running") < 1 or server.metric("num_requests_running")
           + server.metric("num_requests_waiting") + len(results) < 4):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    server.proc.send_signal(signal.SIGTERM)
    time.sleep(0.3)
    r = httpx.post(server.base + "/v1/completions", json={"prompt": "Hi", "max_tokens": 1}, headers=AUTH, timeout=30)
    assert r.status_code == 503 and r.headers["retry-after"] and r.json()["error"]["code"] == 503
    assert httpx.get(server.base + "/health", timeout=10).status_code == 503
    for t in threads:
        t.join(120)
    assert len(results) == 4 and all(status == 200 for status, _ in results), results
    for status, text in results:
        if text.startswith("data: "):
            events = sse_events(text)
            assert events[-1] == "[DONE]" and all("error" not in e for e in events[:-1])
            assert events[-2]["choices"][0]["finish_reason"] == "length"
        else:
            assert '"finish_reason":"length"' in text.replace(" ", "")
    assert server.proc.wait(60) == 0, server.tail()


# -------------------------------------------------------------------------------------- engine fault
def test_engine_failure_fails_requests_turns_health_503_and_exits_nonzero(tmp_path, cache_dir):
    # The first steps serve the warm-up check below; step 12 fails while several requests are in it.
    s = Server(tmp_path, ["--compilation-cache-dir", cache_dir], env={"JAXLLM_TEST_FAIL_AT_STEP": "12"})
    try:
        s.wait_healthy()
        warm = httpx.post(s.base + "/v1/completions", json={"prompt": "Hi", "max_tokens": 2}, timeout=60)
        assert warm.status_code == 200
        results = []

        def call(stream):
            body = {"prompt": "Tell me a story", "max_tokens": 100, "ignore_eos": True, "stream": stream}
            try:
                r = httpx.post(s.base + "/v1/completions", json=body, timeout=60)
                results.append((stream, r.status_code, r.text))
            except httpx.TransportError as e:   # only acceptable if the process was already gone
                results.append((stream, None, repr(e)))

        # 20 requests on 16 sequences: some run in the failing step, some still wait in the queue.
        threads = [threading.Thread(target=call, args=(i % 2 == 0,)) for i in range(20)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(90)
            assert not t.is_alive(), "a request hung after the engine failed"
        assert len(results) == 20
        for stream, status, text in results:
            if stream and status == 200:
                events = sse_events(text)
                assert events[-1] == "[DONE]" and events[-2]["error"]["code"] == 500, text[-300:]
            else:
                assert status in (500, 503), (stream, status, text[:300])
                assert '"error"' in text
        try:   # /health fails readiness until the process is gone
            assert httpx.get(s.base + "/health", timeout=5).status_code == 503
        except httpx.TransportError:
            pass   # already exited
        assert s.proc.wait(60) == 1, s.tail()
        assert "injected failure" in s.tail()
    finally:
        s.stop()
