"""Shared helpers for the HTTP server tests (fake engine app, SSE parsing)."""

from __future__ import annotations

import json

from fastapi.testclient import TestClient

from serving.server.app import build_app
from serving.server.args import ServerArgs
from tests.fakes.fake_async_llm import FakeAsyncLLM


def make_client(engine: FakeAsyncLLM | None = None, **server_args) -> tuple[TestClient, FakeAsyncLLM]:
    engine = engine or FakeAsyncLLM()
    server_args.setdefault("disable_log_stats", True)
    return TestClient(build_app(engine, ServerArgs(**server_args))), engine


def sse_events(text: str) -> list:
    """`data:` payloads of an SSE body, JSON-decoded except the final "[DONE]"."""
    events = []
    for block in text.split("\n\n"):
        data = [line[len("data: "):] for line in block.split("\n") if line.startswith("data: ")]
        if data:
            payload = "\n".join(data)
            events.append(payload if payload == "[DONE]" else json.loads(payload))
    return events


def assert_envelope(response, status: int, param=...):
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"}, body
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"}, err
    assert err["code"] == status and isinstance(err["message"], str) and err["message"]
    if param is not ...:
        assert err["param"] == param, err
    return err
