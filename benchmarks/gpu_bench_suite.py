"""Issue 7/8's one-GPU benchmark runs in one command, within one time budget.

    OUT=/results JAXLLM_COMMIT=<hash> python benchmarks/gpu_bench_suite.py     # on the GPU machine

Steps, in order of priority; STEPS picks some (comma list). Each child process has its own time
guard, capped by what is left of BUDGET_S, and results are written as soon as they exist, so a
failure or a time-out costs only its own step. Steps that no longer fit are skipped and the closing
table says how to run them.

  offline  `bench throughput` on sharegpt-synthetic (SHAREGPT_PROMPTS), then random RANDOM_IN-in /
           RANDOM_OUT-out (RANDOM_PROMPTS). On an empty persistent compilation cache (CACHE_DIR) a
           one-prompt run compiles the bucket ladder first; every later start of it loads it.
  serve    `jaxllm serve` with the same engine flags, then `bench serve` on sharegpt-synthetic at
           SERVE_RATES (rate:prompts; inf first: served/offline is issue 8's target) and, when hf is
           selected, the HF workload with at most HF_BATCH requests in flight (jaxllm's side of the
           HF ratio).
  hf       benchmarks/baseline_hf.py on that workload (HF_DATASET: random HF_IN/HF_OUT, or
           sharegpt-synthetic; HF_PROMPTS prompts, batches of HF_BATCH, static KV cache, eager then
           torch.compile: HF_COMPILE), after the server has stopped, so it has the GPU to itself.
           Fixed lengths are HF's best case (no row of a batch waits for a longer one), so the
           default random workload gives a conservative ratio; sharegpt-synthetic the realistic one
           (with HF_COMPILE=off there: every batch has its own shapes, so compiled would recompile;
           and HF_PROMPTS=64, one batch: on an H200, eager HF took ~60 s a batch of 64 plus as much
           again for its warm-up, and 128 prompts ran past the HF guard).
  buckets  `bench buckets`, one process per ladder of LADDERS (';'-separated TOKENSxSEQS specs), on
           BUCKETS_DATASET (BUCKETS_PROMPTS), merged into one table and recommendation. The default
           ladders are the main ladder, a subset and a superset of it: the shapes they share load
           from the compilation cache, so only the new shapes compile and the 8B shape itself is
           compared (no smaller proxy model); compile_s of a cached shape is its load time.

Start-up (issue 8: cold and cached) is taken from every engine start of the run (the offline
processes and the server): the first start on an empty cache is the cold figure, the next start of
the same ladder the cached one. FRESH_CACHE=1 empties CACHE_DIR first.

Files, under $OUT: <date>-<device>-<model>-<what>.json in the layout of benchmarks/results (device,
model shape, dtype, JAX version, commit from git or $JAXLLM_COMMIT), logs/ (every child's output,
the server log, summary.json, RESULTS-preview.md). The table at the end is also logs/summary.txt.

Knobs (environment variables, defaults in _KNOBS: the engine's GPU defaults): MODEL LOAD_FORMAT DTYPE
ATTN TOKEN_BUCKETS SEQ_BUCKETS DECODE_SEQ_BUCKETS MAX_TOKENS MAX_SEQS MAX_LEN EXTRA_ENGINE_FLAGS SEED SHAREGPT_PROMPTS SHAREGPT_OUTPUT_LEN
RANDOM_PROMPTS RANDOM_IN RANDOM_OUT SERVE_RATES HF_DATASET HF_PROMPTS HF_IN HF_OUT HF_BATCH HF_COMPILE LADDERS
BUCKETS_DATASET BUCKETS_PROMPTS STEPS BUDGET_S CACHE_DIR FRESH_CACHE PORT MODEL_TAG.
A tiny end-to-end check on CPU (about 3.5 minutes on 2 cores; the model from tests/tiny_models.py):

    python -c "from tests.tiny_models import make_tiny_hf_model as m; m('llama', '/tmp/tiny', max_position_embeddings=2048)"
    MODEL=/tmp/tiny DTYPE=float32 ATTN=xla TOKEN_BUCKETS=64,256 SEQ_BUCKETS=8 MAX_TOKENS=256 MAX_SEQS=8 \\
      MAX_LEN=1536 SHAREGPT_PROMPTS=6 SHAREGPT_OUTPUT_LEN=8 RANDOM_PROMPTS=6 RANDOM_IN=64 RANDOM_OUT=8 \\
      SERVE_RATES=inf:6,8:6 HF_PROMPTS=8 HF_IN=64 HF_OUT=8 HF_BATCH=4 HF_COMPILE=off \\
      LADDERS='64,256x8;256x8' BUCKETS_PROMPTS=4 OUT=/tmp/suite python benchmarks/gpu_bench_suite.py
"""

