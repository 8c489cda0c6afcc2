"""One GPU run that checks, then times, the engine end to end (prints a table, writes JSON).

1. Correctness: a small random Llama (float32, highest matmul precision) greedy-decodes the same
   tokens with attention_backend="pallas" as with "xla", through chunked prefill and decode.
2. Speed: Llama-3.1-8B shape, dummy bf16 weights, Pallas attention: batch-1 inter-token latency at
   a 512-token context, and offline throughput on random 1024-in / 128-out prompts.

    PYTHONPATH=$PWD python benchmarks/gpu_engine.py --out $OUT
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import tempfile
import time

import numpy as np


def _commit() -> str:
    from serving.bench.environment import git_commit
    return git_commit() or "unknown"


def write_result(out_dir: str, name: str, data: dict) -> None:
    """One results file (benchmarks/results naming: <date>-<device>-<what>.json)."""
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, name), "w") as f:
        json.dump(data, f, indent=1)
    print("wrote", name)


def check_pallas_equals_xla(results: dict) -> None:
    import jax

    from serving import LLM, SamplingParams
    from tests.tiny_models import make_tiny_hf_model

    with tempfile.TemporaryDirectory() as d, jax.default_matmul_precision("highest"):
        path, _ = make_tiny_hf_model("llama", d, vocab_size=1000, hidden_size=512, intermediate_size=1024,
                                     num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=2,
                                     with_tokenizer=True)
        rng = np.random.RandomState(0)
        prompts = [{"prompt_token_ids": rng.randint(0, 1000, size=n).tolist()}
                   for n in (1, 5, 16, 17, 31, 64, 100, 150, 200, 255)]
        params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True, detokenize=False)
        engine = dict(dtype="float32", token_buckets=[64, 256], seq_buckets=[16], max_num_batched_tokens=256,
                      max_num_seqs=16, max_model_len=512)
        outs = {}
        for backend in ("xla", "pallas"):
            llm = LLM(str(path), attention_backend=backend, **engine)
            outs[backend] = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
            del llm
        same = sum(a == b for a, b in zip(outs["xla"], outs["pallas"]))
        results["pallas_equals_xla"] = {"prompts": len(prompts), "identical": same}
        print(f"pallas vs xla greedy (float32): {same}/{len(prompts)} prompts identical")


def time_8b(results: dict, args) -> None:
    import jax

    from serving import LLM, SamplingParams

    t0 = time.perf_counter()
    llm = LLM(args.model, load_format="dummy", dtype="bfloat16", attention_backend="pallas",
              token_buckets=[512, 2048], seq_buckets=[1, 64, 256], max_num_batched_tokens=2048,
              max_num_seqs=256, max_model_len=2048, compilation_cache_dir="off")
    start_s = time.perf_counter() - t0
    rng = np.random.RandomState(0)
    vocab = llm.engine.model_config.vocab_size

    def run(prompts, max_tokens):
        params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True, detokenize=False)
        t = time.perf_counter()
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        return outs, time.perf_counter() - t

    run([rng.randint(0, vocab, 512).tolist()], 8)                       # warm the host paths
    itls = []
    for _ in range(3):
        outs, _ = run([rng.randint(0, vocab, 512).tolist()], 128)
        m = outs[0].metrics
        itls.append((m.finished_time - m.first_token_time) / (len(outs[0].outputs[0].token_ids) - 1))
    itl_ms = 1e3 * float(np.median(itls))
    n = args.num_prompts
    prompts = [rng.randint(0, vocab, 1024).tolist() for _ in range(n)]
    outs, secs = run(prompts, 128)
    out_tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    st = llm.engine.stats
    results["llama-3.1-8b"] = {
        "device": jax.devices()[0].device_kind, "dtype": "bfloat16", "attention": "pallas",
        "startup_s": round(start_s, 1), "executables": llm.engine.runner.num_executables,
        "batch1_itl_ms_ctx512": round(itl_ms, 3),
        "random_1024_128": {"prompts": n, "seconds": round(secs, 2), "requests_per_s": round(n / secs, 2),
                            "output_tokens_per_s": round(out_tokens / secs, 1),
                            "total_tokens_per_s": round((out_tokens + n * 1024) / secs, 1)},
        "padding_ratio_cumulative": round((st.padded_tokens - st.scheduled_tokens) / max(st.scheduled_tokens, 1), 3),
    }
    r = results["llama-3.1-8b"]
    print(f"{'llama-3.1-8b bf16 (dummy)':<34}{r['device']}")
    print(f"{'start-up (load + compile)':<34}{r['startup_s']} s, {r['executables']} executables")
    print(f"{'batch-1 ITL, 512-token context':<34}{r['batch1_itl_ms_ctx512']} ms")
    t = r["random_1024_128"]
    print(f"{'random 1024-in/128-out':<34}{t['requests_per_s']} req/s, {t['output_tokens_per_s']} out tok/s, "
          f"{t['total_tokens_per_s']} total tok/s ({n} prompts)")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--model", default="llama-3.1-8b")
    ap.add_argument("--num-prompts", type=int, default=256)
    ap.add_argument("--skip-check", action="store_true")
    args = ap.parse_args(argv)
    import jax

    results = {"what": "gpu-engine", "date": datetime.date.today().isoformat(), "jax": jax.__version__,
               "commit": _commit(), "device": jax.devices()[0].device_kind}
    if not args.skip_check:
        check_pallas_equals_xla(results)
    time_8b(results, args)
    write_result(args.out, f"{results['date']}-{results['device'].replace(' ', '-').lower()}-engine.json", results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
