"""Engine arguments: one frozen dataclass, validated on construction, mirroring the CLI flags.

``LLM(model, **engine_args)`` and ``jaxllm serve`` both end here; flags and YAML are parsed only at
the entry points (serving/cli.py), which map ``--max-model-len`` to ``max_model_len`` and so on.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

LOAD_FORMATS = ("auto", "safetensors", "gguf", "orbax", "dummy")
DTYPES = ("auto", "float32", "bfloat16", "float16", "half", "float")
SCHEDULING_POLICIES = ("fcfs", "priority")
# "pallas": the Pallas kernels, chosen per call shape and GPU (pallas_kernels.paged_attention.
# auto_kernel: on Hopper, the Mosaic GPU decode kernel for large decode buckets, Triton-lowered
# kernels elsewhere). "pallas-triton" / "pallas-mosaic" force one lowering; shapes the Mosaic
# kernels do not take fall back to Triton.
ATTENTION_BACKENDS = ("pallas", "pallas-triton", "pallas-mosaic", "xla")


def _parse_ladder(spec, name: str) -> Optional[tuple[int, ...]]:
    if spec is None:
        return None
    if isinstance(spec, str):
        try:
            spec = [int(x) for x in spec.replace(",", " ").split()]
        except ValueError:
            raise ValueError(f"{name} must be a comma-separated list of positive integers, got {spec!r}")
    ladder = tuple(sorted(set(int(x) for x in spec)))
    if not ladder or ladder[0] <= 0:
        raise ValueError(f"{name} must list positive integers, got {spec!r}")
    return ladder


@dataclasses.dataclass(frozen=True)
class EngineArgs:
    model: Optional[str] = None                # None: the embedded SmolLM2-135M-Instruct GGUF
    tokenizer: Optional[str] = None
    revision: Optional[str] = None
    download_dir: Optional[str] = None
    load_format: str = "auto"
    dtype: str = "auto"
    seed: int = 0
    max_model_len: Optional[int] = None
    block_size: int = 16
    gpu_memory_utilization: float = 0.9
    num_gpu_blocks_override: Optional[int] = None
    kv_cache_memory: Optional[int] = None      # bytes; CPU default in serving.kv_sizing
    max_num_seqs: Optional[int] = None         # None: the platform's default (serving.engine_builder)
    max_num_batched_tokens: Optional[int] = None
    enable_prefix_caching: bool = True
    scheduling_policy: str = "fcfs"
    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    sharding_rules: Optional[str] = None       # preset name or rules file
    attention_backend: Optional[str] = None    # None: pallas on GPU, xla elsewhere
    max_logprobs: int = 20
    generation_config: str = "auto"            # "auto" (from the model), "vllm" (ignore it), or a dir
    token_buckets: Optional[tuple[int, ...]] = None
    seq_buckets: Optional[tuple[int, ...]] = None
    decode_seq_buckets: Optional[tuple[int, ...]] = None   # decode-only steps' ladder; None: seq_buckets
    compilation_cache_dir: Optional[str] = None
    served_model_name: Optional[str] = None
    # Keep one step in flight: schedule and launch step N+1 before collecting step N (vLLM's
    # --async-scheduling). On by default since measured on an H100 (8B bf16, ctx 512,
    # benchmarks/gpu_async_vs_sync.sh): batch-1 step 7.13 -> 5.93 ms, batch-64 11.19 -> 9.03 ms,
    # GPU idle at batch 64 37% -> 1.6% (results/2026-11-21-h100-decode-profile-async.json).
    async_scheduling: bool = True
    # Multi-host (one model over several processes, jax.distributed); None: from the environment
    # (JAXLLM_COORDINATOR_ADDRESS / JAXLLM_NUM_PROCESSES / JAXLLM_PROCESS_ID), else single-process.
    coordinator_address: Optional[str] = None
    num_processes: Optional[int] = None
    process_id: Optional[int] = None

    def __post_init__(self):
        def check(cond, msg):
            if not cond:
                raise ValueError(msg)

        check(self.load_format in LOAD_FORMATS,
              f"load_format must be one of {', '.join(LOAD_FORMATS)}; got {self.load_format!r}")
        check(self.dtype in DTYPES, f"dtype must be one of {', '.join(DTYPES)}; got {self.dtype!r}")
        check(self.scheduling_policy in SCHEDULING_POLICIES,
              f"scheduling_policy must be one of {', '.join(SCHEDULING_POLICIES)}; got {self.scheduling_policy!r}")
        check(self.attention_backend is None or self.attention_backend in ATTENTION_BACKENDS,
              f"attention_backend must be one of {', '.join(ATTENTION_BACKENDS)}; got {self.attention_backend!r}")
        check(self.block_size in (8, 16, 32, 64, 128), f"block_size must be 8, 16, 32, 64 or 128; got {self.block_size}")
        check(0.0 < self.gpu_memory_utilization <= 1.0,
              f"gpu_memory_utilization must be in (0, 1]; got {self.gpu_memory_utilization}")
        check(self.num_gpu_blocks_override is None or self.num_gpu_blocks_override >= 2,
              f"num_gpu_blocks_override must be at least 2; got {self.num_gpu_blocks_override}")
        check(self.kv_cache_memory is None or self.kv_cache_memory > 0,
              f"kv_cache_memory must be a positive number of bytes; got {self.kv_cache_memory}")
        check(self.max_num_seqs is None or self.max_num_seqs >= 1, f"max_num_seqs must be at least 1; got {self.max_num_seqs}")
        check(self.max_num_batched_tokens is None or self.max_num_batched_tokens >= 1,
              f"max_num_batched_tokens must be at least 1; got {self.max_num_batched_tokens}")
        check(self.max_model_len is None or self.max_model_len >= 1,
              f"max_model_len must be at least 1; got {self.max_model_len}")
        check(self.tensor_parallel_size >= 1, f"tensor_parallel_size must be at least 1; got {self.tensor_parallel_size}")
        check(self.pipeline_parallel_size >= 1,
              f"pipeline_parallel_size must be at least 1; got {self.pipeline_parallel_size}")
        check(self.max_logprobs >= 0, f"max_logprobs must be non-negative; got {self.max_logprobs}")
        check(self.coordinator_address is None or ":" in self.coordinator_address,
              f"coordinator_address must be host:port; got {self.coordinator_address!r}")
        check(self.num_processes is None or self.num_processes >= 1,
              f"num_processes must be at least 1; got {self.num_processes}")
        check(self.process_id is None or self.process_id >= 0, f"process_id must be non-negative; got {self.process_id}")
        check(self.process_id is None or self.num_processes is None or self.process_id < self.num_processes,
              f"process_id must be below num_processes ({self.num_processes}); got {self.process_id}")
        object.__setattr__(self, "token_buckets", _parse_ladder(self.token_buckets, "token_buckets"))
        object.__setattr__(self, "seq_buckets", _parse_ladder(self.seq_buckets, "seq_buckets"))
        object.__setattr__(self, "decode_seq_buckets", _parse_ladder(self.decode_seq_buckets, "decode_seq_buckets"))

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))
