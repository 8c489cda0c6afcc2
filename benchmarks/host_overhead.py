"""Host (Python) time of one engine step, per phase, with the device's work taken out.

On a GPU the host's share of a step sits on the critical path: the device idles from the moment
step N's sampled tokens arrive until step N+1 is launched, i.e. for::

    collect (after the copy) + scheduler.update + stats + between steps + schedule + dispatch

while ``_process_outputs`` (detokenizing, RequestOutputs) overlaps step N+1 on the device. This
benchmark runs the real LLMEngine, Scheduler, KV cache manager, detokenizer and ModelRunner input
building on the CPU with every compiled executable replaced by a stand-in that returns numpy
outputs at once (its own time is subtracted from dispatch). The model is the embedded SmolLM2
config cut to one layer with dummy weights (the model never runs; its tokenizer and vocabulary
are real), so nothing here depends on a device. Requests decode ``--output-len`` tokens each
(ignore_eos), so per-request costs that grow with the output (O(n^2) over a generation) show.

Modes: ``offline`` is LLM.generate; ``served`` is AsyncLLM with an event loop consuming every
request's cumulative outputs (slice the new text, JSON-encode a chunk: the streaming server's way
until it asked for DELTA outputs), whose work competes with the engine thread for the GIL;
``served-delta`` consumes DELTA outputs instead. ``http`` and ``http-whole`` run the real OpenAI
server (serving/server) in-process over AsyncLLM, through httpx's ASGI transport (no sockets): one
/v1/completions request per sequence, streamed (SSE chunks) or whole; the server's own code picks
the output kind and builds every chunk.
between_steps is the engine thread's time between two steps (LLM.generate's loop; AsyncLLM's inbox,
and its hand-over of outputs to the event loop where that happens after the step); hand_over is
AsyncLLM's hand-over where it happens inside the step, overlapping the device. With --device-us a
device is emulated (collect waits for it without the GIL) and device_idle_pct is the share of wall
time the device would wait for the host: the issue's "GPU idle between steps".

    python benchmarks/host_overhead.py                       # batch 1, 64, 256; detokenize on/off
    python benchmarks/host_overhead.py --batches 64 --output-len 256 --no-json

Prints microseconds per step per phase; writes benchmarks/results/<date>-cpu-host-overhead.json.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import datetime
import functools
import gc
import itertools
import json
import os
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

PHASES = ("schedule", "dispatch", "collect", "update", "stats", "process_outputs", "hand_over", "between_steps")
# Phases are timed in CPU time of the thread running them (time.thread_time): other processes on a
# busy machine and, under AsyncLLM, the event loop holding the GIL do not inflate them. wall_per_step
# is wall-clock time; "consumer" is the event loop thread's CPU time per step (AsyncLLM only), which
# competes with the engine thread for the GIL; "gc" is time in garbage collection (any thread,
# wall-clock, already inside the phases).
_clock = time.thread_time
# Phases on the critical path: the device waits for them (process_outputs overlaps the device step).
# That holds for synchronous scheduling; with async_scheduling (--engine-arg async_scheduling=true)
# collect and update of step N overlap step N+1 on the device, and device_idle_pct is what to read.
CRITICAL = ("schedule", "dispatch", "collect", "update", "stats", "between_steps")
_TEXT = ("The quick brown fox jumps over the lazy dog. In the beginning the Universe was created. "
         "This has made a lot of people very angry and been widely regarded as a bad move. "
         "Caf\u00e9 na\u00efve r\u00e9sum\u00e9 \u2014 \u65e5\u672c\u8a9e\u306e\u30c6\u30ad\u30b9\u30c8 "
         "and some code: def f(x): return x * 2  # done\n")


class _FakeExecutable:
    """Stands in for a compiled step of ``num_rows`` sequences: returns the sampler's outputs as
    numpy arrays at once. Sampled tokens cycle through real text's token ids, so detokenizing does
    realistic work. Speaks both runner protocols: separate input arrays -> SamplerOutput, and one
    packed int32 input vector -> one packed int32 output matrix (serving/step_io.py)."""

    def __init__(self, text_ids: np.ndarray, num_logprobs: int, num_rows: int, timer: dict):
        self.text_ids, self.k, self.num_rows, self.timer = text_ids, num_logprobs, num_rows, timer

    def __call__(self, state, kv_cache, sampler_state, *inputs):
        from serving.sampler import SamplerOutput

        t0 = _clock()
        s, k = self.num_rows, self.k
        step = self.timer["exe_calls"] = self.timer.get("exe_calls", 0) + 1
        tokens = self.text_ids[(step + 7 * np.arange(s)) % len(self.text_ids)].astype(np.int32)
        logprobs, ranks = np.full(s, -0.5, np.float32), np.ones(s, np.int32)
        top_ids = np.tile(np.arange(k, dtype=np.int32), (s, 1))
        top_lp = np.tile(-np.arange(k, dtype=np.float32), (s, 1))
        if len(inputs) == 1:      # packed protocol
            out = np.concatenate([tokens[:, None], logprobs.view(np.int32)[:, None], ranks[:, None], top_ids,
                                  top_lp.view(np.int32)], axis=1)
        else:
            out = SamplerOutput(token_ids=tokens, logprobs=logprobs, ranks=ranks, top_ids=top_ids,
                                top_logprobs=top_lp)
        self.timer["exe"] += _clock() - t0
        return out, kv_cache, sampler_state, None


def build_engine(*, max_num_seqs: int, max_model_len: int, num_logprobs: int, engine_args: dict | None = None):
    """An LLMEngine over the real scheduler and ModelRunner whose executables are stand-ins.
    ``engine_args``: more EngineArgs fields (those the engine itself reads, e.g. async_scheduling)."""
    import jax.numpy as jnp

    from model_zoo.loader import resolve_model
    from model_zoo.loaders.dummy import dummy_params
    from model_zoo.registry import build_model
    from serving.buckets import BucketLadder
    from serving.config import EngineArgs
    from serving.engine import LLMEngine
    from serving.model_runner import ModelRunner
    from serving.scheduler import Scheduler
    from serving.tokenizer import load_tokenizer

    resolved = resolve_model(None, load_format="dummy")
    config = dataclasses.replace(resolved.config, num_layers=1)   # the model never runs
    tokenizer = load_tokenizer(resolved.tokenizer_path, gguf_file=resolved.gguf_file)
    model = build_model(config, dummy_params(config, jnp.float32))
    page_size, max_num_batched_tokens = 16, 2048                  # the GPU defaults
    num_pages = max_num_seqs * -(-max_model_len // page_size) + 1
    ladder = BucketLadder.build(max_num_batched_tokens=max_num_batched_tokens, max_num_seqs=max_num_seqs,
                                max_pages_per_seq=-(-max_model_len // page_size), paged_width_buckets=False)
    eos = (tokenizer.eos_token_id,)
    runner = ModelRunner(model, num_pages=num_pages, page_size=page_size, max_model_len=max_model_len,
                         max_num_seqs=max_num_seqs, ladder=ladder, kv_cache=np.zeros(1, np.float32),
                         max_logprobs=num_logprobs, seed=0, eos_token_ids=eos, decode_buckets=True)
    timer = defaultdict(float)
    text_ids = np.array(tokenizer.encode(_TEXT, add_special_tokens=False) * 4, np.int64)
    runner._executables = {shape: _FakeExecutable(text_ids, num_logprobs, shape[1], timer)
                           for shape in runner.all_shapes()}
    if hasattr(runner, "_layout"):        # the packed protocol: executables come with input layouts
        for shape in runner.all_shapes():
            runner._layout(shape)
    scheduler = Scheduler(num_pages=num_pages, page_size=page_size, max_model_len=max_model_len,
                          max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens)
    args = EngineArgs(max_logprobs=num_logprobs, **(engine_args or {}))
    engine = LLMEngine(engine_args=args, model_config=config, tokenizer=tokenizer, scheduler=scheduler,
                       runner=runner, max_model_len=max_model_len, eos_token_ids=eos, default_sampling={},
                       model_name="smollm2-1layer-dummy")
    return engine, timer


def _instrument(engine, timer: dict) -> dict:
    """Wrap the step's phases so each accumulates its seconds into ``timer``."""
    def timed(obj, name, phase):
        fn = getattr(obj, name)

        def wrapper(*a, **kw):
            t0 = _clock()
            try:
                return fn(*a, **kw)
            finally:
                timer[phase] += _clock() - t0
        setattr(obj, name, wrapper)

    timed(engine.scheduler, "schedule", "schedule")
    timed(engine.runner, "dispatch", "dispatch")
    timed(engine.runner, "collect", "collect")
    timed(engine.scheduler, "update", "update")
    timed(engine, "_record_step_stats", "stats")
    timed(engine, "_process_outputs", "process_outputs")
    start = {}

    def on_gc(phase, info):
        if phase == "start":
            start["t"] = time.perf_counter()
        elif "t" in start:
            timer["gc"] += time.perf_counter() - start.pop("t")
            timer["gc_full"] += info["generation"] == 2
    gc.callbacks.append(on_gc)
    timer["_gc_callback"] = on_gc       # removed by main() after the run
    return timer


