"""Host time of launching one engine step (ModelRunner.dispatch) and of collecting it, per tensor
parallel size, on forced host (CPU) devices.

Issue #6: on 2 x H200 the batch-1 decode step of the Llama-3.1-8B shape spent 2.23 ms of host time
in ``dispatch`` at TP1 and 7.65 ms at TP2 (results/2026-11-21-h200-decode-profile-tp*-same-run.json),
so the TP2 GPU idled half of each step. This script builds the real engine (real scheduler, real
ModelRunner, real compiled executables over a mesh of forced host devices) for a tiny
Llama-architecture model with many layers (random weights), mirrors the GPU build (unrolled layers,
``model.layer_stack = unrolled_layers``; ``--layers scan`` keeps the CPU default), runs decode steps
with async scheduling (the engine default: step N+1 is launched before step N is collected) and
times the host side:

    step              LLMEngine.step (the whole loop iteration; with a tiny model the device is
                      faster than the host, so this is the host's cost per step)
    dispatch          ModelRunner.dispatch until it returns (JAX dispatch is asynchronous)
      deltas          _apply_plan_deltas (per-request host state)
      pack            PackedLayout.pack (the step's one input vector)
      exe_call        the compiled step's call (argument checks, transfers, launch); on the runner's
                      launch thread (TP > 1 by default) it is not part of dispatch
      inputs          the rest: numpy input building (dispatch - deltas - pack [- exe_call])
    collect           ModelRunner.collect (waits for the device; on CPU mostly the step itself)

Only decode steps (one token per sequence) are counted. Times are wall clock (perf_counter) and the
dispatching thread's CPU time (thread_time), median and mean over the steps.

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python benchmarks/host_dispatch.py
    python benchmarks/host_dispatch.py --tp 1,2 --layers unrolled --batches 1 --steps 100 --no-json
    python benchmarks/host_dispatch.py --profile        # + a cProfile of the exe calls per configuration
    python benchmarks/host_dispatch.py --gpu --tp 1,2   # on GPUs: there the call's runtime launch shows

On CPU the wall-clock of the exe call includes waiting for the CPU "devices" (they share the 2
cores with the host thread); the host's own work is the ``cpu`` rows (thread CPU time).

Writes benchmarks/results/<date>-cpu-host-dispatch.json (device, JAX version, commit) unless --no-json.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

if "--gpu" not in sys.argv:
    # 8 host devices unless the caller set XLA_FLAGS; the flag must precede jax's start.
    os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

PARTS = ("deltas", "pack", "exe_call", "inputs")


def make_model(out_dir: Path, *, num_layers: int, hidden: int, heads: int) -> Path:
    """A random Llama-architecture HF checkpoint (tests/tiny_models.py), many layers like the 8B."""
    from tests.tiny_models import make_tiny_hf_model

    if not (out_dir / "config.json").exists():
        make_tiny_hf_model("llama", out_dir, num_hidden_layers=num_layers, hidden_size=hidden,
                           intermediate_size=2 * hidden, num_attention_heads=heads, num_key_value_heads=heads)
    return out_dir


def build_engine(model_dir: Path, *, tp: int, unrolled: bool, max_num_seqs: int, attention: str):
    """The real LLMEngine; with ``unrolled`` the model runs its layers as straight-line code, as
    serving/engine_builder.py builds it on a GPU (there ``platform == "gpu"`` decides)."""
    import serving.engine_builder as eb
    from model_zoo.llama import unrolled_layers
    from serving.config import EngineArgs
    from serving.engine import LLMEngine

    build_model = eb.build_model

    def build(*a, **kw):
        model = build_model(*a, **kw)
        if unrolled:
            model.layer_stack = unrolled_layers
        return model

    eb.build_model = build
    try:
        args = EngineArgs(model=str(model_dir), tensor_parallel_size=tp, max_num_seqs=max_num_seqs,
                          max_model_len=256, token_buckets=(16,), seq_buckets=(max_num_seqs,),
                          max_num_batched_tokens=128, attention_backend=attention,
                          compilation_cache_dir="none", kv_cache_memory=256 * 1024 ** 2)
        return LLMEngine.from_engine_args(args)
    finally:
        eb.build_model = build_model


class _Timer:
    """Wall and thread-CPU seconds of named phases of the current step."""

    def __init__(self):
        self.step: dict[str, list[float]] = {}
        self.host_arrays = None

    def wrap(self, fn, name):
        def timed(*a, **kw):
            w, c = time.perf_counter(), time.thread_time()
            try:
                return fn(*a, **kw)
            finally:
                acc = self.step.setdefault(name, [0.0, 0.0])
                acc[0] += time.perf_counter() - w
                acc[1] += time.thread_time() - c
        return timed


def _counting_host_arrays(fn, timer: _Timer):
    """Counts the call's host (non-device) array arguments: each is copied to every device."""
    import jax

    def counted(*args):
        timer.host_arrays = sum(not isinstance(x, jax.Array) for x in jax.tree.leaves(args))
        return fn(*args)
    return counted


