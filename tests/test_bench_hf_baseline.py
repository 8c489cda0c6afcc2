"""benchmarks/baseline_hf.py: random weights straight in the target dtype, the static-cache / compile
choices, and the fallback to eager when torch.compile fails (a tiny Llama on CPU)."""

import importlib.util
from pathlib import Path

import pytest

from serving.bench.datasets import SampleRequest

torch = pytest.importorskip("torch")

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def hf():
    spec = importlib.util.spec_from_file_location("baseline_hf", ROOT / "benchmarks" / "baseline_hf.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    from tests.tiny_models import make_tiny_hf_model

    path, _ = make_tiny_hf_model("llama", tmp_path_factory.mktemp("tiny"))
    return path


def test_dummy_load_is_random_in_the_target_dtype(hf, tiny_dir):
    model, tok = hf.load_hf_model(str(tiny_dir), dtype="bfloat16", device="cpu", load_format="dummy")
    assert tok is None and model.config.num_hidden_layers == 3
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    # Freshly initialised, not the saved checkpoint (whose weights are drawn with std 0.08).
    saved = hf.load_hf_model(str(tiny_dir), dtype="float32", device="cpu")[0]
    assert not torch.equal(model.model.layers[0].mlp.up_proj.weight.float(),
                           saved.model.layers[0].mlp.up_proj.weight.to(torch.bfloat16).float())
    with pytest.raises(ValueError, match="builtin shape"):
        hf.load_hf_model("no-such-model", load_format="dummy")


def test_builtin_8b_config_matches_the_jaxllm_shape(hf):
    from model_zoo.config import BUILTIN_CONFIGS

    cfg = hf._hf_config_from_builtin(BUILTIN_CONFIGS["llama-3.1-8b"])
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.intermediate_size, cfg.num_attention_heads,
            cfg.num_key_value_heads, cfg.vocab_size) == (32, 4096, 14336, 32, 8, 128256)


def test_generate_kwargs_for_cache_and_compile(hf):
    assert hf.generate_kwargs(static_cache=False, compile=False, device="cuda") == {}
    assert hf.generate_kwargs(static_cache=True, compile=False, device="cuda") == {
        "cache_implementation": "static", "disable_compile": True}
    on = hf.generate_kwargs(static_cache=True, compile=True, device="cpu")
    assert on["cache_implementation"] == "static" and on["compile_config"].mode == "reduce-overhead"
    assert on["compile_config"]._compile_all_devices    # transformers compiles on GPUs only unless told
    with pytest.raises(ValueError, match="needs --static-cache"):
        hf.generate_kwargs(static_cache=False, compile=True, device="cuda")


def test_failed_compile_falls_back_to_eager_and_saves_each_run(hf, tiny_dir):
    model, _ = hf.load_hf_model(str(tiny_dir), dtype="float32", device="cpu", load_format="dummy")
    reqs = [SampleRequest(None, [3 + i, 4, 5, 6][: 2 + i % 3], 4) for i in range(5)]
    saved = []
    res = hf.run_variants(model, reqs, compile="both", batch_size=2, static_cache=True, device="cpu",
                          compile_backend="no_such_backend", on_result=saved.append)
    assert res["torch_compile"] == "off" and res["total_output_tokens"] == 5 * 4
    assert [len(o) for o in res["outputs"]] == [4] * 5
    assert [r["torch_compile"] for r in res["runs"]] == ["off", "failed"]
    assert "no_such_backend" in res["runs"][1]["error"]
    assert len(saved) == 1 and saved[0]["torch_compile"] == "off"     # written after the eager run
    # "on" retries eager after the failed compile.
    res = hf.run_variants(model, reqs, compile="on", batch_size=2, static_cache=True, device="cpu",
                          compile_backend="no_such_backend")
    assert [r["torch_compile"] for r in res["runs"]] == ["failed", "off"] and res["num_requests"] == 5