def _prompts(tokenizer, batch: int) -> list[dict]:
    base = tokenizer.encode("Write a long story about a fox and a dog who become friends. " * 3,
                            add_special_tokens=False)[:32]
    # Distinct first tokens: no prefix-cache sharing between requests.
    return [{"prompt_token_ids": [(i * 13 + 5) % 1000 + 100] + base} for i in range(batch)]


def _params(output_len: int, detokenize: bool, logprobs):
    from serving.sampling_params import SamplingParams

    return SamplingParams(max_tokens=output_len, ignore_eos=True, temperature=0.0, detokenize=detokenize,
                          logprobs=logprobs)


def _reset(timer: dict) -> None:
    for k in list(timer):
        if k != "_gc_callback":
            del timer[k]


def _emulate_device(engine, timer: dict, base_us: float, per_seq_us: float, per_prefill_token_us: float) -> None:
    """A device that takes base + per_seq * seqs + per_prefill_token * (tokens - seqs) microseconds
    per step, running steps in order from their dispatch: collect sleeps (without the GIL, as a
    blocked device_get) until its step is "done". The host's work then overlaps the device as it
    would on a GPU (also with async scheduling, where step N+1 is dispatched before step N is
    collected), and the wall time beyond the device's is the time the device would sit idle."""
    runner = engine.runner
    dispatch, collect = runner.dispatch, runner.collect
    device_free_at = [0.0]
    ready: dict[int, float] = {}      # id(flight) -> when the device finishes that step

    def emulated_dispatch(plan):
        flight = dispatch(plan)
        seqs, tokens = len(plan.num_scheduled_tokens), plan.total_num_scheduled_tokens
        if seqs:
            busy = 1e-6 * (base_us + per_seq_us * seqs + per_prefill_token_us * (tokens - seqs))
            timer["device"] += busy
            device_free_at[0] = max(device_free_at[0], time.perf_counter()) + busy
            ready[id(flight)] = device_free_at[0]
        return flight

    def emulated_collect(flight):
        done = ready.pop(id(flight), None)
        wait = 0.0 if done is None else done - time.perf_counter()
        if wait > 0:
            time.sleep(wait)
            timer["sleep_overshoot"] += time.perf_counter() - done   # the emulation's own error
        return collect(flight)

    runner.dispatch, runner.collect = emulated_dispatch, emulated_collect


