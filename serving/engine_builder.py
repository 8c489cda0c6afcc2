"""Start-up: resolve the model, load tokenizer and weights, size the KV cache, compile the buckets.

Logs the story a person waits through: model, dtype, devices, weights (GB, s), KV pages and maximum
concurrency, compile progress.
"""

from __future__ import annotations

import functools
import logging
import os
import time

import jax
import jax.numpy as jnp

from model_zoo.config import resolve_dtype
from model_zoo.llama import init_kv_cache, kv_cache_spec
from model_zoo.registry import build_model
from serving.buckets import BucketLadder
from serving.config import EngineArgs
from serving.kv_sizing import plan_kv_cache

logger = logging.getLogger("jaxllm")

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"

# Defaults per platform when the user gives none: GPUs take big batches; the 2-core CPU machines
# want few, small executables.
# On CPU the XLA attention gathers each token's whole block table, so the default context is capped
# too (an explicit --max-model-len still goes up to the model's limit).
# The GPU ladder is the one `jaxllm bench buckets` chose (8B bf16, sharegpt-synthetic, 300 prompts;
# H200, results/2026-11-21-h200-8b-buckets.json): tokens 512,2048 x seqs 1,64,256 (12 executables)
# gave 3821 out tok/s and a 18.5 ms lone-request TTFT; 2048-only (9) lost little throughput (3754)
# but a short prompt arriving alone waited 2.7x longer (50.4 ms, padded to 2048 rows of prefill);
# adding 1024 (15) bought 1.5% for 3 more executables. Rungs above the engine's limits are dropped
# and the limits themselves are always rungs (BucketLadder.build).
# 512 sequences and a decode-only ladder of its own (2026-11-22, H100, 8B bf16, sharegpt-synthetic
# 500 prompts, benchmarks/gpu_sharegpt_configs.sh, results/2026-11-22-h100-8b-sharegpt-offline-*.json):
#   256 seqs, seqs 1,64,256 for every step (the previous default)         21.07 req/s
#   + decode-only steps on 1,8,16,32,64,128,256                           21.82
#   512 seqs, seqs 1,64,512, decode-only 1,8,16,32,64,128,256,512         24.49 (+16%)
# With 512 every request of the run is in flight at once: the prompts prefill in 50 mixed steps of
# 512 sequences instead of 140 of 256, and the decode steps of 2-255 sequences (most of the run's
# steps) pad to the next power-of-two-ish rung instead of 64 or 256 (8 x 8 sequences: 6.3 ms a step
# where the 64 bucket costs 8.7). vLLM's own default on 80 GB GPUs is 1024 sequences. The mixed
# ladder keeps three seq rungs (22 executables in all). The KV cache lowers max_num_seqs to its
# pages; on a small GPU mind the sampler's per-slot rows too: 10 bytes x vocab x sequences (0.66 GB
# at 512 for a 128k vocabulary).
_GPU_DEFAULTS = dict(max_num_batched_tokens=2048, max_num_seqs=512, token_buckets=(512, 2048),
                     seq_buckets=(1, 64, 512), decode_seq_buckets=(1, 8, 16, 32, 64, 128, 256, 512))
_CPU_DEFAULTS = dict(max_num_batched_tokens=128, max_num_seqs=32, max_model_len=2048,
                     token_buckets=(16, 128), seq_buckets=(8, 32))


# The OpenAI server keeps at most 256 sequences by default (vLLM too has defaults by usage): its
# host work per step grows with the requests in flight. With a device step emulated on the 2-core
# CPU (benchmarks/host_overhead.py, results/2026-11-22-cpu-host-overhead-seqs512.json), 512
# streamed requests left the device idle 51% of the time (host 47 ms a step against a 23 ms
# device step; the event loop's SSE chunks alone 26.5 ms) where 256 left it 10-15% (served/offline
# 0.918 measured on an H100 with 256). Offline (LLM, bench throughput) keeps the platform's 512.
_SERVER_MAX_NUM_SEQS = 256


def _platform_defaults(platform: str) -> dict:
    return _GPU_DEFAULTS if platform == "gpu" else _CPU_DEFAULTS


def batch_limits(args: EngineArgs, platform: str, *, server: bool = False) -> tuple[int, int]:
    """(max_num_seqs, max_num_batched_tokens): the user's where given, else the platform's default,
    at most ``_SERVER_MAX_NUM_SEQS`` sequences for the OpenAI server (before the KV cache may lower
    max_num_seqs)."""
    defaults = _platform_defaults(platform)
    seqs = defaults["max_num_seqs"]
    if server:
        seqs = min(seqs, _SERVER_MAX_NUM_SEQS)
    return args.max_num_seqs or seqs, args.max_num_batched_tokens or defaults["max_num_batched_tokens"]


