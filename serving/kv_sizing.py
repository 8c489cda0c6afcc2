"""How many KV pages the cache gets, and the context length that follows from it (vLLM's rules)."""

from __future__ import annotations

import dataclasses
import logging

from model_zoo.config import ModelConfig

logger = logging.getLogger("jaxllm")

DEFAULT_CPU_KV_CACHE_BYTES = 512 * 1024 ** 2
_GIB = 1024 ** 3


@dataclasses.dataclass(frozen=True)
class KVCachePlan:
    num_pages: int            # including the reserved null page 0
    page_size: int
    bytes_per_page: int
    max_model_len: int

    @property
    def total_bytes(self) -> int:
        return self.num_pages * self.bytes_per_page

    def max_concurrency(self) -> float:
        usable_tokens = (self.num_pages - 1) * self.page_size
        pages_per_req = -(-self.max_model_len // self.page_size)
        return usable_tokens / (pages_per_req * self.page_size)


def activation_reserve_bytes(config: ModelConfig, max_num_batched_tokens: int, max_num_seqs: int,
                             dtype_bytes: int) -> int:
    """A conservative bound on the step's transient memory: hidden/MLP activations of the token
    bucket, the logits and sampler temporaries of the sequence bucket, plus slack for XLA."""
    t, s = max_num_batched_tokens, max_num_seqs
    act = t * (config.hidden_size * 6 + config.intermediate_size * 3) * max(dtype_bytes, 2)
    logits = s * config.vocab_size * 4 * 6
    return act + logits + _GIB // 2


def plan_kv_cache(config: ModelConfig, *, page_size: int, dtype_bytes: int, platform: str,
                  gpu_memory_utilization: float, num_gpu_blocks_override: int | None,
                  kv_cache_memory: int | None, max_model_len: int | None, device_memory: dict | None,
                  max_num_batched_tokens: int, max_num_seqs: int, num_shards: int = 1,
                  default_max_model_len: int | None = None) -> KVCachePlan:
    """Size the page pool.

    On GPU: ``gpu_memory_utilization`` x device memory, minus what is already in use (the weights)
    and an activation reserve. On CPU: ``kv_cache_memory`` bytes. ``num_gpu_blocks_override`` wins.
    ``num_shards``: devices the KV heads are split over (bytes per page are per device).
    """
    bytes_per_page = config.kv_bytes_per_token(dtype_bytes) * page_size // max(num_shards, 1)
    if num_gpu_blocks_override is not None:
        num_pages = num_gpu_blocks_override
    elif platform == "cpu" or not device_memory or "bytes_limit" not in device_memory:
        budget = kv_cache_memory if kv_cache_memory is not None else DEFAULT_CPU_KV_CACHE_BYTES
        num_pages = budget // bytes_per_page
    else:
        limit = device_memory["bytes_limit"]
        in_use = device_memory.get("bytes_in_use", 0)
        reserve = activation_reserve_bytes(config, max_num_batched_tokens, max_num_seqs, dtype_bytes)
        budget = int(limit * gpu_memory_utilization) - in_use - reserve
        if kv_cache_memory is not None:
            budget = min(budget, kv_cache_memory)
        num_pages = max(budget, 0) // bytes_per_page
    if num_pages < 2:
        raise ValueError(
            f"Not enough memory for the KV cache: {num_pages} pages of {page_size} tokens "
            f"({bytes_per_page} bytes each) fit. Raise --gpu-memory-utilization / --kv-cache-memory, "
            "or use a smaller model or dtype.")
    capacity = (num_pages - 1) * page_size
    model_len = config.max_position_embeddings
    if max_model_len is not None:
        if max_model_len > model_len:
            raise ValueError(
                f"max_model_len ({max_model_len}) is larger than the model's context length "
                f"({model_len}, max_position_embeddings in its config).")
        if max_model_len > capacity:
            raise ValueError(
                f"max_model_len ({max_model_len}) is larger than the KV cache can hold "
                f"({capacity} tokens in {num_pages - 1} pages). Lower --max-model-len or give the cache more memory.")
        model_len = max_model_len
    else:
        # Default: the model's context, capped by the cache (and by a platform default if given).
        model_len = min(model_len, capacity, default_max_model_len or model_len)
    return KVCachePlan(num_pages=int(num_pages), page_size=page_size, bytes_per_page=bytes_per_page,
                       max_model_len=int(model_len))
