"""`jaxllm bench serve` against a small in-process fake OpenAI server that streams SSE on a schedule.

The fake answers a prompt containing FAIL with HTTP 500 and one containing MIDERR with an error
event after its first chunk; every other request gets ``max_tokens`` one-word chunks, the first after
FIRST_DELAY seconds and then one every GAP seconds, plus a usage chunk and [DONE].
"""

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from serving.bench.cli import main as bench_main
from serving.bench.datasets import SampleRequest
from serving.bench.metrics import compute_metrics
from serving.bench.serve import ServeConfig, run_serve_benchmark

FIRST_DELAY = 0.06
GAP = 0.02


class _FakeOpenAI(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True     # each chunk leaves when written, so client-side gaps are GAP
    seen: list = []

    def log_message(self, *args):   # keep pytest output clean
        pass

    def _json(self, status, obj):
        body = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        if self.path == "/v1/models":
            self._json(200, {"object": "list", "data": [{"id": "fake-model", "object": "model"}]})
        else:
            self._json(404, {"error": {"message": "not found"}})

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).seen.append((self.path, body))
        chat = self.path == "/v1/chat/completions"
        prompt = body["messages"][0]["content"] if chat else body["prompt"]
        prompt = prompt if isinstance(prompt, str) else " ".join(map(str, prompt))
        if "FAIL" in prompt:
            self._json(500, {"error": {"message": "injected failure"}})
            return
        n = body.get("max_completion_tokens" if chat else "max_tokens") or 16
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()

        def send(obj):
            data = f"data: {obj if isinstance(obj, str) else json.dumps(obj)}\n\n".encode()
            self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
            self.wfile.flush()

        time.sleep(FIRST_DELAY)
        for i in range(n):
            if i:
                time.sleep(GAP)
            if chat:
                send({"choices": [{"index": 0, "delta": {"content": "word "}}]})
            else:
                send({"choices": [{"index": 0, "text": "word "}]})
            if "MIDERR" in prompt:
                send({"error": {"message": "engine died", "code": 500}})
                break
        else:
            send({"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": n, "total_tokens": n + 3}})
            send("[DONE]")
        self.wfile.write(b"0\r\n\r\n")
        self.wfile.flush()


@pytest.fixture(scope="module")
def fake_server():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _FakeOpenAI)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def _req(text, out):
    return SampleRequest(text, list(range(len(text.split()))), out)


@pytest.mark.parametrize("endpoint", ["/v1/completions", "/v1/chat/completions"])
def test_timings_and_failures_are_counted(fake_server, endpoint):
    reqs = [_req("a b c", 5), _req("FAIL here", 5), _req("d e", 3), _req("MIDERR x", 5), _req("f", 1)]
    cfg = ServeConfig(base_url=fake_server, model="fake-model", endpoint=endpoint, max_concurrency=2)
    results, duration = run_serve_benchmark(reqs, cfg, progress=False)
    assert [r.success for r in results] == [True, False, True, False, True]
    assert "HTTP 500" in results[1].error and "injected failure" in results[1].error
    assert "engine died" in results[3].error
    ok = results[0]
    assert ok.output_tokens == 5 and ok.generated_text == "word " * 5 and len(ok.itl) == 4
    assert FIRST_DELAY <= ok.ttft < FIRST_DELAY + 0.5
    assert all(GAP * 0.8 <= g < GAP + 0.3 for g in ok.itl)
    assert ok.latency >= ok.ttft + sum(ok.itl) - 1e-6
    m = compute_metrics(results, duration)
    assert (m.completed, m.failed) == (3, 2)
    assert m.total_output_tokens == 5 + 3 + 1
    assert m.total_input_tokens == 3 + 2 + 1
    assert m.peak_concurrent_requests <= 2
    assert len(m.errors) == 2


