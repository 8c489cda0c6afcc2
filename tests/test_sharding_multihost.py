"""Two processes on localhost form one mesh (JAX CPU collectives over gloo) and give the same
greedy tokens as one process: process 0 schedules and publishes each step plan, process 1 replays it.

Each process is this file run as a script (`python tests/test_sharding_multihost.py MODEL_DIR`)
with the multi-host environment set; the test compares their output with a one-device engine.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPTS = [[256, 72, 105], [256, 84, 104, 101, 32, 99, 97, 112], [256, 49, 44, 32, 50]]
ENGINE = dict(token_buckets=[16], seq_buckets=[4], max_num_batched_tokens=16, max_num_seqs=4,
              max_model_len=64, kv_cache_memory=8 * 2 ** 20, dtype="float32")


def _generate(model_dir, **kwargs):
    from serving import LLM, SamplingParams

    llm = LLM(model=model_dir, **ENGINE, **kwargs)
    # Prompt logprobs too: their executable's outputs must be readable on process 0.
    outs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS],
                        SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, prompt_logprobs=1))
    return [{"tokens": list(o.outputs[0].token_ids),
             "prompt_logprobs": [o.prompt_logprobs[j][p[j]].logprob for j in range(1, len(p))]}
            for p, o in zip(PROMPTS, outs)]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_match_one(tmp_path):
    from tests.tiny_models import make_tiny_hf_model

    model_dir, _ = make_tiny_hf_model("llama", tmp_path / "m", num_attention_heads=8,
                                      num_key_value_heads=2, num_hidden_layers=4)
    reference = _generate(str(model_dir))
    port = _free_port()
    procs = []
    for rank in range(2):
        env = dict(os.environ, JAX_PLATFORMS="cpu",
                   XLA_FLAGS="--xla_force_host_platform_device_count=2",
                   JAXLLM_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAXLLM_NUM_PROCESSES="2",
                   JAXLLM_PROCESS_ID=str(rank), PYTHONPATH=ROOT)
        procs.append(subprocess.Popen([sys.executable, __file__, str(model_dir)], cwd=ROOT, env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outputs = []
    try:
        for p in procs:
            out, _ = p.communicate(timeout=300)
            outputs.append(out)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for rank, (p, out) in enumerate(zip(procs, outputs)):
        assert p.returncode == 0, f"process {rank} failed:\n{out[-4000:]}"
    result = [line for line in outputs[0].splitlines() if line.startswith("TOKENS ")]
    assert result, outputs[0][-4000:]
    got = json.loads(result[-1][len("TOKENS "):])
    assert [g["tokens"] for g in got] == [r["tokens"] for r in reference]
    for g, r in zip(got, reference):
        np.testing.assert_allclose(g["prompt_logprobs"], r["prompt_logprobs"], rtol=1e-4, atol=1e-4)
    steps = [line for line in outputs[1].splitlines() if line.startswith("FOLLOWED ")]
    assert steps and int(steps[-1].split()[1]) > 0, outputs[1][-4000:]


def _worker(model_dir: str) -> None:
    """One process of the two: tp 2 inside each process, 2 pipeline stages across them."""
    import jax

    from serving.config import EngineArgs
    from serving.engine_builder import run_follower

    if os.environ["JAXLLM_PROCESS_ID"] == "0":
        tokens = _generate(model_dir, tensor_parallel_size=2, pipeline_parallel_size=2)
        assert jax.process_count() == 2 and jax.device_count() == 4
        print("TOKENS " + json.dumps(tokens), flush=True)
    else:
        steps = run_follower(EngineArgs(model=model_dir, tensor_parallel_size=2,
                                        pipeline_parallel_size=2, **ENGINE))
        print(f"FOLLOWED {steps}", flush=True)


if __name__ == "__main__":
    sys.path.insert(0, ROOT)
    _worker(sys.argv[1])
