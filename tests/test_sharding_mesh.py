"""Tensor / pipeline parallel on 8 host CPU devices: same greedy tokens as one device, per-device shards.

Needs `XLA_FLAGS=--xla_force_host_platform_device_count=8` set before jax starts, so the normal
suite (one device) skips this module and tests/test_sharding.py runs it in a child pytest process
with the flag set. Run it alone with:

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python -m pytest tests/test_sharding_mesh.py
"""

from __future__ import annotations

import json
import re

import jax
import numpy as np
import pytest

from model_zoo.loader import load_weights as _REAL_LOAD  # noqa: E402

pytestmark = pytest.mark.skipif(jax.device_count() < 8,
                                reason="needs 8 devices (XLA_FLAGS=--xla_force_host_platform_device_count=8)")

PROMPTS = ["Hi", "The capital of France is", "1, 2, 3, 4,"]
ENGINE = dict(token_buckets=[16], seq_buckets=[4], max_num_batched_tokens=16, max_num_seqs=4,
              max_model_len=64, kv_cache_memory=16 * 2 ** 20, dtype="float32")


_HOST_WEIGHTS: dict = {}


def _host_weights(resolved, dtype):
    """The embedded GGUF dequantized once per process (it dominates an engine build on 2 cores)."""
    key = (str(resolved.path), str(dtype))
    if key not in _HOST_WEIGHTS:
        _HOST_WEIGHTS[key] = {k: np.asarray(v) for k, v in
                              _REAL_LOAD(resolved, dtype, progress=False).items()}
    return _HOST_WEIGHTS[key]


def _cached_load(resolved, dtype, *, sharding_for=None, progress=True, seed=0):
    """Engine builds of the embedded model place cached host weights with the layout's shardings
    instead of dequantizing the GGUF again (the loader's own sharded placement is exercised by the
    tiny safetensors models below)."""
    from model_zoo.params import param_specs

    specs = param_specs(resolved.config)
    out = {}
    for name, arr in _host_weights(resolved, dtype).items():
        shape, axes = specs[name]
        sharding = sharding_for(name, shape, axes) if sharding_for else None
        out[name] = jax.device_put(arr, sharding) if sharding is not None else jax.device_put(arr)
    return out


@pytest.fixture
def cached_gguf_weights(monkeypatch):
    import model_zoo.loader as loader

    monkeypatch.setattr(loader, "load_weights", _cached_load)


def _generate(model=None, max_tokens=6, **kwargs):
    from serving import LLM, SamplingParams

    llm = LLM(model=model, **{**ENGINE, **kwargs})
    outs = llm.generate(PROMPTS if model is None else [{"prompt_token_ids": p} for p in TINY_PROMPTS],
                        SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True))
    return [list(o.outputs[0].token_ids) for o in outs], llm


TINY_PROMPTS = [[256, 72, 105], [256, 84, 104, 101, 32, 99, 97, 112], [256, 49, 44, 32, 50]]


def _runner(llm):
    return llm.engine.runner


def _weights(runner) -> dict:
    """Parameter name ("layers/wq") -> array, from the runner's split model state."""
    out = {}
    for path, leaf in jax.tree_util.tree_leaves_with_path(runner.state):
        keys = [str(k.key) for k in path if isinstance(k, jax.tree_util.DictKey)]
        out["/".join(keys)] = leaf
    return out