from __future__ import annotations

import dataclasses
import datetime
import importlib.metadata
import importlib.util
import json
import math
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from gpu_bench_machine import (_short, cache_entries, detect_device, install_carried_wheels,  # noqa: E402
                               model_tag, stop_group)
from gpu_bench_table import rate_label, summary_table  # noqa: E402

STEPS = ("offline", "serve", "hf", "buckets")
_KNOBS = {
    "MODEL": "llama-3.1-8b", "LOAD_FORMAT": "dummy", "DTYPE": "bfloat16", "ATTN": "pallas",
    "TOKEN_BUCKETS": "512,2048", "SEQ_BUCKETS": "1,64,512",
    "DECODE_SEQ_BUCKETS": "1,8,16,32,64,128,256,512", "MAX_TOKENS": "2048", "MAX_SEQS": "512",
    "MAX_LEN": "2048", "EXTRA_ENGINE_FLAGS": "", "SEED": "0",
    "SHAREGPT_PROMPTS": "500", "SHAREGPT_OUTPUT_LEN": "", "RANDOM_PROMPTS": "500", "RANDOM_IN": "1024",
    "RANDOM_OUT": "128", "SERVE_RATES": "inf:500,32:200,8:80,2:40",
    "HF_DATASET": "random", "HF_PROMPTS": "128", "HF_IN": "1024", "HF_OUT": "128", "HF_BATCH": "64",
    "HF_COMPILE": "both",
    "LADDERS": "512,2048x1,64,256;2048x1,64,256;512,1024,2048x1,64,256",
    "BUCKETS_DATASET": "sharegpt-synthetic", "BUCKETS_PROMPTS": "300",
    "STEPS": ",".join(STEPS), "BUDGET_S": "540", "CACHE_DIR": "", "FRESH_CACHE": "0", "PORT": "8011",
    "MODEL_TAG": "",
}
# Per-child time guards (seconds), each capped by the budget left. A cold 8B ladder (12 step + 5
# prompt-logprob executables) compiled in 200 s (session 3), 367 s and 475 s (session 4) on H100s
# and 314 s on an H200: GEMM autotuning dominates and varies; everything after it loads from the cache.
_GUARD_COLD_START_S = 540
_GUARD_WARM_PROCESS_S = 240
_GUARD_HF_S = 420
_MIN_STEP_S = 30            # a step is not started with less than this left


@dataclasses.dataclass(frozen=True)
class Knobs:
    out: Path
    values: dict

    def __getattr__(self, name):
        try:
            return self.values[name.upper()]
        except KeyError:
            raise AttributeError(name) from None

    def number(self, name: str) -> int:
        try:
            return int(self.values[name])
        except ValueError:
            raise ValueError(f"{name} must be an integer, got {self.values[name]!r}") from None

    @classmethod
    def from_env(cls, env=os.environ) -> "Knobs":
        if not env.get("OUT"):
            raise ValueError("set OUT to the directory the results go to")
        values = {k: env.get(k, v) for k, v in _KNOBS.items()}
        if not values["CACHE_DIR"]:
            values["CACHE_DIR"] = env.get("JAXLLM_COMPILATION_CACHE") or "/tmp/jaxllm-xla-cache"
        knobs = cls(Path(env["OUT"]), values)
        unknown = sorted(set(knobs.steps) - set(STEPS))
        if unknown:
            raise ValueError(f"STEPS: unknown step(s) {', '.join(unknown)}; choose from {', '.join(STEPS)}")
        if values["HF_DATASET"] not in ("random", "sharegpt-synthetic"):
            raise ValueError(f"HF_DATASET must be random or sharegpt-synthetic; got {values['HF_DATASET']!r}")
        if values["HF_COMPILE"] not in ("off", "on", "both"):
            raise ValueError(f"HF_COMPILE must be off, on or both; got {values['HF_COMPILE']!r}")
        for name in ("SHAREGPT_PROMPTS", "RANDOM_PROMPTS", "RANDOM_IN", "RANDOM_OUT", "HF_PROMPTS", "HF_IN",
                     "HF_OUT", "HF_BATCH", "BUCKETS_PROMPTS", "BUDGET_S", "PORT", "SEED"):
            knobs.number(name)
        knobs.serve_rates      # validate now, not after the offline step
        return knobs

    @property
    def steps(self) -> list[str]:
        return [s.strip() for s in self.values["STEPS"].split(",") if s.strip()]

    @property
    def serve_rates(self) -> list[tuple[float, int]]:
        out = []
        for item in self.values["SERVE_RATES"].replace(" ", "").split(","):
            if not item:
                continue
            rate, sep, n = item.partition(":")
            try:
                pair = (float(rate), int(n))
            except ValueError:
                pair = None
            if not sep or pair is None or not pair[0] > 0 or pair[1] < 1:
                raise ValueError(f"SERVE_RATES takes rate:prompts items like inf:500,2:60; got {item!r}")
            out.append(pair)
        return out


