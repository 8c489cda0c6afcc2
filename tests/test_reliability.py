"""Reliability against a real uvicorn server (in a thread) on the fake engine: header limits over a raw
socket, overload (bounded queue -> 503 + Retry-After), per-request deadlines, SIGTERM-style drain."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import threading
import time

import httpx
import pytest

from serving.cli import uvicorn_config
from serving.server.app import build_app
from serving.server.args import ServerArgs
from tests.fakes.fake_async_llm import FakeAsyncLLM
from tests.server_helpers import assert_envelope, sse_events

pytestmark = pytest.mark.timeout(120)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def serve(engine: FakeAsyncLLM | None = None, **server_args):
    """A real uvicorn server (same config as `jaxllm serve`) on a free port, in a thread."""
    import uvicorn

    engine = engine or FakeAsyncLLM()
    args = ServerArgs(host="127.0.0.1", port=_free_port(), disable_log_stats=True, disable_log_requests=True,
                      uvicorn_log_level="warning", **server_args)
    app = build_app(engine, args)
    server = uvicorn.Server(uvicorn_config(app, args))
    app.state.request_shutdown = lambda: setattr(server, "should_exit", True)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "uvicorn did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{args.port}", app, engine, server
    finally:
        server.should_exit = True
        thread.join(20)


def _raw_request(port: int, head: bytes, body: bytes = b"") -> tuple[int, dict]:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(head + body)
        data = b""
        while True:
            try:
                chunk = s.recv(65536)
            except ConnectionResetError:
                break
            if not chunk:
                break
            data += chunk
    head_part, _, payload = data.partition(b"\r\n\r\n")
    status = int(head_part.split(b" ", 2)[1])
    return status, json.loads(payload) if payload else {}


@pytest.fixture(scope="module")
def server():
    with serve(max_header_bytes=4096) as s:
        yield s


def test_oversized_headers_are_431_over_a_raw_socket(server):
    base, *_ = server
    port = int(base.rsplit(":", 1)[1])
    ok = b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\nX-Pad: " + b"a" * 1000 + b"\r\n\r\n"
    assert _raw_request(port, ok)[0] == 200
    # Headers trickled in past h11's buffer limit: refused by the protocol layer.
    huge = b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n" + b"".join(b"X-H%d: %s\r\n" % (i, b"b" * 500) for i in range(40))
    status, body = _raw_request(port, huge)   # never terminated: the server must not wait for the end
    assert status == 431 and body["error"]["code"] == 431 and body["error"]["type"] == "RequestHeaderFieldsTooLargeError"
    # Complete but over the limit (one write): refused by the middleware, same envelope.
    status, body = _raw_request(port, huge + b"\r\n")
    assert status == 431 and body["error"]["code"] == 431
    # A long URL counts too.
    status, _ = _raw_request(port, b"GET /health?" + b"q" * 6000 + b" HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert status == 431
    # Garbage is a 400 with the envelope, not uvicorn's plain text.
    status, body = _raw_request(port, b"NOT HTTP AT ALL\r\n\r\n")
    assert status == 400 and body["error"]["code"] == 400
    assert httpx.get(base + "/health").status_code == 200


def _complete(client: httpx.AsyncClient, base: str, **body):
    return client.post(base + "/v1/completions", json={"prompt": "abc", "max_tokens": 2, **body}, timeout=30)


def test_bounded_queue_rejects_with_503_and_retry_after():
    engine = FakeAsyncLLM(step_delay=0.3)   # nothing starts (first output) for 0.3 s: all arrivals queue
    with serve(engine, max_queued_requests=3) as (base, app, _, _):
        async def burst():
            async with httpx.AsyncClient() as client:
                return await asyncio.gather(*[_complete(client, base) for _ in range(8)])

        responses = asyncio.run(burst())
        assert sorted(r.status_code for r in responses) == [200] * 3 + [503] * 5
        for r in responses:
            if r.status_code == 503:
                err = assert_envelope(r, 503)
                assert r.headers["retry-after"] == "1" and "overloaded" in err["message"]
            else:
                assert r.json()["choices"][0]["text"] == "ab"
        lifecycle = app.state.lifecycle
        assert lifecycle.queued == 0 and lifecycle.in_flight == 0 and lifecycle.rejected == 5
        assert len(engine.requests) == 3                   # the refused ones never reached the engine
        assert httpx.post(base + "/v1/completions", json={"prompt": "abc", "max_tokens": 2}).status_code == 200


def test_request_timeout_aborts_with_a_readable_error():
    engine = FakeAsyncLLM(step_delay=0.05)
    with serve(engine, request_timeout=0.4) as (base, app, _, _):
        t0 = time.monotonic()
        r = httpx.post(base + "/v1/completions", json={"prompt": "abc", "max_tokens": 100}, timeout=30)
        assert time.monotonic() - t0 < 2.0
        err = assert_envelope(r, 504)
        assert "0.4 s" in err["message"]
        r = httpx.post(base + "/v1/chat/completions", timeout=30,
                       json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 100, "stream": True})
        assert r.status_code == 200
        events = sse_events(r.text)
        assert events[-1] == "[DONE]" and events[-2]["error"]["code"] == 504
        assert 2 <= len(events) - 2 <= 12          # some tokens streamed before the deadline
        assert len(engine.aborted) == 2 and not engine.running
        assert app.state.lifecycle.queued == 0
        # Within the deadline nothing changes.
        assert httpx.post(base + "/v1/completions", json={"prompt": "abc", "max_tokens": 3}).json()[
            "choices"][0]["text"] == "abc"


def test_drain_finishes_in_flight_requests_and_refuses_new_ones():
    engine = FakeAsyncLLM(step_delay=0.05)
    with serve(engine, shutdown_timeout=10) as (base, app, _, server):
        lifecycle = app.state.lifecycle
        result = {}

        def long_stream():
            r = httpx.post(base + "/v1/completions", json={"prompt": "abc", "max_tokens": 20, "stream": True},
                           timeout=30)
            result["events"] = sse_events(r.text)

        thread = threading.Thread(target=long_stream)
        thread.start()
        while not engine.running:
            time.sleep(0.01)
        assert lifecycle.begin_drain() and not lifecycle.begin_drain()   # what SIGTERM calls; once
        r = httpx.post(base + "/v1/completions", json={"prompt": "abc", "max_tokens": 2})
        assert_envelope(r, 503)
        assert r.headers["retry-after"] == "5"
        assert httpx.get(base + "/health").status_code == 503
        assert httpx.get(base + "/metrics").status_code == 200          # still scrapeable while draining
        assert not server.should_exit                                   # the stream is still running
        thread.join(20)
        events = result["events"]
        assert events[-1] == "[DONE]" and "".join(e["choices"][0]["text"] for e in events[:-1]) == "abcabcabcabcabcabcab"
        deadline = time.monotonic() + 5
        while not server.should_exit:
            assert time.monotonic() < deadline, "the server was not asked to stop after the drain"
            time.sleep(0.02)
        assert not engine.aborted


def test_drain_is_bounded_by_the_shutdown_timeout():
    engine = FakeAsyncLLM(step_delay=0.05)
    with serve(engine, shutdown_timeout=0.3) as (base, app, _, server):
        def cut_off_stream():
            with pytest.raises(httpx.RemoteProtocolError):   # the server closes it mid-stream
                httpx.post(base + "/v1/completions", json={"prompt": "abc", "max_tokens": 100, "stream": True},
                           timeout=30)

        thread = threading.Thread(target=cut_off_stream)
        thread.start()
        while not engine.running:
            time.sleep(0.01)
        t0 = time.monotonic()
        app.state.lifecycle.begin_drain()
        while not server.should_exit:
            assert time.monotonic() - t0 < 3
            time.sleep(0.02)
        assert time.monotonic() - t0 >= 0.25
        thread.join(20)
    assert engine.aborted   # the cut-off request was aborted in the engine when uvicorn cancelled it


def test_new_server_flags():
    from serving.cli import parse_serve_args

    _, args = parse_serve_args(["--max-header-bytes", "8KiB", "--max-queued-requests", "32", "--request-timeout",
                                "2.5", "--shutdown-timeout", "5"])
    assert (args.max_header_bytes, args.max_queued_requests, args.request_timeout, args.shutdown_timeout) == (
        8192, 32, 2.5, 5.0)
    for bad in (["--max-queued-requests", "0"], ["--request-timeout", "0"], ["--shutdown-timeout", "-1"]):
        with pytest.raises(Exception):
            parse_serve_args(bad)


def test_request_chat_templates_sandboxed_and_time_bounded():
    chat = [{"role": "user", "content": "hi"}]
    with serve(FakeAsyncLLM(), trust_request_chat_template=True) as (base, _, engine, _):
        def chat_call(**body):
            return httpx.post(base + "/v1/chat/completions", json={"messages": chat, "max_tokens": 2, **body},
                              timeout=30)

        r = chat_call(chat_template="{{ messages[0]['content'] | upper }}{{ enable_thinking }}",
                      chat_template_kwargs={"enable_thinking": True})
        assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == "HI"
        assert_envelope(chat_call(chat_template_kwargs={"add_generation_prompt": False}), 400, "chat_template_kwargs")
        # The immutable sandbox: no attribute walks to Python internals, no mutation of server objects.
        for template in ("{{ ''.__class__.__mro__[1].__subclasses__() }}", "{{ messages.append(1) }}",
                         "{% for i in range(10**9) %}{% endfor %}"):
            assert_envelope(chat_call(chat_template=template), 400, "messages")
        # A runaway template is cut at its time limit, and meanwhile the server keeps answering others.
        before = len(engine.requests)
        result = {}
        runaway = "{% for i in range(90000) %}{% for j in range(90000) %}{% endfor %}{% endfor %}"
        thread = threading.Thread(target=lambda: result.update(r=chat_call(chat_template=runaway)))
        t0 = time.monotonic()
        thread.start()
        time.sleep(0.3)
        t1 = time.monotonic()
        assert httpx.get(base + "/health", timeout=10).status_code == 200
        assert time.monotonic() - t1 < 2.0, "a rendering template blocked the event loop"
        thread.join(30)
        err = assert_envelope(result["r"], 400, "messages")
        assert "time limit" in err["message"] and time.monotonic() - t0 < 15
        assert len(engine.requests) == before