def _summarise(timer: dict, num_steps: int, wall: float, outputs: int) -> dict:
    per = {p: 1e6 * timer.get(p, 0.0) / num_steps for p in PHASES + ("consumer", "gc")}
    per["dispatch"] -= 1e6 * timer.get("exe", 0.0) / num_steps      # the stand-in's own time
    per["critical_path"] = sum(per[p] for p in CRITICAL)
    per["total"] = sum(per[p] for p in PHASES)
    per["wall_per_step"] = 1e6 * wall / num_steps
    idle_pct = None
    full_gcs = int(timer.get("gc_full", 0))
    if timer.get("device"):
        per["device"] = 1e6 * timer["device"] / num_steps
        # The device waits for the host for whatever wall time it does not compute (less the
        # emulation's sleep overshoot, which a real device would not add).
        wall -= timer.get("sleep_overshoot", 0.0)
        idle_pct = round(100 * max(wall - timer["device"], 0.0) / wall, 1)
    return {"us_per_step": {k: round(v, 1) for k, v in per.items()}, "num_steps": num_steps,
            "device_idle_pct": idle_pct, "full_gcs": full_gcs, "request_outputs": outputs}


def _time_steps(engine, timer: dict) -> None:
    """Count engine steps; the engine thread's time between two steps is the caller's per-step work
    (LLM.generate's loop, or AsyncLLM handing outputs to the event loop and draining its inbox)."""
    step = engine.step
    last_end = [None]

    def timed_step(*args, **kwargs):
        t0 = _clock()
        if last_end[0] is not None:
            timer["between_steps"] += t0 - last_end[0]
        try:
            return step(*args, **kwargs)
        finally:
            last_end[0] = _clock()
            timer["steps"] += 1
    engine.step = timed_step


