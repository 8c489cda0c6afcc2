"""benchmarks/gpu_bench_suite.py's view of the machine it runs on and of its child processes:
the GPU (without importing jax: the suite's own process must not hold the device), carried wheels,
the compilation cache's size, and stopping a child's whole process group."""

from __future__ import annotations

import importlib.util
import os
import re
import shlex
import signal
import subprocess
import sys
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------- the machine
def detect_device() -> dict:
    """platform and device kind without importing jax here (this process must not hold the GPU)."""
    try:
        names = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                               text=True, timeout=30, check=True).stdout.split("\n")
        names = [n.strip() for n in names if n.strip()]
    except (OSError, subprocess.SubprocessError):
        names = []
    if not names:       # no nvidia-smi: the driver's own listing
        for info in sorted(Path("/proc/driver/nvidia/gpus").glob("*/information")):
            m = re.search(r"^Model:\s*(.+)$", info.read_text(errors="replace"), re.M)
            names.append(m.group(1).strip() if m else "NVIDIA GPU")
    if names:
        return {"platform": "gpu", "device_kind": names[0], "device_count": len(names)}
    return {"platform": "cpu", "device_kind": "cpu", "device_count": 1}


def model_tag(model: str) -> str:
    """'llama-3.1-8b' -> '8b'; a path -> its last component, lower-cased."""
    last = Path(model.rstrip("/")).name.lower() if model else "default"
    m = re.search(r"(\d+(\.\d+)?b)$", last)
    return m.group(1) if m else re.sub(r"[^a-z0-9.]+", "-", last).strip("-") or "model"


def cache_entries(path: str) -> int:
    try:
        return sum(1 for e in os.scandir(path) if e.is_file() and not e.name.endswith("-atime"))
    except FileNotFoundError:
        return 0


def install_carried_wheels() -> Optional[str]:
    """The GPU machine has no web stack; wheels carried in .whl/ go to a target dir (None: not needed)."""
    if importlib.util.find_spec("fastapi") and importlib.util.find_spec("uvicorn"):
        return None
    wheels = sorted(str(p) for p in (ROOT / ".whl").glob("*.whl"))
    if not wheels:
        return None
    target = "/tmp/jaxllm-site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                    "--no-cache-dir", "--upgrade", "--target", target, *wheels], check=True)
    return target



def _short(cmd: list[str]) -> str:
    """A child's command for the console, without the engine flags every child shares (the whole
    command is the first line of its log): the lead sees only the output's last 12,000 characters."""
    text = shlex.join(["python" if c == sys.executable else c for c in cmd])
    return re.sub(r" --load-format \S+ .*?--compilation-cache-dir \S+", " <engine flags>", text)


def stop_group(proc: subprocess.Popen) -> None:
    """SIGINT, then SIGKILL, to the child's own process group (it was started in a new session)."""
    if proc.poll() is not None:
        return
    for sig, wait_s in ((signal.SIGINT, 20), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait_s)
            return
        except subprocess.TimeoutExpired:
            continue
