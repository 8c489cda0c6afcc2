"""Where does batch-1 decode time go? Compares ITL with a huge and a small KV cache (a per-step copy
of the cache would scale with its size) and splits a step into device time and host time.

    PYTHONPATH=$PWD python benchmarks/gpu_itl_probe.py
"""

from __future__ import annotations

import json
import sys
import time

import numpy as np


def probe(num_pages):
    from serving import LLM, SamplingParams

    kw = dict(load_format="dummy", dtype="bfloat16", attention_backend="pallas", token_buckets=[512],
              seq_buckets=[1], max_num_batched_tokens=512, max_num_seqs=1, max_model_len=2048,
              compilation_cache_dir="off")
    if num_pages:
        kw["num_gpu_blocks_override"] = num_pages
    llm = LLM("llama-3.1-8b", **kw)
    rng = np.random.RandomState(0)
    params = SamplingParams(temperature=0.0, max_tokens=64, ignore_eos=True, detokenize=False)
    llm.generate([{"prompt_token_ids": rng.randint(0, 1000, 512).tolist()}], params, use_tqdm=False)
    out = llm.generate([{"prompt_token_ids": rng.randint(0, 1000, 512).tolist()}], params, use_tqdm=False)[0]
    m = out.metrics
    itl = (m.finished_time - m.first_token_time) / 63
    # Device time of one decode step: re-run the last step's executable on fixed inputs.
    runner = llm.engine.runner
    eng = llm.engine
    eng.add_request("probe", {"prompt_token_ids": rng.randint(0, 1000, 512).tolist()}, params)
    step_times = []
    for _ in range(12):
        t = time.perf_counter()
        eng.step()
        step_times.append(time.perf_counter() - t)
    dispatch = []
    collect = []
    for _ in range(10):
        plan = eng.scheduler.schedule()
        t = time.perf_counter()
        fl = runner.dispatch(plan)
        t1 = time.perf_counter()
        res = runner.collect(fl)
        t2 = time.perf_counter()
        eng._pending_core = eng.scheduler.update(plan, res)
        dispatch.append(t1 - t)
        collect.append(t2 - t1)
    eng.abort_request("probe")
    kv_gb = sum(x.nbytes for x in runner.kv_cache) / 1e9
    r = {"num_pages": runner.num_pages, "kv_gb": round(kv_gb, 1), "itl_ms": round(1e3 * itl, 2),
         "engine_step_ms": round(1e3 * float(np.median(step_times[4:])), 2),
         "dispatch_ms": round(1e3 * float(np.median(dispatch)), 2),
         "collect_ms": round(1e3 * float(np.median(collect)), 2)}
    print(json.dumps(r))
    del llm
    import gc
    gc.collect()
    return r


if __name__ == "__main__":
    rows = [probe(2048), probe(None)]
    print(f"{'pages':>8} {'KV GB':>7} {'ITL ms':>8} {'step ms':>8} {'dispatch':>9} {'collect':>8}")
    for r in rows:
        print(f"{r['num_pages']:>8} {r['kv_gb']:>7} {r['itl_ms']:>8} {r['engine_step_ms']:>8} "
              f"{r['dispatch_ms']:>9} {r['collect_ms']:>8}")
    sys.exit(0)
