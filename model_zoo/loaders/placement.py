"""Put one parameter at a time on the device(s), from a host reader, with progress and timing.

A loader describes each parameter by a `ParamSource`: `read(index)` returns the block selected by
`index` (a tuple of slices) of the parameter *as stored* (checkpoint dtype; for a transposed
parameter, the last two dims swapped, i.e. HF's [out, in]). `jax.make_array_from_callback` asks for
exactly the blocks each device's shard needs, so a host holds at most one parameter (usually one
shard) at a time. The transpose to our [in, out] and the dtype cast then run on the device, where
they are nearly free, instead of as strided copies on the host CPU (which ran at <1 GB/s on an
8B model): the stored array is placed with the transposed sharding, so the on-device transpose
is shard-local and moves no data between devices.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import time
from typing import Callable, Iterable, Mapping

import jax
import numpy as np

logger = logging.getLogger("jaxllm")

ShardingFor = Callable[[str, tuple, tuple], "jax.sharding.Sharding | None"]


@dataclasses.dataclass
class ParamSource:
    read: Callable[[tuple], np.ndarray]  # index over the stored layout -> block in host_dtype
    host_dtype: np.dtype
    transpose: bool = False              # stored [..., out, in]; the parameter is [..., in, out]
    release: Callable[[], None] | None = None  # drop any host staging once placed


def sharding_of(name: str, shape: tuple, axes: tuple, sharding_for: ShardingFor | None):
    sharding = sharding_for(name, shape, axes) if sharding_for is not None else None
    if sharding is None:
        sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    return sharding


def _swap_last_two(sharding, ndim: int):
    if isinstance(sharding, jax.sharding.SingleDeviceSharding):
        return sharding
    if isinstance(sharding, jax.sharding.NamedSharding):
        spec = list(sharding.spec) + [None] * (ndim - len(sharding.spec))
        spec[-2], spec[-1] = spec[-1], spec[-2]
        return jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec(*spec),
                                          memory_kind=sharding.memory_kind)
    raise ValueError(f"sharding_for must return a NamedSharding or SingleDeviceSharding "
                     f"(or None); got {type(sharding).__name__}")


@functools.lru_cache(maxsize=256)
def _on_device_fixup(transpose: bool, dtype: np.dtype, sharding):
    def fix(x):
        if transpose:
            x = jax.numpy.swapaxes(x, -1, -2)
        return x.astype(dtype)

    return jax.jit(fix, out_shardings=sharding)


def _index_key(index: tuple) -> tuple:
    return tuple((s.start, s.stop, s.step) if isinstance(s, slice) else s for s in index)


def place_param(name: str, shape: tuple, axes: tuple, dtype, source: ParamSource,
                sharding_for: ShardingFor | None) -> jax.Array:
    shape = tuple(shape)
    dtype = np.dtype(dtype)
    sharding = sharding_of(name, shape, axes, sharding_for)
    stored_shape, stored_sharding = shape, sharding
    if source.transpose:
        stored_shape = shape[:-2] + (shape[-1], shape[-2])
        stored_sharding = _swap_last_two(sharding, len(shape))
    # Replicated dimensions make several devices ask for the same block; read it once.
    blocks: dict[tuple, np.ndarray] = {}

    def callback(index):
        key = _index_key(index)
        if key not in blocks:
            block = source.read(index)
            if block.dtype != source.host_dtype:
                raise AssertionError(f"reader for {name} returned {block.dtype}, "
                                     f"declared {source.host_dtype}")
            blocks[key] = block
        return blocks[key]

    arr = jax.make_array_from_callback(stored_shape, stored_sharding, callback)
    if source.transpose or arr.dtype != dtype:
        arr = _on_device_fixup(source.transpose, dtype, sharding)(arr)
    # Wait for the transfer so this parameter's host blocks can be freed before the next is read:
    # this is what bounds host memory to one parameter.
    arr.block_until_ready()
    blocks.clear()
    return arr


class LoadTimer:
    """tqdm bar over bytes plus the final `loaded ... GB/s` log line."""

    def __init__(self, source: str, total_bytes: int, progress: bool, desc: str = "Loading weights"):
        self.source = source
        self.total = int(total_bytes)
        self.done = 0
        self.t0 = time.perf_counter()
        self.bar = None
        if progress:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=self.total, unit="B", unit_scale=True, desc=desc, leave=False)

    def update(self, nbytes: int):
        self.done += int(nbytes)
        if self.bar is not None:
            self.bar.update(int(nbytes))

    def finish(self, what: str = "weights") -> float:
        seconds = time.perf_counter() - self.t0
        if self.bar is not None:
            self.bar.close()
        gbps = self.done / seconds / 1e9 if seconds > 0 else float("inf")
        logger.info("Loaded %s from %s: %.3f GB in %.2f s (%.2f GB/s)",
                    what, self.source, self.done / 1e9, seconds, gbps)
        return seconds


def place_all(specs: Mapping[str, tuple[tuple, tuple]], readers: Mapping[str, ParamSource], dtype,
              *, sharding_for: ShardingFor | None, progress: bool, source: str,
              order: Iterable[str] | None = None) -> dict[str, jax.Array]:
    """Place every parameter of `specs` using its reader; returns name -> jax.Array."""
    np_dtype = np.dtype(dtype)
    total = sum(int(np.prod(shape)) * np_dtype.itemsize for shape, _ in specs.values())
    timer = LoadTimer(source, total, progress)
    out: dict[str, jax.Array] = {}
    try:
        for name in (order or specs):
            shape, axes = specs[name]
            source = readers[name]
            arr = place_param(name, shape, axes, np_dtype, source, sharding_for)
            if source.release is not None:
                source.release()
            out[name] = arr
            timer.update(arr.nbytes)
    finally:
        if timer.bar is not None and timer.done < timer.total:
            timer.bar.close()
    timer.finish()
    return {name: out[name] for name in specs}


_POOL = None


def parallel_for(fn: Callable[[int], None], n: int) -> None:
    """Run fn(0..n-1) on a small thread pool: numpy's copies, casts and GGUF dequantization
    release the GIL, so layers of one parameter are read concurrently."""
    global _POOL
    if n <= 1:
        for i in range(n):
            fn(i)
        return
    if _POOL is None:
        from concurrent.futures import ThreadPoolExecutor

        _POOL = ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1),
                                   thread_name_prefix="jaxllm-load")
    for future in [_POOL.submit(fn, i) for i in range(n)]:
        future.result()  # re-raises the first error, e.g. a CheckpointError


def full_index(shape: tuple) -> tuple:
    return tuple(slice(0, n) for n in shape)
