"""Hugging Face Hub ids resolved offline from a cache directory the test builds."""

from __future__ import annotations

import numpy as np
import pytest

from model_zoo.loader import load_weights, resolve_model
from model_zoo.loaders.hub import looks_like_hub_id
from tests.tiny_models import make_fake_hub_cache, make_tiny_hf_model


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    path, model = make_tiny_hf_model("qwen3", tmp_path_factory.mktemp("qwen3"))
    return path, model


@pytest.fixture
def offline_cache(tmp_path, monkeypatch):
    cache = tmp_path / "hub"
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.delenv("HF_HOME", raising=False)
    return cache


def test_hub_id_from_cache(tiny_dir, offline_cache):
    path, model = tiny_dir
    snapshot = make_fake_hub_cache(offline_cache, "jaxllm-test/tiny-qwen3", path)
    resolved = resolve_model("jaxllm-test/tiny-qwen3")
    assert resolved.kind == "hf_dir" and resolved.path == snapshot
    assert resolved.tokenizer_path == snapshot and resolved.name == "jaxllm-test/tiny-qwen3"
    assert resolved.config.architecture == "Qwen3ForCausalLM"
    params = load_weights(resolved, "float32", progress=False)
    np.testing.assert_array_equal(np.asarray(params["layers/q_norm"][2]),
                                  model.state_dict()["model.layers.2.self_attn.q_norm.weight"].numpy())


def test_hub_id_revision_and_download_dir(tiny_dir, tmp_path, monkeypatch):
    path, _ = tiny_dir
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "elsewhere"))
    download_dir = tmp_path / "dl"
    snapshot = make_fake_hub_cache(download_dir, "org/model", path, revision="v1")
    resolved = resolve_model("org/model", revision="v1", download_dir=download_dir)
    assert resolved.path == snapshot
    with pytest.raises(ValueError, match="revision 'v2'"):
        resolve_model("org/model", revision="v2", download_dir=download_dir)


def test_hf_home_is_honoured(tiny_dir, tmp_path, monkeypatch):
    path, _ = tiny_dir
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "home"))
    snapshot = make_fake_hub_cache(tmp_path / "home" / "hub", "org/model", path)
    assert resolve_model("org/model").path == snapshot


def test_uncached_id_offline_is_a_clear_error(offline_cache):
    with pytest.raises(ValueError) as info:
        resolve_model("jaxllm-test/not-cached")
    msg = str(info.value)
    assert "'jaxllm-test/not-cached'" in msg
    assert str(offline_cache) in msg  # what was tried
    assert "HF_HUB_OFFLINE" in msg
    assert "directory holding config.json" in msg  # how to point at a local model


def test_dummy_from_hub_id_uses_its_config(tiny_dir, offline_cache):
    path, _ = tiny_dir
    make_fake_hub_cache(offline_cache, "org/tiny", path)
    resolved = resolve_model("org/tiny", load_format="dummy")
    assert resolved.kind == "dummy" and resolved.config.qk_norm
    params = load_weights(resolved, "float32", progress=False)
    assert params["layers/q_norm"].shape == (3, 16)


def test_looks_like_hub_id():
    assert looks_like_hub_id("Qwen/Qwen2.5-7B-Instruct")
    assert looks_like_hub_id("gpt2")
    for bad in ("./model", "/abs/path", "a/b/c", "model.gguf", "../up"):
        assert not looks_like_hub_id(bad), bad