# ----------------------------------------------------------------------------- child processes
@dataclasses.dataclass
class StepLog:
    name: str
    status: str = "not run"
    seconds: float = 0.0
    note: str = ""


class Suite:
    def __init__(self, knobs: Knobs):
        self.k = knobs
        self.t0 = time.monotonic()
        self.deadline = self.t0 + knobs.number("BUDGET_S")
        self.logs = knobs.out / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.device = detect_device()
        from serving.bench.environment import device_slug

        self.date = datetime.date.today().isoformat()
        self.prefix = f"{self.date}-{device_slug(self.device)}-{knobs.model_tag or model_tag(knobs.model)}"
        self.env = dict(os.environ, PYTHONUNBUFFERED="1", JAXLLM_COMPILATION_CACHE=knobs.cache_dir)
        self.env["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(ROOT), install_carried_wheels(), os.environ.get("PYTHONPATH")) if p)
        self.steps: dict[str, StepLog] = {s: StepLog(s) for s in STEPS}
        self.starts: list[dict] = []        # every engine start of the main ladder, in order
        self.files: dict[str, Path] = {}    # what -> results file written

    # -- time
    def left(self) -> float:
        return self.deadline - time.monotonic()

    def guard(self, wanted: float) -> float:
        return max(1.0, min(wanted, self.left() - 5))

    # -- files
    def path(self, what: str) -> Path:
        return self.k.out / f"{self.prefix}-{what}.json"

    def run(self, name: str, cmd: list[str], timeout: float,
            show=("Throughput:", "Start-up", "Saved")) -> Optional[int]:
        """Run a child with its output in logs/<name>.log; None if it ran past ``timeout`` (then its
        process group is stopped). Prints the lines starting with ``show``, or the tail on failure."""
        log_path = self.logs / f"{name}.log"
        print(f"  $ {_short(cmd)}   [guard {timeout:.0f} s; log {log_path.name}]", flush=True)
        with open(log_path, "w") as log:
            log.write(f"$ {shlex.join(cmd)}\n")
            log.flush()
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=self.env, cwd=ROOT,
                                    start_new_session=True)
            try:
                rc = proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                stop_group(proc)
                rc = None
        lines = log_path.read_text(errors="replace").splitlines()
        shown = [ln for ln in lines if ln.lstrip().startswith(show)]
        for ln in (shown if rc == 0 else lines[-15:]):
            print(f"    {ln[-300:]}", flush=True)
        if rc != 0:
            print(f"  ! {name}: {'timed out' if rc is None else f'exit {rc}'} (log: {log_path})", flush=True)
        return rc

    def engine_flags(self, ladder: bool = True) -> list[str]:
        k = self.k
        flags = ["--load-format", k.load_format, "--dtype", k.dtype, "--attention-backend", k.attn,
                 "--max-num-batched-tokens", k.max_tokens, "--max-num-seqs", k.max_seqs,
                 "--max-model-len", k.max_len, "--compilation-cache-dir", k.cache_dir]
        if ladder:
            flags += ["--token-buckets", k.token_buckets, "--seq-buckets", k.seq_buckets]
            if k.decode_seq_buckets:    # '' = the --seq-buckets ladder for decode steps too
                flags += ["--decode-seq-buckets", k.decode_seq_buckets]
        return flags + shlex.split(k.extra_engine_flags)

    def sharegpt_flags(self, num_prompts) -> list[str]:
        flags = ["--dataset-name", "sharegpt-synthetic", "--num-prompts", str(num_prompts), "--seed", self.k.seed]
        return flags + (["--sharegpt-output-len", self.k.sharegpt_output_len] if self.k.sharegpt_output_len else [])

    def random_flags(self, num_prompts, input_len, output_len) -> list[str]:
        return ["--dataset-name", "random", "--num-prompts", str(num_prompts), "--random-input-len", str(input_len),
                "--random-output-len", str(output_len), "--seed", self.k.seed]

    def annotate(self, path: Path, **extra) -> None:
        """Fill what a results file lacks (a bench serve client knows no device or model shape)."""
        data = json.loads(path.read_text())
        env = data.setdefault("environment", {})
        for key, value in self.environment().items():
            env.setdefault(key, value)
        env.update(extra)
        from serving.bench.environment import write_json

        write_json(path, data)

    def environment(self) -> dict:
        """The run's environment: an engine-written file's when there is one (jax's own view)."""
        for what in ("sharegpt-offline", f"random{self.k.random_in}-offline"):
            if what in self.files:
                env = json.loads(self.files[what].read_text()).get("environment", {})
                return {k: env[k] for k in ("platform", "device_kind", "device_count", "jax_version", "model",
                                            "model_shape", "dtype", "commit") if k in env}
        from model_zoo.loader import resolve_model
        from serving.bench.environment import git_commit, model_shape

        shape = model_shape(resolve_model(self.k.model, load_format=self.k.load_format).config)
        return {**self.device, "jax_version": importlib.metadata.version("jax"), "model": self.k.model,
                "model_shape": shape, "dtype": self.k.dtype, "commit": git_commit()}

    # ------------------------------------------------------------------------- steps
    def step_offline(self) -> None:
        k = self.k
        work = [("sharegpt-offline", self.sharegpt_flags(k.sharegpt_prompts)),
                (f"random{k.random_in}-offline", self.random_flags(k.random_prompts, k.random_in, k.random_out))]
        if cache_entries(k.cache_dir) == 0:
            # On an empty cache one tiny run compiles the ladder first (the cold start-up figure), so
            # every measured run, offline or served, runs in a process that loaded its executables:
            # on the CPU check a run in the compiling process came out at half the speed.
            work.insert(0, ("compile-pass", self.random_flags(1, 8, 2)))
        failed = []
        for what, data in work:
            if self.left() < _MIN_STEP_S:
                failed.append(f"{what} (no time left)")
                continue
            before = cache_entries(k.cache_dir)
            out = self.logs / "compile-pass.json" if what == "compile-pass" else self.path(what)
            t = time.monotonic()
            rc = self.run(what, [sys.executable, "-m", "serving", "bench", "throughput", "--model", k.model,
                                 *self.engine_flags(), *data, "--disable-detokenize", "--output-json", str(out)],
                          self.guard(_GUARD_COLD_START_S if before == 0 else _GUARD_WARM_PROCESS_S))
            if rc != 0 or not out.exists():
                failed.append(what)
                continue
            if what != "compile-pass":
                self.files[what] = out
            res = json.loads(out.read_text())["results"]
            self.starts.append({"process": f"bench throughput ({what})", "cache_entries_before": before,
                                "new_cache_entries": cache_entries(k.cache_dir) - before,
                                "process_s": time.monotonic() - t, "startup_s": res["startup_s"],
                                "compile_s": res["compile_s"], "weights_and_kv_s": res["startup_s"] - res["compile_s"],
                                "num_executables": res["num_executables"]})
        if failed:
            raise StepFailed("not measured: " + ", ".join(failed))

    def start_server(self, log_name: str = "server"):
        k = self.k
        before = cache_entries(k.cache_dir)
        cmd = [sys.executable, "-m", "serving", "serve", k.model, *self.engine_flags(), "--host", "127.0.0.1",
               "--port", k.port, "--disable-log-requests", "--uvicorn-log-level", "warning"]
        log_path = self.logs / f"{log_name}.log"
        print(f"  $ {_short(cmd)} &   [log {log_path.name}]", flush=True)
        log = open(log_path, "w")
        log.write(f"$ {shlex.join(cmd)}\n")
        log.flush()
        t = time.monotonic()
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=self.env, cwd=ROOT,
                                start_new_session=True)
        limit = t + self.guard(_GUARD_COLD_START_S if before == 0 else _GUARD_WARM_PROCESS_S)
        while time.monotonic() < limit:
            if proc.poll() is not None:
                break
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{k.port}/health", timeout=5) as r:
                    if r.status == 200:
                        ready = time.monotonic() - t
                        text = log_path.read_text(errors="replace")
                        weights = re.search(r"Weights ready in ([\d.]+) s", text)
                        comp = re.search(r"Compiled (\d+) bucket executables in ([\d.]+) s", text)
                        self.starts.append({
                            "process": "jaxllm serve", "cache_entries_before": before,
                            "new_cache_entries": cache_entries(k.cache_dir) - before, "process_s": ready,
                            "weights_s": float(weights.group(1)) if weights else None,
                            "compile_s": float(comp.group(2)) if comp else None,
                            "num_executables": int(comp.group(1)) if comp else None})
                        print(f"    server ready in {ready:.1f} s (weights {self.starts[-1]['weights_s']} s, "
                              f"compile {self.starts[-1]['compile_s']} s)", flush=True)
                        return proc, log
            except OSError:
                pass
            time.sleep(1)
        stop_group(proc)
        log.close()
        print("\n".join("    " + ln for ln in log_path.read_text(errors="replace").splitlines()[-15:]))
        raise StepFailed(f"the server did not become ready ({'exited' if proc.returncode else 'timed out'}; "
                         f"log {log_path})")

    def bench_serve(self, what: str, data: list[str], rate: float, *, max_concurrency: Optional[int] = None,
                    temperature: str = "1.0") -> bool:
        n = int(data[data.index("--num-prompts") + 1])
        wanted = (n / rate if math.isfinite(rate) else 0) * 1.3 + 150
        cmd = [sys.executable, "-m", "serving", "bench", "serve", "--port", self.k.port, "--model", self.k.model,
               *data, "--request-rate", "inf" if math.isinf(rate) else f"{rate:g}", "--ignore-eos",
               "--temperature", temperature, "--disable-tqdm", "--save-result", "--result-dir", str(self.k.out),
               "--result-filename", self.path(what).name]
        if max_concurrency:
            cmd += ["--max-concurrency", str(max_concurrency)]
        rc = self.run(what, cmd, self.guard(wanted), show=("Request throughput", "Output token throughput",
                                                           "Successful requests", "Failed requests", "Mean TTFT",
                                                           "Mean TPOT", "Saved"))
        if rc == 0 and self.path(what).exists():
            self.annotate(self.path(what), server_engine_flags=shlex.join(self.engine_flags()))
            self.files[what] = self.path(what)
            return True
        return False

    def hf_tag(self) -> str:
        return "sharegpt" if self.k.hf_dataset == "sharegpt-synthetic" else f"random{self.k.hf_in}"

    def hf_workload(self) -> list[str]:
        if self.k.hf_dataset == "sharegpt-synthetic":
            return self.sharegpt_flags(self.k.hf_prompts)
        return self.random_flags(self.k.hf_prompts, self.k.hf_in, self.k.hf_out)

    def hf_served_what(self) -> str:
        return f"{self.hf_tag()}-served-c{self.k.hf_batch}"

    def step_serve(self, runs: list[tuple[str, list[str], float, dict]]) -> None:
        proc, log = self.start_server()
        failed = []
        try:
            for what, data, rate, kw in runs:
                if self.left() < _MIN_STEP_S:
                    failed.append(f"{what} (no time left)")
                    continue
                if not self.bench_serve(what, data, rate, **kw):
                    failed.append(what)
        finally:
            stop_group(proc)
            log.close()
        if failed:
            raise StepFailed("not measured: " + ", ".join(failed))

    def serve_runs(self, with_rates: bool, with_hf: bool) -> list:
        runs = []
        for i, (rate, n) in enumerate(self.k.serve_rates if with_rates else []):
            runs.append((f"sharegpt-served-{rate_label(rate)}", self.sharegpt_flags(n), rate, {}))
            if i == 0 and with_hf:       # the HF comparison's jaxllm side comes right after rate inf
                runs.append((self.hf_served_what(), self.hf_workload(), math.inf,
                             {"max_concurrency": self.k.number("HF_BATCH"), "temperature": "0"}))
        if with_hf and not with_rates:
            runs.append((self.hf_served_what(), self.hf_workload(), math.inf,
                         {"max_concurrency": self.k.number("HF_BATCH"), "temperature": "0"}))
        return runs

    def step_hf(self) -> None:
        k = self.k
        problems = []
        if self.hf_served_what() not in self.files:     # jaxllm's side, measured in this run too
            try:
                self.step_serve(self.serve_runs(with_rates=False, with_hf=True))
            except StepFailed as e:                     # the HF figure is still worth having
                problems.append(f"jaxllm side: {e}")
        out = self.path(f"{self.hf_tag()}-hf-b{k.hf_batch}")
        cmd = [sys.executable, str(ROOT / "benchmarks" / "baseline_hf.py"), "--model", k.model,
               "--load-format", "dummy" if k.load_format == "dummy" else "auto", "--dtype", k.dtype,
               "--device", "cuda" if self.device["platform"] == "gpu" else "cpu", "--batch-size", k.hf_batch,
               "--static-cache", "--compile", k.hf_compile, *self.hf_workload(), "--output-json", str(out)]
        rc = self.run("hf-baseline", cmd, self.guard(_GUARD_HF_S),
                      show=("Model ready", "transformers generate", "torch.compile failed", "Throughput:"))
        if out.exists():            # written after every variant: an eager figure survives a compile time-out
            self.annotate(out)
            self.files["hf"] = out
        if rc != 0:
            problems.append("baseline_hf.py " + ("timed out" if rc is None else f"exit {rc}")
                            + (" (the file holds the runs that finished)" if out.exists() else ""))
        if problems:
            raise StepFailed("; ".join(problems))

    def run_ladder(self, name: str, spec: str) -> Optional[dict]:
        """One `bench buckets --ladder spec` process; its output document, the row counting the
        executables it added to the compilation cache (0: every shape loaded, none compiled)."""
        k = self.k
        before = cache_entries(k.cache_dir)
        part = self.logs / f"{name}.json"
        data = (self.sharegpt_flags(k.buckets_prompts) if k.buckets_dataset == "sharegpt-synthetic" else
                self.random_flags(k.buckets_prompts, k.random_in, k.random_out))
        rc = self.run(name, [sys.executable, "-m", "serving", "bench", "buckets", "--model", k.model,
                             *self.engine_flags(ladder=False), *data, "--ladder", spec, "--output-json", str(part)],
                      self.guard(_GUARD_COLD_START_S), show=("Recommended", "Saved"))
        if rc != 0 or not part.exists():
            return None
        doc = json.loads(part.read_text())
        doc["results"]["ladders"][0]["new_cache_entries"] = cache_entries(k.cache_dir) - before
        return doc

    def step_buckets(self) -> None:
        from serving.bench.buckets import choose_ladder
        from serving.bench.environment import result_envelope, write_json

        k = self.k
        specs = [s.strip() for s in k.ladders.split(";") if s.strip()]
        rows, first, missed = [], None, []
        for i, spec in enumerate(specs):
            doc = self.run_ladder(f"buckets-{i}", spec) if self.left() >= _MIN_STEP_S else None
            if doc is None:
                missed.append(spec)
                continue
            row = doc["results"]["ladders"][0]
            if row["new_cache_entries"] and self.left() >= _GUARD_WARM_PROCESS_S / 2:
                # Measured again in a process that loads the new shapes, as every other figure is.
                again = self.run_ladder(f"buckets-{i}-cached", spec)
                if again is not None:
                    doc, compiled = again, row
                    row = doc["results"]["ladders"][0]
                    row.update(new_cache_entries=compiled["new_cache_entries"], load_s=row["compile_s"],
                               compile_s=compiled["compile_s"], startup_s=compiled["startup_s"])
            first = first or doc
            rows.append(row)
        if rows:
            pick, why = choose_ladder(rows)
            config = {**first["config"], "ladders": [r["ladder"] for r in rows], "not_measured": missed,
                      "note": "one process per ladder; shapes already in the compilation cache load instead of "
                              "compiling, so compile_s is load time where new_cache_entries is 0; a ladder that "
                              "compiled new shapes was measured again in a process that loads them (load_s)"}
            out = write_json(self.path("buckets"), result_envelope(
                "buckets", {**first["environment"], **{k2: v for k2, v in self.environment().items()
                                                       if k2 not in first["environment"]}},
                config, {"ladders": rows, "recommended": pick["ladder"], "why": why}))
            self.files["buckets"] = out
        if missed:
            raise StepFailed("ladders not measured: " + "; ".join(missed))

    def write_startup(self) -> None:
        if not self.starts:
            return
        from serving.bench.environment import result_envelope, write_json

        cold, cached = startup_cold_and_cached(self.starts)
        config = {"engine_flags": shlex.join(self.engine_flags()), "cache_dir": self.k.cache_dir,
                  "note": "startup_s: engine build (weights + KV cache + every bucket compiled or loaded) inside "
                          "the process; process_s: from launch to ready, imports included (server: to /health)"}
        self.files["startup"] = write_json(self.path("startup"), result_envelope(
            "startup", self.environment(), config, {"cold": cold, "cached": cached, "starts": self.starts}))

    # ------------------------------------------------------------------------- driver
    def main(self) -> int:
        k = self.k
        print(f"== jaxllm GPU bench suite: {self.device['device_kind']}, {k.model} {k.dtype} {k.attn}, "
              f"steps {','.join(k.steps)}, budget {k.budget_s} s, cache {k.cache_dir} "
              f"({cache_entries(k.cache_dir)} entries), results {k.out}/{self.prefix}-*.json\n"
              f"   <engine flags> = {shlex.join(self.engine_flags(ladder=False))}", flush=True)
        hf_in_serve = "hf" in k.steps and "serve" in k.steps
        plan = {"offline": self.step_offline,
                "serve": lambda: self.step_serve(self.serve_runs(with_rates=True, with_hf=hf_in_serve)),
                "hf": self.step_hf, "buckets": self.step_buckets}
        for name in STEPS:
            if name not in k.steps:
                continue
            log = self.steps[name]
            if self.left() < _MIN_STEP_S:
                log.status, log.note = "skipped", f"{self.left():.0f} s of the budget left"
                continue
            print(f"\n== {name} ({self.left():.0f} s of the budget left)", flush=True)
            t = time.monotonic()
            try:
                plan[name]()
                log.status = "ok"
            except StepFailed as e:
                log.status, log.note = "failed", str(e)
            except Exception as e:  # noqa: BLE001 - one step's bug must not cost the others
                log.status, log.note = "error", f"{type(e).__name__}: {e}"
            log.seconds = time.monotonic() - t
            self.write_startup()
        table = summary_table(self)
        (self.logs / "summary.txt").write_text(table + "\n")
        self.write_preview()
        print("\n" + table, flush=True)
        return 0 if all(self.steps[s].status == "ok" for s in k.steps) else 1

    def write_preview(self) -> None:
        spec = importlib.util.spec_from_file_location("make_results_md", ROOT / "benchmarks" / "make_results_md.py")
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        (self.logs / "RESULTS-preview.md").write_text(mod.render(self.k.out))


