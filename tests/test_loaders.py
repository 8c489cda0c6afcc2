"""Weight loaders: safetensors (single, sharded, bfloat16, every error case), GGUF against
transformers' own GGUF loading, orbax round trips, dummy weights, and name resolution."""

from __future__ import annotations

import json
import logging
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from model_zoo.config import BUILTIN_CONFIGS, ModelConfig, UnsupportedArchitectureError
from model_zoo.loader import (CheckpointError, load_weights, resolve_model, save_orbax)
from model_zoo.loaders.dummy import dummy_params
from model_zoo.loaders.hf_safetensors import _HF_NAMES, hf_tensor_names
from model_zoo.params import param_specs
from tests.tiny_models import TINY_ARCHS, make_tiny_hf_model


def hf_reference(state_dict: dict, config: ModelConfig) -> dict[str, np.ndarray]:
    """Our tree built from a HF state dict by the documented rule (stack layers, [out,in] -> [in,out])."""
    sd = {k: v.float().numpy() if hasattr(v, "float") else v for k, v in state_dict.items()}
    out = {}
    for name in param_specs(config):
        _, transpose = _HF_NAMES[name]
        arrays = [sd[n].T if transpose else sd[n] for n in hf_tensor_names(name, config.num_layers)]
        out[name] = np.stack(arrays) if name.startswith("layers/") else arrays[0]
    return out


def assert_params_equal(params, ref):
    assert set(params) == set(ref)
    for name in ref:
        got = np.asarray(params[name])
        assert got.shape == ref[name].shape, name
        np.testing.assert_array_equal(got, ref[name], err_msg=name)


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    return make_tiny_hf_model("llama", tmp_path_factory.mktemp("llama"), with_tokenizer=True)


# --- safetensors ---------------------------------------------------------------------------

@pytest.mark.parametrize("arch", sorted(TINY_ARCHS))
def test_safetensors_matches_hf_state_dict(arch, tmp_path):
    path, model = make_tiny_hf_model(arch, tmp_path, with_tokenizer=False)
    resolved = resolve_model(str(path))
    assert resolved.kind == "hf_dir" and resolved.tokenizer_path == path.absolute()
    cfg = resolved.config
    assert cfg.tie_word_embeddings == (arch == "llama_tied")
    assert cfg.attention_bias == (arch == "qwen2") and cfg.qk_norm == (arch == "qwen3")
    params = load_weights(resolved, "float32", progress=False)
    assert ("lm_head" in params) == (not cfg.tie_word_embeddings)
    assert all(a.dtype == jnp.float32 for a in params.values())
    assert_params_equal(params, hf_reference(model.state_dict(), cfg))


def test_bfloat16_checkpoint_and_casts(tmp_path):
    path, model = make_tiny_hf_model("qwen2", tmp_path, with_tokenizer=False, dtype="bfloat16")
    resolved = resolve_model(str(path))
    assert resolved.dtype == "bfloat16"
    ref = hf_reference(model.state_dict(), resolved.config)  # exact: bf16 -> f32 is lossless
    bf16 = load_weights(resolved, jnp.bfloat16, progress=False)
    assert all(a.dtype == jnp.bfloat16 for a in bf16.values())
    assert_params_equal({k: np.asarray(v, np.float32) for k, v in bf16.items()}, ref)
    assert_params_equal(load_weights(resolved, "float32", progress=False), ref)
    f16 = load_weights(resolved, "float16", progress=False)
    assert f16["layers/wq"].dtype == jnp.float16
    np.testing.assert_array_equal(np.asarray(f16["layers/wq"]), ref["layers/wq"].astype(np.float16))


