"""The model runner: turns a StepPlan into device arrays, runs the compiled step, returns sampled tokens.

It is the only place that pads (to a bucket from serving.buckets) and the only place that talks to
the device. One executable per bucket shape, compiled ahead of time at start (``compile_all``); a
step with a shape outside the ladder is a bug, not a compile.

Per-request state (token ids, block table, sampler slot) is kept here keyed by req_id and updated
from the plan's deltas; finished/preempted ids drop it.

Async scheduling (the engine dispatches step N+1 before it collects step N): the host copy of a
request's tokens lags by the step in flight. Its positions past the known tokens are placeholders,
sent as input id ``-(slot + 1)``: the compiled step reads them from ``SamplerState.last_tokens``,
which the previous step wrote on the device. Counters advance at dispatch; collect only appends the
sampled tokens. Synchronous use (collect before the next dispatch) never sends a placeholder.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import logging
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from model_zoo.attention import AttentionMetadata
from serving import sampler as smp
from serving.buckets import BucketLadder
from serving.plan import Logprobs, RunnerOutput, StepPlan
from serving.step_io import PackedLayout, pack_rows, unpack_rows

logger = logging.getLogger("jaxllm")


def _shape_label(key: tuple) -> str:
    if key[0] == "prompt_logprobs":
        return f"prompt logprobs tokens={key[1]}"
    t, s, p, decode, plain = key[1:]
    return f"tokens={t} seqs={s} pages={p}" + (" decode" if decode else "") + (" plain" if plain else "")


@dataclasses.dataclass
class _ReqState:
    req_id: str
    slot: int                     # row of the persistent sampler state and of the runner's host arrays
    params: object                # SamplingParams


@dataclasses.dataclass(frozen=True)
class _InFlight:
    """A dispatched step whose outputs are still on (or on their way from) the device."""
    order: tuple                # req ids, in plan order
    reqs: list                  # their _ReqStates
    slots: np.ndarray           # [num] their slots
    samples: np.ndarray         # [num] bool: the request samples a token this step
    epochs: np.ndarray          # [num] the slots' epochs at dispatch (a slot released since is not theirs)
    launched: object            # Future of (device SamplerOutput, device prompt-logprob arrays or None)
    prompt_lp: object           # (targets, rows) of the prompt logprobs asked for, or None
    stats: object               # StepStats (seconds filled in at collect)
    start: float


@dataclasses.dataclass(frozen=True)
class StepStats:
    num_tokens: int
    padded_tokens: int
    num_seqs: int
    bucket: tuple[int, int, int]
    seconds: float
    decode_only: bool = False
    plain: bool = False

    @property
    def shape(self) -> tuple[int, int, int, bool, bool]:
        """The key of the executable that ran the step (see ``all_shapes``)."""
        return self.bucket + (self.decode_only, self.plain)

    @property
    def padding_ratio(self) -> float:
        """Padded tokens / real tokens (0 = no waste)."""
        return (self.padded_tokens - self.num_tokens) / max(self.num_tokens, 1)


def executable_scratch_bytes(exe) -> int | None:
    """An executable's scratch (temporaries) from XLA's memory analysis; None where the backend
    does not report it."""
    try:
        return int(exe.memory_analysis().temp_size_in_bytes)
    except Exception:  # noqa: BLE001 - not every backend implements memory_analysis
        return None


class ModelRunner:
    def __init__(self, model, *, num_pages: int, page_size: int, max_model_len: int,
                 max_num_seqs: int, ladder: BucketLadder, kv_cache, max_logprobs: int, seed: int,
                 eos_token_ids: tuple[int, ...] = (), layout=None, decode_buckets: bool = False):
        self.config = model.config
        self.page_size = page_size
        self.num_pages = num_pages
        self.max_model_len = max_model_len
        self.max_num_seqs = max_num_seqs
        self.ladder = ladder
        self.max_logprobs = max_logprobs
        self.eos_token_ids = tuple(eos_token_ids)
        self.decode_buckets = decode_buckets
        self.vocab_size = self.config.vocab_size
        self.layout = layout   # sharding.ShardingLayout when the model spans a mesh
        self.graphdef, state = nnx.split(model)
        # The weights go to the executables as a flat tuple of device arrays (the treedef is static
        # and unflattened inside the jit), so each step's call flattens a tuple in C++ instead of
        # calling back into Python for every nnx State and Variable node, and no leaf is a host
        # array that would be copied to every device on every step (the rope table ``_inv_freq``
        # is a numpy attribute, hence a state leaf: at TP n that was n extra transfers a step).
        leaves, self._weights_treedef = jax.tree.flatten(state)
        rep = layout.replicated() if layout is not None else None
        self._weights = tuple(x if isinstance(x, jax.Array) else jax.device_put(x, rep) for x in leaves)
        self.kv_cache = kv_cache
        self.sampler_state = smp.init_sampler_state(max_num_seqs, self.vocab_size)
        if layout is not None:
            self.sampler_state = jax.device_put(self.sampler_state, layout.replicated())
        self._free_slots = list(range(max_num_seqs - 1, -1, -1))
        self._reqs: dict[str, _ReqState] = {}
        self._executables: dict[tuple[int, int, int, bool, bool], object] = {}   # see all_shapes
        self._layouts: dict[tuple[int, int, int], PackedLayout] = {}
        self._prompt_lp_exes: dict[int, object] = {}
        self._set_rows_exe = None
        self.max_temp_bytes = 0       # the largest executable's scratch memory (XLA's memory analysis)
        self._base_key = jax.random.PRNGKey(seed)
        self._step_count = 0
        self.last_step: StepStats | None = None
        self._init_host_state()
        # The launch thread. Launching an executable that spans several GPUs blocks the caller until
        # every device's launch is done (PjRt runs one launch per device on its own thread and
        # waits for all); the caller's CPU is idle meanwhile. Measured on 2 x H200, a 32-layer TP2
        # decode step's call took 2.95 ms of wall time and 0.27 ms of CPU time, against 0.40 / 0.32
        # ms at TP1 (benchmarks/host_dispatch.py --gpu), so with the engine's own host work the TP2
        # host loop (3.9 ms a step) outran the device. The device calls therefore go, in order, to
        # one worker thread (the call releases the GIL while it waits), and the engine thread
        # collects, schedules and builds the next step's inputs meanwhile. Only that thread touches
        # kv_cache / sampler_state once a step is launched; a step's outputs are its Future.
        # Default: on for a mesh of several devices; JAXLLM_LAUNCH_THREAD=0/1 overrides.
        env = os.environ.get("JAXLLM_LAUNCH_THREAD", "").strip()
        launch_thread = env == "1" if env in ("0", "1") else layout is not None and layout.mesh.devices.size > 1
        self._launcher = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="jaxllm-launch") \
            if launch_thread else None

    @property
    def state(self):
        """The model's nnx State (the weights), rebuilt from the flat tuple the executables take."""
        return jax.tree.unflatten(self._weights_treedef, self._weights)

    def _merge(self, weights):
        return nnx.merge(self.graphdef, jax.tree.unflatten(self._weights_treedef, weights))

    # ------------------------------------------------------------------ compile
    def _step_fn(self, weights, kv_cache, sampler_state, packed, *, layout: PackedLayout, max_query_len=None,
                 plain_sampler: bool = False):
        """The compiled step. ``packed``: every per-step input as one int32 vector (serving.step_io);
        returns the sampler's outputs as one int32 matrix [S, 3 + 2k] (see ``_out_spec``).
        ``plain_sampler``: the variant for batches that ``sampler.is_plain_batch`` (no lax.cond)."""
        tokens, md, logits_indices, sampling_md, step_idx = layout.unpack(packed)
        # A negative id is the token slot (-id - 1) sampled in the previous step, not yet on the host.
        fed_back = sampler_state.last_tokens[jnp.maximum(-tokens - 1, 0)]
        tokens = jnp.where(tokens < 0, fed_back, tokens)
        model = self._merge(weights)
        if max_query_len is not None:
            # Static hint for the attention kernel: a decode-only executable (one token per sequence).
            model.attention_fn = functools.partial(model.attention_fn, max_query_len=max_query_len)
        step_key = jax.random.fold_in(self._base_key, step_idx)
        logits, kv_cache, hidden = model(tokens, kv_cache, md, logits_indices, return_hidden=True)
        out, sampler_state = smp.sample(logits, sampling_md, sampler_state, step_key,
                                        num_logprobs=self.max_logprobs, plain=plain_sampler)
        out = pack_rows(jax.tree.leaves(out))     # SamplerOutput's fields in order; see _out_spec
        # hidden stays on the device; only a step with prompt-logprob requests reads it.
        return out, kv_cache, sampler_state, hidden

    def _out_spec(self):
        """(width, dtype, squeeze) of each SamplerOutput field in the packed output matrix."""
        k = self.max_logprobs
        return ((1, np.int32, True), (1, np.float32, True), (1, np.int32, True),
                (k, np.int32, False), (k, np.float32, False))

    def _prompt_logprobs_fn(self, weights, hidden, targets):
        """Logprobs of each position's next prompt token: hidden [T, E], targets [T] -> per row."""
        model = self._merge(weights)
        logits = model.logits_from_hidden(hidden)
        wants = jnp.ones(targets.shape, bool)
        return smp.token_logprobs(logits, targets, wants, num_logprobs=self.max_logprobs)

    def _abstract_inputs(self, t: int, s: int, p: int):
        i32 = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.int32)  # noqa: E731
        md = AttentionMetadata(positions=i32(t), token_seq_ids=i32(t), slot_mapping=i32(t),
                               block_tables=i32(s, p), seq_lens=i32(s), query_start_loc=i32(s + 1))
        sampling_md = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype),
                                   smp.build_sampling_metadata([], s))
        return i32(t), md, i32(s), sampling_md, jax.ShapeDtypeStruct((), jnp.uint32)

    def _layout(self, shape) -> PackedLayout:
        """The packed-input layout of a bucket (tokens, seqs, pages, ...): the same for its variants."""
        if shape[:3] not in self._layouts:
            self._layouts[shape[:3]] = PackedLayout.of(self._abstract_inputs(*shape[:3]))
        return self._layouts[shape[:3]]

    def _step_shardings(self, layout: PackedLayout) -> dict:
        """Under a mesh: weights and KV cache keep their layout, all else is replicated, so each
        step's outputs come back in the layout the next step takes and are readable on every host."""
        if self.layout is None:
            return {}
        rep = self.layout.replicated()
        kv_sh = jax.tree.map(lambda a: a.sharding, self.kv_cache)
        args = (self._weights, self.kv_cache, self.sampler_state, jax.ShapeDtypeStruct((layout.size,), jnp.int32))
        outs = jax.eval_shape(functools.partial(self._step_fn, layout=layout), *args)
        return dict(in_shardings=(tuple(a.sharding for a in self._weights), kv_sh)
                    + (rep,) * (len(args) - 2),
                    out_shardings=tuple(kv_sh if i == 1 else rep for i in range(len(outs))))

    # Token rows of a decode-only executable: its sequence count, raised to this floor (the extra
    # rows are padding: they write no K/V and nobody reads their logits). With a single token row
    # XLA rewrites the K/V projections of a layer as elementwise-multiply + reduce kernels (~17 us
    # each for 8 MB of weights) instead of GEMMs; with two rows they stay GEMMs. On an H100, batch-1
    # decode of the Llama-3.1-8B shape: 950 -> 574 kernels a step, device time 7.04 -> 5.94 ms,
    # ITL 8.33 -> 7.13 ms (benchmarks/gpu_itl_variants.sh, results/2026-11-21-h100-decode-profile-2-*.json).
    min_decode_tokens = 2

    def _decode_tokens(self, num_seqs: int) -> int:
        return max(num_seqs, self.min_decode_tokens)

    def all_shapes(self) -> list[tuple[int, int, int, bool, bool]]:
        """(tokens, seqs, pages, decode_only, plain_sampler) of every executable. Decode-only steps (one
        token per sequence) get their own executables with tokens == seqs (the ladder's decode seq
        buckets) when ``decode_buckets`` is on, twice: with the full sampler and with the branch-free
        one for plain batches (``sampler.sample``'s ``plain``): one CUDA graph the host never waits in."""
        shapes = [(t, s, p, False, False) for t, s, p in self.ladder.all_shapes()]
        if self.decode_buckets:
            shapes += [(self._decode_tokens(s), s, p, True, plain)
                       for s in self.ladder.decode_seq_buckets for p in self.ladder.page_buckets
                       for plain in (False, True)]
        return shapes

    # XLA releases the GIL while it compiles (LLVM, ptxas, GEMM autotuning), so the bucket
    # executables compile side by side: lowering (Python tracing) stays serial, compiling runs on a
    # thread pool. 4 threads: on an H100 8 concurrent GEMM autotuners once ran out of device memory
    # (3.5 GiB each, beside the KV cache), and each compile already splits its LLVM work over threads.
    compile_threads = 4

    def compile_all(self, progress: bool = True) -> float:
        """Compile every bucket shape ahead of time (in parallel threads); returns seconds spent."""
        shapes = self.all_shapes()
        start = time.perf_counter()
        shardings = self._step_shardings(self._layout(shapes[0]))
        lowered = {}
        for shape in shapes:
            layout = self._layout(shape)
            fn = functools.partial(self._step_fn, layout=layout, max_query_len=1 if shape[3] else None,
                                   plain_sampler=shape[4])
            lowered[("step",) + shape] = jax.jit(fn, donate_argnums=(1, 2), **shardings).lower(
                self._weights, self.kv_cache, self.sampler_state,
                jax.ShapeDtypeStruct((layout.size,), jnp.int32))
        # Under a mesh the results come back replicated: readable on every host.
        plp = jax.jit(self._prompt_logprobs_fn,
                      **({"out_shardings": self.layout.replicated()} if self.layout is not None else {}))
        for t in sorted({shape[0] for shape in shapes}):
            lowered[("prompt_logprobs", t)] = plp.lower(
                self._weights, jax.ShapeDtypeStruct((t, self.config.hidden_size), self._hidden_dtype()),
                jax.ShapeDtypeStruct((t,), jnp.int32))
        threads = max(1, min(self.compile_threads, os.cpu_count() or 1, len(lowered)))
        bar = tqdm(total=len(lowered), desc=f"Compiling buckets ({threads} threads)", unit="exe",
                   disable=not progress)
        with concurrent.futures.ThreadPoolExecutor(threads, thread_name_prefix="jaxllm-compile") as pool:
            futures = {pool.submit(low.compile): key for key, low in lowered.items()}
            for done in concurrent.futures.as_completed(futures):
                key = futures[done]
                exe = done.result()         # a compile error surfaces here, with its own traceback
                self.max_temp_bytes = max(self.max_temp_bytes, executable_scratch_bytes(exe) or 0)
                if key[0] == "step":
                    self._executables[key[1:]] = exe
                else:
                    self._prompt_lp_exes[key[1]] = exe
                bar.set_postfix_str(_shape_label(key))
                bar.update()
        bar.close()
        self._write_slot_rows([])   # compiles set_slot_rows for its fixed row count
        elapsed = time.perf_counter() - start
        logger.info("Compiled %d bucket executables in %.1f s (%d threads)", len(shapes), elapsed, threads)
        return elapsed

    def attach_kv_cache(self, kv_cache) -> None:
        """Give the runner its allocated cache once ``compile_all`` has compiled against the spec it
        was built with (``kv_cache_spec``): compiling first leaves the device memory free for XLA's
        GEMM autotuner, which runs candidate kernels on the device; beside a cache that fills the
        memory, concurrent autotuners ran out of it (H100, 8B: "Out of memory while trying to
        allocate 30.00MiB", 2026-11-21)."""
        def sig(tree):
            return [(a.shape, jnp.dtype(a.dtype)) for a in jax.tree.leaves(tree)]

        if sig(kv_cache) != sig(self.kv_cache):
            raise ValueError(f"KV cache {sig(kv_cache)} does not match the compiled one {sig(self.kv_cache)}")
        for want, got in zip(jax.tree.leaves(self.kv_cache), jax.tree.leaves(kv_cache)):
            if getattr(want, "sharding", None) is not None and \
                    not want.sharding.is_equivalent_to(got.sharding, len(want.shape)):
                raise ValueError(f"KV cache sharding {got.sharding} does not match the compiled {want.sharding}")
        self.kv_cache = kv_cache

    @property
    def num_executables(self) -> int:
        return len(self._executables)

    # ------------------------------------------------------------------ state updates
    def _init_host_state(self) -> None:
        """Per-slot host arrays (vLLM's InputBatch): a request's tokens, counters and block table
        live in row ``slot``, updated from the plans' deltas, so building a step's inputs is a few
        vectorised gathers instead of Python work per request and per token."""
        n = self.max_num_seqs
        max_pages = max(-(-self.max_model_len // self.page_size), self.ladder.page_buckets[-1])
        # Prompt + outputs. One column past max_model_len: the token sampled after a prompt that
        # fills max_model_len is still written (the scheduler then finishes the request).
        self._token_ids = np.zeros((n, self.max_model_len + 1), np.int32)
        # _num_tokens counts the tokens sampled by steps not collected yet (placeholders); the
        # first _num_known of them are in _token_ids.
        self._num_tokens = np.zeros(n, np.int64)
        self._num_known = np.zeros(n, np.int64)
        # Bumped when a slot is released: collect writes back only to slots still held by the
        # request that was dispatched (a finished or preempted one's slot may be taken meanwhile).
        self._slot_epoch = np.zeros(n, np.int64)
        self._num_prompt = np.zeros(n, np.int64)
        self._num_computed = np.zeros(n, np.int64)
        self._block_table = np.zeros((n, max_pages), np.int32)    # 0 (the null page) past a request's pages
        self._num_pages = np.zeros(n, np.int64)
        self._row_consts = np.zeros((n, smp.NUM_ROW_CONSTANTS), np.float64)   # sampler.row_constants
        # Running requests that asked for logprobs / prompt logprobs: 0 skips those loops.
        self._num_logprob_reqs = 0
        self._num_prompt_logprob_reqs = 0

    def _add_pages(self, slot: int, page_ids) -> None:
        k = int(self._num_pages[slot])
        self._block_table[slot, k:k + len(page_ids)] = page_ids
        self._num_pages[slot] = k + len(page_ids)

    def _release(self, st: _ReqState) -> None:
        slot = st.slot
        self._block_table[slot, :self._num_pages[slot]] = 0
        self._num_pages[slot] = 0
        self._slot_epoch[slot] += 1
        self._num_logprob_reqs -= st.params.logprobs is not None
        self._num_prompt_logprob_reqs -= st.params.prompt_logprobs is not None
        self._free_slots.append(slot)

    def _apply_plan_deltas(self, plan: StepPlan) -> tuple[list[_ReqState], list]:
        """Apply the plan's deltas; returns the step's requests in plan order (new ones first) and
        the sampler rows (penalties, bias, stops) of new requests, uploaded when the step launches."""
        for req_id in plan.finished_req_ids:
            st = self._reqs.pop(req_id, None)
            if st is not None:
                self._release(st)
        reqs, new_rows = [], []
        for new in plan.new_requests:
            if not self._free_slots:
                raise RuntimeError("more running requests than max_num_seqs sampler slots")
            slot = self._free_slots.pop()
            params = new.sampling_params
            st = _ReqState(new.req_id, slot, params)
            self._reqs[new.req_id] = st
            reqs.append(st)
            num_prompt = len(new.prompt_token_ids)
            num_tokens = num_prompt + len(new.output_token_ids)
            self._token_ids[slot, :num_prompt] = new.prompt_token_ids
            self._token_ids[slot, num_prompt:num_tokens] = new.output_token_ids
            self._num_tokens[slot], self._num_prompt[slot] = num_tokens, num_prompt
            self._num_known[slot] = num_tokens
            self._num_computed[slot] = new.num_computed_tokens
            self._add_pages(slot, new.page_ids)
            self._row_consts[slot] = smp.row_constants(params)
            self._num_logprob_reqs += params.logprobs is not None
            self._num_prompt_logprob_reqs += params.prompt_logprobs is not None
            if smp.slot_rows_needed(params):
                new_rows.append((slot, smp.build_slot_rows(
                    params, new.prompt_token_ids, new.output_token_ids, self.vocab_size,
                    eos_token_ids=self.eos_token_ids)))
        cached = plan.cached_requests
        for c in cached:
            st = self._reqs[c.req_id]
            reqs.append(st)
            if c.new_page_ids:
                self._add_pages(st.slot, c.new_page_ids)
        if cached:
            self._num_computed[[st.slot for st in reqs[len(plan.new_requests):]]] = \
                [c.num_computed_tokens for c in cached]
        return reqs, new_rows

    _SLOT_ROWS_PER_CALL = 8

    def _write_slot_rows(self, rows) -> None:
        """Upload penalty/bias/stop rows of requests taking a slot, K at a time (one executable)."""
        k, v = self._SLOT_ROWS_PER_CALL, self.vocab_size
        for i in range(0, max(len(rows), 1), k):
            chunk = rows[i:i + k]
            slots = np.full(k, self.max_num_seqs, np.int32)   # out of range: dropped
            counts = np.zeros((k, v), np.int32)
            mask = np.zeros((k, v), bool)
            bias = np.zeros((k, v), np.float32)
            stop = np.zeros((k, v), bool)
            for j, (slot, r) in enumerate(chunk):
                slots[j], counts[j], mask[j], bias[j], stop[j] = slot, r.counts, r.prompt_mask, r.bias, r.stop_mask
            if self._set_rows_exe is None:
                # Compiled ahead of time (at warm-up) and called as such: a plain jit call would
                # recompile once the state comes back from the step with a committed sharding.
                self._set_rows_exe = smp.set_slot_rows.lower(
                    self.sampler_state, slots, counts, mask, bias, stop).compile()
            self.sampler_state = self._set_rows_exe(self.sampler_state, slots, counts, mask, bias, stop)

    # ------------------------------------------------------------------ one step
    def run(self, plan: StepPlan) -> RunnerOutput:
        return self.collect(self.dispatch(plan))

    def dispatch(self, plan: StepPlan) -> "_InFlight":
        """Build the step's inputs and launch it; returns at once (JAX dispatch is asynchronous)."""
        if isinstance(self.kv_cache[0], jax.ShapeDtypeStruct):
            raise RuntimeError("The KV cache is not allocated: call attach_kv_cache() after compile_all().")
        reqs, new_rows = self._apply_plan_deltas(plan)
        if not reqs:
            empty = np.zeros(0, np.int64)
            return _InFlight((), [], empty, empty.astype(bool), empty, None, None, None, 0.0)
        start = time.perf_counter()
        num = len(reqs)
        order = tuple(st.req_id for st in reqs)
        slots = np.array([st.slot for st in reqs], np.int64)
        counts = np.array([plan.num_scheduled_tokens[r] for r in order], np.int64)
        total = int(counts.sum())
        computed = self._num_computed[slots]          # tokens in the cache before this step
        num_tokens = self._num_tokens[slots]
        t_pad, s_pad, p_pad = self.ladder.select(total, num, int(self._num_pages[slots].max()))
        decode_only = self.decode_buckets and total == num
        if decode_only:
            s_pad = self.ladder.decode_seqs(num)
            t_pad = self._decode_tokens(s_pad)

        ends = np.cumsum(counts)
        # Token j of the step belongs to sequence seq[j] and sits at position pos[j].
        if total == num:                               # one token each (decode)
            seq, pos = np.arange(num), computed
        else:
            seq = np.repeat(np.arange(num), counts)
            pos = np.arange(total) + np.repeat(computed - (ends - counts), counts)
        tokens = np.zeros(t_pad, np.int32)
        seq_slots = slots[seq]
        tokens[:total] = np.where(pos < self._num_known[seq_slots], self._token_ids[seq_slots, pos], -seq_slots - 1)
        positions = np.zeros(t_pad, np.int32)
        positions[:total] = pos
        seq_ids = np.zeros(t_pad, np.int32)
        seq_ids[:total] = seq
        block_tables = np.zeros((s_pad, p_pad), np.int32)
        block_tables[:num] = self._block_table[slots, :p_pad]
        seq_lens = np.zeros(s_pad, np.int32)
        seq_lens[:num] = computed + counts
        qsl = np.full(s_pad + 1, total, np.int32)
        qsl[0] = 0
        qsl[1:num + 1] = ends
        logits_indices = np.zeros(s_pad, np.int32)
        logits_indices[:num] = ends - 1
        # A request samples when this step reaches the end of its known tokens.
        samples = computed + counts >= num_tokens
        page_of = block_tables[seq_ids, positions // self.page_size]
        slot_mapping = page_of * self.page_size + positions % self.page_size
        # Padding tokens get an out-of-range slot: their K/V writes are dropped (see write_kv).
        slot_mapping[total:] = self.num_pages * self.page_size
        md = AttentionMetadata(positions=positions, token_seq_ids=seq_ids, slot_mapping=slot_mapping.astype(np.int32),
                               block_tables=block_tables, seq_lens=seq_lens, query_start_loc=qsl)
        sampling_md = smp.sampling_metadata_from_columns(
            slots, num_tokens - self._num_prompt[slots], samples, self._row_consts[slots], s_pad)
        step_idx = np.uint32(self._step_count)
        self._step_count += 1

        # Counters advance now, so the next dispatch may precede this step's collect.
        self._num_computed[slots] = computed + counts
        self._num_tokens[slots[samples]] += 1
        plain = decode_only and smp.is_plain_batch(sampling_md, self.vocab_size)
        shape = (t_pad, s_pad, p_pad, decode_only, plain)
        exe = self._executables[shape]
        packed = self._layout(shape).pack((tokens, md, logits_indices, sampling_md, step_idx))
        prompt_lp = self._prompt_logprob_targets(reqs, slots, counts, computed, t_pad)

        def launch():        # device calls only: host state may change once dispatch returns
            if new_rows:
                self._write_slot_rows(new_rows)
            out, self.kv_cache, self.sampler_state, hidden = exe(
                self._weights, self.kv_cache, self.sampler_state, packed)
            lp = self._prompt_lp_exes[t_pad](self._weights, hidden, prompt_lp[0]) if prompt_lp else None
            return out, lp

        stats = StepStats(total, t_pad, num, (t_pad, s_pad, p_pad), 0.0, decode_only, plain)
        return _InFlight(order, reqs, slots, samples, self._slot_epoch[slots], self._launch(launch), prompt_lp,
                         stats, start)

    def _launch(self, fn) -> concurrent.futures.Future:
        """Run ``fn`` (device calls) after every earlier launch: on the launch thread, or here."""
        if self._launcher is not None:
            return self._launcher.submit(fn)
        done = concurrent.futures.Future()
        done.set_result(fn())         # errors raise at dispatch, as a plain call would
        return done

    @property
    def launch_thread(self) -> bool:
        """Whether device calls go to the launch thread (see __init__)."""
        return self._launcher is not None

    def close(self) -> None:
        """Stop the launch thread after the calls already launched."""
        if self._launcher is not None:
            self._launcher.shutdown(wait=True)

    def collect(self, flight: "_InFlight") -> RunnerOutput:
        """Wait for a dispatched step and turn its outputs into a RunnerOutput."""
        if not flight.order:
            return RunnerOutput((), {}, {}, {})
        reqs, slots, samples = flight.reqs, flight.slots, flight.samples
        # The step's only device -> host copies: sampled tokens (+ logprobs), prompt logprobs if asked.
        out, prompt_lp_arrays = jax.device_get(flight.launched.result())
        out = smp.SamplerOutput(*unpack_rows(out, self._out_spec()))
        prompt_logprobs = self._prompt_logprobs_entries(reqs, flight.prompt_lp, prompt_lp_arrays)

        token_ids = np.asarray(out.token_ids)[:len(reqs)]
        keep = samples & (self._slot_epoch[slots] == flight.epochs)
        sampling_slots = slots[keep]
        ends = self._num_known[sampling_slots]
        self._token_ids[sampling_slots, ends] = token_ids[keep]
        self._num_known[sampling_slots] = ends + 1
        toks, flags = token_ids.tolist(), samples.tolist()
        sampled: dict[str, tuple[int, ...]] = {
            rid: (tok,) if flag else () for rid, tok, flag in zip(flight.order, toks, flags)}
        logprobs: dict[str, tuple[Logprobs, ...]] = {}
        if self._num_logprob_reqs:
            for i, st in enumerate(reqs):
                k = st.params.logprobs
                if k is not None and flags[i]:
                    logprobs[st.req_id] = (Logprobs(
                        token_id=toks[i], logprob=float(out.logprobs[i]), rank=int(out.ranks[i]),
                        top_ids=tuple(out.top_ids[i, :k].tolist()),
                        top_logprobs=tuple(out.top_logprobs[i, :k].astype(float).tolist())),)
        self.last_step = dataclasses.replace(flight.stats, seconds=time.perf_counter() - flight.start)
        return RunnerOutput(flight.order, sampled, logprobs, prompt_logprobs)

    def _hidden_dtype(self):
        return self._merge(self._weights).dtype

    @property
    def dtype(self):
        """The model's activation dtype (its embedding's)."""
        return self._hidden_dtype()

    def _prompt_logprob_targets(self, reqs, slots, counts, computed, t_pad):
        """Prompt logprobs for the prompt positions computed this step (vLLM's convention).

        A chunk computing positions [a, a+n) reports None for position 0 (nothing predicts it) and,
        for each prompt position j in [a+1, a+n], the logprob of token j from the logits at j-1 —
        the chunk's last row predicts the first token of the next chunk, known from the prompt.
        ``computed``: the step's num_computed_tokens before it runs (a, per request).
        Returns (targets, {row: (offset, count, a)}), the launch's input and collect's key, or None
        when nobody asked.
        """
        if not self._num_prompt_logprob_reqs:
            return None
        num_prompt = self._num_prompt[slots]
        wanted = [i for i, st in enumerate(reqs) if st.params.prompt_logprobs is not None
                  and computed[i] < num_prompt[i]]
        if not wanted:
            return None
        targets = np.zeros(t_pad, np.int32)
        rows: dict[int, tuple[int, int, int]] = {}
        offsets = np.cumsum(counts) - counts
        for i in wanted:
            off, a, n = int(offsets[i]), int(computed[i]), int(counts[i])
            last = min(a + n, int(num_prompt[i]) - 1)     # last target position
            k = max(last - a, 0)                          # rows off .. off+k-1 predict a+1 .. last
            targets[off:off + k] = self._token_ids[slots[i], a + 1:a + 1 + k]
            rows[i] = (off, k, a)
        return targets, rows

    @staticmethod
    def _prompt_logprobs_entries(reqs, asked, arrays) -> dict:
        if asked is None:
            return {}
        targets, rows = asked
        lp, ranks, top_ids, top_lp = arrays
        result = {}
        for i, (off, k, a) in rows.items():
            st = reqs[i]
            width = st.params.prompt_logprobs
            entries = [None] if a == 0 else []
            entries += [Logprobs(int(targets[r]), float(lp[r]), int(ranks[r]),
                                 tuple(int(x) for x in top_ids[r, :width]),
                                 tuple(float(x) for x in top_lp[r, :width])) for r in range(off, off + k)]
            result[st.req_id] = tuple(entries)
        return result