def run_offline(engine, timer, *, batch: int, output_len: int, detokenize: bool, logprobs) -> dict:
    """LLM.generate over the engine (its own step loop and output kind)."""
    from serving.llm import LLM

    llm = LLM.__new__(LLM)            # LLM around an existing engine
    llm.engine, llm._ids = engine, itertools.count()
    _time_steps(engine, timer)
    params = _params(output_len, detokenize, logprobs)
    prompts = _prompts(engine.tokenizer, batch)
    _reset(timer)
    t0 = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    wall = time.perf_counter() - t0
    assert all(len(o.outputs[0].token_ids) == output_len for o in outs)
    return _summarise(timer, int(timer.pop("steps")), wall, len(outs))


def run_served(engine, timer, *, batch: int, output_len: int, detokenize: bool, logprobs,
               delta: bool = False) -> dict:
    """AsyncLLM's device thread stepping the engine while an event loop turns every output into
    an SSE chunk the way the streaming completions endpoint does: the text new since the last
    output (sliced from cumulative outputs, or a DELTA output as it is), JSON-encoded."""
    kind = {}
    if delta:
        from serving.outputs import RequestOutputKind
        kind = {"output_kind": RequestOutputKind.DELTA}
    llm = _async_llm(engine, timer)
    params = _params(output_len, detokenize, logprobs)
    created = int(time.time())

    async def consume(i, prompt):
        sent_text = sent_tokens = chunks = 0
        async for out in llm.generate(prompt, params, f"a{i}", **kind):
            c = out.outputs[0]
            if delta:
                text, sent_tokens = c.text, sent_tokens + len(c.token_ids)
            else:
                text = c.text[sent_text:]
                sent_text, sent_tokens = len(c.text), len(c.token_ids)
            chunk = {"id": f"cmpl-{i}", "object": "text_completion", "created": created, "model": "m",
                     "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": c.finish_reason}]}
            _sse = f"data: {json.dumps(chunk)}\n\n".encode()
            chunks += 1
        assert sent_tokens == output_len, (sent_tokens, output_len)
        return chunks

    return _consume_and_time(llm, timer, lambda: asyncio.gather(
        *(consume(i, p) for i, p in enumerate(_prompts(engine.tokenizer, batch)))))


def _consume_and_time(llm, timer: dict, consume_all) -> dict:
    """Run ``consume_all()`` (a coroutine: each request's output or chunk count) on an event loop whose
    thread's CPU time is the consumer's, then shut AsyncLLM down; the summary of the run."""
    async def main():
        try:
            return await consume_all()
        finally:
            await llm.shutdown()

    _reset(timer)
    t0, c0 = time.perf_counter(), _clock()
    chunks = asyncio.run(main())
    wall = time.perf_counter() - t0
    timer["consumer"] = _clock() - c0
    return _summarise(timer, int(timer.pop("steps")), wall, sum(chunks))