def instrument(engine, timer: _Timer) -> None:
    from serving import step_io

    runner = engine.runner
    engine.step = timer.wrap(engine.step, "step")
    runner.dispatch = timer.wrap(runner.dispatch, "dispatch")
    runner.collect = timer.wrap(runner.collect, "collect")
    runner._apply_plan_deltas = timer.wrap(runner._apply_plan_deltas, "deltas")
    for key, exe in list(runner._executables.items()):
        runner._executables[key] = _counting_host_arrays(timer.wrap(exe, "exe_call"), timer)
    for layout in list(runner._layouts.values()):
        object.__setattr__(layout, "pack", timer.wrap(step_io.PackedLayout.pack.__get__(layout), "pack"))


def measure(engine, timer: _Timer, *, batch: int, steps: int, prompt_len: int = 8) -> dict:
    """Decode ``steps`` tokens for ``batch`` requests; per-phase ms of the decode steps."""
    from serving import SamplingParams

    params = SamplingParams(temperature=0, max_tokens=steps + 1, ignore_eos=True, detokenize=False)
    rng = np.random.default_rng(0)
    for i in range(batch):
        ids = rng.integers(0, engine.vocab_size, prompt_len).tolist()
        engine.add_request(f"r{i}", {"prompt_token_ids": ids}, params)
    runner = engine.runner
    rows = []
    while engine.has_unfinished_requests():
        timer.step = {}
        engine.step()
        last = runner.last_step
        if last is not None and last.num_tokens == last.num_seqs and "exe_call" in timer.step:
            rows.append(dict(timer.step))
    rows = rows[2:]          # the first calls fill C++ dispatch caches
    out = {"decode_steps": len(rows), "launch_thread": runner.launch_thread}
    # With the runner's launch thread the exe call runs there, not inside dispatch.
    launched_inline = not runner.launch_thread
    for clock, idx in (("wall", 0), ("cpu", 1)):
        per = {name: np.array([r.get(name, [0.0, 0.0])[idx] for r in rows]) * 1e3
               for name in ("step", "dispatch", "collect", "deltas", "pack", "exe_call")}
        per["inputs"] = per["dispatch"] - per["deltas"] - per["pack"] - per["exe_call"] * launched_inline
        out[clock] = {name: {"median_ms": round(float(np.median(v)), 4), "mean_ms": round(float(v.mean()), 4)}
                      for name, v in per.items()}
    return out


def profile_exe_call(engine, *, batch: int, steps: int, top: int = 25) -> str:
    """cProfile of the decode steps' exe calls: which Python runs inside the compiled step's call."""
    import cProfile
    import io
    import pstats

    from serving import SamplingParams

    prof = cProfile.Profile()
    runner = engine.runner
    for key, exe in list(runner._executables.items()):
        def profiled(*a, _exe=exe):
            prof.enable()
            try:
                return _exe(*a)
            finally:
                prof.disable()
        runner._executables[key] = profiled
    params = SamplingParams(temperature=0, max_tokens=steps, ignore_eos=True, detokenize=False)
    for i in range(batch):
        engine.add_request(f"p{i}", {"prompt_token_ids": [1, 2, 3, 4]}, params)
    while engine.has_unfinished_requests():
        engine.step()
    s = io.StringIO()
    pstats.Stats(prof, stream=s).sort_stats("cumulative").print_stats(top)
    return s.getvalue()


