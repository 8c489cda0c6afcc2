"""Public entry for Pallas paged attention: validation, tuning defaults and decode/prefill dispatch.

``paged_attention`` has the call signature of ``model_zoo.attention.paged_attention_xla`` plus
keyword-only static options, so the model switches backends by swapping the function:

    out = paged_attention(q, k_cache, v_cache, layer, md, scale=d ** -0.5,
                          soft_cap=None, sliding_window=None, max_query_len=1)

``max_query_len`` is a static hint from the runner (it knows each bucket): ``1`` promises every
sequence contributes at most one query token this step and selects the decode kernel (one program
per token x kv head x key split, the key range split so a single long sequence still fills the GPU);
anything else (or ``None``) selects the ragged prefill kernel (query blocks of one sequence each,
causal masking), which is correct for decode too, just slower there. Without ``new_kv`` the decode
kernel treats every token independently, so a wrong hint costs speed, never correctness.

``new_kv=(k, v)`` (the models always pass it) also writes this step's keys/values at
``md.slot_mapping`` and returns ``(out, k_cache, v_cache)``: inside the decode kernel (Triton or
Mosaic) on a decode step (no separate scatter kernel per layer), by ``write_kv`` before the kernel
on prefill/mixed steps.
The fused write needs the hint to hold: a second token of one sequence in the same step would not
see the first one's key, which is written during the kernel, not before it.

Which lowering runs: the Triton-lowered Pallas kernels in ``triton_attention.py`` by default
(``kernel="triton"``), on every CUDA GPU (and in interpret mode on the CPU, ``interpret=True``,
which the tests use). ``kernel="mosaic"`` selects the Mosaic GPU (Hopper, sm_90) kernels (TMA
page copies into a multi-stage SMEM ring, wgmma; ``interpret=True`` runs them in Mosaic GPU's
interpreter):
decode in ``mosaic_attention.py``, prefill/mixed batches in ``mosaic_prefill.py``. Shapes they do
not support (fp32, head_dim not a multiple of 64, more than 64 query heads per kv head for decode,
page sizes not a multiple of 8, or no ring that fits shared memory) run the Triton kernels, with a
one-time log line. ``kernel="auto"`` (the engine's default ``pallas`` backend) picks per call
shape and GPU (``auto_kernel``): the Mosaic kernels where benchmarks/kernels.py and whole engine
steps measured them faster on H100/H200, Triton elsewhere.
"""

from __future__ import annotations

import dataclasses
import functools
import logging

import jax
import jax.numpy as jnp

from pallas_kernels import mosaic_attention, mosaic_prefill, triton_attention
from pallas_kernels.reference import attend_after_write

logger = logging.getLogger("jaxllm.pallas_kernels")


@dataclasses.dataclass(frozen=True)
class DecodeTuning:
    pages_per_block: int      # pages gathered per inner step (block_k = pages * page_size keys)
    target_programs: int      # split the key range until token x kv_head x split reaches this
    min_pages_per_split: int  # ...but never below this many pages per split (partials cost bytes)
    num_warps: int
    num_stages: int


@dataclasses.dataclass(frozen=True)
class PrefillTuning:
    block_rows: int           # query rows per program: block_q = block_rows // padded group
    pages_per_block: int
    num_warps: int
    num_stages: int


# Tuned per GPU with benchmarks/kernels.py; the key is a substring of jax.Device.device_kind.
# Measurements justifying each entry are in the comment beside it; "default" is the fallback.
# H100 shares the H200's entry (same SM count, shared memory and Triton scheduling; only the
# bandwidth differs) until it is measured on its own.
_HOPPER_DECODE = DecodeTuning(
    # H200, JAX 0.11.2, 2026-11-21 sweep (benchmarks/results/2026-11-21-h200-kernels-sweep.json,
    # bf16, 32q/8kv heads, d128, page 16): single-stage (num_stages=1) with 8-page blocks was the
    # best or near-best at batch >= 128 (2.21 TB/s at 128 x 4k against 1.68 with 2 stages) and
    # target 1024 programs beat 4096 at small batch (32 x 2k: 0.75-0.96 vs 0.43-0.67 TB/s);
    # 8 warps never helped. Sweep spread is about +-15%.
    pages_per_block=8, target_programs=1024, min_pages_per_split=8, num_warps=4, num_stages=1)
_HOPPER_PREFILL = PrefillTuning(
    # Same sweep, causal chunks with 4 q heads per kv head: 128 rows x 128 keys, 8 warps, 2 stages
    # gave 290 TFLOP/s at 8k and 206 at 4k, the best or within 3% of it; 64-row blocks and
    # single-stage pipelines lost 10-30%.
    block_rows=128, pages_per_block=8, num_warps=8, num_stages=2)