def enable_compilation_cache(path: str | None) -> None:
    """JAX's persistent compilation cache: a second start loads executables instead of compiling."""
    path = path or os.environ.get("JAXLLM_COMPILATION_CACHE") or os.path.join(
        os.path.expanduser("~"), ".cache", "jaxllm", "xla")
    if path.lower() in ("", "none", "off"):
        return
    os.makedirs(path, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def _attention_fn(backend: str | None, platform: str):
    from model_zoo.attention import paged_attention_xla

    if backend is None:
        backend = "pallas" if platform == "gpu" else "xla"
    if backend == "xla":
        return "xla", paged_attention_xla
    from pallas_kernels import paged_attention

    # "pallas": the kernel per call shape and GPU (paged_attention.auto_kernel); the others force one.
    kernel = {"pallas": "auto", "pallas-triton": "triton", "pallas-mosaic": "mosaic"}[backend]
    fn = functools.partial(paged_attention, kernel=kernel)
    if platform == "cpu":
        # No GPU: the same kernels in Pallas' interpreter (slow; for tests and debugging).
        fn = functools.partial(fn, interpret=True)
    return backend, fn


def default_sampling_from_generation_config(gen: dict) -> dict:
    keys = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty")
    return {k: gen[k] for k in keys if gen.get(k) is not None}


def build_engine_parts(args: EngineArgs, *, server: bool = False) -> dict:
    from model_zoo.loader import load_weights, resolve_model
    from serving.scheduler import Scheduler
    from serving.tokenizer import load_tokenizer
    from serving.model_runner import ModelRunner

    from sharding import initialize_distributed

    # Multi-host (flags, or JAXLLM_COORDINATOR_ADDRESS / _NUM_PROCESSES / _PROCESS_ID): before any device use.
    initialize_distributed(args.coordinator_address, args.num_processes, args.process_id)
    enable_compilation_cache(args.compilation_cache_dir)
    platform = jax.default_backend()
    devices = jax.devices()
    resolved = resolve_model(args.model, revision=args.revision, download_dir=args.download_dir,
                             load_format=args.load_format, tokenizer=args.tokenizer)
    config = resolved.config
    dtype = resolve_dtype(args.dtype, config, platform)
    logger.info("Model %s (%s, %d layers, %.0fM params), dtype %s, %d x %s", resolved.path,
                config.architecture, config.num_layers, config.num_params / 1e6, jnp.dtype(dtype).name,
                len(devices), devices[0].device_kind)

    tokenizer = None
    if resolved.tokenizer_path is not None:
        tokenizer = load_tokenizer(resolved.tokenizer_path, gguf_file=resolved.gguf_file,
                                   revision=args.revision)

    layout = None
    if args.tensor_parallel_size * args.pipeline_parallel_size > 1 or args.sharding_rules is not None \
            or jax.process_count() > 1:
        from sharding import build_layout

        layout = build_layout(config, tensor_parallel_size=args.tensor_parallel_size,
                              pipeline_parallel_size=args.pipeline_parallel_size,
                              rules=args.sharding_rules)
        logger.info("Sharding: %s", layout.describe())

    t0 = time.perf_counter()
    params = load_weights(resolved, dtype, sharding_for=layout.sharding_for if layout else None)
    attn_name, attn_fn = _attention_fn(args.attention_backend, platform)
    model = build_model(config, params, attention_fn=attn_fn)
    if layout is not None:
        # Pipeline stages unroll their own layers on GPU, for the same reason as below.
        layout.attach(model, unroll_stage_layers=platform == "gpu")
    if model.layer_stack is None and platform == "gpu":
        from model_zoo.llama import unrolled_layers

        model.layer_stack = unrolled_layers       # 2x faster decode than the scan on H100 (see there)
    logger.info("Weights ready in %.1f s; attention backend: %s", time.perf_counter() - t0, attn_name)

    defaults = _platform_defaults(platform)
    max_num_seqs, max_num_batched_tokens = batch_limits(args, platform, server=server)
    mem = devices[0].memory_stats() if platform == "gpu" else None
    kv_plan = plan_kv_cache(
        config, page_size=args.block_size, dtype_bytes=jnp.dtype(dtype).itemsize, platform=platform,
        gpu_memory_utilization=args.gpu_memory_utilization,
        num_gpu_blocks_override=args.num_gpu_blocks_override, kv_cache_memory=args.kv_cache_memory,
        max_model_len=args.max_model_len, default_max_model_len=defaults.get("max_model_len"),
        device_memory=mem, num_shards=layout.kv_cache_shards if layout else 1,
        max_num_batched_tokens=max_num_batched_tokens, max_num_seqs=max_num_seqs)
    max_model_len = kv_plan.max_model_len
    logger.info("KV cache: %d pages of %d tokens (%.2f GiB); maximum concurrency for %d tokens per "
                "request: %.2fx", kv_plan.num_pages - 1, kv_plan.page_size, kv_plan.total_bytes / 2 ** 30,
                max_model_len, kv_plan.max_concurrency())
    max_num_seqs = min(max_num_seqs, kv_plan.num_pages - 1)
    kv_sharding = layout.kv_cache_sharding() if layout else None

    max_pages_per_seq = -(-max_model_len // kv_plan.page_size)
    ladder = BucketLadder.build(max_num_batched_tokens=max_num_batched_tokens, max_num_seqs=max_num_seqs,
                                max_pages_per_seq=max_pages_per_seq,
                                token_buckets=args.token_buckets or defaults.get("token_buckets"),
                                seq_buckets=args.seq_buckets or defaults.get("seq_buckets"),
                                # A user's --seq-buckets alone is their decode ladder too.
                                decode_seq_buckets=args.decode_seq_buckets or (
                                    None if args.seq_buckets else defaults.get("decode_seq_buckets")),
                                paged_width_buckets=attn_name == "xla")
    gen_eos = resolved.generation_config.get("eos_token_id")
    gen_eos = [gen_eos] if isinstance(gen_eos, int) else list(gen_eos or [])
    tok_eos = [tokenizer.eos_token_id] if tokenizer is not None and tokenizer.eos_token_id is not None else []
    eos = tuple(dict.fromkeys(tok_eos + gen_eos + list(config.eos_token_ids)))
    runner = ModelRunner(model, num_pages=kv_plan.num_pages, page_size=kv_plan.page_size,
                         max_model_len=max_model_len, max_num_seqs=max_num_seqs, ladder=ladder,
                         kv_cache=kv_cache_spec(config, kv_plan.num_pages, kv_plan.page_size, dtype, kv_sharding),
                         max_logprobs=args.max_logprobs, seed=args.seed,
                         eos_token_ids=eos, layout=layout, decode_buckets=attn_name.startswith("pallas"))
    runner.compile_all()
    # Allocated after compiling, so that GEMM autotuning has the device memory (see attach_kv_cache).
    runner.attach_kv_cache(init_kv_cache(config, kv_plan.num_pages, kv_plan.page_size, dtype, sharding=kv_sharding))
    mem = devices[0].memory_stats() if platform == "gpu" else None
    if mem and "bytes_limit" in mem:
        free = mem["bytes_limit"] - mem.get("bytes_in_use", 0)
        logger.info("Device memory left beside weights and KV cache: %.2f GiB; the largest step's scratch: %.2f GiB",
                    free / 2 ** 30, runner.max_temp_bytes / 2 ** 30)
        if runner.max_temp_bytes > free:
            logger.warning("The largest step needs %.2f GiB of scratch memory but only %.2f GiB is left: steps may "
                           "run out of memory; lower --gpu-memory-utilization or --num-gpu-blocks-override.",
                           runner.max_temp_bytes / 2 ** 30, free / 2 ** 30)
    if jax.process_count() > 1 and jax.process_index() == 0:
        from sharding.multihost import BroadcastingRunner

        runner = BroadcastingRunner(runner)   # followers replay each plan (see run_follower)
    scheduler = Scheduler(num_pages=kv_plan.num_pages, page_size=kv_plan.page_size,
                          max_model_len=max_model_len, max_num_seqs=max_num_seqs,
                          max_num_batched_tokens=max_num_batched_tokens,
                          enable_prefix_caching=args.enable_prefix_caching,
                          scheduling_policy=args.scheduling_policy)
    gen = resolved.generation_config if args.generation_config == "auto" else {}
    if args.generation_config not in ("auto", "vllm"):
        import json

        with open(os.path.join(args.generation_config, "generation_config.json")) as f:
            gen = json.load(f)
    name = args.served_model_name or (args.model if args.model else DEFAULT_MODEL_NAME)
    return dict(model_config=config, tokenizer=tokenizer, scheduler=scheduler, runner=runner,
                max_model_len=max_model_len, eos_token_ids=eos,
                default_sampling=default_sampling_from_generation_config(gen), model_name=name)


def run_follower(args: EngineArgs) -> int:
    """A multi-host process other than 0: build the same model and runner, then run every step
    plan process 0 publishes, until it stops. Returns the number of steps run."""
    from sharding import initialize_distributed
    from sharding.multihost import follow

    if not initialize_distributed(args.coordinator_address, args.num_processes, args.process_id) \
            or jax.process_index() == 0:
        raise ValueError("run_follower is for processes other than 0 of a multi-host job "
                         "(set JAXLLM_COORDINATOR_ADDRESS, JAXLLM_NUM_PROCESSES, JAXLLM_PROCESS_ID)")
    # Followers exist only under `jaxllm serve`: the server's limits, so their executables are rank 0's.
    return follow(build_engine_parts(args, server=True)["runner"])