def startup_cold_and_cached(starts: list[dict]) -> tuple[Optional[dict], Optional[dict]]:
    """The cold figure is the first start that compiled (it wrote new compilation-cache entries; a
    cache left by other programs' executables does not make a start cached), the cached figure the
    first start that wrote none, i.e. loaded every executable."""
    def summary(s):
        return None if s is None else {"process": s["process"], "startup_s": s.get("startup_s", s["process_s"]),
                                       "compile_s": s["compile_s"]}

    cold = next((s for s in starts if s["new_cache_entries"] > 0), None)
    cached = next((s for s in starts if s["new_cache_entries"] == 0), None)
    return summary(cold), summary(cached)


class StepFailed(Exception):
    pass


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv:
        print(__doc__)
        return 0 if argv[0] in ("-h", "--help") else 2
    try:
        knobs = Knobs.from_env()
    except ValueError as e:
        print(f"gpu_bench_suite: error: {e}", file=sys.stderr)
        return 2
    if knobs.fresh_cache == "1":
        shutil.rmtree(knobs.cache_dir, ignore_errors=True)
    os.makedirs(knobs.cache_dir, exist_ok=True)
    knobs.out.mkdir(parents=True, exist_ok=True)
    return Suite(knobs).main()


if __name__ == "__main__":
    raise SystemExit(main())