_DECODE_TUNING = {
    "H200": _HOPPER_DECODE,
    "H100": _HOPPER_DECODE,
    # Untuned GPUs: the conservative Triton defaults that the first H200 run started from.
    "default": DecodeTuning(pages_per_block=8, target_programs=1024, min_pages_per_split=16,
                            num_warps=4, num_stages=2),
}
_PREFILL_TUNING = {
    "H200": _HOPPER_PREFILL,
    "H100": _HOPPER_PREFILL,
    "default": PrefillTuning(block_rows=64, pages_per_block=4, num_warps=4, num_stages=2),
}


@dataclasses.dataclass(frozen=True)
class MosaicDecodeTuning:
    block_keys: int           # keys per K/V block (a multiple of 64: the wgmma contraction)
    num_stages: int           # K/V blocks in flight in the SMEM ring
    target_programs: int      # as DecodeTuning
    min_pages_per_split: int
    # A grid of fewer (token x kv head) programs than this takes small_grid_block_keys instead:
    # one CTA an SM then needs larger blocks to keep enough bytes in flight.
    small_grid_programs: int = 0
    small_grid_block_keys: int = 0


# H200, JAX 0.11.2, 2026-11-22 (benchmarks/results/2026-11-22-h200-kernels-mosaic-sweep-busy.json:
# 32 q / 8 kv heads, d128, bf16, page 16; % of copy by device busy time, every variant traced).
# Fewest splits won everywhere: target 128 programs gave 70-103% against 49-103% at 1024 (each
# split pays a CTA setup and the combine). Two stages beat three and four at 64-key blocks (80 KB a
# CTA, two CTAs an SM): 88% at 32 x 2k, 103% at 128 x 4k, 96% at 256 x 1k. Where the batch alone
# gives fewer CTAs than SMs, 128-key blocks won: 75% vs 70% at 1 x 32k, 86% vs 79% at 8 x 8k.
# H100 shares the entry (same SM count and shared memory) until measured on its own.
_HOPPER_MOSAIC_DECODE = MosaicDecodeTuning(block_keys=64, num_stages=2, target_programs=128,
                                           min_pages_per_split=8, small_grid_programs=132,
                                           small_grid_block_keys=128)
_MOSAIC_DECODE_TUNING = {
    "H200": _HOPPER_MOSAIC_DECODE,
    "H100": _HOPPER_MOSAIC_DECODE,
    # Other GPUs cannot run Mosaic GPU's Hopper kernels; the entry only keeps planning total.
    "default": _HOPPER_MOSAIC_DECODE,
}
_INTERPRET_MOSAIC_DECODE = MosaicDecodeTuning(block_keys=64, num_stages=2, target_programs=1,
                                              min_pages_per_split=1)


@dataclasses.dataclass(frozen=True)
class MosaicPrefillTuning:
    block_keys: int           # keys per K/V block (a multiple of 64, at most 256)
    num_stages: int           # K/V blocks in flight in the SMEM ring
    compute_wgs: int          # 2: two compute warpgroups (128 query rows) fed by a producer
                              # warpgroup (FA3); 1: one warpgroup (64 rows) issuing its own copies


