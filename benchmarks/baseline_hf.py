"""The same workload through Hugging Face transformers (PyTorch), for ratios measured in one run.

    python benchmarks/baseline_hf.py --model llama-3.1-8b --dtype bfloat16 --device cuda \\
        --dataset-name random --random-input-len 1024 --random-output-len 128 --num-prompts 128 \\
        --batch-size 64 --static-cache --compile both --output-json benchmarks/results/<date>-h100-8b-hf-baseline.json

``--model``: none (the embedded SmolLM2 GGUF, dequantized by transformers), a ``.gguf`` file, a model
directory or Hub id, or a jaxllm builtin dummy shape (``llama-3.1-8b``: random weights, same shape).
``--load-format dummy`` random-initialises a model directory's config the same way. Random weights
are created in the target dtype directly on ``--device`` (no float32 host copy: an 8B model is 16 GB
of bf16 on the GPU, drawn there in well under a second).

Requests are sorted by prompt length and batched with left padding; ``generate`` runs greedy with
``min_new_tokens = max_new_tokens`` (EOS ignored, like ``bench throughput``). In a batch whose
requests want different output lengths every row runs to the longest and only the requested tokens
count: generate has no continuous batching, which is part of what the ratio measures.

``--static-cache`` uses transformers' StaticCache. On a GPU, ``generate`` then compiles the decode
step with ``torch.compile`` by itself; ``--compile`` makes that explicit: ``off`` forces eager
(``disable_compile``), ``on`` compiles (mode ``reduce-overhead``: CUDA graphs) and falls back to
eager if compiling fails, ``both`` times eager first, then compiled, and reports the faster. The
result file is written after every run, so a compile that is stopped by a time limit still leaves
the eager figure. The first batch is run once untimed with exactly the timed shapes, so compile
and CUDA-graph capture are not in the timing (``warmup_s`` records them).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from serving.bench import datasets as ds  # noqa: E402
from serving.bench.datasets import SampleRequest  # noqa: E402

_TORCH_DTYPES = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}
COMPILE_CHOICES = ("off", "on", "both")


def _hf_config_from_builtin(config):
    """A transformers LlamaConfig with a jaxllm ModelConfig's shape (dummy-weight benchmarks)."""
    from transformers import LlamaConfig

    rope_scaling = dict(config.rope_scaling) if config.rope_scaling else None
    return LlamaConfig(vocab_size=config.vocab_size, hidden_size=config.hidden_size,
                       intermediate_size=config.intermediate_size, num_hidden_layers=config.num_layers,
                       num_attention_heads=config.num_heads, num_key_value_heads=config.num_kv_heads,
                       head_dim=config.head_dim, rms_norm_eps=config.rms_norm_eps, rope_theta=config.rope_theta,
                       rope_scaling=rope_scaling, max_position_embeddings=config.max_position_embeddings,
                       tie_word_embeddings=config.tie_word_embeddings, attention_bias=config.attention_bias)


