"""Device meshes from the parallel sizes, and the multi-controller start-up.

The mesh is 2-D, ``("pp", "tp")`` with tp the fast axis: consecutive devices (same host, and on a
GPU box the NVLink neighbours that jax lists next to each other) form a tensor-parallel group, and
pipeline stages, which only pass one activation per micro-batch, may span hosts.
"""

from __future__ import annotations

import logging
import os
from typing import Optional, Sequence

import jax
import numpy as np

logger = logging.getLogger("jaxllm")

AXES = ("pp", "tp")


def make_mesh(tensor_parallel_size: int = 1, pipeline_parallel_size: int = 1,
              devices: Optional[Sequence] = None) -> jax.sharding.Mesh:
    """A ("pp", "tp") mesh over the first pp * tp devices (all processes' devices, in process order)."""
    tp, pp = int(tensor_parallel_size), int(pipeline_parallel_size)
    if tp < 1 or pp < 1:
        raise ValueError(f"tensor_parallel_size and pipeline_parallel_size must be at least 1; "
                         f"got {tp} and {pp}")
    if devices is None:
        devices = sorted(jax.devices(), key=lambda d: (d.process_index, d.id))
    devices = list(devices)
    need = tp * pp
    if need > len(devices):
        raise ValueError(
            f"tensor_parallel_size ({tp}) x pipeline_parallel_size ({pp}) = {need} devices, but only "
            f"{len(devices)} {devices[0].platform.upper()} device(s) are visible"
            + (" (on CPU, set XLA_FLAGS=--xla_force_host_platform_device_count=N before starting)"
               if devices[0].platform == "cpu" else ""))
    if need < len(devices):
        if jax.process_count() > 1:
            raise ValueError(f"a multi-host mesh must use every device: {len(devices)} visible, "
                             f"tp x pp = {need}")
        logger.info("Using %d of %d devices for tp=%d x pp=%d", need, len(devices), tp, pp)
    grid = np.array(devices[:need], dtype=object).reshape(pp, tp)
    return jax.sharding.Mesh(grid, AXES)


def initialize_distributed(coordinator_address: Optional[str] = None,
                           num_processes: Optional[int] = None,
                           process_id: Optional[int] = None) -> bool:
    """Join JAX's multi-controller runtime when asked to, from arguments or the environment.

    Environment: JAXLLM_COORDINATOR_ADDRESS (host:port of process 0), JAXLLM_NUM_PROCESSES,
    JAXLLM_PROCESS_ID. Returns True when this process is part of a multi-process job. Must run
    before anything touches a jax device.
    """
    env = os.environ
    coordinator_address = coordinator_address or env.get("JAXLLM_COORDINATOR_ADDRESS")
    if num_processes is None and env.get("JAXLLM_NUM_PROCESSES"):
        num_processes = int(env["JAXLLM_NUM_PROCESSES"])
    if process_id is None and env.get("JAXLLM_PROCESS_ID"):
        process_id = int(env["JAXLLM_PROCESS_ID"])
    if coordinator_address is None and num_processes in (None, 1):
        return False
    if coordinator_address is None or num_processes is None or process_id is None:
        raise ValueError("multi-host needs all three of coordinator address, number of processes and "
                         "process id (flags or JAXLLM_COORDINATOR_ADDRESS / JAXLLM_NUM_PROCESSES / "
                         "JAXLLM_PROCESS_ID)")
    if not 0 <= process_id < num_processes:
        raise ValueError(f"process id must be in [0, {num_processes}); got {process_id}")
    if jax.distributed.is_initialized():
        return jax.process_count() > 1
    # CPU devices of different processes talk through gloo (the default is no cross-process
    # collectives); the setting only affects the CPU client, so it is harmless on GPU hosts.
    # Not jax.default_backend() here: that would start the backends before initialize().
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                               process_id=process_id)
    logger.info("Joined a %d-process JAX job as process %d (coordinator %s); %d global devices",
                num_processes, process_id, coordinator_address, jax.device_count())
    return True