# Measured on an H100 (7ef33e1) and an H200 (22cfd7f), JAX 0.11.2, 2k/4k/8k causal chunks, 32 q / 8
# kv heads, d128, bf16, page 16 (results/2026-11-22-{h100,h200}-kernels-prefill-mosaic.json, busy):
# FA3's split (two compute warpgroups x 64 rows + a producer, 128-key blocks, 2 stages, ~163 KiB
# of SMEM: one CTA an SM) was the best or within noise of it everywhere (H200: 56/67/68% of the
# matmul rate). 64-key blocks lost 2-4 points (3 stages no better), one warpgroup (block_q 64) 9-39.
_MOSAIC_PREFILL_TUNING = {
    "default": MosaicPrefillTuning(block_keys=128, num_stages=2, compute_wgs=2),
}
# One warpgroup runs as one interpreter thread, inline; several warpgroups cost a compile per
# grid point and thread on the CPU (seconds each), so the interpreter default is one.
_INTERPRET_MOSAIC_PREFILL = MosaicPrefillTuning(block_keys=64, num_stages=2, compute_wgs=1)
# Hopper gives a CTA at most 227 KiB of shared memory; the ring shrinks until the CTA fits.
_MOSAIC_SMEM_LIMIT = 227 * 1024
KERNELS = ("auto", "triton", "mosaic")
# kernel="auto" (the engine's "pallas" backend) on a Hopper GPU: a decode call whose grid has at
# least this many (token x kv head) programs runs the Mosaic decode kernel, a smaller one the Triton
# kernel. Measured while the Mosaic path still scattered K/V separately (it fuses the write since
# session 8's branch; re-measure the threshold on the GPU). The shard-local wrap
# (sharding/attention.py) calls the kernel with its own heads: under TP the count is per device.
# Measured on the 8B shape (8 kv heads), ctx 512, whole engine steps, one process per backend
# (gpu_itl_variants.sh; step ms, pallas-triton -> auto, same check tokens):
#   H100, 2026-11-22 (results/2026-11-22-h100-decode-profile-{T-triton,A-auto}*.json):
#     batch 64 (512 programs) 9.042 -> 8.783, batch 32 (256) 7.535 -> 7.329, batch 16 (128, with
#     this threshold) 6.632 -> 6.525; batch 8 (64, Triton in both) 6.248 / 6.239, batch 1 5.777 /
#     5.796. Below 128 the kernel alone loses: 8 x 512 runs at 13% of copy on Mosaic against 27%
#     on Triton (-kernels-decode-write.json), a grid of 64 CTAs on 132 SMs.
#   H200, 2026-11-22: batch 64 pallas-mosaic 6.789 vs Triton 7.193; batch 1 Triton 4.378 vs 4.434.
# "default" (every other GPU, and the interpreter): never Mosaic.
_AUTO_MOSAIC_DECODE_MIN_PROGRAMS = {"H200": 128, "H100": 128, "default": None}
# Prefill and mixed calls: the Mosaic prefill kernel when the bucket has at least this many query
# tokens per sequence slot, i.e. the buckets of one sequence (a prompt prefilling alone: 512 or 2048
# tokens, 1 sequence), Triton otherwise. The Mosaic kernel runs 2k-8k causal chunks 1.6-2x faster
# (H200: 56/67/68% of the matmul rate against 28/38/43%, results/2026-11-22-h200-kernels-prefill-
# mosaic.json), but a CTA owns 128 query rows of ONE q head, where a Triton program owns 32 tokens
# x the 4 q heads of one kv head: a decode token in a mixed batch costs it 2-4x Triton's work and
# reads its K/V once per q head. Mixed buckets of many sequences stay on Triton until measured.
_AUTO_MOSAIC_PREFILL_MIN_TOKENS_PER_SEQ = {"H200": 256, "H100": 256, "default": None}
# Small enough for the CPU interpreter: fewer, smaller blocks keep the tests fast.
_INTERPRET_DECODE = DecodeTuning(pages_per_block=2, target_programs=1, min_pages_per_split=1,
                                 num_warps=4, num_stages=1)
_INTERPRET_PREFILL = PrefillTuning(block_rows=16, pages_per_block=2, num_warps=4, num_stages=1)
# Triton keeps num_stages copies of each K/V block in shared memory (228 KiB a block on Hopper,
# less elsewhere); blocks are halved until they fit this budget, which leaves room for the rest.
_SMEM_BUDGET = 160 * 1024


def _fit_pages_per_block(pages_per_block, page_size, head_dim, itemsize, num_stages, extra=0):
    while pages_per_block > 1 and (
            2 * pages_per_block * page_size * head_dim * itemsize * max(1, num_stages) + extra
            > _SMEM_BUDGET):
        pages_per_block //= 2
    return pages_per_block


def _lookup(table, device_kind: str):
    for key, value in table.items():
        if key != "default" and key.lower() in device_kind.lower():
            return value
    return table["default"]


def _device_kind() -> str:
    return jax.devices()[0].device_kind


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def _is_pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def _override(tuning, **overrides):
    """The tuning-table entry with the caller's explicit keyword overrides (None = keep the table's)."""
    return dataclasses.replace(tuning, **{k: v for k, v in overrides.items() if v is not None})