def load_hf_model(model: Optional[str], *, dtype: str = "float32", device: str = "cpu", load_format: str = "auto"):
    """(torch model in eval mode on ``device``, tokenizer or None)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from model_zoo.config import BUILTIN_CONFIGS
    from model_zoo.loader import default_model_path

    if dtype not in _TORCH_DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(_TORCH_DTYPES)}; got {dtype!r}")
    if load_format not in ("auto", "dummy"):
        raise ValueError(f"load format must be auto or dummy; got {load_format!r}")
    torch_dtype = getattr(torch, _TORCH_DTYPES[dtype])
    if model in BUILTIN_CONFIGS or load_format == "dummy":
        if model in BUILTIN_CONFIGS:
            hf_config = _hf_config_from_builtin(BUILTIN_CONFIGS[model])
        elif model and Path(model).expanduser().is_dir():
            hf_config = AutoConfig.from_pretrained(str(Path(model).expanduser()))
        else:
            raise ValueError(f"--load-format dummy needs a builtin shape ({', '.join(BUILTIN_CONFIGS)}) or a "
                             f"model directory with a config.json; got {model!r}")
        # Parameters are allocated and drawn on the device in the target dtype.
        with torch.device(device):
            hf = AutoModelForCausalLM.from_config(hf_config, dtype=torch_dtype)
        return hf.eval(), None
    path = Path(model).expanduser() if model else default_model_path()
    if path.suffix == ".gguf":
        kwargs = {"gguf_file": path.name}
        where = str(path.parent)
    else:
        kwargs, where = {}, str(model)
    tok = AutoTokenizer.from_pretrained(where, **kwargs)
    hf = AutoModelForCausalLM.from_pretrained(where, dtype=torch_dtype, **kwargs).to(device)
    return hf.eval(), tok


def generate_kwargs(*, static_cache: bool, compile: bool, device: str, compile_backend: str = "inductor",
                    compile_mode: Optional[str] = "reduce-overhead") -> dict:
    """``generate`` options for the cache and compile choice. transformers compiles the decode step
    itself when the cache is static and the device is a GPU; ``disable_compile`` keeps eager eager."""
    if compile and not static_cache:
        raise ValueError("--compile needs --static-cache: transformers only compiles generate's decode step "
                         "over a static KV cache (a dynamic cache changes shape every step)")
    if not static_cache:
        return {}
    if not compile:
        return {"cache_implementation": "static", "disable_compile": True}
    from transformers import CompileConfig

    cfg = CompileConfig(backend=compile_backend, mode=compile_mode)
    if not device.startswith("cuda"):
        cfg._compile_all_devices = True      # transformers compiles on GPUs only unless told (CPU: tests)
    return {"cache_implementation": "static", "compile_config": cfg}


def _batches(requests: Sequence[SampleRequest], batch_size: int):
    order = sorted(range(len(requests)), key=lambda i: len(requests[i].prompt_token_ids))
    for start in range(0, len(order), batch_size):
        yield order[start:start + batch_size]


def hf_generate(model, requests: Sequence[SampleRequest], *, batch_size: int, pad_token_id: int = 0,
                static_cache: bool = False, device: str = "cpu",
                extra: Optional[dict] = None) -> tuple[dict[int, list[int]], float]:
    """Greedy outputs by request index, and the seconds all batches took. ``extra``: more
    ``generate`` options (default: a static cache if ``static_cache``, transformers' compile choice)."""
    import torch

    if batch_size < 1:
        raise ValueError(f"batch size must be at least 1, got {batch_size}")
    outputs: dict[int, list[int]] = {}
    if extra is None:
        extra = {"cache_implementation": "static"} if static_cache else {}
    start = time.perf_counter()
    for idx in _batches(requests, batch_size):
        width = max(len(requests[i].prompt_token_ids) for i in idx)
        new = max(requests[i].expected_output_len for i in idx)
        ids = torch.full((len(idx), width), pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(idx), width), dtype=torch.long)
        for row, i in enumerate(idx):
            p = requests[i].prompt_token_ids
            ids[row, width - len(p):] = torch.tensor(p)      # left padding: all rows end together
            mask[row, width - len(p):] = 1
        with torch.inference_mode():
            out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), max_new_tokens=new,
                                 min_new_tokens=new, do_sample=False, pad_token_id=pad_token_id, **extra)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        for row, i in enumerate(idx):
            outputs[i] = out[row, width:width + requests[i].expected_output_len].tolist()
    return outputs, time.perf_counter() - start


def hf_throughput(model, requests: Sequence[SampleRequest], *, batch_size: int, static_cache: bool = False,
                  compile: bool = False, device: str = "cpu", pad_token_id: int = 0,
                  compile_backend: str = "inductor") -> dict:
    """Warm up, then time the whole workload; vLLM throughput keys. With a static cache the warm-up
    is the first batch as timed (the cache and a compiled step are built for those shapes, not for a
    shorter stand-in); eager with a dynamic cache needs only one short batch."""
    extra = generate_kwargs(static_cache=static_cache, compile=compile, device=device,
                            compile_backend=compile_backend)
    first = [requests[i] for i in next(_batches(requests, batch_size))]
    if not static_cache:
        first = [SampleRequest(None, r.prompt_token_ids, 2) for r in first]
    _, warmup_s = hf_generate(model, first, batch_size=batch_size, device=device, pad_token_id=pad_token_id,
                              extra=extra)
    outputs, seconds = hf_generate(model, requests, batch_size=batch_size, device=device,
                                   pad_token_id=pad_token_id, extra=extra)
    prompt_tokens = sum(r.prompt_len for r in requests)
    output_tokens = sum(len(v) for v in outputs.values())
    return {"batch_size": batch_size, "static_cache": static_cache, "torch_compile": "on" if compile else "off",
            "warmup_s": warmup_s, "elapsed_time": seconds,
            "num_requests": len(requests), "total_prompt_tokens": prompt_tokens, "total_output_tokens": output_tokens,
            "requests_per_second": len(requests) / seconds,
            "tokens_per_second": (prompt_tokens + output_tokens) / seconds,
            "output_tokens_per_second": output_tokens / seconds,
            "outputs": [outputs[i] for i in range(len(requests))]}


def run_variants(model, requests: Sequence[SampleRequest], *, compile: str, batch_size: int, static_cache: bool,
                 device: str, pad_token_id: int = 0, compile_backend: str = "inductor", on_result=None) -> dict:
    """Time the eager and/or compiled variants (``compile`` in COMPILE_CHOICES); returns the fastest
    run's figures plus ``runs`` (every attempt, failures with their error). A compile failure falls
    back to eager; ``on_result(best)`` is called after every run (to save partial results)."""
    if compile not in COMPILE_CHOICES:
        raise ValueError(f"compile must be one of {', '.join(COMPILE_CHOICES)}; got {compile!r}")
    plan = {"off": [False], "on": [True], "both": [False, True]}[compile]
    runs: list[dict] = []
    best = None

    def attempt(compiled: bool) -> Optional[dict]:
        try:
            res = hf_throughput(model, requests, batch_size=batch_size, static_cache=static_cache,
                                compile=compiled, device=device, pad_token_id=pad_token_id,
                                compile_backend=compile_backend)
        except Exception as e:  # noqa: BLE001 - any compile/capture failure: record it, keep the eager figure
            if not compiled:
                raise
            import torch

            torch._dynamo.reset()      # drop half-built graphs before running eager
            msg = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]
            runs.append({"torch_compile": "failed", "error": msg})
            print(f"torch.compile failed ({msg}); falling back to eager", flush=True)
            return None
        print(f"transformers generate ({'compiled' if compiled else 'eager'}): "
              f"{res['requests_per_second']:.2f} requests/s, {res['output_tokens_per_second']:.2f} output tokens/s "
              f"(warm-up {res['warmup_s']:.1f} s)", flush=True)
        return res

    for compiled in plan:
        res = attempt(compiled)
        if res is None and compile == "on":
            res = attempt(False)
        if res is None:
            continue
        runs.append({k: v for k, v in res.items() if k != "outputs"})
        if best is None or res["requests_per_second"] > best["requests_per_second"]:
            best = res
        if on_result is not None:
            on_result({**best, "runs": list(runs)})
    return {**best, "runs": runs}


