"""Sharding rules, presets, rules files and layout resolution (one device), plus the 8-device suite.

The multi-device checks live in tests/test_sharding_mesh.py and need XLA's forced host device
count set before jax starts; `test_multi_device_suite` runs that module in a child pytest process
with the flag, so this process keeps its single device.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from model_zoo.config import ModelConfig
from model_zoo.params import param_specs
from sharding import PRESETS, ShardingLayout, load_rules_file, make_mesh, preset, resolve_rules
from sharding.pipeline import micro_batches_for
from sharding.rules import ShardingRules

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _config(**kw):
    base = dict(architecture="LlamaForCausalLM", vocab_size=256, hidden_size=64, intermediate_size=128,
                num_layers=4, num_heads=8, num_kv_heads=2, head_dim=8)
    return ModelConfig(**{**base, **kw})


class _FakeMesh:
    """Just the `shape` a layout resolves against (no devices needed for the arithmetic)."""

    def __init__(self, **shape):
        self.shape = shape


def _layout(rules="megatron", tp=2, pp=1, **cfg):
    return ShardingLayout(_config(**cfg), _FakeMesh(pp=pp, tp=tp), resolve_rules(rules))


def test_presets_and_rules_files(tmp_path):
    assert resolve_rules(None).name == "megatron"
    assert resolve_rules("replicated-vocab").as_dict()["vocab"] is None
    f = tmp_path / "r.json"
    f.write_text(json.dumps({"preset": "mlp-only", "rules": {"vocab": None, "embed": ["tp"]}}))
    r = load_rules_file(f)
    assert r.as_dict()["q_heads"] is None and r.as_dict()["mlp"] == "tp"
    assert r.as_dict()["vocab"] is None and r.as_dict()["embed"] == "tp"
    bare = tmp_path / "bare.json"
    bare.write_text(json.dumps({"mlp": None}))
    assert resolve_rules(str(bare)).as_dict()["mlp"] is None
    assert resolve_rules(str(bare)).as_dict()["q_heads"] == "tp"   # the default preset fills in
    for name in PRESETS:
        assert preset(name).name == name


@pytest.mark.parametrize("content,match", [
    ({"rules": {"heads": "tp"}}, "unknown logical axis 'heads'"),
    ({"rules": {"mlp": "dp"}}, "mesh axis must be one of"),
    ({"preset": "nope"}, "unknown sharding preset"),
    ({"rules": {"mlp": ["tp", "tp"]}}, "repeats a mesh axis"),
    ({"rules": {"mlp": "tp"}, "layouts": 1}, "unknown keys"),
])
def test_bad_rules_are_clear_errors(tmp_path, content, match):
    f = tmp_path / "bad.json"
    f.write_text(json.dumps(content))
    with pytest.raises(ValueError, match=match):
        load_rules_file(f)


def test_unknown_rules_spec_is_a_clear_error():
    with pytest.raises(ValueError, match="neither a preset"):
        resolve_rules("no-such-layout")


def test_weight_specs_follow_the_rules():
    lay = _layout(tp=2, pp=2, num_kv_heads=2)
    specs = {n: lay.spec(axes) for n, (_, axes) in
             param_specs(lay.config).items()}
    assert specs["layers/wq"] == P("pp", None, "tp")        # column parallel
    assert specs["layers/wo"] == P("pp", "tp")              # row parallel
    assert specs["layers/w_down"] == P("pp", "tp")
    assert specs["layers/wk"] == P("pp", None, "tp")
    assert specs["embed"] == P("tp")                        # vocab parallel
    assert specs["lm_head"] == P(None, "tp")
    assert specs["final_norm"] == P()
    assert lay.spec(("layers", "kv_heads", None, None, None)) == P("pp", "tp")


def test_kv_heads_replicated_when_tp_exceeds_them():
    lay = _layout(tp=4, num_kv_heads=2)
    assert lay.spec(param_specs(lay.config)["layers/wk"][1]) == P()
    assert lay.spec(("layers", "kv_heads", None, None, None)) == P()
    assert lay.spec(param_specs(lay.config)["layers/wq"][1]) == P(None, None, "tp")


def test_vocab_that_does_not_divide_is_replicated():
    lay = _layout(tp=2, vocab_size=255)
    assert lay.spec(("vocab", "embed")) == P()


@pytest.mark.parametrize("kw,match", [
    (dict(tp=3), "attention heads \\(8\\) is not divisible by the 3 devices"),
    (dict(tp=2, pp=3), "number of layers \\(4\\) is not divisible"),
    (dict(tp=2, intermediate_size=129), "MLP intermediate size"),
])
def test_sizes_that_do_not_divide_are_clear_errors(kw, match):
    with pytest.raises(ValueError, match=match):
        _layout(**kw)


def test_a_mesh_axis_splits_one_dimension_only():
    lay = _layout("embed-parallel", tp=2)
    # wo is [layers, q_heads, embed]: only embed maps to tp here.
    assert lay.spec(("layers", "q_heads", "embed")) == P(None, None, "tp")
    both = ShardingLayout(_config(), _FakeMesh(pp=1, tp=2),
                          ShardingRules.from_mapping({"embed": "tp", "vocab": "tp"}))
    assert both.spec(("vocab", "embed")) == P("tp")        # the first dimension wins


def test_mesh_needs_enough_devices():
    with pytest.raises(ValueError, match="only 1 CPU device"):
        make_mesh(2, 1, devices=jax.devices()[:1])
    mesh = make_mesh(1, 1)
    assert dict(mesh.shape) == {"pp": 1, "tp": 1}


def test_micro_batches_divide_the_token_bucket():
    assert micro_batches_for(16, 2) == 2
    assert micro_batches_for(6, 4) == 3
    assert micro_batches_for(7, 2) == 1
    assert micro_batches_for(1, 4) == 1


def test_one_device_layout_runs_the_model_unchanged():
    """A 1x1 mesh with the layout's hooks attached gives the very same logits as no layout."""
    import jax.numpy as jnp

    from model_zoo.llama import LlamaForCausalLM
    from model_zoo.loaders.dummy import dummy_params
    from sharding import build_layout

    cfg = _config()
    lay = build_layout(cfg)
    params = dummy_params(cfg, jnp.float32, sharding_for=lay.sharding_for, seed=1, progress=False)
    tokens = jnp.asarray(np.arange(12).reshape(2, 6) % cfg.vocab_size)
    plain = LlamaForCausalLM(cfg, params).forward_dense(tokens)
    hooked = lay.attach(LlamaForCausalLM(cfg, params)).forward_dense(tokens)
    np.testing.assert_array_equal(np.asarray(plain), np.asarray(hooked))