def test_sharded_checkpoint_with_index(tmp_path, caplog):
    path, model = make_tiny_hf_model("llama", tmp_path, with_tokenizer=False)
    model.save_pretrained(tmp_path / "sharded", safe_serialization=True, max_shard_size="40KB")
    index = json.loads((tmp_path / "sharded" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2
    resolved = resolve_model(str(tmp_path / "sharded"))
    with caplog.at_level(logging.INFO, logger="jaxllm"):
        params = load_weights(resolved, "float32", progress=True)
    assert_params_equal(params, hf_reference(model.state_dict(), resolved.config))
    assert any("GB/s" in r.getMessage() for r in caplog.records)


def test_sharding_for_places_each_param(tiny_llama):
    path, _ = tiny_llama
    resolved = resolve_model(str(path))
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("tp",))
    seen = {}

    def sharding_for(name, shape, axes):
        seen[name] = (shape, axes)
        spec = jax.sharding.PartitionSpec(*(("tp" if a in ("q_heads", "mlp") else None)
                                            for a in axes))
        return jax.sharding.NamedSharding(mesh, spec)

    params = load_weights(resolved, "float32", sharding_for=sharding_for, progress=False)
    assert seen == {n: s for n, s in param_specs(resolved.config).items()}
    assert params["layers/w_up"].sharding.spec == jax.sharding.PartitionSpec(None, None, "tp")


def _rewrite(path, mutate):
    tensors = load_file(str(path / "model.safetensors"))
    mutate(tensors)
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})


def test_error_missing_tensor(tmp_path):
    path, _ = make_tiny_hf_model("llama", tmp_path, with_tokenizer=False)
    _rewrite(path, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(CheckpointError, match=r"'model\.layers\.1\.mlp\.up_proj\.weight' is missing"
                       r".*model\.safetensors"):
        load_weights(resolve_model(str(path)), "float32", progress=False)


def test_error_wrong_dtype(tmp_path):
    path, _ = make_tiny_hf_model("llama", tmp_path, with_tokenizer=False)

    def to_int(t):
        t["model.layers.0.self_attn.k_proj.weight"] = t["model.layers.0.self_attn.k_proj.weight"
                                                        ].astype(np.int8)
    _rewrite(path, to_int)
    with pytest.raises(CheckpointError, match=r"model\.safetensors: tensor "
                       r"'model\.layers\.0\.self_attn\.k_proj\.weight' has dtype I8"):
        load_weights(resolve_model(str(path)), "float32", progress=False)


def test_error_wrong_shape(tmp_path):
    path, _ = make_tiny_hf_model("llama", tmp_path, with_tokenizer=False)
    cfg = json.loads((path / "config.json").read_text())
    cfg["intermediate_size"] = 96
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"model\.safetensors: tensor "
                       r"'model\.layers\.0\.mlp\.gate_proj\.weight' has shape \[128, 64\], "
                       r"expected \[96, 64\]"):
        load_weights(resolve_model(str(path)), "float32", progress=False)


def test_error_truncated_file(tmp_path):
    path, _ = make_tiny_hf_model("llama", tmp_path, with_tokenizer=False)
    f = path / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size * 2 // 3])
    with pytest.raises(CheckpointError, match=r"model\.safetensors: truncated safetensors file: "
                       r"tensor '[\w.]+' needs data bytes"):
        load_weights(resolve_model(str(path)), "float32", progress=False)
    f.write_bytes(b"\x10\x00")
    with pytest.raises(CheckpointError, match=r"model\.safetensors: truncated"):
        load_weights(resolve_model(str(path)), "float32", progress=False)


def test_error_missing_shard_file(tmp_path):
    _, model = make_tiny_hf_model("llama", tmp_path / "src", with_tokenizer=False)
    out = tmp_path / "sharded"
    model.save_pretrained(out, safe_serialization=True, max_shard_size="40KB")
    weight_map = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    victim = sorted(set(weight_map.values()))[1]
    tensor = next(t for t, f in weight_map.items() if f == victim)
    (out / victim).unlink()
    with pytest.raises(CheckpointError, match=rf"{victim}: safetensors file does not exist, but "
                       rf"model\.safetensors\.index\.json lists it for tensor '{tensor}'"):
        load_weights(resolve_model(str(out)), "float32", progress=False)


def test_error_untied_config_without_lm_head(tmp_path):
    path, _ = make_tiny_hf_model("llama_tied", tmp_path, with_tokenizer=False)
    cfg = json.loads((path / "config.json").read_text())
    cfg["tie_word_embeddings"] = False
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"'lm_head\.weight' is missing.*tie_word_embeddings"):
        load_weights(resolve_model(str(path)), "float32", progress=False)


