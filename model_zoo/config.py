"""Model configuration: one frozen dataclass for every supported decoder family.

Built from a Hugging Face ``config.json`` dict (:meth:`ModelConfig.from_hf_dict`), from GGUF metadata
(the GGUF loader), or from a built-in name for dummy-weight benchmarks (:data:`BUILTIN_CONFIGS`).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

import numpy as np

# Hugging Face `architectures` name -> family flags understood by model_zoo.llama.
# Llama, Mistral, Qwen2 and Qwen3 are one decoder with switches (qkv bias, q/k norm).
SUPPORTED_ARCHITECTURES: dict[str, dict[str, Any]] = {
    "LlamaForCausalLM": {},
    "MistralForCausalLM": {},
    "Qwen2ForCausalLM": {"attention_bias": True},
    "Qwen3ForCausalLM": {"qk_norm": True},
    # model_zoo.gemma: (1 + w) RMSNorms around attention and MLP, GeGLU, soft-capping, local/global layers.
    "Gemma2ForCausalLM": {},
    "Gemma3ForCausalLM": {"qk_norm": True},
}
GEMMA_ARCHITECTURES = ("Gemma2ForCausalLM", "Gemma3ForCausalLM")
LAYER_TYPES = ("full_attention", "sliding_attention")

_DTYPES = {"float32": np.float32, "bfloat16": "bfloat16", "float16": np.float16}


class UnsupportedArchitectureError(ValueError):
    pass


def _rope_scaling(hf: Mapping[str, Any]) -> tuple[tuple[str, Any], ...] | None:
    rs = hf.get("rope_scaling") or None
    if rs is None and isinstance(hf.get("rope_parameters"), Mapping):
        # transformers 5 folds rope settings into `rope_parameters`.
        rp = dict(hf["rope_parameters"])
        if rp.get("rope_type", "default") != "default":
            rs = rp
    if rs is None:
        return None
    rs = dict(rs)
    kind = rs.get("rope_type", rs.get("type", "default"))
    if kind == "default":
        return None
    rs["rope_type"] = kind
    rs.pop("type", None)
    rs.pop("rope_theta", None)
    return tuple(sorted(rs.items()))


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope_theta: float = 10000.0
    # Sorted (key, value) pairs of the HF rope_scaling dict (hashable), or None.
    rope_scaling: tuple[tuple[str, Any], ...] | None = None
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    qk_norm: bool = False
    max_position_embeddings: int = 4096
    sliding_window: int | None = None
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    # The checkpoint's own dtype name ("bfloat16", ...); dtype="auto" uses it on GPU.
    torch_dtype: str = "float32"
    # Per-layer attention kind, one of LAYER_TYPES per layer (Gemma 2/3 alternate local and global
    # layers). None: every layer is alike and `sliding_window`, if set, applies to all (Mistral).
    layer_types: tuple[str, ...] | None = None
    # Attention scale is query_pre_attn_scalar ** -0.5 (Gemma); None: head_dim ** -0.5.
    query_pre_attn_scalar: float | None = None
    # tanh soft-capping of attention scores / final logits: cap * tanh(x / cap) (Gemma 2).
    attn_logit_softcap: float | None = None
    final_logit_softcap: float | None = None
    # Rope base of the sliding-window layers (Gemma 3's rope_local_base_freq; no scaling there).
    # None: every layer uses rope_theta and rope_scaling.
    rope_local_theta: float | None = None

    def __post_init__(self):
        if self.architecture not in SUPPORTED_ARCHITECTURES:
            raise UnsupportedArchitectureError(
                f"Model architecture {self.architecture!r} is not supported by jaxllm. "
                f"Supported architectures: {', '.join(sorted(SUPPORTED_ARCHITECTURES))}."
            )
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                     "num_kv_heads", "head_dim"):
            if int(getattr(self, name)) <= 0:
                raise ValueError(f"ModelConfig.{name} must be positive, got {getattr(self, name)}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})")
        if self.rope_scaling is not None:
            kind = dict(self.rope_scaling)["rope_type"]
            if kind not in ("linear", "llama3", "dynamic", "yarn"):
                raise ValueError(f"rope_scaling type {kind!r} is not supported "
                                 "(supported: default, linear, dynamic, llama3, yarn)")
        if self.layer_types is not None:
            # A list (from JSON, e.g. an orbax checkpoint's config) becomes a tuple: configs are hashable.
            object.__setattr__(self, "layer_types", tuple(self.layer_types))
            if len(self.layer_types) != self.num_layers:
                raise ValueError(f"layer_types has {len(self.layer_types)} entries for "
                                 f"{self.num_layers} layers")
            bad = sorted(set(self.layer_types) - set(LAYER_TYPES))
            if bad:
                raise ValueError(f"layer_types entries {bad} are not supported "
                                 f"(supported: {', '.join(LAYER_TYPES)})")
            if "sliding_attention" in self.layer_types and self.sliding_window is None:
                raise ValueError("layer_types has sliding_attention layers but sliding_window is not set")
        if self.sliding_window is not None and int(self.sliding_window) <= 0:
            raise ValueError(f"sliding_window must be positive, got {self.sliding_window}")
        for name in ("query_pre_attn_scalar", "attn_logit_softcap", "final_logit_softcap",
                     "rope_local_theta"):
            value = getattr(self, name)
            if value is not None and not float(value) > 0:
                raise ValueError(f"ModelConfig.{name} must be positive or None, got {value}")
        if self.architecture in GEMMA_ARCHITECTURES and self.layer_types is None:
            raise ValueError(f"{self.architecture} needs layer_types (local/global attention per layer)")

    @property
    def num_query_groups(self) -> int:
        return self.num_heads // self.num_kv_heads

    @property
    def is_gemma(self) -> bool:
        """Gemma 2/3 layout: extra post-attention / post-MLP norms, handled by model_zoo.gemma."""
        return self.architecture in GEMMA_ARCHITECTURES

    @property
    def attention_scale(self) -> float:
        return float(self.query_pre_attn_scalar or self.head_dim) ** -0.5

    def layer_window(self, layer: int) -> int | None:
        """The sliding window of one layer (None: full attention)."""
        if self.layer_types is None:
            return self.sliding_window
        return self.sliding_window if self.layer_types[layer] == "sliding_attention" else None

    @property
    def num_params(self) -> int:
        e, f, d = self.hidden_size, self.intermediate_size, self.head_dim
        attn = e * d * (self.num_heads * 2 + self.num_kv_heads * 2)
        if self.attention_bias:
            attn += d * (self.num_heads + 2 * self.num_kv_heads)
        if self.qk_norm:
            attn += 2 * d
        per_layer = attn + 3 * e * f + (4 if self.is_gemma else 2) * e
        emb = self.vocab_size * e * (1 if self.tie_word_embeddings else 2)
        return self.num_layers * per_layer + emb + e

    def kv_bytes_per_token(self, dtype_bytes: int) -> int:
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * dtype_bytes

    @classmethod
    def from_hf_dict(cls, hf: Mapping[str, Any]) -> "ModelConfig":
        archs = hf.get("architectures") or []
        if not archs:
            raise UnsupportedArchitectureError(
                "config.json has no `architectures` entry; cannot tell which model to build. "
                f"Supported architectures: {', '.join(sorted(SUPPORTED_ARCHITECTURES))}.")
        arch = archs[0]
        if arch not in SUPPORTED_ARCHITECTURES:
            raise UnsupportedArchitectureError(
                f"Model architecture {arch!r} is not supported by jaxllm. "
                f"Supported architectures: {', '.join(sorted(SUPPORTED_ARCHITECTURES))}.")
        flags = SUPPORTED_ARCHITECTURES[arch]
        gemma = _gemma_fields(arch, hf) if arch in GEMMA_ARCHITECTURES else {}
        if "rope_parameters" in gemma:
            hf = {**hf, "rope_parameters": gemma.pop("rope_parameters")}
        num_heads = hf["num_attention_heads"]
        head_dim = hf.get("head_dim") or hf["hidden_size"] // num_heads
        eos = hf.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, (list, tuple)) else ((eos,) if eos is not None else ())
        rope_theta = hf.get("rope_theta")
        if rope_theta is None and isinstance(hf.get("rope_parameters"), Mapping):
            rope_theta = hf["rope_parameters"].get("rope_theta")
        sliding = hf.get("sliding_window") if hf.get("use_sliding_window", True) else None
        if arch.startswith("Qwen") and not hf.get("use_sliding_window", False):
            sliding = None
        dtype = hf.get("torch_dtype") or hf.get("dtype") or "float32"
        return cls(
            architecture=arch,
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            intermediate_size=hf["intermediate_size"],
            num_layers=hf["num_hidden_layers"],
            num_heads=num_heads,
            num_kv_heads=hf.get("num_key_value_heads") or num_heads,
            head_dim=head_dim,
            rope_theta=float(rope_theta if rope_theta is not None else 10000.0),
            rope_scaling=_rope_scaling(hf),
            rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            # Gemma ties its embeddings by default (configs on the Hub often leave the key out).
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", arch in GEMMA_ARCHITECTURES)),
            attention_bias=bool(hf.get("attention_bias", flags.get("attention_bias", False))),
            qk_norm=bool(flags.get("qk_norm", False)),
            max_position_embeddings=int(hf.get("max_position_embeddings", 4096)),
            sliding_window=sliding,
            bos_token_id=hf.get("bos_token_id"),
            eos_token_ids=eos_ids,
            torch_dtype=str(dtype).replace("torch.", ""),
            **gemma,
        )


def _gemma_fields(arch: str, hf: Mapping[str, Any]) -> dict[str, Any]:
    """Gemma 2/3 extras from a config.json (transformers 4 and 5 spellings), plus the global
    layers' rope dict under "rope_parameters" for the caller's rope parsing."""
    act = hf.get("hidden_activation") or hf.get("hidden_act") or "gelu_pytorch_tanh"
    if act not in ("gelu_pytorch_tanh", "gelu_tanh"):
        raise ValueError(f"{arch} with hidden_activation={act!r} is not supported "
                         "(jaxllm implements gelu_pytorch_tanh)")
    if hf.get("use_bidirectional_attention"):
        raise ValueError(f"{arch} with use_bidirectional_attention=true (an encoder) is not supported")
    n = hf["num_hidden_layers"]
    layer_types = hf.get("layer_types")
    if layer_types is None:
        # Gemma 2: local, global, local, ...; Gemma 3: sliding_window_pattern - 1 local, then global.
        period = 2 if arch == "Gemma2ForCausalLM" else int(hf.get("sliding_window_pattern") or 6)
        layer_types = ["sliding_attention" if (i + 1) % period else "full_attention" for i in range(n)]
    out: dict[str, Any] = {
        "layer_types": tuple(layer_types),
        "query_pre_attn_scalar": hf.get("query_pre_attn_scalar"),
        "attn_logit_softcap": hf.get("attn_logit_softcapping"),
        "final_logit_softcap": hf.get("final_logit_softcapping"),
    }
    rp = hf.get("rope_parameters")
    if isinstance(rp, Mapping) and ("full_attention" in rp or "sliding_attention" in rp):
        # transformers 5 (Gemma 3): one rope dict per layer type.
        local = dict(rp.get("sliding_attention") or {})
        if local.get("rope_type", "default") != "default":
            raise ValueError(f"{arch}: rope scaling on sliding-window layers "
                             f"({local.get('rope_type')!r}) is not supported")
        out["rope_local_theta"] = float(local.get("rope_theta", 10000.0))
        out["rope_parameters"] = dict(rp.get("full_attention") or {"rope_type": "default"})
        out["rope_parameters"].setdefault("rope_theta", 1000000.0)
    elif arch == "Gemma3ForCausalLM":
        out["rope_local_theta"] = float(hf.get("rope_local_base_freq", 10000.0))
        if hf.get("rope_theta") is None and rp is None:
            out["rope_parameters"] = {"rope_type": "default", "rope_theta": 1000000.0}
    return out


def resolve_dtype(dtype: str, config: ModelConfig, platform: str):
    """`dtype="auto"`: the checkpoint's dtype on GPU, float32 on CPU."""
    import jax.numpy as jnp

    if dtype == "auto":
        dtype = config.torch_dtype if platform != "cpu" else "float32"
        if dtype not in _DTYPES:
            dtype = "bfloat16" if platform != "cpu" else "float32"
    if dtype == "half":
        dtype = "float16"
    if dtype == "float":
        dtype = "float32"
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of auto, float32, bfloat16, float16; got {dtype!r}")
    return jnp.dtype(dtype)


