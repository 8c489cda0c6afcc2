"""Batch-1 decode step time: layers as one lax.scan over stacked weights vs unrolled, Pallas vs XLA
attention; prints the optimized HLO's copy / dynamic-slice counts of the scanned executable.

    PYTHONPATH=$PWD python benchmarks/gpu_layers_probe.py
"""

from __future__ import annotations

import collections
import json
import re

import jax
import numpy as np


def unrolled_layers(layer_fn, h, kv, params, per_token, shared):
    num_layers = jax.tree.leaves(params)[0].shape[0]
    for i in range(num_layers):
        h, kv = layer_fn(h, kv, jax.tree.map(lambda a: a[i], params), i, per_token, shared, True)
    return h, kv


def run(name, layer_stack, backend):
    from model_zoo.llama import LlamaForCausalLM
    from serving import LLM, SamplingParams

    LlamaForCausalLM.layer_stack = None if layer_stack is None else staticmethod(layer_stack)
    llm = LLM("llama-3.1-8b", load_format="dummy", dtype="bfloat16", attention_backend=backend,
              token_buckets=[512], seq_buckets=[1], max_num_batched_tokens=512, max_num_seqs=1,
              max_model_len=2048, num_gpu_blocks_override=1024, compilation_cache_dir="off")
    rng = np.random.RandomState(0)
    params = SamplingParams(temperature=0.0, max_tokens=48, ignore_eos=True, detokenize=False)
    llm.generate([{"prompt_token_ids": rng.randint(0, 1000, 500).tolist()}], params, use_tqdm=False)
    out = llm.generate([{"prompt_token_ids": rng.randint(0, 1000, 500).tolist()}], params, use_tqdm=False)[0]
    m = out.metrics
    itl = 1e3 * (m.finished_time - m.first_token_time) / 47
    info = {"variant": name, "attention": backend, "itl_ms": round(itl, 2)}
    exe = [e for k, e in llm.engine.runner._executables.items() if k[3] or k[0] == 1]
    if exe:
        text = exe[0].as_text()
        ops = collections.Counter(re.findall(r"= \S+ (copy|dynamic-slice|dynamic-update-slice|scatter|while|conditional|custom-call)\(", text))
        big_copies = [l.strip()[:160] for l in text.splitlines() if re.search(r"= bf16\[[0-9,]{9,}\]\S* copy\(", l)]
        info["hlo_ops"] = dict(ops)
        info["big_bf16_copies"] = big_copies[:6]
    print(json.dumps(info))
    del llm
    return info


def main():
    import sys

    if "--conds" in sys.argv:
        rows = [run("unrolled", unrolled_layers, "pallas"), run_without_conds()]
    else:
        rows = [run("scan", None, "pallas"), run("unrolled", unrolled_layers, "pallas"), run("scan", None, "xla")]
    print(f"{'layers':<10}{'attention':<10}{'ITL ms':>8}")
    for r in rows:
        print(f"{r['variant']:<10}{r['attention']:<10}{r['itl_ms']:>8}")


def select_cond(pred, true_fn, false_fn, *operands):
    """lax.cond computed as both branches + select: no data-dependent control flow on the device."""
    import jax.numpy as jnp

    t, f = true_fn(*operands), false_fn(*operands)
    return jax.tree.map(lambda a, b: jnp.where(pred, a, b), t, f)


def run_without_conds():
    import serving.sampler as smp

    class _Lax:                      # the sampler module's view of jax.lax, with cond replaced
        def __getattr__(self, name):
            return select_cond if name == "cond" else getattr(jax.lax, name)

    smp.jax = type("J", (), {"__getattr__": lambda self, n: _Lax() if n == "lax" else getattr(jax, n)})()
    return run("unrolled+nocond", unrolled_layers, "pallas")


if __name__ == "__main__":
    main()
