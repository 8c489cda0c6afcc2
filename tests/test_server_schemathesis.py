"""Schemathesis against the server's own /openapi.json (over ASGI, fake engine): no input the schema
describes, valid or mutated, may produce a 5xx. A bounded number of examples per operation keeps it
to well under a minute on CI; raise JAXLLM_SCHEMATHESIS_EXAMPLES locally for a longer hunt."""

import os

import pytest

schemathesis = pytest.importorskip("schemathesis")

from hypothesis import HealthCheck, settings  # noqa: E402

from serving.server.app import build_app  # noqa: E402
from serving.server.args import ServerArgs  # noqa: E402
from tests.fakes.fake_async_llm import FakeAsyncLLM  # noqa: E402

MAX_EXAMPLES = int(os.environ.get("JAXLLM_SCHEMATHESIS_EXAMPLES", "20"))

# max_model_len bounds what the fake generates for a request without max_tokens, keeping each call fast.
app = build_app(FakeAsyncLLM(max_model_len=48), ServerArgs(disable_log_stats=True, disable_log_requests=True))
schema = schemathesis.openapi.from_asgi("/openapi.json", app)


@schema.parametrize()
@settings(max_examples=MAX_EXAMPLES, deadline=None, derandomize=True,
          suppress_health_check=list(HealthCheck))
def test_no_server_errors(case):
    response = case.call()
    assert response.status_code < 500, (case.method, case.path, case.body, response.status_code, response.text[:300])
    if response.status_code >= 400:
        # Every error, including schema validation failures, is the OpenAI envelope.
        body = response.json()
        assert set(body) == {"error"} and body["error"]["code"] == response.status_code, body
