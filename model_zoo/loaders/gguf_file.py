"""GGUF files (llama.cpp's format): model config and generation config from the metadata, tensors
dequantized to float32 with the `gguf` package's numpy code (no torch), mapped onto our tree.

llama.cpp's converter permutes the rows of a Llama-architecture model's attn_q / attn_k (weights and
biases) from Hugging Face's rotate-half rope layout to its own interleaved one; we undo it exactly as
transformers' GGUF loader does, so the arrays equal what `from_pretrained(..., gguf_file=)` builds.
Qwen2/Qwen3 GGUFs are written without that permutation.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from model_zoo.config import ModelConfig, UnsupportedArchitectureError, rope_inv_freq
from model_zoo.loaders.hf_safetensors import CheckpointError
from model_zoo.loaders.placement import ParamSource, parallel_for
from model_zoo.params import param_specs

# general.architecture -> Hugging Face class name. Mistral GGUFs say "llama" (see gguf_config).
GGUF_ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM",
                      "qwen3": "Qwen3ForCausalLM"}

# Our name -> (GGUF name, or template with {i}; stored [out, in] like HF, so transpose).
_GGUF_NAMES: dict[str, tuple[str, bool]] = {
    "embed": ("token_embd.weight", False),
    "layers/attn_norm": ("blk.{i}.attn_norm.weight", False),
    "layers/wq": ("blk.{i}.attn_q.weight", True),
    "layers/wk": ("blk.{i}.attn_k.weight", True),
    "layers/wv": ("blk.{i}.attn_v.weight", True),
    "layers/bq": ("blk.{i}.attn_q.bias", False),
    "layers/bk": ("blk.{i}.attn_k.bias", False),
    "layers/bv": ("blk.{i}.attn_v.bias", False),
    "layers/q_norm": ("blk.{i}.attn_q_norm.weight", False),
    "layers/k_norm": ("blk.{i}.attn_k_norm.weight", False),
    "layers/wo": ("blk.{i}.attn_output.weight", True),
    "layers/mlp_norm": ("blk.{i}.ffn_norm.weight", False),
    "layers/w_gate": ("blk.{i}.ffn_gate.weight", True),
    "layers/w_up": ("blk.{i}.ffn_up.weight", True),
    "layers/w_down": ("blk.{i}.ffn_down.weight", True),
    "final_norm": ("output_norm.weight", False),
    "lm_head": ("output.weight", True),
}


class GGUFFile:
    """A parsed GGUF file: metadata fields and tensors by name (data memory-mapped)."""

    def __init__(self, path: str | os.PathLike):
        from gguf import GGUFReader

        self.path = Path(path)
        if not self.path.is_file():
            raise CheckpointError(f"{self.path}: GGUF file does not exist")
        try:
            self.reader = GGUFReader(str(self.path), "r")
        except Exception as e:  # the reader raises bare ValueError/IndexError on damaged files
            raise CheckpointError(f"{self.path}: not a readable GGUF file "
                                  f"(truncated or damaged?): {type(e).__name__}: {e}") from None
        self.tensors = {t.name: t for t in self.reader.tensors}

    def field(self, key: str, default=None):
        f = self.reader.fields.get(key)
        if f is None:
            return default
        return f.contents()

    def dequantize(self, name: str) -> np.ndarray:
        """The tensor as float32 in numpy (row-major, i.e. ggml's dims reversed)."""
        from gguf.quants import dequantize

        t = self.tensors[name]
        try:
            return np.asarray(dequantize(t.data, t.tensor_type), dtype=np.float32)
        except Exception as e:
            raise CheckpointError(f"{self.path}: cannot dequantize tensor {name!r} of type "
                                  f"{t.tensor_type.name}: {e}") from None


def _reverse_rope_permute(w: np.ndarray, n_heads: int) -> np.ndarray:
    # llama.cpp wrote rows as (head, pair_index, 2); HF wants (head, 2, pair_index).
    dim = w.shape[0] // n_heads // 2
    return w.reshape(n_heads, dim, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _llama3_rope_from_factors(gf: GGUFFile, head_dim: int, theta: float, max_pos: int):
    """Llama 3.1+ GGUFs store rope scaling as per-frequency divisors (rope_freqs.weight) instead
    of parameters. Recover the HF llama3 parameters and check they reproduce the divisors."""
    factors = gf.dequantize("rope_freqs.weight").astype(np.float64)
    factor = float(factors.max())
    rs = {"rope_type": "llama3", "factor": factor, "low_freq_factor": 1.0,
          "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    base = ModelConfig(architecture="LlamaForCausalLM", vocab_size=1, hidden_size=head_dim,
                       intermediate_size=1, num_layers=1, num_heads=1, num_kv_heads=1,
                       head_dim=head_dim, rope_theta=theta)
    plain, _ = rope_inv_freq(base)
    scaled, _ = rope_inv_freq(
        ModelConfig(**{**base.__dict__, "rope_scaling": tuple(sorted(rs.items()))}))
    if factors.shape != plain.shape or not np.allclose(plain / scaled, factors, rtol=1e-3):
        raise CheckpointError(f"{gf.path}: tensor 'rope_freqs.weight' holds a rope scaling that is "
                              "not Llama 3's (factor, low 1, high 4, original context 8192); "
                              "this GGUF's rope scaling is not supported")
    return tuple(sorted(rs.items()))


def gguf_config(gf: GGUFFile) -> tuple[ModelConfig, dict, str]:
    """(ModelConfig, generation config dict, checkpoint dtype name) from the file's metadata."""
    arch = gf.field("general.architecture")
    if arch not in GGUF_ARCHITECTURES:
        raise UnsupportedArchitectureError(
            f"{gf.path}: GGUF architecture {arch!r} is not supported by jaxllm. Supported GGUF "
            f"architectures: {', '.join(GGUF_ARCHITECTURES)}.")
    hf_arch = GGUF_ARCHITECTURES[arch]
    name = str(gf.field("general.name", "") or "")
    if arch == "llama" and "mistral" in name.lower():
        hf_arch = "MistralForCausalLM"

    def need(key):
        value = gf.field(f"{arch}.{key}")
        if value is None:
            raise CheckpointError(f"{gf.path}: GGUF metadata key '{arch}.{key}' is missing")
        return value

    hidden, heads = int(need("embedding_length")), int(need("attention.head_count"))
    kv_heads = int(gf.field(f"{arch}.attention.head_count_kv", heads))
    head_dim = int(gf.field(f"{arch}.attention.key_length",
                            gf.field(f"{arch}.rope.dimension_count", hidden // heads)))
    vocab = gf.field(f"{arch}.vocab_size")
    if vocab is None:
        tokens = gf.reader.fields.get("tokenizer.ggml.tokens")
        vocab = len(tokens.data) if tokens is not None else gf.tensors["token_embd.weight"].shape[-1]
    theta = float(gf.field(f"{arch}.rope.freq_base", 10000.0))
    max_pos = int(gf.field(f"{arch}.context_length", 4096))

    rope_scaling = None
    kind = gf.field(f"{arch}.rope.scaling.type")
    if kind in ("linear", "yarn"):
        rs = {"rope_type": kind, "factor": float(need("rope.scaling.factor"))}
        orig = gf.field(f"{arch}.rope.scaling.original_context_length")
        if orig is not None:
            rs["original_max_position_embeddings"] = int(orig)
        rope_scaling = tuple(sorted(rs.items()))
    elif kind not in (None, "none"):
        raise CheckpointError(f"{gf.path}: GGUF rope scaling type {kind!r} is not supported")
    if "rope_freqs.weight" in gf.tensors:
        rope_scaling = _llama3_rope_from_factors(gf, head_dim, theta, max_pos)

    bos, eos = gf.field("tokenizer.ggml.bos_token_id"), gf.field("tokenizer.ggml.eos_token_id")
    pad = gf.field("tokenizer.ggml.padding_token_id")
    config = ModelConfig(
        architecture=hf_arch,
        vocab_size=int(vocab),
        hidden_size=hidden,
        intermediate_size=int(need("feed_forward_length")),
        num_layers=int(need("block_count")),
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        rope_theta=theta,
        rope_scaling=rope_scaling,
        # float32 metadata as transformers reads it (1e-5 arrives as 9.9999997e-06).
        rms_norm_eps=float(gf.field(f"{arch}.attention.layer_norm_rms_epsilon", 1e-6)),
        # No output.weight means the head reuses the embedding (SmolLM2).
        tie_word_embeddings="output.weight" not in gf.tensors,
        attention_bias="blk.0.attn_q.bias" in gf.tensors,
        qk_norm="blk.0.attn_q_norm.weight" in gf.tensors,
        max_position_embeddings=max_pos,
        bos_token_id=None if bos is None else int(bos),
        eos_token_ids=() if eos is None else (int(eos),),
        torch_dtype=_gguf_dtype(gf),
    )
    generation_config = {k: int(v) for k, v in
                         (("bos_token_id", bos), ("eos_token_id", eos), ("pad_token_id", pad))
                         if v is not None}
    return config, generation_config, config.torch_dtype


def _gguf_dtype(gf: GGUFFile) -> str:
    """The dtype to serve in on GPU with dtype="auto": the matrices' float type, or bfloat16 for
    quantized files (dequantized weights carry far more error than bfloat16 rounding adds)."""
    kinds = {t.tensor_type.name for n, t in gf.tensors.items() if n.endswith(".weight")
             and len(t.shape) == 2}
    if kinds == {"F32"}:
        return "float32"
    if kinds <= {"F16", "F32"}:
        return "float16"
    return "bfloat16"


class _GGUFSource:
    """One of our parameters from GGUF: its tensors are dequantized once into a float32 host
    buffer in the stored [layers?, out, in] layout (transpose and cast run on device), blocks of
    it are served to the placement callback, and release() drops it."""

    def __init__(self, gf: GGUFFile, names: list[str], stacked: bool, permute_heads: int | None):
        self.gf, self.names, self.stacked, self.permute_heads = gf, names, stacked, permute_heads
        self.full: np.ndarray | None = None

    def _tensor(self, name: str) -> np.ndarray:
        w = self.gf.dequantize(name)
        if self.permute_heads is not None:
            w = _reverse_rope_permute(w, self.permute_heads)
        return w

    def read(self, index: tuple) -> np.ndarray:
        if self.full is None:
            if self.stacked:
                first = self._tensor(self.names[0])
                full = np.empty((len(self.names),) + first.shape, np.float32)
                full[0] = first

                def fill(j: int) -> None:
                    full[j + 1] = self._tensor(self.names[j + 1])

                parallel_for(fill, len(self.names) - 1)
                self.full = full
            else:
                self.full = np.ascontiguousarray(self._tensor(self.names[0]))
        return np.ascontiguousarray(self.full[index])

    def release(self):
        self.full = None


def gguf_readers(gf: GGUFFile, config: ModelConfig, dtype=None) -> tuple[dict, dict]:
    """Validate the file against `config`; return (specs, name -> reader)."""
    specs = param_specs(config)
    llama_layout = gf.field("general.architecture") == "llama"
    readers = {}
    for name, (shape, _axes) in specs.items():
        template, transpose = _GGUF_NAMES[name]
        stacked = name.startswith("layers/")
        names = ([template.format(i=i) for i in range(config.num_layers)] if stacked
                 else [template])
        per_tensor = shape[1:] if stacked else shape
        expected = tuple(reversed(per_tensor)) if transpose else tuple(per_tensor)
        for tname in names:
            t = gf.tensors.get(tname)
            if t is None:
                raise CheckpointError(f"{gf.path}: tensor {tname!r} is missing from the GGUF file")
            # ggml lists dims innermost first; numpy's row-major shape is the reverse.
            got = tuple(int(d) for d in reversed(t.shape.tolist()))
            if got != expected:
                raise CheckpointError(f"{gf.path}: tensor {tname!r} has shape {list(got)}, "
                                      f"expected {list(expected)} from the file's metadata")
        permute = None
        if llama_layout and name in ("layers/wq", "layers/bq"):
            permute = config.num_heads
        elif llama_layout and name in ("layers/wk", "layers/bk"):
            permute = config.num_kv_heads
        src = _GGUFSource(gf, names, stacked, permute)
        readers[name] = ParamSource(src.read, np.dtype(np.float32), transpose, src.release)
    return specs, readers
