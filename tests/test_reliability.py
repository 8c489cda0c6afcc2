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
