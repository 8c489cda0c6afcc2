"""Tiny random Hugging Face models and a fake Hub cache, built locally for tests.

`make_tiny_hf_model(arch, out_dir, **overrides)` saves a seeded, float32 transformers model of each
supported family (safetensors + config + generation config + a byte-level tokenizer) and returns it,
so tests can compare jaxllm's loaders and forward passes against the very same weights.
`make_fake_hub_cache` lays such a directory out the way `huggingface_hub` caches a download, so Hub
id resolution is testable with `HF_HUB_OFFLINE=1` and no network.
"""

from __future__ import annotations

import functools
import hashlib
import os
import shutil
from pathlib import Path
from typing import Any

# Short name -> (transformers class name, config overrides on top of _BASE).
TINY_ARCHS: dict[str, tuple[str, dict[str, Any]]] = {
    "llama": ("LlamaForCausalLM", {}),
    "llama_tied": ("LlamaForCausalLM", {"tie_word_embeddings": True}),
    "llama3_rope": ("LlamaForCausalLM", {
        "rope_parameters": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                            "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                            "original_max_position_embeddings": 64},
    }),
    "mistral": ("MistralForCausalLM", {"sliding_window": None}),
    "qwen2": ("Qwen2ForCausalLM", {"tie_word_embeddings": False}),
    "qwen3": ("Qwen3ForCausalLM", {"tie_word_embeddings": False, "head_dim": 16}),
}

# Gemma 2/3 (model_zoo.gemma), kept apart from TINY_ARCHS, whose tests check Llama-family flags.
TINY_GEMMA_ARCHS: dict[str, tuple[str, dict[str, Any]]] = {
    # Windows of 8 tokens so prompts outgrow them; 3 layers = one local/global group + a local tail.
    "gemma2": ("Gemma2ForCausalLM", {
        "tie_word_embeddings": True, "head_dim": 16, "sliding_window": 8,
        "query_pre_attn_scalar": 24, "attn_logit_softcapping": 4.0, "final_logit_softcapping": 8.0,
        "hidden_activation": "gelu_pytorch_tanh",
    }),
    # Pattern local, local, global over 4 layers (a group of 3 + a local tail); linear rope scaling
    # on the global layers, a different rope base on the local ones.
    "gemma3": ("Gemma3ForCausalLM", {
        "tie_word_embeddings": True, "head_dim": 16, "sliding_window": 8, "num_hidden_layers": 4,
        "layer_types": ["sliding_attention", "sliding_attention", "full_attention",
                        "sliding_attention"],
        "query_pre_attn_scalar": 16, "hidden_activation": "gelu_pytorch_tanh",
        "rope_parameters": {
            "full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 100000.0},
            "sliding_attention": {"rope_type": "default", "rope_theta": 1000.0},
        },
    }),
}

# Small enough that a forward pass on CPU takes milliseconds; 4 query heads over 2 KV heads so
# grouped-query attention is exercised; head_dim 16 keeps rope's pairs non-trivial.
_BASE: dict[str, Any] = {
    "vocab_size": 272,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 3,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 512,
    "rms_norm_eps": 1e-6,
    "bos_token_id": 256,
    "eos_token_id": 257,
    "pad_token_id": 257,
    "tie_word_embeddings": False,
}


def _hf_class_name(arch: str) -> tuple[str, dict[str, Any]]:
    archs = {**TINY_ARCHS, **TINY_GEMMA_ARCHS}
    if arch in archs:
        return archs[arch]
    for cls_name, extra in archs.values():
        if arch == cls_name:
            return cls_name, extra
    raise ValueError(f"unknown tiny architecture {arch!r}; choose from {sorted(archs)}")