def _llama31(num_layers, hidden, inter, heads, kv_heads, vocab=128256):
    return ModelConfig(
        architecture="LlamaForCausalLM", vocab_size=vocab, hidden_size=hidden,
        intermediate_size=inter, num_layers=num_layers, num_heads=heads, num_kv_heads=kv_heads,
        head_dim=hidden // heads, rope_theta=500000.0,
        rope_scaling=(("factor", 8.0), ("high_freq_factor", 4.0), ("low_freq_factor", 1.0),
                      ("original_max_position_embeddings", 8192), ("rope_type", "llama3")),
        rms_norm_eps=1e-5, max_position_embeddings=131072, bos_token_id=128000,
        eos_token_ids=(128001, 128008, 128009), torch_dtype="bfloat16")


# Shapes for `load_format="dummy"` benchmarks without files.
BUILTIN_CONFIGS: dict[str, ModelConfig] = {
    "llama-3.1-8b": _llama31(32, 4096, 14336, 32, 8),
    "llama-3.1-70b": _llama31(80, 8192, 28672, 64, 8),
    "qwen2.5-7b": ModelConfig(
        architecture="Qwen2ForCausalLM", vocab_size=152064, hidden_size=3584,
        intermediate_size=18944, num_layers=28, num_heads=28, num_kv_heads=4, head_dim=128,
        rope_theta=1000000.0, rms_norm_eps=1e-6, attention_bias=True,
        max_position_embeddings=32768, bos_token_id=151643, eos_token_ids=(151645, 151643),
        torch_dtype="bfloat16"),
}


