"""`jaxllm bench serve`: an async load generator against any OpenAI-compatible server.

Requests are sent on a Poisson schedule (``request_rate`` per second; ``burstiness`` is the shape of
the gamma distribution of the gaps: 1 = Poisson, < 1 burstier, > 1 more uniform; ``inf`` sends them
all at once), at most ``max_concurrency`` in flight. Every request streams, so the client times each
output-carrying chunk itself (TTFT, ITL) and takes the output token count from the final usage chunk
(``stream_options.include_usage``), or counts tokens of the text when the server sends no usage.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import math
import time
from typing import Callable, Optional, Sequence

import numpy as np

from serving.bench.datasets import SampleRequest
from serving.bench.metrics import RequestResult

ENDPOINTS = ("/v1/completions", "/v1/chat/completions")


@dataclasses.dataclass(frozen=True)
class ServeConfig:
    base_url: str
    model: str
    endpoint: str = "/v1/completions"
    request_rate: float = math.inf
    burstiness: float = 1.0
    max_concurrency: Optional[int] = None
    ignore_eos: bool = False
    temperature: float = 0.0
    api_key: Optional[str] = None
    request_timeout_s: float = 6 * 3600.0
    extra_body: dict = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        if self.endpoint not in ENDPOINTS:
            raise ValueError(f"endpoint must be one of {', '.join(ENDPOINTS)}; got {self.endpoint!r}")
        if not (self.request_rate > 0):
            raise ValueError(f"request-rate must be positive (or inf), got {self.request_rate}")
        if not (self.burstiness > 0) or math.isinf(self.burstiness):
            raise ValueError(f"burstiness must be a positive finite number, got {self.burstiness}")
        if self.max_concurrency is not None and self.max_concurrency < 1:
            raise ValueError(f"max-concurrency must be at least 1, got {self.max_concurrency}")
        if not self.base_url.startswith(("http://", "https://")):
            raise ValueError(f"base-url must start with http:// or https://, got {self.base_url!r}")

    @property
    def url(self) -> str:
        return self.base_url.rstrip("/") + self.endpoint

    @property
    def is_chat(self) -> bool:
        return self.endpoint == "/v1/chat/completions"


def arrival_gaps(num: int, request_rate: float, burstiness: float, seed: int) -> np.ndarray:
    """Seconds to wait before each request: gamma(shape=burstiness, mean=1/rate), zeros at rate inf."""
    if math.isinf(request_rate):
        return np.zeros(num)
    rng = np.random.default_rng(seed)
    return rng.gamma(shape=burstiness, scale=1.0 / (request_rate * burstiness), size=num)


def build_payload(cfg: ServeConfig, req: SampleRequest) -> dict:
    body: dict = {"model": cfg.model, "stream": True, "stream_options": {"include_usage": True},
                  "temperature": cfg.temperature}
    if cfg.is_chat:
        if req.prompt is None:
            raise ValueError("the chat endpoint needs text prompts; give --tokenizer (or use /v1/completions)")
        body["messages"] = [{"role": "user", "content": req.prompt}]
        body["max_completion_tokens"] = req.expected_output_len
    else:
        # A token-id list is a valid OpenAI completions prompt: the only choice without a tokenizer.
        body["prompt"] = req.prompt if req.prompt is not None else list(req.prompt_token_ids)
        body["max_tokens"] = req.expected_output_len
    if cfg.ignore_eos:
        body["ignore_eos"] = True      # vLLM's (and jaxllm's) extension: exactly max_tokens tokens
    body.update(cfg.extra_body)
    return body


def _chunk_text(chunk: dict, is_chat: bool) -> Optional[str]:
    """The chunk's text, "" for a token that streamed no text (a server without a tokenizer, e.g.
    dummy weights), or None when the chunk carries no token (role-only, usage-only, finish-only)."""
    choices = chunk.get("choices") or []
    if not choices:
        return None
    choice = choices[0]
    if is_chat:
        delta = choice.get("delta") or {}
        text = delta.get("content") or delta.get("reasoning_content") or delta.get("content")
        has_field = "content" in delta and delta.get("role") is None
    else:
        text = choice.get("text")
        has_field = "text" in choice
    if text:
        return text
    return "" if has_field and text is not None and choice.get("finish_reason") is None else None


async def send_request(client, cfg: ServeConfig, req: SampleRequest,
                       count_tokens: Optional[Callable[[str], int]] = None) -> RequestResult:
    """One streamed request, timed; never raises (a failure is a RequestResult with success=False)."""
    result = RequestResult(success=False, prompt_len=req.prompt_len)
    headers = {"Authorization": f"Bearer {cfg.api_key}"} if cfg.api_key else {}
    start = time.perf_counter()
    result.start_time = start
    last = start
    text_parts: list[str] = []
    usage_tokens = None
    num_chunks = 0
    done = False
    try:
        payload = build_payload(cfg, req)
        async with client.stream("POST", cfg.url, json=payload, headers=headers,
                                 timeout=cfg.request_timeout_s) as resp:
            if resp.status_code != 200:
                body = (await resp.aread()).decode("utf-8", "replace")
                result.error = f"HTTP {resp.status_code}: {body[:500]}"
                result.latency = time.perf_counter() - start
                return result
            async for line in resp.aiter_lines():
                line = line.strip()
                if not line or line.startswith(":"):
                    continue                          # SSE keep-alive / comment
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    done = True
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    err = chunk["error"]
                    result.error = f"error event: {err.get('message', err) if isinstance(err, dict) else err}"
                    result.latency = time.perf_counter() - start
                    return result
                now = time.perf_counter()
                text = _chunk_text(chunk, cfg.is_chat)
                if text is not None:
                    if num_chunks == 0:
                        result.ttft = now - start
                    else:
                        result.itl.append(now - last)
                    last = now
                    num_chunks += 1
                    text_parts.append(text)
                usage = chunk.get("usage")
                if usage and usage.get("completion_tokens") is not None:
                    usage_tokens = int(usage["completion_tokens"])
        result.latency = time.perf_counter() - start
    except Exception as e:   # noqa: BLE001 - any transport or protocol failure is a failed request
        result.latency = time.perf_counter() - start
        result.error = f"{type(e).__name__}: {e}"
        return result
    result.generated_text = "".join(text_parts)
    if not done:
        result.error = "the stream ended without [DONE]"
    elif num_chunks == 0:
        result.error = "the response carried no output"
    else:
        result.success = True
        if usage_tokens is not None:
            result.output_tokens = usage_tokens
        elif count_tokens is not None:
            result.output_tokens = count_tokens(result.generated_text)
        else:
            result.output_tokens = num_chunks
    return result


async def run_load(requests: Sequence[SampleRequest], cfg: ServeConfig, *, seed: int = 0,
                   count_tokens: Optional[Callable[[str], int]] = None,
                   progress: bool = True) -> tuple[list[RequestResult], float]:
    """All requests on the arrival schedule; returns (results in request order, duration in s)."""
    import httpx
    from tqdm.auto import tqdm

    gaps = arrival_gaps(len(requests), cfg.request_rate, cfg.burstiness, seed)
    sem = asyncio.Semaphore(cfg.max_concurrency) if cfg.max_concurrency else None
    bar = tqdm(total=len(requests), desc="Requests", disable=not progress)
    limits = httpx.Limits(max_connections=cfg.max_concurrency or len(requests) or 1,
                          max_keepalive_connections=cfg.max_concurrency or len(requests) or 1)

    async with httpx.AsyncClient(limits=limits, timeout=cfg.request_timeout_s) as client:
        async def one(req: SampleRequest) -> RequestResult:
            if sem is None:
                res = await send_request(client, cfg, req, count_tokens)
            else:
                async with sem:
                    res = await send_request(client, cfg, req, count_tokens)
            bar.update(1)
            return res

        start = time.perf_counter()
        tasks = []
        for req, gap in zip(requests, gaps):
            if gap > 0:
                await asyncio.sleep(float(gap))
            tasks.append(asyncio.create_task(one(req)))
        results = await asyncio.gather(*tasks)
        duration = time.perf_counter() - start
    bar.close()
    return list(results), duration


async def first_model_id(base_url: str, api_key: Optional[str] = None, timeout_s: float = 30.0) -> str:
    """The first model the server lists (GET /v1/models), for a run without --model."""
    import httpx

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    async with httpx.AsyncClient(timeout=timeout_s) as client:
        try:
            resp = await client.get(base_url.rstrip("/") + "/v1/models", headers=headers)
        except httpx.HTTPError as e:
            raise ValueError(f"cannot reach {base_url}: {type(e).__name__}: {e}") from None
    if resp.status_code != 200:
        raise ValueError(f"GET {base_url}/v1/models answered HTTP {resp.status_code}; pass --model")
    data = resp.json().get("data") or []
    if not data:
        raise ValueError(f"{base_url}/v1/models lists no model; pass --model")
    return data[0]["id"]


def run_serve_benchmark(requests: Sequence[SampleRequest], cfg: ServeConfig, *, seed: int = 0,
                        count_tokens: Optional[Callable[[str], int]] = None, initial_test: bool = True,
                        progress: bool = True) -> tuple[list[RequestResult], float]:
    """Blocking wrapper; with ``initial_test`` one request goes first, alone, and a failure stops the
    run with its error (a misconfigured URL or model should not produce a table of failures)."""
    if not requests:
        raise ValueError("no requests to send")

    async def main():
        import httpx

        if initial_test:
            test_req = dataclasses.replace(requests[0], expected_output_len=min(requests[0].expected_output_len, 4))
            async with httpx.AsyncClient(timeout=cfg.request_timeout_s) as client:
                res = await send_request(client, cfg, test_req, count_tokens)
            if not res.success:
                raise ValueError(f"the initial test request to {cfg.url} failed: {res.error}")
        return await run_load(requests, cfg, seed=seed, count_tokens=count_tokens, progress=progress)

    return asyncio.run(main())


def per_request_record(results: Sequence[RequestResult]) -> dict:
    """Per-request arrays saved with a result (vLLM saves the same names)."""
    return {"input_lens": [r.prompt_len for r in results],
            "output_lens": [r.output_tokens for r in results],
            "ttfts": [r.ttft if r.success else None for r in results],
            "itls": [r.itl for r in results],
            "e2els": [r.latency if r.success else None for r in results],
            "errors": [r.error for r in results]}


def flat_metrics(m) -> dict:
    """BenchmarkMetrics as vLLM's flat JSON keys (mean_ttft_ms, p99_itl_ms, ...)."""
    d = {"completed": m.completed, "failed": m.failed, "duration": m.duration_s,
         "total_input_tokens": m.total_input_tokens, "total_output_tokens": m.total_output_tokens,
         "request_throughput": m.request_throughput, "output_throughput": m.output_throughput,
         "total_token_throughput": m.total_token_throughput, "request_goodput": m.request_goodput,
         "max_output_tokens_per_s": m.peak_output_throughput, "max_concurrent_requests": m.peak_concurrent_requests}
    for metric, stats in m.latencies.items():
        for stat, value in stats.items():
            d[f"{stat}_{metric}_ms"] = value
    return d
