"""The same workload through Hugging Face transformers (PyTorch), for ratios measured in one run.

    python benchmarks/baseline_hf.py --model llama-3.1-8b --dtype bfloat16 --device cuda \\
        --dataset-name random --random-input-len 1024 --random-output-len 128 --num-prompts 500 \\
        --batch-size 64 --static-cache --compile --output-json benchmarks/results/<date>-h100-hf-baseline.json

``--model``: none (the embedded SmolLM2 GGUF, dequantized by transformers), a ``.gguf`` file, a model
directory or Hub id, or a jaxllm builtin dummy shape (``llama-3.1-8b``: random weights, same shape).
Requests are sorted by prompt length and batched with left padding; ``generate`` runs greedy with
``min_new_tokens = max_new_tokens`` (EOS ignored, like ``bench throughput``). In a batch whose
requests want different output lengths every row runs to the longest and only the requested tokens
count: generate has no continuous batching, which is part of what the ratio measures.
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


def load_hf_model(model: Optional[str], *, dtype: str = "float32", device: str = "cpu"):
    """(torch model in eval mode on ``device``, tokenizer or None)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from model_zoo.config import BUILTIN_CONFIGS
    from model_zoo.loader import default_model_path

    if dtype not in _TORCH_DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(_TORCH_DTYPES)}; got {dtype!r}")
    torch_dtype = getattr(torch, _TORCH_DTYPES[dtype])
    if model in BUILTIN_CONFIGS:
        with torch.device(device):
            hf = AutoModelForCausalLM.from_config(_hf_config_from_builtin(BUILTIN_CONFIGS[model]), dtype=torch_dtype)
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


def _batches(requests: Sequence[SampleRequest], batch_size: int):
    order = sorted(range(len(requests)), key=lambda i: len(requests[i].prompt_token_ids))
    for start in range(0, len(order), batch_size):
        yield order[start:start + batch_size]


def hf_generate(model, requests: Sequence[SampleRequest], *, batch_size: int, pad_token_id: int = 0,
                static_cache: bool = False, device: str = "cpu") -> tuple[dict[int, list[int]], float]:
    """Greedy outputs by request index, and the seconds all batches took."""
    import torch

    if batch_size < 1:
        raise ValueError(f"batch size must be at least 1, got {batch_size}")
    outputs: dict[int, list[int]] = {}
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
                  device: str = "cpu", pad_token_id: int = 0) -> dict:
    """Warm up on one small batch, then time the whole workload; vLLM throughput keys."""
    warm = [ds.SampleRequest(None, r.prompt_token_ids, 2) for r in requests[:min(batch_size, len(requests))]]
    hf_generate(model, warm, batch_size=batch_size, static_cache=static_cache, device=device,
                pad_token_id=pad_token_id)
    outputs, seconds = hf_generate(model, requests, batch_size=batch_size, static_cache=static_cache,
                                   device=device, pad_token_id=pad_token_id)
    prompt_tokens = sum(r.prompt_len for r in requests)
    output_tokens = sum(len(v) for v in outputs.values())
    return {"batch_size": batch_size, "static_cache": static_cache, "elapsed_time": seconds,
            "num_requests": len(requests), "total_prompt_tokens": prompt_tokens, "total_output_tokens": output_tokens,
            "requests_per_second": len(requests) / seconds,
            "tokens_per_second": (prompt_tokens + output_tokens) / seconds,
            "output_tokens_per_second": output_tokens / seconds,
            "outputs": [outputs[i] for i in range(len(requests))]}


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


def main(argv: Optional[Sequence[str]] = None) -> int:
    from serving.bench.cli import _add_dataset_args, dataset_kwargs
    from serving.bench.environment import result_envelope, write_json

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None)
    p.add_argument("--dtype", default="float32", choices=sorted(_TORCH_DTYPES))
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--static-cache", action="store_true", help="generate(cache_implementation='static')")
    p.add_argument("--compile", action="store_true", help="torch.compile the forward (static cache recommended)")
    p.add_argument("--output-json", default=None)
    _add_dataset_args(p)
    ns = p.parse_args(argv)
    model, tok = load_hf_model(ns.model, dtype=ns.dtype, device=ns.device)
    if ns.compile:
        import torch

        model.forward = torch.compile(model.forward, mode="reduce-overhead", fullgraph=True)
    source = ds.TokenSource(tok, vocab_size=model.config.vocab_size) if tok is not None else \
        ds.TokenSource(vocab_size=model.config.vocab_size)
    requests = ds.build_dataset(ns.dataset_name, source, ns.num_prompts, seed=ns.seed, **dataset_kwargs(ns))
    pad = (tok.pad_token_id if tok is not None and tok.pad_token_id is not None else 0)
    res = hf_throughput(model, requests, batch_size=ns.batch_size, static_cache=ns.static_cache, device=ns.device,
                        pad_token_id=pad)
    res.pop("outputs")
    res["torch_compile"] = ns.compile
    print(f"Throughput: {res['requests_per_second']:.2f} requests/s, {res['tokens_per_second']:.2f} total tokens/s, "
          f"{res['output_tokens_per_second']:.2f} output tokens/s")
    print(f"Total num prompt tokens:  {res['total_prompt_tokens']}\nTotal num output tokens:  {res['total_output_tokens']}")
    if ns.output_json:
        config = {"model": ns.model, "dataset": ns.dataset_name, "num_prompts": ns.num_prompts, "seed": ns.seed,
                  "batch_size": ns.batch_size, "static_cache": ns.static_cache, "compile": ns.compile,
                  **dataset_kwargs(ns)}
        print("Saved", write_json(ns.output_json, result_envelope("hf-baseline",
                                                                   hf_environment(model, ns.dtype, ns.device),
                                                                   config, res)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