def _async_llm(engine, timer: dict):
    """AsyncLLM over the engine, its steps counted and its hand-over of outputs timed."""
    from serving.async_llm import AsyncLLM

    _time_steps(engine, timer)
    llm = AsyncLLM(engine)
    if hasattr(llm, "_deliver"):          # handed over inside the step: timed on its own
        deliver = llm._deliver

        def timed_deliver(outputs):
            t0 = _clock()
            deliver(outputs)
            timer["hand_over"] += _clock() - t0
        llm._deliver = timed_deliver
    return llm


def run_http(engine, timer, *, batch: int, output_len: int, detokenize: bool, logprobs,
             stream: bool = True) -> dict:
    """The OpenAI server's /v1/completions (serving/server) over AsyncLLM, in-process through httpx's
    ASGI transport: ``batch`` concurrent requests, streamed or whole, each checked for its token count."""
    import httpx

    from serving.server.app import build_app
    from serving.server.args import ServerArgs

    if not detokenize:
        raise ValueError("the HTTP server always detokenizes")
    llm = _async_llm(engine, timer)
    app = build_app(llm, ServerArgs(disable_log_stats=True, disable_log_requests=True))
    body = {"max_tokens": output_len, "ignore_eos": True, "temperature": 0.0, "stream": stream}
    if logprobs is not None:
        body["logprobs"] = logprobs
    if stream:
        body["stream_options"] = {"include_usage": True}

    async def request(client, prompt) -> int:
        r = await client.post("/v1/completions", json={**body, "prompt": prompt["prompt_token_ids"]})
        assert r.status_code == 200, r.text
        if not stream:
            assert r.json()["usage"]["completion_tokens"] == output_len
            return 1
        events = [e for e in r.text.split("\n\n") if e.startswith("data: ")]
        assert events[-1] == "data: [DONE]"
        assert json.loads(events[-2][len("data: "):])["usage"]["completion_tokens"] == output_len
        return len(events) - 2

    async def request_all():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://server", timeout=None) as client:
            return await asyncio.gather(*(request(client, p) for p in _prompts(engine.tokenizer, batch)))

    return _consume_and_time(llm, timer, request_all)


MODES = {"offline": run_offline, "served": run_served,
         "served-delta": functools.partial(run_served, delta=True),
         "http": run_http, "http-whole": functools.partial(run_http, stream=False)}
# The HTTP server has no way to turn detokenizing off.
_ALWAYS_DETOKENIZE = ("http", "http-whole")


