"""Random weights for any config, generated on the device(s) in their final sharding.

Each parameter is one small jitted function whose output sharding is the requested one, so even a
70B shape is drawn shard by shard on the accelerators and never touches host memory.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from model_zoo.config import ModelConfig
from model_zoo.loaders.placement import LoadTimer, ShardingFor
from model_zoo.params import param_specs

INIT_STD = 0.02


@functools.lru_cache(maxsize=64)
def _init_fn(is_norm: bool, shape: tuple, dtype, sharding):
    # Cached: parameters of equal shape (wk/wv, w_gate/w_up) and repeated loads compile once.
    if is_norm:
        # RMSNorm scales of one keep activations at a sane scale through the stack.
        fn = lambda key: jnp.ones(shape, dtype)  # noqa: E731
    else:
        fn = lambda key: (jax.random.normal(key, shape, jnp.float32) * INIT_STD).astype(dtype)  # noqa: E731
    return jax.jit(fn, out_shardings=sharding)


def dummy_params(config: ModelConfig, dtype, *, sharding_for: ShardingFor | None = None,
                 seed: int = 0, progress: bool = False) -> dict[str, jax.Array]:
    """name -> random array (normal * 0.02; norms = 1), each placed by `sharding_for`."""
    dtype = jnp.dtype(dtype)
    specs = param_specs(config)
    total = sum(math.prod(shape) * dtype.itemsize for shape, _ in specs.values())
    timer = LoadTimer("random init", total, progress, desc="Generating dummy weights")
    root = jax.random.key(seed)
    out = {}
    for i, (name, (shape, axes)) in enumerate(specs.items()):
        sharding = sharding_for(name, shape, axes) if sharding_for is not None else None
        fn = _init_fn(name.endswith("norm"), tuple(shape), dtype, sharding)
        out[name] = fn(jax.random.fold_in(root, i))
        timer.update(math.prod(shape) * dtype.itemsize)
    jax.block_until_ready(out)
    timer.finish("dummy weights")
    return out
