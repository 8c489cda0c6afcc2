"""What every benchmark result records about where and on what it ran.

A figure without its device, model shape, dtype, JAX version and commit cannot be compared with
another, so results are only written through :func:`result_envelope`.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import subprocess
from pathlib import Path
from typing import Any, Optional

_REPO_ROOT = Path(__file__).resolve().parents[2]


def git_commit(repo: Path = _REPO_ROOT) -> Optional[str]:
    """HEAD's hash, with "-dirty" when tracked files differ from it; $JAXLLM_COMMIT first when set:
    whoever copies the tree to a GPU machine sets it (the copy may carry a stale .git of its own)."""
    if os.environ.get("JAXLLM_COMMIT"):
        return os.environ["JAXLLM_COMMIT"]
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True,
                              timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=repo,
                               capture_output=True, text=True, timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return os.environ.get("JAXLLM_COMMIT") or None
    return head + ("-dirty" if dirty else "")


def device_info() -> dict[str, Any]:
    """The JAX backend and its first device (imports jax: call only from engine-side benchmarks)."""
    import jax

    devices = jax.devices()
    kind = devices[0].device_kind
    import jaxlib

    return {"platform": jax.default_backend(), "device_kind": kind, "device_count": len(devices),
            "jax_version": jax.__version__, "jaxlib_version": getattr(jaxlib, "__version__", None)}


def device_slug(info: dict[str, Any]) -> str:
    """Short device name for result file names: 'cpu', 'h100', 'h200', else the kind lower-cased."""
    if info.get("platform") == "cpu":
        return "cpu"
    kind = str(info.get("device_kind", "unknown")).lower()
    for name in ("h100", "h200", "a100", "b200", "l40s", "l4"):
        if name in kind:
            return name
    return "".join(c if c.isalnum() else "-" for c in kind).strip("-") or "unknown"


def model_shape(config) -> dict[str, Any]:
    """The fields of a model_zoo ModelConfig that decide its cost."""
    return {"architecture": config.architecture, "num_layers": config.num_layers,
            "hidden_size": config.hidden_size, "intermediate_size": config.intermediate_size,
            "num_heads": config.num_heads, "num_kv_heads": config.num_kv_heads, "head_dim": config.head_dim,
            "vocab_size": config.vocab_size, "num_params": int(config.num_params)}


def engine_environment(llm) -> dict[str, Any]:
    """Environment of a built serving.LLM: device, model shape, dtype, JAX version, commit."""
    dtype = str(llm.engine.runner.dtype)
    env = {**device_info(), "model": llm.engine.model_name, "model_shape": model_shape(llm.engine.model_config),
           "dtype": dtype}
    return env


def host_environment() -> dict[str, Any]:
    return {"python": platform.python_version(), "hostname": platform.node(), "cpu_count": os.cpu_count(),
            "commit": git_commit()}


def result_envelope(kind: str, environment: dict[str, Any], config: dict[str, Any],
                    results: dict[str, Any]) -> dict[str, Any]:
    """The JSON layout of every results file (benchmarks/make_results_md.py reads it)."""
    env = {**host_environment(), **environment}
    return {"benchmark": kind, "date": datetime.datetime.now().isoformat(timespec="seconds"),
            "environment": env, "config": config, "results": results}


def write_json(path: str | os.PathLike, data: dict[str, Any]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2, default=_json_default)
        f.write("\n")
    return path


def _json_default(obj):
    # numpy scalars and arrays show up in metric dicts.
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if hasattr(obj, "item"):
        return obj.item()
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")
