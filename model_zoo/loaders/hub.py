"""Hugging Face Hub ids -> a local snapshot directory, cache first, downloading only what we load.

Environment variables are read at call time (huggingface_hub reads them once at import), so
`HF_HUB_OFFLINE`, `HF_HUB_CACHE` and `HF_HOME` set after import are honoured too. `HF_TOKEN` is
picked up by huggingface_hub itself.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

# What a model directory needs: config, weights (+ index), tokenizer, generation defaults.
ALLOW_PATTERNS = [
    "config.json", "generation_config.json", "*.safetensors", "model.safetensors.index.json",
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
    "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja", "chat_template.json",
]
# Mistral-style repos ship a second copy of the weights in another layout; never fetch it.
IGNORE_PATTERNS = ["consolidated*.safetensors", "original/*"]

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*(/[\w.\-]+)?$")


def looks_like_hub_id(name: str) -> bool:
    return bool(_HUB_ID.match(name)) and not name.endswith((".gguf", ".json")) and ".." not in name


def _truthy(value: str | None) -> bool:
    return (value or "").strip().upper() in ("1", "ON", "YES", "TRUE")


def hub_offline() -> bool:
    from huggingface_hub import constants

    if "HF_HUB_OFFLINE" in os.environ:
        return _truthy(os.environ["HF_HUB_OFFLINE"])
    return bool(constants.HF_HUB_OFFLINE)


def hub_cache_dir(download_dir: str | os.PathLike | None = None) -> Path:
    if download_dir is not None:
        return Path(download_dir).expanduser()
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def resolve_hub_id(repo_id: str, *, revision: str | None = None,
                   download_dir: str | os.PathLike | None = None) -> Path:
    """The local snapshot directory of `repo_id` at `revision`, downloading it if needed."""
    from huggingface_hub import snapshot_download

    cache_dir = hub_cache_dir(download_dir)
    kwargs = dict(revision=revision, cache_dir=str(cache_dir), allow_patterns=ALLOW_PATTERNS,
                  ignore_patterns=IGNORE_PATTERNS)
    what = f"{repo_id!r}" + (f" at revision {revision!r}" if revision else "")
    tried = [f"the Hugging Face cache at {cache_dir}"]
    try:
        path = Path(snapshot_download(repo_id, local_files_only=True, **kwargs))
        if (path / "config.json").is_file():
            return path
        tried[0] += " (a snapshot is there but has no config.json)"
    except Exception as e:  # LocalEntryNotFoundError and friends: not cached
        tried[0] += f" (not cached: {type(e).__name__})"

    if hub_offline():
        tried.append("no download: HF_HUB_OFFLINE is set")
    else:
        try:
            path = Path(snapshot_download(repo_id, local_files_only=False, **kwargs))
            if (path / "config.json").is_file():
                return path
            tried.append(f"downloaded {path}, but the repository has no config.json")
        except Exception as e:
            tried.append(f"downloading from the Hub failed: {type(e).__name__}: "
                         f"{str(e).splitlines()[0] if str(e) else ''}".rstrip(": "))
    raise ValueError(
        f"Cannot find model {what}. It is not a local path, so it was taken as a Hugging Face Hub "
        f"id and jaxllm tried: " + "; ".join(tried) + ". To use a model on disk, pass a directory "
        "holding config.json and *.safetensors (or a .gguf file) as the model; to use the Hub, "
        "check the id and your network, set HF_TOKEN for gated models, or point --download-dir / "
        "HF_HUB_CACHE at a cache that holds it.")