def _validate(q, k_cache, v_cache, layer, md, soft_cap, sliding_window, max_query_len):
    if q.ndim != 3:
        raise ValueError(f"q must be [tokens, heads, head_dim], got shape {q.shape}")
    if k_cache.ndim != 5 or k_cache.shape != v_cache.shape:
        raise ValueError("k_cache and v_cache must both be [layers, kv_heads, pages, page_size, "
                         f"head_dim] with equal shapes, got {k_cache.shape} and {v_cache.shape}")
    if k_cache.dtype != v_cache.dtype:
        raise ValueError(f"k_cache and v_cache dtypes differ: {k_cache.dtype} vs {v_cache.dtype}")
    t, h, d = q.shape
    _, hkv, _, page_size, dk = k_cache.shape
    if dk != d:
        raise ValueError(f"head_dim of q ({d}) and of the cache ({dk}) differ")
    if h % hkv:
        raise ValueError(f"query heads ({h}) must be a multiple of kv heads ({hkv})")
    if not _is_pow2(d) or d < 16:
        raise ValueError(f"head_dim must be a power of two >= 16 for the Pallas kernels, got {d}; "
                         "use attention_backend='xla'")
    if not _is_pow2(page_size):
        raise ValueError(f"page_size must be a power of two for the Pallas kernels, got {page_size}")
    if jnp.shape(layer) != () or not jnp.issubdtype(jnp.result_type(layer), jnp.integer):
        raise ValueError(f"layer must be an integer scalar, got {layer!r}")
    for name, arr, shape in (("positions", md.positions, (t,)),
                             ("token_seq_ids", md.token_seq_ids, (t,))):
        if arr.shape != shape:
            raise ValueError(f"md.{name} must have shape {shape}, got {arr.shape}")
    s = md.seq_lens.shape[0]
    if md.block_tables.ndim != 2 or md.block_tables.shape[0] != s:
        raise ValueError(f"md.block_tables must be [{s}, max_pages], got {md.block_tables.shape}")
    if md.query_start_loc.shape != (s + 1,):
        raise ValueError(f"md.query_start_loc must have shape {(s + 1,)}, "
                         f"got {md.query_start_loc.shape}")
    if soft_cap is not None and not soft_cap > 0:
        raise ValueError(f"soft_cap must be positive or None, got {soft_cap}")
    if sliding_window is not None and (not isinstance(sliding_window, int) or sliding_window < 1):
        raise ValueError(f"sliding_window must be a positive int or None, got {sliding_window}")
    if max_query_len is not None and (not isinstance(max_query_len, int) or max_query_len < 1):
        raise ValueError(f"max_query_len must be a positive int or None, got {max_query_len}")


def _validate_new_kv(new_kv, q, k_cache, md):
    if not isinstance(new_kv, (tuple, list)) or len(new_kv) != 2:
        raise ValueError("new_kv must be a pair (k, v) of this step's keys and values")
    t, _, d = q.shape
    want = (t, k_cache.shape[1], d)
    for name, arr in zip(("k", "v"), new_kv):
        if arr.shape != want:
            raise ValueError(f"new_kv's {name} must be [tokens, kv_heads, head_dim] = {want}, "
                             f"got {arr.shape}")
    if md.slot_mapping.shape != (t,):
        raise ValueError(f"md.slot_mapping must have shape {(t,)}, got {md.slot_mapping.shape}")


def _group(q, hkv, padded_group):
    """[T, H, D] -> [T, Hkv, Gp, D], zero query rows appended to each group."""
    t, h, d = q.shape
    g = h // hkv
    qg = q.reshape(t, hkv, g, d)
    if padded_group > g:
        qg = jnp.pad(qg, ((0, 0), (0, 0), (0, padded_group - g), (0, 0)))
    return qg


