"""Prometheus metrics, named `jaxllm:<name>` after vLLM's `vllm:<name>` where one exists.

Two sources:
  * engine state (running/waiting, KV usage, cumulative token and cache counters, compilations,
    bucket padding) is read from `engine.get_stats()` at scrape time by a custom collector, so the
    numbers are the engine's own and nothing is double counted;
  * per-request latencies and outcomes are observed by the server as responses complete, from the
    engine's RequestMetrics timestamps when it supplies them, else from the server's own clock.

Each app gets its own CollectorRegistry (several apps in one test process must not collide).
"""

from __future__ import annotations

import time
from typing import Optional

from prometheus_client import CollectorRegistry, Counter, Histogram, disable_created_metrics, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from serving.outputs import RequestOutput

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# `*_created` timestamp series double the scrape size and no dashboard reads them (vLLM drops them too).
disable_created_metrics()

_LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
                    10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
_ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.2,
                0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
_TOKEN_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000, 50000, 100000)


class _EngineCollector:
    """Reads EngineStats at scrape time. Gauges are current values; counters are the engine's totals."""

    _GAUGES = (("num_requests_running", "num_requests_running", "Requests in the running batch."),
               ("num_requests_waiting", "num_requests_waiting", "Requests waiting to be scheduled."),
               ("kv_cache_usage_perc", "kv_cache_usage", "Fraction of KV cache pages in use (0..1)."),
               ("bucket_padding_ratio", "bucket_padding_ratio",
                "Padded share of the last step's bucket (tokens computed for padding / bucket size)."))
    _COUNTERS = (("prefix_cache_queries", "prefix_cache_queries", "Prompt tokens looked up in the prefix cache."),
                 ("prefix_cache_hits", "prefix_cache_hits", "Prompt tokens found in the prefix cache."),
                 ("num_preemptions", "num_preemptions", "Requests preempted to free KV cache pages."),
                 ("prompt_tokens", "prompt_tokens", "Prompt tokens processed (prefill)."),
                 ("generation_tokens", "generation_tokens", "Tokens generated."),
                 ("compilations", "compilations", "XLA compilations of step executables."))

    def __init__(self, engine, model_name: str):
        self.engine = engine
        self.model_name = model_name

    def collect(self):
        stats = self.engine.get_stats()
        for name, attr, doc in self._GAUGES:
            value = getattr(stats, attr, None)
            if value is None:
                continue
            g = GaugeMetricFamily(f"jaxllm:{name}", doc, labels=["model_name"])
            g.add_metric([self.model_name], float(value))
            yield g
        for name, attr, doc in self._COUNTERS:
            value = getattr(stats, attr, None)
            if value is None:
                continue
            c = CounterMetricFamily(f"jaxllm:{name}", doc, labels=["model_name"])  # exposed as <name>_total
            c.add_metric([self.model_name], float(value))
            yield c


class ServerMetrics:
    def __init__(self, engine, model_name: str):
        self.model_name = model_name
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(_EngineCollector(engine, model_name))
        labels = ["model_name"]
        self.request_success = Counter("jaxllm:request_success", "Finished requests by finish reason.",
                                       labels + ["finished_reason"], registry=self.registry)
        self.ttft = Histogram("jaxllm:time_to_first_token_seconds", "Time from arrival to the first token.",
                              labels, buckets=_LATENCY_BUCKETS, registry=self.registry)
        self.itl = Histogram("jaxllm:inter_token_latency_seconds", "Time between consecutive output tokens.",
                             labels, buckets=_ITL_BUCKETS, registry=self.registry)
        self.e2e = Histogram("jaxllm:e2e_request_latency_seconds", "Time from arrival to the last token.",
                             labels, buckets=_LATENCY_BUCKETS, registry=self.registry)
        self.queue = Histogram("jaxllm:request_queue_time_seconds", "Time from arrival to first scheduling.",
                               labels, buckets=_LATENCY_BUCKETS, registry=self.registry)
        self.prompt_len = Histogram("jaxllm:request_prompt_tokens", "Prompt length of finished requests.",
                                    labels, buckets=_TOKEN_BUCKETS, registry=self.registry)
        self.gen_len = Histogram("jaxllm:request_generation_tokens", "Generated tokens of finished requests.",
                                 labels, buckets=_TOKEN_BUCKETS, registry=self.registry)

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def track(self) -> "RequestTracker":
        return RequestTracker(self)


class RequestTracker:
    """Follows one engine request's outputs and records its latencies when it finishes. The outputs are
    deltas (DELTA: each step's new tokens; FINAL_ONLY: one output with all of them)."""

    def __init__(self, metrics: Optional[ServerMetrics]):
        self.metrics = metrics
        self.arrival = time.time()
        self.first_token: Optional[float] = None
        self.last_token: Optional[float] = None
        self.num_tokens = 0
        self.done = False

    def update(self, output: RequestOutput) -> None:
        if self.metrics is None or self.done:
            return
        now = time.time()
        new = sum(len(c.token_ids) for c in output.outputs)
        if new > 0:
            label = self.metrics.model_name
            if self.first_token is None:
                self.first_token = now
                # More tokens than choices at once: a FINAL_ONLY output, the whole generation. Its
                # inter-token gaps (one per token after each choice's first, as a stream records
                # them) are spread evenly over the engine's first-to-last-token time.
                gaps = new - len(output.outputs)
                rm = output.metrics
                if gaps > 0 and rm is not None and rm.first_token_time and rm.last_token_time:
                    gap = max(0.0, rm.last_token_time - rm.first_token_time) / gaps
                    for _ in range(gaps):
                        self.metrics.itl.labels(label).observe(gap)
            elif self.last_token is not None:
                gap = (now - self.last_token) / new
                for _ in range(new):
                    self.metrics.itl.labels(label).observe(gap)
            self.last_token = now
            self.num_tokens += new
        if output.finished:
            self._finish(output, now)

    def _finish(self, output: RequestOutput, now: float) -> None:
        self.done = True
        m, label = self.metrics, self.metrics.model_name
        rm = output.metrics
        arrival = rm.arrival_time if rm is not None and rm.arrival_time else self.arrival
        first = (rm.first_token_time if rm is not None and rm.first_token_time else None) or self.first_token
        if first is not None:
            m.ttft.labels(label).observe(max(0.0, first - arrival))
        end = (rm.finished_time if rm is not None and rm.finished_time else None) or now
        m.e2e.labels(label).observe(max(0.0, end - arrival))
        if rm is not None and rm.first_scheduled_time:
            m.queue.labels(label).observe(max(0.0, rm.first_scheduled_time - arrival))
        for choice in output.outputs:
            m.request_success.labels(label, choice.finish_reason or "abort").inc()
        m.prompt_len.labels(label).observe(len(output.prompt_token_ids))
        m.gen_len.labels(label).observe(self.num_tokens)