def _fmt_table(rows: list[dict]) -> str:
    cols = (["mode", "batch", "detok", "logprobs"] + list(PHASES)
            + ["critical_path", "total", "wall_per_step", "consumer", "gc", "full_gcs", "device", "device_idle_pct"])
    lines = [" | ".join(f"{c[:9]:>9}" for c in cols)]
    for r in rows:
        us = r["us_per_step"]
        cells = [r["mode"], r["batch"], r["detokenize"], r["logprobs"]] + [us.get(c, r.get(c)) for c in cols[4:]]
        lines.append(" | ".join(f"{c:>9.1f}" if isinstance(c, float) else f"{str(c):>9}" for c in cells))
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", default="1,64,256", help="comma-separated decode batch sizes")
    ap.add_argument("--output-len", type=int, default=1024, help="tokens each request generates")
    ap.add_argument("--modes", default="offline,served",
                    help="offline (LLM.generate), served (AsyncLLM + a streaming consumer of cumulative "
                         "outputs), served-delta (the same consuming DELTA outputs), http (the OpenAI "
                         "server's streamed /v1/completions, in-process), http-whole (its whole responses)")
    ap.add_argument("--logprobs-batch", type=int, default=64,
                    help="also run this batch with logprobs=5 (0: skip)")
    ap.add_argument("--out-dir", default=str(Path(__file__).resolve().parent / "results"))
    ap.add_argument("--label", default="", help="suffix for the results file name (e.g. 'before')")
    ap.add_argument("--device-us", default="0,0,0",
                    help="emulate a device step of BASE,PER_SEQ,PER_PREFILL_TOKEN microseconds (e.g. "
                         "6000,25,40 for an 8B decode on an H100); 0,0,0: none (host time only)")
    ap.add_argument("--switch-interval-ms", type=float, default=None,
                    help="sys.setswitchinterval for the run (default: Python's, 5 ms)")
    ap.add_argument("--engine-arg", action="append", default=[], metavar="KEY=VALUE",
                    help="an EngineArgs field for the engine (VALUE as JSON, else a string), e.g. "
                         "async_scheduling=true; repeatable")
    ap.add_argument("--gc-freeze", action="store_true",
                    help="gc.freeze() the heap once the engine is built (startup objects are never scanned)")
    ap.add_argument("--commit", default=None,
                    help="the measured code's commit, when it runs from an exported tree, not a checkout")
    ap.add_argument("--no-json", action="store_true")
    a = ap.parse_args(argv)
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    if a.switch_interval_ms is not None:
        sys.setswitchinterval(a.switch_interval_ms / 1000)

    from serving.bench.environment import host_environment, model_shape, result_envelope, write_json

    batches = [int(b) for b in a.batches.split(",")]
    engine_args = {}
    for item in a.engine_arg:
        key, _, value = item.partition("=")
        try:
            engine_args[key] = json.loads(value)
        except json.JSONDecodeError:
            engine_args[key] = value
    modes = a.modes.split(",")
    runs = [(m, b, d, None) for m in modes for b in batches for d in (True, False)
            if d or m not in _ALWAYS_DETOKENIZE]
    if a.logprobs_batch:
        runs += [(m, a.logprobs_batch, True, 5) for m in modes]
    max_model_len = 64 + a.output_len
    rows = []
    for mode, batch, detok, logprobs in runs:
        engine, exe_timer = build_engine(max_num_seqs=max(batches + [a.logprobs_batch]),
                                         max_model_len=max_model_len, num_logprobs=5, engine_args=engine_args)
        timer = _instrument(engine, exe_timer)
        device_us = [float(x) for x in a.device_us.split(",")]
        if any(device_us):
            _emulate_device(engine, timer, *device_us)
        gc.collect()
        if a.gc_freeze:
            gc.freeze()
        res = MODES[mode](engine, timer, batch=batch, output_len=a.output_len, detokenize=detok, logprobs=logprobs)
        model_config = engine.model_config
        row = {"mode": mode, "batch": batch, "detokenize": detok, "logprobs": logprobs, **res}
        rows.append(row)
        print(_fmt_table([row]).splitlines()[-1], flush=True)
        gc.callbacks.remove(timer.pop("_gc_callback"))
        del engine
        gc.unfreeze()
    print()
    print(f"us per step; output_len={a.output_len}; critical_path = {' + '.join(CRITICAL)} "
          "(process_outputs overlaps the device step)")
    print(_fmt_table(rows))
    if not a.no_json:
        import jax

        env = {"platform": "cpu", "device_kind": "cpu (no device work: executables are stand-ins)",
               "jax_version": jax.__version__, "model": "SmolLM2-135M config, 1 layer, dummy weights",
               "model_shape": model_shape(model_config), "dtype": "float32", **host_environment()}
        if a.commit:
            env["commit"] = a.commit
        data = result_envelope("host_overhead", env, {"output_len": a.output_len, "batches": batches,
                                                      "modes": modes, "page_size": 16,
                                                      "max_num_batched_tokens": 2048,
                                                      "device_us": a.device_us,
                                                      "switch_interval_s": sys.getswitchinterval(),
                                                      "gc_freeze": a.gc_freeze, "engine_args": engine_args},
                               {"runs": rows})
        date = datetime.date.today().isoformat()
        name = f"{date}-cpu-host-overhead{'-' + a.label if a.label else ''}.json"
        print("wrote", write_json(Path(a.out_dir) / name, data))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
