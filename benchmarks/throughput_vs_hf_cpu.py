"""Offline throughput on CPU: jaxllm's engine vs transformers' ``generate``, same prompts, same run.

Both run the embedded SmolLM2-135M-Instruct GGUF in float32 (each dequantizes the Q4_1 weights),
greedy, every request producing exactly its output length (EOS ignored). The engine uses a CPU
ladder sized to the workload (decode steps of up to 32 sequences fill the 32-token bucket, prefill
chunks fill 256); transformers runs left-padded batches of 32 and one request at a time, and the
faster of the two is the baseline. Writes benchmarks/results/<date>-cpu-throughput-vs-hf.json.

    python benchmarks/throughput_vs_hf_cpu.py [--num-prompts 32] [--input-len 96] [--output-len 48]
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from baseline_hf import hf_throughput, load_hf_model  # noqa: E402

from serving.bench import datasets as ds  # noqa: E402
from serving.bench.environment import engine_environment, result_envelope, write_json  # noqa: E402
from serving.bench.throughput import build_llm, run_engine_workload, throughput_results, warm_up  # noqa: E402

ENGINE_ARGS = dict(dtype="float32", max_model_len=256, max_num_seqs=32, max_num_batched_tokens=256,
                   token_buckets=(32, 256), seq_buckets=(32,))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--num-prompts", type=int, default=32)
    p.add_argument("--input-len", type=int, default=96, help="mean input tokens (uniform +-33%%)")
    p.add_argument("--output-len", type=int, default=48)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--hf-batch-sizes", default="32,1", help="transformers batch sizes to try")
    p.add_argument("--output-json", default=str(ROOT / "benchmarks" / "results" /
                                                 f"{datetime.date.today().isoformat()}-cpu-throughput-vs-hf.json"))
    ns = p.parse_args(argv)

    built = build_llm(ENGINE_ARGS)
    llm = built.llm
    source = ds.TokenSource(llm.tokenizer, vocab_size=llm.engine.model_config.vocab_size)
    requests = ds.sample_random(source, ns.num_prompts, input_len=ns.input_len, output_len=ns.output_len,
                                range_ratio=0.33, seed=ns.seed)
    warm_up(llm, requests)
    results, seconds, counters = run_engine_workload(llm, requests, temperature=0.0, detokenize=False)
    jax_res = throughput_results(results, seconds, counters)
    jax_res.update(startup_s=built.startup_s, compile_s=built.compile_s,
                   num_executables=llm.engine.runner.num_executables, engine_args=ENGINE_ARGS)
    # The engine's greedy tokens, to check both sides computed the same thing.
    outs = llm.generate([{"prompt_token_ids": r.prompt_token_ids} for r in requests],
                        _greedy_params(requests), use_tqdm=False)
    jax_tokens = [list(o.outputs[0].token_ids) for o in outs]
    env = engine_environment(llm)
    del llm, built

    model, tok = load_hf_model(None, dtype="float32", device="cpu")
    import torch

    hf_runs = []
    for bs in (int(x) for x in ns.hf_batch_sizes.split(",")):
        res = hf_throughput(model, requests, batch_size=bs, pad_token_id=tok.pad_token_id or 0)
        agree = sum(a == b for a, b in zip(res.pop("outputs"), jax_tokens))
        res["greedy_outputs_identical_to_jaxllm"] = f"{agree}/{len(requests)}"
        hf_runs.append(res)
        print(f"transformers generate, batch {bs}: {res['output_tokens_per_second']:.1f} output tok/s "
              f"({res['elapsed_time']:.1f} s)", flush=True)
    best = max(hf_runs, key=lambda r: r["output_tokens_per_second"])
    ratio = jax_res["output_tokens_per_second"] / best["output_tokens_per_second"]
    print(f"jaxllm: {jax_res['output_tokens_per_second']:.1f} output tok/s ({jax_res['elapsed_time']:.1f} s); "
          f"transformers best (batch {best['batch_size']}): {best['output_tokens_per_second']:.1f} output tok/s; "
          f"ratio {ratio:.2f}x")

    env.update(torch_version=torch.__version__, transformers_version=importlib.metadata.version("transformers"),
               torch_threads=torch.get_num_threads())
    config = {"model": "SmolLM2-135M-Instruct.Q4_1.gguf (dequantized to float32 by both)", "dataset": "random",
              "num_prompts": ns.num_prompts, "input_len": f"{ns.input_len} +-33% (uniform)",
              "output_len": f"{ns.output_len} +-33% (uniform)", "sampling": "greedy, EOS ignored", "seed": ns.seed}
    results_doc = {"jaxllm": jax_res, "transformers": hf_runs, "transformers_best_batch_size": best["batch_size"],
                   "output_throughput_ratio_jaxllm_over_hf": ratio,
                   "total_throughput_ratio_jaxllm_over_hf": jax_res["tokens_per_second"] / best["tokens_per_second"]}
    path = write_json(ns.output_json, result_envelope("throughput-vs-hf", env, config, results_doc))
    print(f"Saved {path}")
    return 0


def _greedy_params(requests):
    from serving.sampling_params import SamplingParams

    return [SamplingParams(temperature=0.0, ignore_eos=True, max_tokens=r.expected_output_len, detokenize=False)
            for r in requests]


if __name__ == "__main__":
    raise SystemExit(main())