def test_payload_shape(fake_server):
    _FakeOpenAI.seen.clear()
    cfg = ServeConfig(base_url=fake_server, model="m", ignore_eos=True)
    run_serve_benchmark([SampleRequest(None, [5, 6, 7], 2)], cfg, progress=False, initial_test=False)
    path, body = _FakeOpenAI.seen[-1]
    assert path == "/v1/completions"
    assert body["prompt"] == [5, 6, 7] and body["max_tokens"] == 2 and body["ignore_eos"] is True
    assert body["stream"] is True and body["stream_options"] == {"include_usage": True}


def test_initial_test_failure_stops_the_run(fake_server):
    cfg = ServeConfig(base_url=fake_server, model="m")
    with pytest.raises(ValueError, match="initial test request"):
        run_serve_benchmark([_req("FAIL", 3), _req("ok", 3)], cfg, progress=False)


def test_unreachable_server_counts_failures():
    cfg = ServeConfig(base_url="http://127.0.0.1:9", model="m")     # discard port: connection refused
    results, _ = run_serve_benchmark([_req("a", 2), _req("b", 2)], cfg, progress=False, initial_test=False)
    assert [r.success for r in results] == [False, False] and all(r.error for r in results)


def test_bench_serve_cli_end_to_end(fake_server, tmp_path, capsys):
    data = tmp_path / "prompts.jsonl"
    data.write_text("".join(json.dumps({"prompt_token_ids": [i + 1, i + 2], "output_len": 4}) + "\n"
                            for i in range(6)))
    rc = bench_main(["serve", "--base-url", fake_server, "--tokenizer", "none", "--vocab-size", "100",
                     "--dataset-name", "custom", "--dataset-path", str(data), "--num-prompts", "6",
                     "--request-rate", "50,inf", "--max-concurrency", "3", "--goodput", "ttft:1000", "tpot:500",
                     "--save-result", "--result-dir", str(tmp_path), "--metadata", "device=fake",
                     "--plot", "--disable-tqdm"])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert out.count("============ Serving Benchmark Result ============") == 2
    assert "Successful requests:                     6" in out
    assert "Request goodput (req/s):" in out and "Mean E2EL (ms):" in out
    saved = sorted(tmp_path.glob("*-fake-serve-custom-*qps.json"))
    assert [p.name.split("-custom-")[1] for p in saved] == ["50qps.json", "infqps.json"]
    result = json.loads(saved[1].read_text())
    assert result["benchmark"] == "serve" and result["environment"]["device"] == "fake"
    assert result["environment"]["commit"]
    r = result["results"]
    assert r["completed"] == 6 and r["failed"] == 0 and r["total_output_tokens"] == 24
    assert r["mean_ttft_ms"] >= FIRST_DELAY * 1000 and r["request_goodput"] > 0
    assert len(result["requests"]["ttfts"]) == 6
    assert result["config"]["model"] == "fake-model"                 # from GET /v1/models
    pngs = {p.name.rsplit("-", 1)[-1] for p in tmp_path.glob("*.png")}
    assert pngs == {"50qps.png", "infqps.png", "sweep.png"}


def test_bench_serve_cli_usage_errors(fake_server, capsys):
    assert bench_main(["serve", "--base-url", fake_server, "--goodput", "foo:1"]) == 2
    assert "--goodput" in capsys.readouterr().err
    assert bench_main(["serve", "--request-rate", "0"]) == 2


def test_chunk_text_counts_tokens_that_stream_no_text():
    from serving.bench.serve import _chunk_text

    assert _chunk_text({"choices": [{"text": "hi", "finish_reason": None}]}, False) == "hi"
    # A server without a tokenizer (dummy weights) streams one empty-text chunk per token.
    assert _chunk_text({"choices": [{"text": "", "finish_reason": None}]}, False) == ""
    assert _chunk_text({"choices": [{"text": "", "finish_reason": "length"}]}, False) is None
    assert _chunk_text({"choices": [], "usage": {"completion_tokens": 3}}, False) is None
    assert _chunk_text({"choices": [{"delta": {"role": "assistant", "content": ""}}]}, True) is None
    assert _chunk_text({"choices": [{"delta": {"content": ""}, "finish_reason": None}]}, True) == ""
    assert _chunk_text({"choices": [{"delta": {"content": "x"}}]}, True) == "x"
