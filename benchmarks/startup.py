"""Start-up time: weights + every bucket compiled, cold vs with JAX's persistent compilation cache.

Runs the engine start twice in fresh processes against one new cache directory and records both
(device, model, dtype, JAX version, commit) in benchmarks/results/<date>-<device>-startup.json.

    python benchmarks/startup.py                                  # embedded model, CPU defaults
    python benchmarks/startup.py --model llama-3.1-8b --load-format dummy   # on a GPU
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
import time

CHILD = r"""
import json, sys, time
t0 = time.perf_counter()
from serving.config import EngineArgs
from serving.engine import LLMEngine
args = EngineArgs(**json.loads(sys.argv[1]))
t1 = time.perf_counter()
engine = LLMEngine.from_engine_args(args)
t2 = time.perf_counter()
import jax
print("RESULT " + json.dumps({"import_s": t1 - t0, "start_s": t2 - t1,
      "executables": engine.runner.num_executables, "device": jax.devices()[0].device_kind,
      "jax": jax.__version__}))
"""


def _run(engine_args: dict, cache_dir: str) -> dict:
    env = dict(os.environ, JAXLLM_COMPILATION_CACHE=cache_dir)
    t = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", CHILD, json.dumps(engine_args)], env=env,
                          capture_output=True, text=True, check=True)
    line = next(l for l in proc.stdout.splitlines() if l.startswith("RESULT "))
    result = json.loads(line[len("RESULT "):])
    result["process_s"] = time.perf_counter() - t
    return result


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None)
    ap.add_argument("--load-format", default="auto")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--out-dir", default=os.path.join(os.path.dirname(__file__), "results"))
    a = ap.parse_args(argv)
    engine_args = {"model": a.model, "load_format": a.load_format, "dtype": a.dtype}
    with tempfile.TemporaryDirectory() as cache:
        cold = _run(engine_args, cache)
        warm = _run(engine_args, cache)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    device = cold["device"].replace(" ", "-").lower()
    result = {"what": "startup", "date": datetime.date.today().isoformat(), "device": cold["device"],
              "model": a.model or "SmolLM2-135M-Instruct (embedded GGUF)", "dtype": a.dtype,
              "jax": cold["jax"], "commit": commit, "executables": cold["executables"],
              "cold_start_s": round(cold["start_s"], 2), "cached_start_s": round(warm["start_s"], 2),
              "speedup": round(cold["start_s"] / warm["start_s"], 2)}
    print(f"{'':>14} {'engine start (s)':>18}\n{'cold':>14} {cold['start_s']:>18.1f}\n"
          f"{'cached':>14} {warm['start_s']:>18.1f}\n({result['executables']} executables, {result['device']})")
    os.makedirs(a.out_dir, exist_ok=True)
    path = os.path.join(a.out_dir, f"{result['date']}-{device}-startup.json")
    with open(path, "w") as f:
        json.dump(result, f, indent=1)
    print("wrote", path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