def test_error_no_weights(tmp_path):
    path, _ = make_tiny_hf_model("llama", tmp_path, with_tokenizer=False)
    (path / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"no \*\.safetensors files"):
        load_weights(resolve_model(str(path)), "float32", progress=False)


# --- resolution ----------------------------------------------------------------------------

def test_unsupported_architecture_names_supported_ones(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"]}))
    with pytest.raises(UnsupportedArchitectureError, match="GPT2LMHeadModel.*LlamaForCausalLM"):
        resolve_model(str(tmp_path))


def test_missing_local_path_is_clear():
    with pytest.raises(ValueError, match="neither an existing file or directory"):
        resolve_model("./no/such/model/dir")
    with pytest.raises(ValueError, match="load_format must be one of"):
        resolve_model(None, load_format="pt")


def test_tokenizer_override(tiny_llama, tmp_path):
    path, _ = tiny_llama
    resolved = resolve_model(str(path), tokenizer=str(tmp_path))
    assert resolved.tokenizer_path == tmp_path and resolved.gguf_file is None
    assert resolved.generation_config["eos_token_id"] == 257


# --- dummy ---------------------------------------------------------------------------------

def test_dummy_weights_small_config(tiny_llama):
    path, _ = tiny_llama
    resolved = resolve_model(str(path), load_format="dummy")
    assert resolved.kind == "dummy"
    params = load_weights(resolved, "bfloat16", progress=False)
    specs = param_specs(resolved.config)
    assert {k: (tuple(v.shape), v.dtype) for k, v in params.items()} == \
        {k: (s, jnp.bfloat16) for k, (s, _) in specs.items()}
    np.testing.assert_array_equal(np.asarray(params["final_norm"], np.float32), 1.0)
    w = np.asarray(params["layers/w_gate"], np.float32)
    assert 0.015 < w.std() < 0.025 and abs(w.mean()) < 0.005
    again = load_weights(resolved, "bfloat16", progress=False)
    np.testing.assert_array_equal(np.asarray(again["embed"]), np.asarray(params["embed"]))
    other = load_weights(resolved, "bfloat16", progress=False, seed=1)
    assert not np.array_equal(np.asarray(other["embed"]), np.asarray(params["embed"]))


@pytest.mark.parametrize("name", sorted(BUILTIN_CONFIGS))
def test_dummy_builtin_configs_shapes(name):
    resolved = resolve_model(name, load_format="dummy")
    assert resolved.kind == "dummy" and resolved.path is None
    # eval_shape traces without allocating the 8B/70B weights.
    shapes = jax.eval_shape(lambda: dummy_params(resolved.config, jnp.bfloat16))
    specs = param_specs(resolved.config)
    assert {k: tuple(v.shape) for k, v in shapes.items()} == {k: s for k, (s, _) in specs.items()}
    assert all(v.dtype == jnp.bfloat16 for v in shapes.values())
    assert sum(int(np.prod(v.shape)) for v in shapes.values()) == resolved.config.num_params


# --- orbax ---------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_orbax_round_trip_bit_identical(tiny_llama, tmp_path, dtype):
    path, _ = tiny_llama
    src = resolve_model(str(path))
    params = load_weights(src, dtype, progress=False)
    out = save_orbax(params, src.config, tmp_path / "ckpt", generation_config=src.generation_config,
                     tokenizer_dir=src.tokenizer_path)
    resolved = resolve_model(str(out))
    assert resolved.kind == "orbax" and resolved.config == src.config
    assert resolved.tokenizer_path == out and (out / "tokenizer.json").is_file()
    assert resolved.generation_config == src.generation_config and resolved.dtype == dtype
    restored = load_weights(resolved, dtype, progress=False)
    for name, arr in params.items():
        assert restored[name].dtype == arr.dtype
        np.testing.assert_array_equal(np.asarray(restored[name]).view(np.uint8),
                                      np.asarray(arr).view(np.uint8), err_msg=name)
    with pytest.raises(ValueError, match="not empty"):
        save_orbax(params, src.config, out)
    # Restoring straight into a requested sharding.
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("tp",))
    spec_for = lambda name, shape, axes: jax.sharding.NamedSharding(  # noqa: E731
        mesh, jax.sharding.PartitionSpec(*(("tp" if a == "mlp" else None) for a in axes)))
    sharded = load_weights(resolved, dtype, sharding_for=spec_for, progress=False)
    assert sharded["layers/w_down"].sharding.spec == jax.sharding.PartitionSpec(None, "tp", None)
    np.testing.assert_array_equal(np.asarray(sharded["layers/w_down"]),
                                  np.asarray(params["layers/w_down"]))