def test_multi_device_suite():
    """tests/test_sharding_mesh.py on 8 forced host devices (TP, PP, TP x PP, layouts, HLO)."""
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
               JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider",
                           "tests/test_sharding_mesh.py"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=900)
    tail = (proc.stdout + proc.stderr)[-6000:]
    assert proc.returncode == 0, tail
    assert " passed" in proc.stdout and "skipped" not in proc.stdout.split("\n")[-2], tail


def test_benchmark_layout_specs():
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "sharding_layouts", os.path.join(ROOT, "benchmarks", "sharding_layouts.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.parse_layout("tp=2,pp=2") == {"name": "tp=2,pp=2", "tp": 2, "pp": 2, "rules": None}
    assert mod.parse_layout("tp=4:replicated-vocab")["rules"] == "replicated-vocab"
    with pytest.raises(ValueError, match="bad layout"):
        mod.parse_layout("dp=2")


def test_kv_cache_shards_count_the_devices_a_page_is_split_over():
    assert _layout(tp=2, pp=2, num_kv_heads=2).kv_cache_shards == 4
    assert _layout(tp=4, pp=1, num_kv_heads=2).kv_cache_shards == 1      # replicated KV heads
    assert _layout("mlp-only", tp=2, pp=1).kv_cache_shards == 1


@pytest.mark.parametrize("heads,kv_heads,shards,block_heads,blocks,q_offsets", [
    (8, 2, 4, 1, (0, 0, 1, 1), (0, 2, 0, 2)),      # TP a multiple of the KV heads: one KV head each
    (12, 3, 2, 3, (0, 0), (0, 6)),                 # windows [0,2) and [1,3): only the whole cache fits
    (24, 6, 4, 3, (0, 0, 1, 1), (0, 6, 0, 6)),     # windows [0,2) [1,3) [3,5) [4,6): blocks of 3
    (8, 8, 4, 2, (0, 1, 2, 3), (0, 0, 0, 0)),      # replicated by a rule although it divides
])
def test_replicated_kv_cache_windows(heads, kv_heads, shards, block_heads, blocks, q_offsets):
    """Which aligned block of KV heads each head shard reads from a replicated cache, and where its
    query heads sit in that block's heads (sharding/attention.py)."""
    from sharding.attention import KVWindows

    w = KVWindows.for_heads(heads, kv_heads, shards)
    assert (w.block_heads, w.blocks, w.q_offsets) == (block_heads, blocks, q_offsets)
    group, local = heads // kv_heads, heads // shards
    for i in range(shards):
        # Every query head of shard i uses a KV head inside its block.
        for h in range(i * local, (i + 1) * local):
            assert blocks[i] * block_heads <= h // group < (blocks[i] + 1) * block_heads


def test_gpu_sharding_benchmark_runs_end_to_end_on_cpu(tmp_path):
    """benchmarks/gpu_sharding.py --cpu-smoke: every configuration in its own worker process on
    forced host devices (a tiny model standing in for both shapes), JSON + figure + targets."""
    from tests.tiny_models import make_tiny_hf_model

    model, _ = make_tiny_hf_model("llama", tmp_path / "m", num_attention_heads=8, num_key_value_heads=8,
                                  hidden_size=128, num_hidden_layers=2)
    out = tmp_path / "out"
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    proc = subprocess.run([sys.executable, "benchmarks/gpu_sharding.py", "--cpu-smoke", "--model", str(model),
                           "--load-format", "auto", "--configs", "tp1,70b-tp4,tp2-no-thread", "--out", str(out)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    (path,) = out.glob("*-cpux4-sharding.json")
    assert path.with_suffix(".png").exists()
    data = json.loads(path.read_text())
    assert data["environment"]["device_count"] == 4 and data["environment"]["commit"]
    tp1, tp4, tp2_control = data["results"]["configs"]
    assert (tp1["config"], tp1["devices_used"], tp4["config"], tp4["devices_used"]) == ("tp1", 1, "70b-tp4", 4)
    assert tp1["served_tokens"] == tp4["served_tokens"] == tp2_control["served_tokens"]
    assert len(tp1["served_tokens"]) == 8
    # The launch thread: off on one device, on by default for several, off in the TP2 control's worker.
    assert (tp1["launch_thread"], tp4["launch_thread"], tp2_control["launch_thread"]) == (False, True, False)
    for r in (tp1, tp4):
        assert r["model_shape"]["num_heads"] == 8 and r["jax_version"] == jax.__version__
        assert r["batch1"]["batch"] == 1 and r["itl_ms"] > 0
    assert tp1["batch_decode"]["batch"] == 4 and "batch_decode" not in tp4
    # TP 4 over 8 KV heads: each device holds a quarter of the weights' big matrices and of the cache.
    assert len(tp4["memory"]) == 4
    assert {m["kv_bytes"] for m in tp4["memory"]} == {tp1["memory"][0]["kv_bytes"]}   # same bytes, 4x pages
    assert max(m["weights_bytes"] for m in tp4["memory"]) < tp1["memory"][0]["weights_bytes"] / 2
    assert tp4["roofline_ms"] == round(1e3 * tp4["weight_bytes"] / (4 * tp4["copy_bandwidth"]["bytes_per_s"]), 3)
    assert data["results"]["targets"]["70b_tp4_itl_over_roofline"]["value"] == tp4["itl_over_roofline"]
