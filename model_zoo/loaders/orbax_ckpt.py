"""jaxllm's own checkpoint: loaded weights saved with orbax, restored straight into a sharding.

Directory layout (self-contained; `resolve_model` recognises it by the marker in config.json):

    out/config.json          {"jaxllm_format": "orbax", "model_config": {...}, "dtype": ..., ...}
    out/params/              the orbax PyTree checkpoint, nested {"layers": {"wq": ...}, ...}
    out/generation_config.json
    out/tokenizer*.json ...  the source's tokenizer (saved with transformers for a GGUF source)

Restoring hands orbax abstract arrays that carry the requested sharding and dtype, so each device
reads its own shard from disk and nothing is assembled on the host first.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any, Mapping

import jax
import numpy as np

from model_zoo.config import ModelConfig
from model_zoo.loaders.hf_safetensors import CheckpointError
from model_zoo.loaders.placement import LoadTimer, ShardingFor, sharding_of
from model_zoo.params import param_specs

logger = logging.getLogger("jaxllm")

FORMAT_MARKER = "jaxllm_format"
FORMAT_NAME = "orbax"
FORMAT_VERSION = 1
PARAMS_SUBDIR = "params"
# Files a Hugging Face tokenizer may consist of; copied verbatim from a model directory.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "tokenizer.model", "vocab.json", "merges.txt", "added_tokens.json",
                   "chat_template.jinja", "chat_template.json")
_MODEL_TYPES = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral",
                "Qwen2ForCausalLM": "qwen2", "Qwen3ForCausalLM": "qwen3",
                "Gemma2ForCausalLM": "gemma2", "Gemma3ForCausalLM": "gemma3_text"}


def _nest(flat: Mapping[str, Any]) -> dict:
    # Orbax turns tree keys into paths on disk; "layers/wq" is kept as a real nesting level.
    tree: dict = {}
    for name, value in flat.items():
        node = tree
        *parents, leaf = name.split("/")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return tree


def _flatten(tree: Mapping[str, Any], prefix: str = "") -> dict:
    flat = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(_flatten(value, name + "/"))
        else:
            flat[name] = value
    return flat


def read_meta(path: str | os.PathLike) -> dict | None:
    """The jaxllm metadata of an orbax checkpoint directory, or None if it is not one."""
    cfg = Path(path) / "config.json"
    if not cfg.is_file():
        return None
    try:
        meta = json.loads(cfg.read_text())
    except ValueError:
        return None
    if not isinstance(meta, dict) or meta.get(FORMAT_MARKER) != FORMAT_NAME:
        return None
    return meta


def config_from_meta(meta: Mapping[str, Any]) -> ModelConfig:
    fields = dict(meta["model_config"])
    if fields.get("rope_scaling") is not None:
        fields["rope_scaling"] = tuple(tuple(pair) for pair in fields["rope_scaling"])
    fields["eos_token_ids"] = tuple(fields.get("eos_token_ids") or ())
    return ModelConfig(**fields)


def save_orbax(params: Mapping[str, jax.Array], config: ModelConfig, path: str | os.PathLike, *,
               generation_config: Mapping[str, Any] | None = None,
               tokenizer_dir: str | os.PathLike | None = None, gguf_file: str | None = None,
               overwrite: bool = False) -> Path:
    """Write `params` (our flat tree) as an orbax checkpoint plus config, so that `path` is a model.

    The tokenizer comes from `tokenizer_dir` (a Hugging Face directory: files are copied) or, with
    `gguf_file`, from that GGUF file inside `tokenizer_dir` (re-saved with transformers, which
    needs no weights for it). Without a tokenizer source the checkpoint has weights only.
    """
    import orbax.checkpoint as ocp

    out = Path(path).absolute()
    specs = param_specs(config)
    if set(params) != set(specs):
        raise ValueError(f"params do not match the config's tree: missing "
                         f"{sorted(set(specs) - set(params))}, extra {sorted(set(params) - set(specs))}")
    if out.exists():
        if not overwrite and any(out.iterdir()):
            raise ValueError(f"{out} exists and is not empty; pass overwrite=True (--overwrite) "
                             "to replace it")
        shutil.rmtree(out)
    out.mkdir(parents=True)
    dtypes = {str(np.dtype(a.dtype)) for a in params.values()}
    if len(dtypes) != 1:
        raise ValueError(f"params mix dtypes {sorted(dtypes)}; cast them to one first")
    dtype = dtypes.pop()

    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(out / PARAMS_SUBDIR, _nest(params))
        ckptr.wait_until_finished()

    meta = {
        FORMAT_MARKER: FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        # HF-style keys so tools that peek at config.json (AutoTokenizer) know the family.
        "architectures": [config.architecture],
        "model_type": _MODEL_TYPES[config.architecture],
        "dtype": dtype,
        "model_config": dataclasses.asdict(config),
    }
    if tokenizer_dir is not None:
        tok_info = _copy_tokenizer(Path(tokenizer_dir), gguf_file, out)
        if tok_info is not None:
            meta["tokenizer_gguf"] = tok_info
    (out / "config.json").write_text(json.dumps(meta, indent=2) + "\n")
    (out / "generation_config.json").write_text(json.dumps(dict(generation_config or {}),
                                                           indent=2) + "\n")
    return out


def _copy_tokenizer(src: Path, gguf_file: str | None, out: Path) -> str | None:
    """Make `out` carry its own tokenizer. Returns the GGUF path to fall back on, if any."""
    if gguf_file is None:
        for name in TOKENIZER_FILES:
            if (src / name).is_file():
                shutil.copyfile(src / name, out / name)
        return None
    try:
        from transformers import AutoTokenizer

        AutoTokenizer.from_pretrained(str(src), gguf_file=gguf_file).save_pretrained(str(out))
        return None
    except Exception as e:  # transformers' GGUF tokenizer conversion is optional here
        logger.warning("could not save the GGUF tokenizer with transformers (%s); the checkpoint "
                       "will read it from %s", e, src / gguf_file)
        return str((src / gguf_file).absolute())


def restore_orbax(path: str | os.PathLike, config: ModelConfig, dtype, *,
                  sharding_for: ShardingFor | None = None, progress: bool = True
                  ) -> dict[str, jax.Array]:
    """Restore into `dtype` with each parameter's sharding from `sharding_for`."""
    import orbax.checkpoint as ocp

    params_dir = Path(path).absolute() / PARAMS_SUBDIR
    if not params_dir.is_dir():
        raise CheckpointError(f"{params_dir}: orbax checkpoint directory does not exist")
    specs = param_specs(config)
    np_dtype = np.dtype(dtype)
    abstract = {name: jax.ShapeDtypeStruct(shape, np_dtype,
                                           sharding=sharding_of(name, shape, axes, sharding_for))
                for name, (shape, axes) in specs.items()}
    total = sum(int(np.prod(s)) * np_dtype.itemsize for s, _ in specs.values())
    timer = LoadTimer(str(path), total, progress, desc="Restoring orbax checkpoint")
    try:
        with ocp.StandardCheckpointer() as ckptr:
            restored = ckptr.restore(params_dir, _nest(abstract))
    except Exception as e:
        raise CheckpointError(f"{params_dir}: cannot restore the orbax checkpoint: "
                              f"{type(e).__name__}: {e}") from None
    flat = _flatten(restored)
    jax.block_until_ready(flat)
    for name, (shape, _) in specs.items():
        if name not in flat:
            raise CheckpointError(f"{params_dir}: parameter {name!r} is missing from the checkpoint")
        if tuple(flat[name].shape) != tuple(shape):
            raise CheckpointError(f"{params_dir}: parameter {name!r} has shape "
                                  f"{list(flat[name].shape)}, expected {list(shape)}")
    timer.update(total)
    timer.finish()
    return {name: flat[name] for name in specs}