def _assert_shards(runner, tp, pp, kv_split, vocab_split=None):
    """Every large weight and the KV caches: each device holds exactly its shard."""
    c = runner.config
    w = _weights(runner)
    L, E, F, V, D = c.num_layers, c.hidden_size, c.intermediate_size, c.vocab_size, c.head_dim
    expect = {
        "layers/wq": (L // pp, E, c.num_heads * D // tp),
        "layers/wo": (L // pp, c.num_heads * D // tp, E),
        "layers/w_gate": (L // pp, E, F // tp),
        "layers/w_up": (L // pp, E, F // tp),
        "layers/w_down": (L // pp, F // tp, E),
        "layers/wk": (L // pp, E, c.num_kv_heads * D // (tp if kv_split else 1)),
        "embed": (V // (vocab_split or tp), E),
    }
    for name, shape in expect.items():
        arr = w[name]
        assert len(arr.addressable_shards) == tp * pp
        for shard in arr.addressable_shards:
            assert shard.data.shape == shape, (name, shard.data.shape, shape)
    for cache in runner.kv_cache:
        expect_kv = (L // pp, c.num_kv_heads // (tp if kv_split else 1)) + cache.shape[2:]
        assert {s.data.shape for s in cache.addressable_shards} == {expect_kv}
        assert len({s.device for s in cache.addressable_shards}) == tp * pp


# ----------------------------------------------------------------------------- embedded SmolLM2
@pytest.fixture(scope="module")
def smollm_reference():
    import model_zoo.loader as loader

    mp = pytest.MonkeyPatch()
    mp.setattr(loader, "load_weights", _cached_load)
    try:
        tokens, _ = _generate()
    finally:
        mp.undo()
    return tokens


@pytest.mark.parametrize("tp,pp", [(3, 1), (1, 2), (3, 2)])
def test_embedded_model_greedy_matches_single_device(tp, pp, smollm_reference, cached_gguf_weights):
    tokens, llm = _generate(tensor_parallel_size=tp, pipeline_parallel_size=pp)
    assert tokens == smollm_reference
    _assert_shards(_runner(llm), tp, pp, kv_split=True)
    # A mesh of several devices launches its steps from the runner's launch thread by default.
    assert _runner(llm)._launcher is not None


# ----------------------------------------------------------------------------- tiny random models
@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory):
    from tests.tiny_models import make_tiny_hf_model

    root = tmp_path_factory.mktemp("tiny")
    # 8 query / 2 KV heads (TP 4 replicates the KV heads) and 16 / 4; 4 layers for 2 stages.
    a, _ = make_tiny_hf_model("llama", root / "h8", num_attention_heads=8, num_key_value_heads=2,
                              hidden_size=64, num_hidden_layers=4)
    b, _ = make_tiny_hf_model("qwen2", root / "h16", num_attention_heads=16, num_key_value_heads=4,
                              hidden_size=128, num_hidden_layers=4)
    # Head dim 16 (the Pallas kernels' minimum): 8 query heads over 8 KV heads (split at every TP)
    # and over 2 (replicated at TP 4); 2 layers a stage at PP 2 is plenty.
    c, _ = make_tiny_hf_model("llama", root / "kv8", num_attention_heads=8, num_key_value_heads=8,
                              hidden_size=128, num_hidden_layers=2)
    d, _ = make_tiny_hf_model("llama", root / "kv2", num_attention_heads=8, num_key_value_heads=2,
                              hidden_size=128, num_hidden_layers=2)
    return {"h8": str(a), "h16": str(b), "kv8": str(c), "kv2": str(d)}


def test_tiny_model_tp_and_pp_match_single_device(tiny_dirs):
    # 8 query / 2 KV heads: TP 2 splits the KV heads, TP 4 replicates them.
    ref, _ = _generate(tiny_dirs["h8"], max_tokens=8)
    # The last layout also splits the vocabulary over the stages (4 ways).
    for tp, pp, rules in [(2, 1, None), (4, 1, None), (2, 2, None), (2, 2, "vocab-over-stages")]:
        tokens, llm = _generate(tiny_dirs["h8"], max_tokens=8, tensor_parallel_size=tp,
                                pipeline_parallel_size=pp, sharding_rules=rules)
        assert tokens == ref, (tp, pp, rules)
        _assert_shards(_runner(llm), tp, pp, kv_split=2 % tp == 0,
                       vocab_split=tp * pp if rules else tp)


@pytest.mark.parametrize("model", ["kv8", "kv2"])
def test_pallas_backend_tp_and_pp_match_single_device(tiny_dirs, model):
    """The Pallas kernels (interpreted here; opaque custom calls on a GPU) under TP 2, TP 4 and
    TP 2 x PP 2 run per head shard (sharding/attention.py) and give the one-device tokens, through
    the prefill and the decode kernel. With 2 KV heads TP 4 replicates the cache."""
    ref, _ = _generate(tiny_dirs[model], max_tokens=4, attention_backend="pallas")
    for tp, pp in [(2, 1), (4, 1), (2, 2)]:
        tokens, llm = _generate(tiny_dirs[model], max_tokens=4, attention_backend="pallas",
                                tensor_parallel_size=tp, pipeline_parallel_size=pp)
        assert tokens == ref, (model, tp, pp)
        runner = _runner(llm)
        assert runner.decode_buckets
        kv_heads = runner.config.num_kv_heads
        _assert_shards(runner, tp, pp, kv_split=kv_heads % tp == 0)


def test_rules_file_changes_shardings_not_outputs(tiny_dirs, tmp_path):
    ref, llm = _generate(tiny_dirs["h16"], max_tokens=8, tensor_parallel_size=4)
    rules = tmp_path / "layout.json"
    rules.write_text(json.dumps({"preset": "megatron", "rules": {"mlp": None, "vocab": None,
                                                                 "act_tokens": "tp"}}))
    tokens, llm2 = _generate(tiny_dirs["h16"], max_tokens=8, tensor_parallel_size=4,
                             sharding_rules=str(rules))
    assert tokens == ref

    def spec(l, name):
        return _weights(_runner(l))[name].sharding.spec

    assert spec(llm, "layers/w_up") != spec(llm2, "layers/w_up")
    assert spec(llm2, "layers/w_up") == jax.sharding.PartitionSpec()
    assert spec(llm2, "embed") == jax.sharding.PartitionSpec()
    tokens3, llm3 = _generate(tiny_dirs["h16"], max_tokens=8, tensor_parallel_size=4,
                              sharding_rules="embed-parallel")
    assert tokens3 == ref
    assert spec(llm3, "layers/wq") == jax.sharding.PartitionSpec(None, "tp")


def test_tp_does_not_divide_heads_is_a_clear_error(tiny_dirs):
    with pytest.raises(ValueError, match="attention heads.*not divisible"):
        _generate(tiny_dirs["h8"], tensor_parallel_size=3)


# ----------------------------------------------------------------------------- collectives
def _traced_step(tp, pp, rules=None, *, attention="xla", num_heads=8, num_kv_heads=4, head_dim=8,
                 max_query_len=None):
    """The serving forward of a tiny Llama under a (tp, pp) layout: (jaxpr, compiled HLO text)."""
    import functools

    import jax.numpy as jnp
    from flax import nnx

    from model_zoo.attention import AttentionMetadata
    from model_zoo.config import ModelConfig
    from model_zoo.llama import LlamaForCausalLM, init_kv_cache
    from model_zoo.loaders.dummy import dummy_params
    from sharding import build_layout

    cfg = ModelConfig(architecture="LlamaForCausalLM", vocab_size=256, hidden_size=64,
                      intermediate_size=128, num_layers=4, num_heads=num_heads,
                      num_kv_heads=num_kv_heads, head_dim=head_dim)
    layout = build_layout(cfg, tensor_parallel_size=tp, pipeline_parallel_size=pp, rules=rules)
    params = dummy_params(cfg, jnp.float32, sharding_for=layout.sharding_for, seed=0, progress=False)
    if attention == "pallas":
        from pallas_kernels import paged_attention

        attention_fn = functools.partial(paged_attention, interpret=True, max_query_len=max_query_len)
    else:
        from model_zoo.attention import paged_attention_xla as attention_fn
    model = LlamaForCausalLM(cfg, params, attention_fn=attention_fn)
    graphdef, state = nnx.split(layout.attach(model))
    kv = init_kv_cache(cfg, 16, 8, jnp.float32, sharding=layout.kv_cache_sharding())

    def f(state, kv, tokens, md, idx):
        return nnx.merge(graphdef, state)(tokens, kv, md, idx)

    i32 = lambda *s: jax.ShapeDtypeStruct(s, jnp.int32, sharding=layout.replicated())  # noqa: E731
    md = AttentionMetadata(i32(16), i32(16), i32(16), i32(4, 4), i32(4), i32(5))
    args = (state, kv, i32(16), md, i32(4))
    return jax.make_jaxpr(f)(*args), jax.jit(f).lower(*args).compile().as_text()


def _count_collectives(hlo: str) -> dict:
    # The layer scan is one while loop: its body's collectives are the per-layer ones.
    return {op: len(re.findall(rf"= \S+ {op}(?:-start)?\(", hlo))
            for op in ("all-reduce", "all-gather", "reduce-scatter", "collective-permute", "all-to-all")}


def _collectives(tp, pp, rules=None, **kw):
    return _count_collectives(_traced_step(tp, pp, rules, **kw)[1])


def _pallas_calls(jaxpr, manual=frozenset(), shard_outputs=None):
    """Every pallas_call in a jaxpr: (mesh axes manual around it, the per-device output shapes of
    the innermost enclosing shard_map body, the kernel's operand shapes)."""
    from jax.extend import core as jcore

    found = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "pallas_call":
            found.append((manual, shard_outputs, [v.aval.shape for v in eqn.invars]))
        is_shard_map = eqn.primitive.name == "shard_map"
        inner_manual = manual | eqn.params["newly_manual_axes"] if is_shard_map else manual
        for value in eqn.params.values():
            for sub in value if isinstance(value, (tuple, list)) else (value,):
                sub = sub.jaxpr if isinstance(sub, jcore.ClosedJaxpr) else sub
                if isinstance(sub, jcore.Jaxpr):
                    outputs = [v.aval.shape for v in sub.outvars] if is_shard_map else shard_outputs
                    found += _pallas_calls(sub, inner_manual, outputs)
    return found


def test_tensor_parallel_layer_has_two_all_reduces_and_nothing_else():
    # Per layer: one all-reduce after attention (row-parallel wo), one after the MLP (w_down);
    # plus one for the vocab-parallel embedding lookup. The KV writes stay shard-local.
    assert _collectives(2, 1) == {"all-reduce": 3, "all-gather": 0, "reduce-scatter": 0,
                                  "collective-permute": 0, "all-to-all": 0}
    # Pipeline: one activation hand-off per tick (in the tick loop), one final all-reduce.
    assert _collectives(1, 2) == {"all-reduce": 1, "all-gather": 0, "reduce-scatter": 0,
                                  "collective-permute": 1, "all-to-all": 0}
    assert _collectives(2, 2)["all-reduce"] == 4


@pytest.mark.parametrize("tp,pp,kv_heads,max_query_len", [
    (2, 1, 4, None), (2, 1, 4, 1), (4, 1, 2, 1), (2, 2, 4, None)])
def test_pallas_attention_runs_on_each_devices_own_heads(tp, pp, kv_heads, max_query_len):
    """Under a TP mesh every Pallas kernel (prefill and decode) sits inside a shard_map that is
    manual over tp, sees Hq/tp query heads and only its KV heads (Hkv/tp, or with the cache
    replicated at TP 4 over 2 KV heads, the one its queries use), and the step has the same
    collectives as with XLA attention: no all-gather of q or the cache around the opaque kernel.
    A head-split cache gets the new K/V inside the map (fused into the decode kernel: its
    [T, Hkv/tp, D] operands) and comes back from it; a replicated one is written outside."""
    jaxpr, hlo = _traced_step(tp, pp, attention="pallas", num_kv_heads=kv_heads, head_dim=16,
                              max_query_len=max_query_len)
    calls = _pallas_calls(jaxpr.jaxpr)
    assert len(calls) == 1                                   # in the (stage's) layer scan
    kv_split = kv_heads % tp == 0
    for manual, shard_outputs, operands in calls:
        assert "tp" in manual
        out, *cache_outs = shard_outputs                        # [T (a micro-batch), Hq/tp, D]
        assert out[1:] == (8 // tp, 16)
        caches = [s for s in operands if len(s) == 5]
        assert len(caches) == 2
        assert {c[1] for c in caches} == {kv_heads // tp if kv_split else 1}
        assert cache_outs == (caches if kv_split else [])
        fused = kv_split and max_query_len == 1
        assert ((out[0], kv_heads // tp, 16) in operands) == fused
    xla = _collectives(tp, pp, num_kv_heads=kv_heads, head_dim=16)
    assert _count_collectives(hlo) == xla
    assert xla["all-gather"] == 0


@pytest.mark.parametrize("unroll,attention", [(False, "xla"), (True, "xla"), (False, "pallas")])
def test_pipeline_forward_equals_plain_scan(unroll, attention):
    """The model's serving forward under PP 2 x TP 2 (scanned or unrolled stage layers) returns
    the plain single-device logits and KV cache, for a prompt split over 4 micro-batches. With the
    Pallas kernels (interpreted) this checks that each micro-batch's query ranges are rebased."""
    import functools
    import jax.numpy as jnp
    from flax import nnx

    from model_zoo.attention import AttentionMetadata
    from model_zoo.config import ModelConfig
    from model_zoo.llama import LlamaForCausalLM, init_kv_cache
    from model_zoo.loaders.dummy import dummy_params
    from model_zoo.params import param_specs
    from sharding import build_layout

    cfg = ModelConfig(architecture="LlamaForCausalLM", vocab_size=256, hidden_size=64,
                      intermediate_size=128, num_layers=4, num_heads=4, num_kv_heads=2, head_dim=16)
    params = dummy_params(cfg, jnp.float32, seed=3, progress=False)
    if attention == "pallas":
        from pallas_kernels import paged_attention

        attention_fn = functools.partial(paged_attention, interpret=True)
    else:
        from model_zoo.attention import paged_attention_xla as attention_fn
    # x10 (std 0.2): logits and K/V far from zero, so the comparison below means something.
    host = {k: np.asarray(v) * (1 if k.endswith("norm") else 10) for k, v in params.items()}
    t, page = 16, 8
    tokens = np.arange(3, 3 + t, dtype=np.int32) * 7 % cfg.vocab_size
    # Two prompts, 6 and 10 tokens (pages 1 and 2-3): micro-batches of 4 tokens cut across both.
    md = AttentionMetadata(positions=np.r_[np.arange(6), np.arange(10)].astype(np.int32),
                           token_seq_ids=np.r_[np.zeros(6), np.ones(10)].astype(np.int32),
                           slot_mapping=np.r_[np.arange(8, 14), np.arange(16, 26)].astype(np.int32),
                           block_tables=np.array([[1, 0], [2, 3]], np.int32),
                           seq_lens=np.array([6, 10], np.int32), query_start_loc=np.array([0, 6, t], np.int32))
    idx = np.array([5, t - 1], np.int32)

    def run(layout):
        specs = param_specs(cfg)
        p = {k: jax.device_put(v, layout.sharding_for(k, v.shape, specs[k][1])) if layout else jnp.asarray(v)
             for k, v in host.items()}
        model = LlamaForCausalLM(cfg, p, attention_fn=attention_fn)
        if layout:
            layout.attach(model, num_micro_batches=4, unroll_stage_layers=unroll)
        kv = init_kv_cache(cfg, 4, page, jnp.float32, sharding=layout.kv_cache_sharding() if layout else None)
        g, st = nnx.split(model)
        logits, kv = jax.jit(lambda st, kv: nnx.merge(g, st)(tokens, kv, md, idx))(st, kv)
        return np.asarray(logits), [np.asarray(c) for c in kv]

    ref_logits, ref_kv = run(None)
    logits, kv = run(build_layout(cfg, tensor_parallel_size=2, pipeline_parallel_size=2))
    for got, want in [(logits, ref_logits)] + list(zip(kv, ref_kv)):
        assert np.abs(want).max() > 0.1
        assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max()