def make_tiny_tokenizer(out_dir: str | os.PathLike):
    """A byte-level BPE tokenizer with no merges: ids 0..255 are bytes, 256 = <s>, 257 = </s>.

    Any text round-trips, so engine tests can use strings with the tiny models.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    byte_tokens = list(pre_tokenizers.ByteLevel.alphabet())
    byte_tokens.sort(key=lambda ch: _BYTE_ORDER[ch])
    vocab = {tok: i for i, tok in enumerate(byte_tokens)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   pad_token="</s>")
    fast.add_special_tokens({"bos_token": "<s>", "eos_token": "</s>"})
    fast.chat_template = (
        "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}</s>{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>{% endif %}")
    fast.save_pretrained(out_dir)
    return fast


def _byte_order() -> dict[str, int]:
    # GPT-2's byte -> printable unicode map, so token id == byte value.
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


_BYTE_ORDER = _byte_order()


def make_tiny_hf_model(arch: str, out_dir: str | os.PathLike, *, seed: int = 0,
                       with_tokenizer: bool = True, **overrides):
    """Build, save and return a tiny random model: `(path, hf_model)`.

    `arch` is a key of TINY_ARCHS ("llama", "llama_tied", "llama3_rope", "mistral", "qwen2",
    "qwen3") or TINY_GEMMA_ARCHS ("gemma2", "gemma3") or a transformers class name. `overrides` go into the config (e.g. num_hidden_layers=2,
    dtype="bfloat16" to save bfloat16 weights). The model is returned in eval mode, float32 unless
    overridden. Weights are drawn with a std larger than transformers' default init so the logits
    are not all near zero and comparisons mean something.
    """
    import torch
    import transformers

    cls_name, extra = _hf_class_name(arch)
    cls = getattr(transformers, cls_name)
    cfg_kwargs = {**_BASE, **extra, **overrides}
    save_dtype = cfg_kwargs.pop("dtype", "float32")
    config = cls.config_class(**cfg_kwargs)
    torch.manual_seed(seed)
    model = cls(config)
    with torch.no_grad():
        gen = torch.Generator().manual_seed(seed)
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(0.08 * torch.randn(p.shape, generator=gen))
    model = model.to(getattr(torch, save_dtype)).eval()
    path = Path(out_dir)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path, safe_serialization=True)
    if with_tokenizer:
        make_tiny_tokenizer(path)
    return path, model


def make_fake_hub_cache(cache_dir: str | os.PathLike, repo_id: str, src_dir: str | os.PathLike,
                        *, revision: str = "main") -> Path:
    """Lay `src_dir`'s files out as huggingface_hub caches a downloaded snapshot.

        cache_dir/models--org--name/blobs/<sha256 of file>
        cache_dir/models--org--name/refs/<revision>            (holds the commit hash)
        cache_dir/models--org--name/snapshots/<commit>/<file>  (symlink to its blob)

    Returns the snapshot directory.
    """
    src = Path(src_dir)
    repo_dir = Path(cache_dir) / ("models--" + repo_id.replace("/", "--"))
    files = sorted(p for p in src.rglob("*") if p.is_file())
    commit = hashlib.sha1("".join(str(p.relative_to(src)) for p in files).encode()).hexdigest()
    snapshot = repo_dir / "snapshots" / commit
    (repo_dir / "blobs").mkdir(parents=True, exist_ok=True)
    (repo_dir / "refs").mkdir(parents=True, exist_ok=True)
    for f in files:
        digest = hashlib.sha256(f.read_bytes()).hexdigest()
        blob = repo_dir / "blobs" / digest
        if not blob.exists():
            shutil.copyfile(f, blob)
        dest = snapshot / f.relative_to(src)
        dest.parent.mkdir(parents=True, exist_ok=True)
        if dest.exists() or dest.is_symlink():
            dest.unlink()
        os.symlink(os.path.relpath(blob, dest.parent), dest)
    (repo_dir / "refs" / revision).write_text(commit)
    return snapshot


@functools.lru_cache(maxsize=1)
def load_hf_gguf_reference(gguf_path: str | None = None):
    """transformers' own float32 model for a GGUF file (default: the embedded SmolLM2), loaded once
    per test process: it takes tens of seconds on CPU, and several test modules compare with it."""
    import torch
    from transformers import AutoModelForCausalLM

    if gguf_path is None:
        from model_zoo.loader import default_model_path

        gguf_path = str(default_model_path())
    p = Path(gguf_path)
    return AutoModelForCausalLM.from_pretrained(str(p.parent), gguf_file=p.name,
                                                dtype=torch.float32).eval()


# A tiny Llama served with the Pallas backend (interpreted on the CPU), so the runner compiles its
# decode-only executables beside the general ones: engine tests that look at which executables ran.
PALLAS_DECODE_ENGINE = dict(dtype="float32", token_buckets=[32], seq_buckets=[1, 8], max_num_batched_tokens=32,
                            max_num_seqs=8, max_model_len=96, block_size=16, kv_cache_memory=8 * 2 ** 20,
                            attention_backend="pallas")


def make_tiny_pallas_llama(out_dir: str | os.PathLike) -> str:
    """The model directory for ``PALLAS_DECODE_ENGINE``: 2 layers, hidden 128, 4 q / 2 kv heads."""
    path, _ = make_tiny_hf_model("llama", out_dir, hidden_size=128, num_attention_heads=4,
                                 num_key_value_heads=2, num_hidden_layers=2)
    return str(path)