def _default_num_splits(tuning, programs: int, max_pages: int, pages_per_block: int) -> int:
    """Key-range splits for decode (both kernels): enough that token x kv_head x split reaches
    ``tuning.target_programs``, but never below ``min_pages_per_split`` (or one block) per split."""
    want = -(-tuning.target_programs // max(1, programs))
    most = max(1, max_pages // max(tuning.min_pages_per_split, pages_per_block))
    return max(1, min(want, most))


def _decode(q, k_cache, v_cache, layer_arr, md, *, scale, soft_cap, sliding_window, tuning,
            num_splits, interpret, new_kv=None):
    t, h, d = q.shape
    hkv = k_cache.shape[1]
    g = h // hkv
    padded_group = max(16, _next_pow2(g))
    max_pages = md.block_tables.shape[1]
    ppb = _fit_pages_per_block(tuning.pages_per_block, k_cache.shape[3], d,
                               k_cache.dtype.itemsize, tuning.num_stages)
    if num_splits is None:
        num_splits = _default_num_splits(tuning, t * hkv, max_pages, ppb)
    pages_per_split = -(-max_pages // num_splits)
    token_tables = md.block_tables[md.token_seq_ids]                   # [T, max_pages]
    # Zero (null page) padding: every split owns pages_per_split entries and the last inner
    # block may read up to pages_per_block entries past the end; masked keys are never used.
    pad = num_splits * pages_per_split + ppb - max_pages
    token_tables = jnp.pad(token_tables, ((0, 0), (0, pad)))
    if new_kv is not None:
        # Cast before the kernel: it then attends to exactly the values a cache of this dtype
        # holds, as the unfused path reads them back.
        new_kv = (new_kv[0].astype(k_cache.dtype), new_kv[1].astype(v_cache.dtype),
                  md.slot_mapping.astype(jnp.int32))
    result = triton_attention.decode_pallas_call(
        _group(q, hkv, padded_group), k_cache, v_cache, layer_arr,
        (md.positions + 1).astype(jnp.int32), token_tables.astype(jnp.int32),
        scale=scale, soft_cap=soft_cap, sliding_window=sliding_window, pages_per_block=ppb,
        num_splits=num_splits, num_warps=tuning.num_warps, num_stages=tuning.num_stages,
        interpret=interpret, new_kv=new_kv)
    if new_kv is None:
        return result[:, :, :g].reshape(t, h, d)
    out, k_cache, v_cache = result
    return out[:, :, :g].reshape(t, h, d), k_cache, v_cache


@functools.lru_cache(maxsize=None)
def _log_mosaic_fallback(reason: str, phase: str = "decode") -> None:
    """Once per (reason, phase) (this runs while tracing, i.e. once per compiled shape anyway);
    ``phase`` is "decode" or "prefill"."""
    logger.warning("kernel='mosaic': the Mosaic GPU %s kernel cannot run this shape (%s); "
                   "the Triton %s kernel runs it instead", phase, reason, phase)


def _mosaic_plan(q, k_cache, md, tuning, pages_per_block, num_splits):
    """(pages_per_block, pages_per_split, num_splits, num_stages) for the Mosaic decode kernel, or
    the reason it cannot run this shape (then the Triton kernel runs)."""
    t, h, d = q.shape
    hkv, _, page_size = k_cache.shape[1:4]
    max_pages = md.block_tables.shape[1]
    block_keys = tuning.block_keys
    if t * hkv < tuning.small_grid_programs:
        block_keys = tuning.small_grid_block_keys
    ppb = pages_per_block or max(1, block_keys // page_size)
    why = mosaic_attention.unsupported_reason(dtype=k_cache.dtype, head_dim=d, group=h // hkv,
                                              page_size=page_size, pages_per_block=ppb)
    if why is not None:
        return why
    if num_splits is None:
        num_splits = _default_num_splits(tuning, t * hkv, max_pages, ppb)
    # Splits own whole blocks, so a block never straddles two splits' tables; rounding up may
    # leave fewer splits than asked.
    pages_per_split = -(-max_pages // num_splits)
    pages_per_split = -(-pages_per_split // ppb) * ppb
    num_splits = -(-max_pages // pages_per_split)
    stages = tuning.num_stages
    while stages > 2 and _mosaic_smem(k_cache, d, ppb, pages_per_split, stages, num_splits) > \
            _MOSAIC_SMEM_LIMIT:
        stages -= 1
    if _mosaic_smem(k_cache, d, ppb, pages_per_split, stages, num_splits) > _MOSAIC_SMEM_LIMIT:
        return f"no {stages}-stage ring of {ppb * k_cache.shape[3]}-key blocks fits shared memory"
    if mosaic_attention.table_layout(pages_per_split)[0] > 256:
        return f"{pages_per_split} pages per split (more than one TMA copy of the table)"
    return ppb, pages_per_split, num_splits, stages


def _mosaic_smem(k_cache, d, ppb, pages_per_split, stages, num_splits):
    rows, cols = mosaic_attention.table_layout(pages_per_split)
    return mosaic_attention.smem_bytes(
        head_dim=d, block_k=ppb * k_cache.shape[3], num_stages=stages,
        itemsize=k_cache.dtype.itemsize, table_entries=rows * cols, multi_split=num_splits > 1)


def _decode_mosaic(q, k_cache, v_cache, layer_arr, md, plan, *, scale, soft_cap, sliding_window,
                   interpret, new_kv=None):
    ppb, pages_per_split, _, stages = plan
    t, h, d = q.shape
    hkv = k_cache.shape[1]
    g = h // hkv
    if new_kv is not None:
        # Cast before the kernel, as write_kv does: the kernel stores (and reads back) exactly
        # the values a cache of this dtype holds.
        new_kv = (new_kv[0].astype(k_cache.dtype), new_kv[1].astype(v_cache.dtype),
                  md.slot_mapping.astype(jnp.int32))
    # q and out are bitcasts of [T, H, D]; the kernel reads positions and each token's table row.
    result = mosaic_attention.decode_call(
        q.reshape(t, hkv, g, d), k_cache, v_cache, layer_arr, md.positions, md.block_tables,
        md.token_seq_ids, scale=scale, soft_cap=soft_cap, sliding_window=sliding_window,
        pages_per_block=ppb, pages_per_split=pages_per_split, num_stages=stages,
        interpret=interpret, new_kv=new_kv)
    if new_kv is None:
        return result.reshape(t, h, d)
    out, k_cache, v_cache = result
    return out.reshape(t, h, d), k_cache, v_cache


def _prefill_items(md, num_tokens, block_q, sliding_window, align=1):
    """Split each sequence's query tokens into blocks of <= block_q.

    Rows are (q_lo, q_hi, kv_lo, kv_hi, kv_full, real_lo, 0, 0): the block's rows [q_lo, q_hi),
    of which [real_lo, q_hi) are the sequence's tokens, the keys any of them sees [kv_lo, kv_hi),
    and kv_full, below which every one of them sees every key (the first one's position + 1
    without a window).

    ``align`` (the Mosaic prefill kernel's 8: its TMA boxes need row offsets that are multiples of
    8): a sequence's first item starts at the multiple of ``align`` at or below its first token,
    its later ones every ``block_q`` rows after that, so every q_lo is a multiple of ``align``; the
    rows [q_lo, real_lo) before the sequence belong to earlier sequences. With
    ``align=1`` (the Triton kernel) real_lo == q_lo.

    The static item count N bounds sum_s cdiv(q_len_s + lead_s, block_q), lead_s = real_lo - q_lo
    of the sequence's first item: cdiv(T, block_q) + S with align=1; with align >= 2 (lead_s <
    align) a nonempty sequence has cdiv(q_len_s + lead_s, block_q) <= (q_len_s + align - 2) //
    block_q + 1 items, so N = (T + (align - 2) S) // block_q + S. Unused items are empty
    (q_lo == q_hi, kv_lo == kv_hi) and write nothing.
    """
    qsl = md.query_start_loc.astype(jnp.int32)
    s = qsl.shape[0] - 1
    q_len = qsl[1:] - qsl[:-1]
    base = qsl[:-1] // align * align                 # the sequence's first item's q_lo
    blocks = jnp.where(q_len > 0, (qsl[1:] - base + block_q - 1) // block_q, 0)
    ends = jnp.cumsum(blocks)
    starts = ends - blocks
    if align == 1:
        n = -(-num_tokens // block_q) + s
    else:
        n = (num_tokens + (align - 2) * s) // block_q + s
    item = jnp.arange(n, dtype=jnp.int32)
    seq = jnp.minimum(jnp.searchsorted(ends, item, side="right"), s - 1).astype(jnp.int32)
    valid = item < ends[-1]
    q_lo = base[seq] + (item - starts[seq]) * block_q
    q_hi = jnp.minimum(q_lo + block_q, qsl[seq + 1])
    real_lo = jnp.maximum(q_lo, qsl[seq])
    valid &= q_hi > real_lo
    last = jnp.clip(q_hi - 1, 0, num_tokens - 1)
    first = jnp.clip(real_lo, 0, num_tokens - 1)
    kv_hi = md.positions[last] + 1
    kv_lo = jnp.zeros_like(kv_hi)
    # Causal: every real row of the block sees keys up to the first one's position. With a window
    # the fully visible range is narrower; the kernel then masks every block (kv_full = kv_lo).
    kv_full = md.positions[first] + 1
    if sliding_window is not None:
        kv_lo = jnp.maximum(0, md.positions[first] - sliding_window + 1)
        kv_full = kv_lo
    zero = jnp.zeros_like(q_lo)
    cols = [q_lo, q_hi, kv_lo, kv_hi, kv_full, real_lo]
    items = jnp.stack([jnp.where(valid, c, zero) for c in cols] + [zero] * 2, axis=1)
    return items.astype(jnp.int32), seq


def _mosaic_prefill_plan(q, k_cache, md, tuning):
    """The Mosaic prefill kernel's plan for this shape, or why it cannot run it."""
    if q.dtype != k_cache.dtype:
        return f"q dtype {q.dtype} differs from the cache's {k_cache.dtype}"
    return mosaic_prefill.make_plan(
        dtype=k_cache.dtype, head_dim=q.shape[2], page_size=k_cache.shape[3],
        max_pages=md.block_tables.shape[1], block_keys=tuning.block_keys,
        num_stages=tuning.num_stages, compute_wgs=tuning.compute_wgs,
        smem_limit=_MOSAIC_SMEM_LIMIT)


def _prefill_mosaic(q, k_cache, v_cache, layer_arr, md, plan, *, scale, soft_cap,
                    sliding_window, interpret):
    # Items without the window: the kernel applies it from each item's first position.
    items, seq = _prefill_items(md, q.shape[0], plan.block_q, None,
                                align=mosaic_prefill.ROW_ALIGN)
    return mosaic_prefill.prefill_call(
        q, k_cache, v_cache, layer_arr, items, md.block_tables[seq], scale=scale,
        soft_cap=soft_cap, sliding_window=sliding_window, plan=plan, interpret=interpret)


def _prefill(q, k_cache, v_cache, layer_arr, md, *, scale, soft_cap, sliding_window, tuning,
             block_q, interpret):
    t, h, d = q.shape
    hkv = k_cache.shape[1]
    g = h // hkv
    padded_group = _next_pow2(g)
    # Triton's dot needs >= 16 rows; block_q is a power of two so rows stay one.
    bq = block_q or max(1, tuning.block_rows // padded_group)
    bq = max(bq, -(-16 // padded_group))
    ppb = _fit_pages_per_block(tuning.pages_per_block, k_cache.shape[3], d,
                               k_cache.dtype.itemsize, tuning.num_stages,
                               extra=bq * padded_group * d * q.dtype.itemsize)
    items, seq = _prefill_items(md, t, bq, sliding_window)
    tables = jnp.pad(md.block_tables[seq], ((0, 0), (0, ppb))).astype(jnp.int32)
    qg = jnp.pad(_group(q, hkv, padded_group), ((0, bq), (0, 0), (0, 0), (0, 0)))
    positions = jnp.pad(md.positions.astype(jnp.int32), (0, bq))
    out = triton_attention.prefill_pallas_call(
        qg, k_cache, v_cache, layer_arr, items, tables, positions,
        scale=scale, soft_cap=soft_cap, sliding_window=sliding_window, pages_per_block=ppb,
        block_q=bq, num_warps=tuning.num_warps, num_stages=tuning.num_stages, interpret=interpret)
    return out[:t, :, :g].reshape(t, h, d)


def auto_kernel(device_kind: str, *, decode: bool, num_tokens: int, num_kv_heads: int,
                num_seqs: int) -> str:
    """The kernel ``kernel="auto"`` runs for a call of this shape on this device (see
    ``_AUTO_MOSAIC_DECODE_MIN_PROGRAMS`` and ``_AUTO_MOSAIC_PREFILL_MIN_TOKENS_PER_SEQ``; devices
    they do not name, and ``"interpret"`` (the CPU tests), run Triton)."""
    table = _AUTO_MOSAIC_DECODE_MIN_PROGRAMS if decode else _AUTO_MOSAIC_PREFILL_MIN_TOKENS_PER_SEQ
    threshold = _lookup(table, device_kind)
    size = num_tokens * num_kv_heads if decode else num_tokens // max(1, num_seqs)
    return "mosaic" if threshold is not None and size >= threshold else "triton"


@functools.partial(jax.jit, static_argnames=(
    "scale", "soft_cap", "sliding_window", "max_query_len", "interpret", "kernel",
    "pages_per_block", "num_splits", "block_q", "num_warps", "num_stages"))
def paged_attention(q, k_cache, v_cache, layer, md, *, scale: float,
                    soft_cap: float | None = None, sliding_window: int | None = None,
                    max_query_len: int | None = None, new_kv=None, interpret: bool = False,
                    kernel: str = "triton", pages_per_block: int | None = None,
                    num_splits: int | None = None, block_q: int | None = None,
                    num_warps: int | None = None, num_stages: int | None = None):
    """Ragged paged attention, q [T, H, D] -> [T, H, D]; same semantics as ``paged_attention_xla``.

    ``new_kv=(k, v)`` ([T, Hkv, D] each) writes this step's keys/values at ``md.slot_mapping``
    first (``write_kv``'s semantics: out-of-range slots write nothing) and returns
    ``(out, k_cache, v_cache)``. A decode step does the write inside the kernel, caches aliased in
    place (Triton: the new key enters the softmax from registers; Mosaic: the CTA whose key split
    holds the position stores the rows by TMA and reads them back), which then
    needs each token's slot to hold its position (``md.positions``) in its own sequence and at most
    one query token per sequence, as ``max_query_len=1`` promises; every other path scatters first.

    Static keywords: ``max_query_len`` (1 = decode-only batch -> decode kernel), ``interpret``
    (CPU interpret mode, for tests), ``kernel`` (``"triton"`` or ``"mosaic"``: the kernels'
    lowering, see the module docstring; ``"auto"``, the engine's choice: by shape and GPU, see
    ``auto_kernel``), and tuning overrides (``pages_per_block``,
    ``num_splits`` for decode, ``block_q`` for prefill (Mosaic: 64 = one compute warpgroup, 128 =
    two), ``num_warps``, ``num_stages``, which for the Mosaic kernels is the depth of their K/V
    ring); ``None`` takes the per-GPU table here.
    """
    _validate(q, k_cache, v_cache, layer, md, soft_cap, sliding_window, max_query_len)
    if new_kv is not None:
        _validate_new_kv(new_kv, q, k_cache, md)
    if kernel not in KERNELS:
        raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}")
    kind = "interpret" if interpret else _device_kind()
    if kernel == "auto":
        kernel = auto_kernel(kind, decode=max_query_len == 1, num_tokens=q.shape[0],
                             num_kv_heads=k_cache.shape[1], num_seqs=md.block_tables.shape[0])
    if kernel == "mosaic":
        if num_stages is not None and num_stages < 2:
            raise ValueError(f"num_stages must be >= 2 for kernel='mosaic' (a ring of K/V "
                             f"blocks), got {num_stages}")
        block_keys = (pages_per_block or 0) * k_cache.shape[3]
        if pages_per_block is not None and (block_keys % mosaic_attention.BLOCK_KEYS_MULTIPLE
                                            or block_keys > mosaic_attention.MAX_BLOCK_KEYS):
            raise ValueError(
                f"kernel='mosaic' needs pages_per_block * page_size to be a multiple of "
                f"{mosaic_attention.BLOCK_KEYS_MULTIPLE} and at most "
                f"{mosaic_attention.MAX_BLOCK_KEYS}, got {pages_per_block} x {k_cache.shape[3]}")
        if block_q is not None and max_query_len != 1 and block_q not in (64, 128):
            raise ValueError(f"block_q must be 64 or 128 for kernel='mosaic' (one or two compute "
                             f"warpgroups of 64 query rows), got {block_q}")
    for name, val in (("pages_per_block", pages_per_block), ("block_q", block_q)):
        if val is not None and not _is_pow2(val):
            raise ValueError(f"{name} must be a power of two, got {val}")
    if num_splits is not None and num_splits < 1:
        raise ValueError(f"num_splits must be >= 1, got {num_splits}")
    decode = max_query_len == 1
    if new_kv is not None and not decode:
        # Prefill and mixed batches read the new tokens back from the cache: scatter them first.
        # Both decode kernels below fuse the write (and then return the caches themselves).
        return attend_after_write(
            paged_attention, q, k_cache, v_cache, layer, md, new_kv, scale=scale, soft_cap=soft_cap,
            sliding_window=sliding_window, max_query_len=max_query_len, interpret=interpret,
            kernel=kernel, pages_per_block=pages_per_block, num_splits=num_splits, block_q=block_q,
            num_warps=num_warps, num_stages=num_stages)
    layer_arr = jnp.asarray(layer, jnp.int32).reshape(1)
    if decode and kernel == "mosaic":
        tuning = _INTERPRET_MOSAIC_DECODE if interpret else _lookup(_MOSAIC_DECODE_TUNING, kind)
        tuning = _override(tuning, num_stages=num_stages)
        plan = _mosaic_plan(q, k_cache, md, tuning, pages_per_block, num_splits)
        if not isinstance(plan, str):
            # With new_kv (fused write): returns (out, k_cache, v_cache).
            return _decode_mosaic(q, k_cache, v_cache, layer_arr, md, plan, scale=scale,
                                  soft_cap=soft_cap, sliding_window=sliding_window,
                                  interpret=interpret, new_kv=new_kv)
        # An unsupported shape (e.g. fp32): the Triton decode kernel below runs it (and its own
        # fused write).
        _log_mosaic_fallback(plan)
    if decode:
        tuning = _INTERPRET_DECODE if interpret else _lookup(_DECODE_TUNING, kind)
        tuning = _override(tuning, pages_per_block=pages_per_block, num_warps=num_warps, num_stages=num_stages)
        # With new_kv (fused write): returns (out, k_cache, v_cache).
        return _decode(q, k_cache, v_cache, layer_arr, md, scale=scale, soft_cap=soft_cap,
                       sliding_window=sliding_window, tuning=tuning, num_splits=num_splits,
                       interpret=interpret, new_kv=new_kv)
    if kernel == "mosaic":
        tuning = _INTERPRET_MOSAIC_PREFILL if interpret else _lookup(_MOSAIC_PREFILL_TUNING, kind)
        tuning = _override(tuning, num_stages=num_stages,
                           block_keys=pages_per_block and pages_per_block * k_cache.shape[3],
                           compute_wgs=block_q and block_q // 64)
        plan = _mosaic_prefill_plan(q, k_cache, md, tuning)
        if not isinstance(plan, str):
            return _prefill_mosaic(q, k_cache, v_cache, layer_arr, md, plan, scale=scale,
                                   soft_cap=soft_cap, sliding_window=sliding_window,
                                   interpret=interpret)
        _log_mosaic_fallback(plan, "prefill")
        block_q = None                    # the Triton kernel's own block size
    tuning = _INTERPRET_PREFILL if interpret else _lookup(_PREFILL_TUNING, kind)
    tuning = _override(tuning, pages_per_block=pages_per_block, num_warps=num_warps, num_stages=num_stages)
    return _prefill(q, k_cache, v_cache, layer_arr, md, scale=scale, soft_cap=soft_cap,
                    sliding_window=sliding_window, tuning=tuning, block_q=block_q,
                    interpret=interpret)
