"""What a step's launch hands the compiled executable (issue #6: host cost of dispatch under TP).

The weights go in as a flat tuple of device arrays: no nnx State / Variable nodes for the call to
flatten through Python callbacks, and no host (numpy) leaf that would be copied to every device on
every step. The only host array of a step is its packed input vector. The compiled step is called
through JAX's C++ fast path after its first call (no Python ``Compiled.call`` per step).

One device here; the same checks at tensor parallel 2 run in a child process with two forced host
devices (``test_tensor_parallel_step_calls``).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
ENGINE = dict(token_buckets=[16], seq_buckets=[4], max_num_batched_tokens=16, max_num_seqs=4,
              max_model_len=64, kv_cache_memory=4 * 2 ** 20, dtype="float32")


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    from tests.tiny_models import make_tiny_hf_model

    path, _ = make_tiny_hf_model("llama", tmp_path_factory.mktemp("tiny") / "m")
    return str(path)


def _record_step_calls(runner, python_calls) -> list:
    """Wrap the runner's step executables: each call appends (key, args, whether it ran JAX's
    Python-side call) to the returned list."""
    calls = []
    for key, exe in list(runner._executables.items()):
        def recording(*args, _exe=exe, _key=key):
            before = python_calls.count
            try:
                return _exe(*args)
            finally:
                calls.append((_key, args, python_calls.count > before))
        runner._executables[key] = recording
    return calls


def _count_python_compiled_calls():
    """A context: counts JAX's Python-side ``Compiled.call`` (run on a C++ dispatch cache miss)."""
    from jax._src import util

    class Counter:
        count = 0

        def __enter__(self):
            self.previous = util.test_event_listener

            def listener(name, *args):
                if name == "stages_compiled_call":
                    self.count += 1
                if self.previous is not None:
                    self.previous(name, *args)
            util.test_event_listener = listener
            return self

        def __exit__(self, *exc):
            util.test_event_listener = self.previous

    return Counter()


def check_step_calls(model_dir: str, tensor_parallel_size: int) -> None:
    from serving import LLM, SamplingParams

    llm = LLM(model=model_dir, tensor_parallel_size=tensor_parallel_size, **ENGINE)
    runner = llm.engine.runner
    num_leaves = len(jax.tree.leaves(runner.state))
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    prompts = [{"prompt_token_ids": [256, 72, 105]}, {"prompt_token_ids": [256, 84, 104, 101, 32]}]
    with _count_python_compiled_calls() as python_calls:
        calls = _record_step_calls(runner, python_calls)
        outs = llm.generate(prompts, params, use_tqdm=False)
    assert all(len(o.outputs[0].token_ids) == 12 for o in outs)
    assert len(calls) >= 12
    flat = jax.tree.structure(tuple(range(num_leaves)))
    for key, (weights, kv_cache, sampler_state, packed), _ in calls:
        # A flat tuple, not the nnx State: nothing for the call to flatten through Python.
        assert isinstance(weights, tuple) and jax.tree.structure(weights) == flat, key
        # Device arrays only, except the packed step input: one host-to-device copy a step.
        for leaf in jax.tree.leaves((weights, kv_cache, sampler_state)):
            assert isinstance(leaf, jax.Array), (key, type(leaf))
        assert isinstance(packed, np.ndarray) and packed.ndim == 1, key
    if tensor_parallel_size > 1:
        mesh_devices = set(runner.layout.mesh.devices.flat)
        for leaf in runner._weights:
            assert set(leaf.sharding.device_set) == mesh_devices
    # An executable misses JAX's C++ dispatch cache on its first calls only: the freshly allocated
    # KV cache and sampler state differ in signature from the step's own outputs; then it hits.
    seen: dict = {}
    for i, (key, _, python_call) in enumerate(calls):
        seen[key] = seen.get(key, 0) + 1
        assert not python_call or seen[key] <= 2, f"call {i} ({key}) went through JAX's Python path"
    # The weights the executables take are the model's state, leaf for leaf.
    for a, b in zip(runner._weights, jax.tree.leaves(runner.state), strict=True):
        assert a is b


def test_step_calls(tiny_dir):
    check_step_calls(tiny_dir, 1)


def test_tensor_parallel_step_calls(tiny_dir):
    """``check_step_calls`` at TP 2, in a child process with two forced host devices."""
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu")
    code = f"from tests.test_model_runner_dispatch import check_step_calls; check_step_calls({tiny_dir!r}, 2)"
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
