"""The runner compiles against the KV cache's spec and gets the allocated cache afterwards
(engine_builder: compile first, so XLA's GEMM autotuner has the device memory)."""
import dataclasses

import jax
import jax.numpy as jnp
import pytest

from model_zoo.llama import init_kv_cache, kv_cache_spec
from model_zoo.loader import resolve_model
from model_zoo.loaders.dummy import dummy_params
from model_zoo.registry import build_model
from serving.buckets import BucketLadder
from serving.model_runner import ModelRunner
from serving.plan import StepPlan


@pytest.fixture(scope="module")
def parts():
    config = dataclasses.replace(resolve_model(None, load_format="dummy").config, num_layers=1)
    model = build_model(config, dummy_params(config, jnp.float32))
    ladder = BucketLadder.build(max_num_batched_tokens=16, max_num_seqs=2, max_pages_per_seq=2,
                                paged_width_buckets=False)
    runner = ModelRunner(model, num_pages=5, page_size=8, max_model_len=16, max_num_seqs=2, ladder=ladder,
                         kv_cache=kv_cache_spec(config, 5, 8, jnp.float32), max_logprobs=0, seed=0)
    runner.compile_all(progress=False)
    return config, runner


def test_compiled_against_the_spec_refuses_to_run_until_the_cache_is_attached(parts):
    config, runner = parts
    assert runner.num_executables > 0
    empty = StepPlan((), (), {}, 0, frozenset())
    with pytest.raises(RuntimeError, match="attach_kv_cache"):
        runner.dispatch(empty)
    with pytest.raises(ValueError, match="does not match"):
        runner.attach_kv_cache(init_kv_cache(config, 6, 8, jnp.float32))      # one page too many
    with pytest.raises(ValueError, match="does not match"):
        runner.attach_kv_cache(init_kv_cache(config, 5, 8, jnp.bfloat16))
    kv = init_kv_cache(config, 5, 8, jnp.float32)
    runner.attach_kv_cache(kv)
    assert all(isinstance(a, jax.Array) for a in runner.kv_cache)
    assert runner.run(empty).req_ids == ()
    assert runner.kv_cache[0].shape == (1, config.num_kv_heads, 5, 8, config.head_dim)