def _commit() -> str:
    try:
        return subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, text=True).strip()
    except Exception:  # noqa: BLE001 - not a checkout
        return "unknown"


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tp", default="1,2,4", help="tensor parallel sizes (comma separated)")
    p.add_argument("--layers", default="unrolled,scan", help="unrolled (the GPU build), scan, or both")
    p.add_argument("--batches", default="1,8", help="decode batch sizes (<= --max-num-seqs)")
    p.add_argument("--steps", type=int, default=100, help="decode steps per measurement")
    p.add_argument("--num-layers", type=int, default=32)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--heads", type=int, default=8, help="query = KV heads (divisible by every TP size)")
    p.add_argument("--max-num-seqs", type=int, default=8)
    p.add_argument("--attention-backend", default="xla")
    p.add_argument("--model", default=None, help="an HF model directory instead of the random one")
    p.add_argument("--profile", action="store_true", help="print a cProfile of the exe call per configuration")
    p.add_argument("--gpu", action="store_true", help="run on the GPUs (default: forced host CPU devices)")
    p.add_argument("--no-json", action="store_true")
    p.add_argument("--tag", default="", help="suffix of the results file name (e.g. -before)")
    a = p.parse_args(argv)

    import logging

    import jax

    logging.getLogger("jaxllm").setLevel(logging.WARNING)
    tmp = Path(tempfile.gettempdir()) / f"jaxllm-host-dispatch-l{a.num_layers}-h{a.hidden}-n{a.heads}"
    model_dir = Path(a.model) if a.model else make_model(tmp, num_layers=a.num_layers, hidden=a.hidden,
                                                           heads=a.heads)
    results = []
    cols = ("step", "dispatch") + PARTS + ("collect",)
    print(f"{'layers':>8} {'tp':>3} {'batch':>5} | " + " ".join(f"{n:>9}" for n in cols)
          + "   (ms, median per decode step)")
    for layers in a.layers.split(","):
        for tp in (int(x) for x in a.tp.split(",")):
            engine = build_engine(model_dir, tp=tp, unrolled=layers == "unrolled",
                                  max_num_seqs=a.max_num_seqs, attention=a.attention_backend)
            state_leaves = len(jax.tree.leaves(engine.runner.state))
            timer = _Timer()
            instrument(engine, timer)
            for batch in (int(x) for x in a.batches.split(",")):
                row = dict(layers=layers, tp=tp, batch=batch, state_leaves=state_leaves,
                           **measure(engine, timer, batch=batch, steps=a.steps),
                           host_arrays_per_call=timer.host_arrays)
                results.append(row)
                for clock in ("wall", "cpu"):
                    med = row[clock]
                    print(f"{layers:>8} {tp:>3} {batch:>5} | "
                          + " ".join(f"{med[n]['median_ms']:9.3f}" for n in cols)
                          + f"   {clock}", flush=True)
            if a.profile:
                print(profile_exe_call(engine, batch=1, steps=50))
            del engine, timer
            gc.collect()       # the runner and its wrapped methods form a cycle: free the KV cache now
    doc = dict(
        what="host ms of ModelRunner.dispatch / collect per decode step (benchmarks/host_dispatch.py)",
        device=f"{jax.device_count()} x {jax.devices()[0].device_kind}"
               + (" (forced host devices)" if jax.default_backend() == "cpu" else "") + f", {os.cpu_count()} cores",
        jax_version=jax.__version__, commit=_commit(),
        model=dict(architecture="llama", num_layers=a.num_layers, hidden_size=a.hidden, heads=a.heads,
                   kv_heads=a.heads, dtype="float32", weights="random", path=None if not a.model else a.model),
        attention_backend=a.attention_backend, steps=a.steps, runs=results)
    if not a.no_json:
        day = datetime.date.today().isoformat()
        kind = "cpu" if jax.default_backend() == "cpu" else jax.devices()[0].device_kind.split()[-1].lower()
        path = ROOT / "benchmarks" / "results" / f"{day}-{kind}-host-dispatch{a.tag}.json"
        path.write_text(json.dumps(doc, indent=1) + "\n")
        print("wrote", path.relative_to(ROOT))
    return doc


if __name__ == "__main__":
    main()