def rope_inv_freq(config: ModelConfig) -> tuple[np.ndarray, float]:
    """Inverse frequencies [head_dim/2] and the attention scaling factor (yarn's mscale), in float64.

    Mirrors transformers' ROPE_INIT_FUNCTIONS for the rope types we accept.
    """
    d = config.head_dim
    base = config.rope_theta
    inv = 1.0 / (base ** (np.arange(0, d, 2, dtype=np.float64) / d))
    if config.rope_scaling is None:
        return inv, 1.0
    rs = dict(config.rope_scaling)
    kind = rs["rope_type"]
    if kind == "linear":
        return inv / rs["factor"], 1.0
    if kind == "dynamic":
        # Dynamic NTK changes with sequence length only beyond the original context; within it,
        # it equals the default. We serve up to max_position_embeddings with the default table.
        return inv, 1.0
    if kind == "llama3":
        factor = rs["factor"]
        low, high = rs["low_freq_factor"], rs["high_freq_factor"]
        old_ctx = rs["original_max_position_embeddings"]
        low_wavelen, high_wavelen = old_ctx / low, old_ctx / high
        wavelen = 2 * math.pi / inv
        scaled = np.where(wavelen > low_wavelen, inv / factor, inv)
        smooth = (old_ctx / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        return np.where(medium, smoothed, scaled), 1.0
    if kind == "yarn":
        factor = rs["factor"]
        old_ctx = rs.get("original_max_position_embeddings") or config.max_position_embeddings
        beta_fast, beta_slow = rs.get("beta_fast", 32), rs.get("beta_slow", 1)
        mscale = rs.get("attention_factor") or (0.1 * math.log(factor) + 1.0 if factor > 1 else 1.0)

        def corr_dim(rot):
            return (d * math.log(old_ctx / (rot * 2 * math.pi))) / (2 * math.log(base))

        low = max(math.floor(corr_dim(beta_fast)), 0)
        high = min(math.ceil(corr_dim(beta_slow)), d - 1)
        if low == high:
            high += 0.001
        ramp = np.clip((np.arange(d // 2, dtype=np.float64) - low) / (high - low), 0, 1)
        extrap = 1 - ramp
        inv = (inv / factor) * (1 - extrap) + inv * extrap
        return inv, float(mscale)
    raise ValueError(f"unsupported rope type {kind!r}")