def hf_environment(model, dtype: str, device: str) -> dict:
    import torch
    import transformers

    cfg = model.config
    shape = {"architecture": (cfg.architectures or [type(model).__name__])[0], "num_layers": cfg.num_hidden_layers,
             "hidden_size": cfg.hidden_size, "intermediate_size": cfg.intermediate_size,
             "num_heads": cfg.num_attention_heads, "num_kv_heads": cfg.num_key_value_heads,
             "vocab_size": cfg.vocab_size, "num_params": int(sum(p.numel() for p in model.parameters()))}
    dev = torch.cuda.get_device_name() if device.startswith("cuda") else "cpu"
    return {"platform": "gpu" if device.startswith("cuda") else "cpu", "device_kind": dev,
            "torch_version": torch.__version__, "transformers_version": transformers.__version__,
            "jax_version": importlib.metadata.version("jax"),
            "model_shape": shape, "dtype": dtype}


def _compile_flag(value: str) -> str:
    if value not in COMPILE_CHOICES:
        raise argparse.ArgumentTypeError(f"choose from {', '.join(COMPILE_CHOICES)}")
    return value


def main(argv: Optional[Sequence[str]] = None) -> int:
    from serving.bench.cli import _add_dataset_args, dataset_kwargs
    from serving.bench.environment import result_envelope, write_json

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None)
    p.add_argument("--load-format", default="auto", choices=("auto", "dummy"),
                   help="dummy: random weights from the model's config (builtin shapes always are)")
    p.add_argument("--dtype", default="float32", choices=sorted(_TORCH_DTYPES))
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--static-cache", action="store_true", help="generate(cache_implementation='static')")
    p.add_argument("--compile", nargs="?", const="on", default="off", type=_compile_flag,
                   help="torch.compile the decode step (needs --static-cache): off, on (eager if it fails), "
                        "both (time eager and compiled, report the faster)")
    p.add_argument("--compile-backend", default="inductor", help="torch.compile backend")
    p.add_argument("--output-json", default=None)
    _add_dataset_args(p)
    ns = p.parse_args(argv)
    if ns.compile != "off" and not ns.static_cache:
        p.error("--compile needs --static-cache")
    t0 = time.perf_counter()
    model, tok = load_hf_model(ns.model, dtype=ns.dtype, device=ns.device, load_format=ns.load_format)
    load_s = time.perf_counter() - t0
    print(f"Model ready in {load_s:.1f} s", flush=True)
    source = ds.TokenSource(tok, vocab_size=model.config.vocab_size) if tok is not None else \
        ds.TokenSource(vocab_size=model.config.vocab_size)
    requests = ds.build_dataset(ns.dataset_name, source, ns.num_prompts, seed=ns.seed, **dataset_kwargs(ns))
    pad = (tok.pad_token_id if tok is not None and tok.pad_token_id is not None else 0)
    config = {"model": ns.model, "load_format": ns.load_format, "dataset": ns.dataset_name,
              "num_prompts": ns.num_prompts, "seed": ns.seed, "batch_size": ns.batch_size,
              "static_cache": ns.static_cache, "compile": ns.compile, **dataset_kwargs(ns)}
    env = hf_environment(model, ns.dtype, ns.device)

    def save(res: dict) -> None:
        if ns.output_json:
            res = {k: v for k, v in res.items() if k != "outputs"}
            write_json(ns.output_json, result_envelope("hf-baseline", env, config, {**res, "load_s": load_s}))

    res = run_variants(model, requests, compile=ns.compile, batch_size=ns.batch_size,
                       static_cache=ns.static_cache, device=ns.device, pad_token_id=pad,
                       compile_backend=ns.compile_backend, on_result=save)
    print(f"Throughput: {res['requests_per_second']:.2f} requests/s, {res['tokens_per_second']:.2f} total tokens/s, "
          f"{res['output_tokens_per_second']:.2f} output tokens/s (torch.compile {res['torch_compile']})")
    print(f"Total num prompt tokens:  {res['total_prompt_tokens']}\nTotal num output tokens:  {res['total_output_tokens']}")
    if ns.output_json:
        print("Saved", ns.output_json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