# --- GGUF (the embedded SmolLM2) -----------------------------------------------------------

def test_gguf_reverse_permute_matches_transformers():
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    from model_zoo.loaders.gguf_file import _reverse_rope_permute

    w = np.random.default_rng(0).standard_normal((6 * 8, 5)).astype(np.float32)
    proc = LlamaTensorProcessor(config={"num_attention_heads": 6, "num_key_value_heads": 2})
    for name, heads in (("blk.0.attn_q.weight", 6), ("blk.0.attn_k.weight", 2)):
        ref = proc.process(weights=w[: heads * 8], name=name).weights
        np.testing.assert_array_equal(_reverse_rope_permute(w[: heads * 8], heads), ref)


@pytest.fixture(scope="module")
def smollm():
    resolved = resolve_model(None)
    t0 = time.perf_counter()
    params = load_weights(resolved, "float32", progress=False)
    return resolved, params, time.perf_counter() - t0


def test_gguf_config_matches_transformers(smollm):
    from tests.tiny_models import load_hf_gguf_reference

    resolved, _, _ = smollm
    assert resolved.kind == "gguf" and resolved.gguf_file.endswith(".gguf")
    assert (resolved.tokenizer_path / resolved.gguf_file).is_file()
    hf = load_hf_gguf_reference().config
    c = resolved.config
    assert c.architecture == "LlamaForCausalLM" and c.tie_word_embeddings and hf.tie_word_embeddings
    assert (c.vocab_size, c.hidden_size, c.intermediate_size, c.num_layers, c.num_heads,
            c.num_kv_heads, c.head_dim) == (hf.vocab_size, hf.hidden_size, hf.intermediate_size,
                                            hf.num_hidden_layers, hf.num_attention_heads,
                                            hf.num_key_value_heads, hf.head_dim)
    assert c.rms_norm_eps == hf.rms_norm_eps and c.rope_theta == hf.rope_parameters["rope_theta"]
    assert c.max_position_embeddings == hf.max_position_embeddings
    assert resolved.generation_config["eos_token_id"] == 2 == c.eos_token_ids[0]
    assert resolved.generation_config["bos_token_id"] == 1 == c.bos_token_id


def test_gguf_weights_match_transformers(smollm):
    from tests.tiny_models import load_hf_gguf_reference

    resolved, params, _ = smollm
    sd = load_hf_gguf_reference().state_dict()
    assert set(params) == set(param_specs(resolved.config))
    # Layer by layer, to spare the CI machine a second full copy of the model.
    for name, arr in params.items():
        got = np.asarray(arr)
        _, transpose = _HF_NAMES[name]
        hf_names = hf_tensor_names(name, resolved.config.num_layers)
        for i, hf_name in enumerate(hf_names):
            ref = sd[hf_name].numpy()
            np.testing.assert_array_equal(got[i] if name.startswith("layers/") else got,
                                          ref.T if transpose else ref, err_msg=hf_name)


def test_orbax_from_gguf_is_self_contained_and_timed(smollm, tmp_path, capsys):
    """Convert the embedded model to orbax; restoring it equals the GGUF load and is timed
    against converting again (numbers printed for the record; CI timings are too noisy to gate)."""
    from transformers import AutoTokenizer

    resolved, params, gguf_seconds = smollm
    out = save_orbax(params, resolved.config, tmp_path / "smol", tokenizer_dir=resolved.tokenizer_path,
                     gguf_file=resolved.gguf_file, generation_config=resolved.generation_config)
    ckpt = resolve_model(str(out))
    assert ckpt.kind == "orbax" and ckpt.tokenizer_path == out and ckpt.gguf_file is None
    t0 = time.perf_counter()
    restored = load_weights(ckpt, "float32", progress=False)
    orbax_seconds = time.perf_counter() - t0
    for name in params:
        np.testing.assert_array_equal(np.asarray(restored[name]), np.asarray(params[name]))
    tok = AutoTokenizer.from_pretrained(str(out))
    assert len(tok) == resolved.config.vocab_size and tok.eos_token == "<|im_end|>"
    assert tok.decode(tok("Grüße, 世界!").input_ids) == "Grüße, 世界!"
    with capsys.disabled():
        print(f"\n[loader timing] embedded SmolLM2 float32: GGUF dequant+place {gguf_seconds:.2f} s, "
              f"orbax restore {orbax_seconds:.2f} s")


def test_convert_cli_tiny(tiny_llama, tmp_path):
    from model_zoo.convert import main

    path, model = tiny_llama
    assert main([str(path), str(tmp_path / "out"), "--dtype", "bfloat16"]) == 0
    resolved = resolve_model(str(tmp_path / "out"))
    assert resolved.kind == "orbax" and resolved.dtype == "bfloat16"
    params = load_weights(resolved, "bfloat16", progress=False)
    ref = hf_reference(model.state_dict(), resolved.config)
    np.testing.assert_array_equal(np.asarray(params["layers/wo"]),
                                  ref["layers/wo"].astype(jnp.bfloat16))
    assert main([str(path), str(tmp_path / "out")]) == 2  # exists, no --overwrite


_MULTI_DEVICE_SCRIPT = r"""
import numpy as np, jax, sys
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from model_zoo.loader import resolve_model, load_weights, save_orbax
from tests.tiny_models import make_tiny_hf_model
assert len(jax.devices()) == 4
path, model = make_tiny_hf_model("qwen2", sys.argv[1] + "/m", with_tokenizer=False)
mesh = Mesh(np.array(jax.devices()).reshape(2, 2), ("dp", "tp"))
rules = {"q_heads": "tp", "kv_heads": "tp", "mlp": "tp", "vocab": "dp"}
calls = []
def sharding_for(name, shape, axes):
    calls.append(name)
    return NamedSharding(mesh, P(*(rules.get(a) for a in axes)))
resolved = resolve_model(str(path))
params = load_weights(resolved, "float32", sharding_for=sharding_for, progress=False)
sd = {k: v.numpy() for k, v in model.state_dict().items()}
np.testing.assert_array_equal(np.asarray(params["layers/w_up"][1]), sd["model.layers.1.mlp.up_proj.weight"].T)
np.testing.assert_array_equal(np.asarray(params["layers/bk"][2]), sd["model.layers.2.self_attn.k_proj.bias"])
np.testing.assert_array_equal(np.asarray(params["lm_head"]), sd["lm_head.weight"].T)
shard = params["layers/w_up"].addressable_shards[0].data
assert shard.shape == (3, 64, 64), shard.shape
assert params["embed"].addressable_shards[0].data.shape == (136, 64)
out = save_orbax(params, resolved.config, sys.argv[1] + "/ckpt")
restored = load_weights(resolve_model(out), "float32", sharding_for=sharding_for, progress=False)
assert restored["layers/w_up"].sharding == params["layers/w_up"].sharding
for k in params:
    np.testing.assert_array_equal(np.asarray(restored[k]), np.asarray(params[k]))
print("MULTI_DEVICE_OK")
"""


def test_loading_into_a_multi_device_mesh(tmp_path):
    """Sharded placement (each device reads only its block) on 4 host devices, in a subprocess
    because the device count is fixed when jax starts."""
    import os
    import subprocess
    import sys

    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4",
               JAX_PLATFORMS="cpu")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run([sys.executable, "-c", _MULTI_DEVICE_SCRIPT, str(tmp_path)], cwd=root,
                          env=env, capture_output=True, text=True, timeout=300)
    assert "MULTI_DEVICE_OK" in proc.stdout, proc.stdout[-3000:] + proc.stderr[-3000:]
