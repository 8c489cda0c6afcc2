"""`jaxllm bench serve | throughput | buckets` argument parsing and the three commands' main bodies.

Flag names follow vLLM's ``vllm bench`` where the meaning is the same. A bad value is one line on
stderr and exit code 2, like `jaxllm serve`.
"""

from __future__ import annotations

import argparse
import datetime
import logging
import math
import os
import sys
from pathlib import Path
from typing import Optional, Sequence

from serving.bench import datasets as ds
from serving.bench.buckets import LONE_PROMPTS
from serving.bench.metrics import (METRICS, compute_metrics, format_report, parse_goodput, parse_metric_names,
                                   parse_percentiles)


class BenchUsageError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        raise BenchUsageError(message)


def _rates(value: str) -> list[float]:
    out = []
    for item in str(value).replace(",", " ").split():
        try:
            rate = float(item)
        except ValueError:
            raise argparse.ArgumentTypeError(f"request rates are numbers or inf, got {item!r}") from None
        if not rate > 0:
            raise argparse.ArgumentTypeError(f"request rates must be positive, got {item!r}")
        out.append(rate)
    if not out:
        raise argparse.ArgumentTypeError("give at least one request rate")
    return out


def _size(value: str) -> int:
    from serving.cli import _bytes   # the server's parser for 2GiB-style sizes: same spelling everywhere

    return _bytes(value)


def _add_dataset_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("dataset")
    g.add_argument("--dataset-name", default="random", choices=ds.DATASETS, help="workload")
    g.add_argument("--dataset-path", default=None, help="JSONL file for --dataset-name custom")
    g.add_argument("--num-prompts", type=int, default=1000, help="number of requests")
    g.add_argument("--seed", type=int, default=0, help="seed of the dataset and the arrival times")
    g.add_argument("--random-input-len", type=int, default=1024, help="random: input tokens")
    g.add_argument("--random-output-len", type=int, default=128, help="random: output tokens")
    g.add_argument("--random-range-ratio", type=float, default=0.0,
                   help="random: lengths uniform in [L*(1-r), L*(1+r)]")
    g.add_argument("--random-prefix-len", type=int, default=0, help="random: tokens of one shared prefix")
    g.add_argument("--sharegpt-output-len", type=int, default=None,
                   help="sharegpt-synthetic: fixed output length instead of the sampled ones")
    g.add_argument("--prefix-repetition-prefix-len", type=int, default=256)
    g.add_argument("--prefix-repetition-suffix-len", type=int, default=256)
    g.add_argument("--prefix-repetition-num-prefixes", type=int, default=10)
    g.add_argument("--prefix-repetition-output-len", type=int, default=128)
    g.add_argument("--custom-output-len", type=int, default=256, help="custom: output tokens when a line gives none")


def _add_engine_args(p: argparse.ArgumentParser, *, ladders: bool) -> None:
    # Defaults are None: only flags given reach EngineArgs, so the engine's platform defaults apply.
    g = p.add_argument_group("engine (as `jaxllm serve`)")
    g.add_argument("--model", default=None, help="model path, Hub id, GGUF file or builtin dummy name; "
                                                 "none: the embedded SmolLM2-135M-Instruct")
    g.add_argument("--tokenizer", default=None)
    g.add_argument("--load-format", default=None)
    g.add_argument("--dtype", default=None)
    g.add_argument("--max-model-len", type=int, default=None)
    g.add_argument("--block-size", type=int, default=None)
    g.add_argument("--kv-cache-memory", type=_size, default=None)
    g.add_argument("--num-gpu-blocks-override", type=int, default=None)
    g.add_argument("--gpu-memory-utilization", type=float, default=None)
    g.add_argument("--max-num-seqs", type=int, default=None)
    g.add_argument("--max-num-batched-tokens", type=int, default=None)
    g.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction, default=None)
    g.add_argument("-tp", "--tensor-parallel-size", type=int, default=None)
    g.add_argument("-pp", "--pipeline-parallel-size", type=int, default=None)
    g.add_argument("--sharding-rules", default=None)
    g.add_argument("--attention-backend", default=None)
    g.add_argument("--compilation-cache-dir", default=None)
    if ladders:
        g.add_argument("--token-buckets", default=None)
        g.add_argument("--seq-buckets", default=None)
        g.add_argument("--decode-seq-buckets", default=None,
                       help="batch-size buckets of the decode-only executables (default: --seq-buckets)")


def build_parser() -> argparse.ArgumentParser:
    fmt = argparse.ArgumentDefaultsHelpFormatter
    parser = _Parser(prog="jaxllm bench", description="benchmarks that read like vLLM's", formatter_class=fmt)
    sub = parser.add_subparsers(dest="command", metavar="{serve,throughput,buckets}", parser_class=_Parser)

    s = sub.add_parser("serve", help="load generator against an OpenAI-compatible server", formatter_class=fmt)
    s.add_argument("--base-url", default=None, help="server root (default http://HOST:PORT)")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--endpoint", default="/v1/completions", choices=("/v1/completions", "/v1/chat/completions"))
    s.add_argument("--model", default=None, help="model name in requests (default: the server's first model)")
    s.add_argument("--tokenizer", default=None,
                   help="tokenizer for prompts and token counts; 'none': token-id prompts (needs --vocab-size)")
    s.add_argument("--vocab-size", type=int, default=None, help="vocabulary for prompts without a tokenizer")
    s.add_argument("--request-rate", type=_rates, default=[math.inf],
                   help="requests/s (Poisson); a comma list sweeps them; inf sends all at once")
    s.add_argument("--burstiness", type=float, default=1.0, help="gamma shape of the arrival gaps (1 = Poisson)")
    s.add_argument("--max-concurrency", type=int, default=None, help="most requests in flight")
    s.add_argument("--ignore-eos", action="store_true", help="ask for exactly the output length (vLLM extension)")
    s.add_argument("--temperature", type=float, default=0.0)
    s.add_argument("--api-key", default=os.environ.get("OPENAI_API_KEY"), help="default: $OPENAI_API_KEY")
    s.add_argument("--goodput", nargs="+", default=None, metavar="KEY:MS", help="SLOs, e.g. ttft:500 tpot:50")
    s.add_argument("--percentile-metrics", default=",".join(METRICS), help="metrics to report")
    s.add_argument("--metric-percentiles", default="99", help="percentiles to report, e.g. 50,90,99")
    s.add_argument("--save-result", action="store_true", help="write a JSON result")
    s.add_argument("--result-dir", default=".", help="where --save-result and --plot write")
    s.add_argument("--result-filename", default=None, help="JSON file name (one rate only)")
    s.add_argument("--metadata", nargs="*", default=[], metavar="KEY=VALUE",
                   help="recorded in the result, e.g. device=h100 dtype=bfloat16 model_shape=llama-3.1-8b")
    s.add_argument("--plot", action="store_true", help="write latency histograms (and sweep curves) as PNG")
    s.add_argument("--skip-initial-test", action="store_true", help="do not send one request alone first")
    s.add_argument("--disable-tqdm", action="store_true")
    _add_dataset_args(s)

    t = sub.add_parser("throughput", help="offline throughput of the engine (no HTTP)", formatter_class=fmt)
    _add_engine_args(t, ladders=True)
    _add_dataset_args(t)
    t.add_argument("--disable-detokenize", action="store_true", help="do not detokenize outputs")
    t.add_argument("--output-json", default=None, help="write the result here")

    b = sub.add_parser("buckets", help="one workload under several bucket ladders", formatter_class=fmt)
    _add_engine_args(b, ladders=False)
    _add_dataset_args(b)
    b.add_argument("--ladder", action="append", default=None, metavar="TOKENSxSEQS",
                   help="a ladder like 64,256x8,32 or 'default' (repeat the flag)")
    b.add_argument("--tolerance", type=float, default=0.05,
                   help="throughput share within which fewer executables win")
    b.add_argument("--latency-tolerance", type=float, default=0.10,
                   help="share of the best lone-request TTFT a recommended ladder may exceed")
    b.add_argument("--lone-prompts", type=int, default=LONE_PROMPTS,
                   help="prompts of the dataset timed one at a time after the workload (low-load TTFT/ITL; 0 skips)")
    b.add_argument("--output-json", default=None, help="write the table here")
    b.add_argument("--plot", default=None, metavar="PNG", help="write the comparison figure here")
    b.set_defaults(num_prompts=64)      # one workload per ladder: smaller by default
    return parser


def dataset_kwargs(ns: argparse.Namespace) -> dict:
    keys = ("random_input_len", "random_output_len", "random_range_ratio", "random_prefix_len",
            "sharegpt_output_len", "prefix_repetition_prefix_len", "prefix_repetition_suffix_len",
            "prefix_repetition_num_prefixes", "prefix_repetition_output_len", "dataset_path", "custom_output_len")
    return {k: getattr(ns, k) for k in keys}


def engine_kwargs(ns: argparse.Namespace) -> dict:
    from serving.config import EngineArgs

    fields = set(EngineArgs.field_names())
    kwargs = {k: v for k, v in vars(ns).items() if k in fields and v is not None and k != "seed"}
    kwargs["seed"] = ns.seed
    EngineArgs(**kwargs)      # validate now: a bad flag is a usage error, not a traceback mid-build
    return kwargs


def engine_token_source(llm) -> ds.TokenSource:
    """The dataset's vocabulary from a built engine (its tokenizer, or ids only for dummy weights);
    reusing the engine's tokenizer saves loading it twice."""
    vocab = llm.engine.model_config.vocab_size
    if llm.tokenizer is None:
        return ds.TokenSource(vocab_size=vocab)
    return ds.TokenSource(llm.tokenizer, vocab_size=vocab)


def _check_dataset_flags(ns: argparse.Namespace) -> None:
    """The dataset is built after the (slow) engine; catch a missing file before it."""
    if ns.dataset_name == "custom" and not (ns.dataset_path and os.path.isfile(ns.dataset_path)):
        raise ValueError(f"--dataset-name custom needs --dataset-path FILE.jsonl (got {ns.dataset_path!r})")


def _engine_requests(ns: argparse.Namespace):
    """A factory: the dataset needs the engine's tokenizer, so it is built after the first engine."""
    return lambda llm: ds.build_dataset(ns.dataset_name, engine_token_source(llm), ns.num_prompts, seed=ns.seed,
                                        **dataset_kwargs(ns))


def serve_token_source(tokenizer: Optional[str], model: str, vocab_size: Optional[int]) -> Optional[ds.TokenSource]:
    """Prompts are built and outputs counted with this: --tokenizer, else the model's own if the
    model name is a local path, the embedded model or a builtin dummy shape (ids only)."""
    from model_zoo.config import BUILTIN_CONFIGS
    from model_zoo.loader import DEFAULT_MODEL_NAME, default_model_path
    from serving.tokenizer import load_tokenizer

    if tokenizer and tokenizer.lower() == "none":
        if vocab_size is None:
            raise ValueError("--tokenizer none needs --vocab-size N")
        return ds.TokenSource(vocab_size=vocab_size)
    if tokenizer is None and model in BUILTIN_CONFIGS:
        return ds.TokenSource(vocab_size=vocab_size or BUILTIN_CONFIGS[model].vocab_size)
    if tokenizer is None and model == DEFAULT_MODEL_NAME:
        tokenizer = str(default_model_path())
    try:
        tok = load_tokenizer(tokenizer or model)
    except ValueError as e:
        raise ValueError(f"no tokenizer for model {model!r} ({e}); pass --tokenizer PATH, or --tokenizer none "
                         "--vocab-size N for token-id prompts") from None
    return ds.TokenSource(tok, vocab_size=vocab_size)


def _parse_metadata(items: Sequence[str]) -> dict:
    meta = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--metadata takes KEY=VALUE, got {item!r}")
        meta[key] = value
    return meta


def _rate_label(rate: float) -> str:
    return "inf" if math.isinf(rate) else f"{rate:g}"


def cmd_serve(ns: argparse.Namespace) -> int:
    import asyncio

    from serving.bench import serve as srv
    from serving.bench.environment import result_envelope, write_json

    goodput = parse_goodput(ns.goodput)
    shown = parse_metric_names(ns.percentile_metrics)
    percentiles = parse_percentiles(ns.metric_percentiles)
    metadata = _parse_metadata(ns.metadata)
    if ns.result_filename and len(ns.request_rate) > 1:
        raise ValueError("--result-filename names one file; a --request-rate sweep writes one per rate")
    base_url = ns.base_url or f"http://{ns.host}:{ns.port}"
    model = ns.model or asyncio.run(srv.first_model_id(base_url, ns.api_key))
    source = serve_token_source(ns.tokenizer, model, ns.vocab_size)
    requests = ds.build_dataset(ns.dataset_name, source, ns.num_prompts, seed=ns.seed, **dataset_kwargs(ns))
    count_tokens = (lambda text: len(source.encode(text))) if source.tokenizer is not None else None
    out_dir = Path(ns.result_dir)
    date = datetime.date.today().isoformat()
    device = metadata.get("device", "unknown-device")
    sweep = []
    for i, rate in enumerate(ns.request_rate):
        cfg = srv.ServeConfig(base_url=base_url, model=model, endpoint=ns.endpoint, request_rate=rate,
                              burstiness=ns.burstiness, max_concurrency=ns.max_concurrency,
                              ignore_eos=ns.ignore_eos, temperature=ns.temperature, api_key=ns.api_key)
        print(f"Traffic request rate: {_rate_label(rate)} (burstiness {ns.burstiness}), "
              f"max concurrency: {ns.max_concurrency}", flush=True)
        results, duration = srv.run_serve_benchmark(requests, cfg, seed=ns.seed + i, count_tokens=count_tokens,
                                                    initial_test=not ns.skip_initial_test and i == 0,
                                                    progress=not ns.disable_tqdm)
        m = compute_metrics(results, duration, goodput_slos=goodput, percentiles=percentiles)
        header = [("Maximum request concurrency:", ns.max_concurrency),
                  ("Request rate configured (RPS):", _rate_label(rate))]
        print(format_report(m, metrics=shown, header=header), flush=True)
        flat = {"request_rate": rate, "burstiness": ns.burstiness, "max_concurrency": ns.max_concurrency,
                **srv.flat_metrics(m)}
        sweep.append(flat)
        stem = f"{date}-{device}-serve-{ns.dataset_name}-{_rate_label(rate)}qps"
        if ns.save_result:
            config = {"base_url": base_url, "endpoint": ns.endpoint, "model": model, "dataset": ns.dataset_name,
                      "num_prompts": ns.num_prompts, "seed": ns.seed, "ignore_eos": ns.ignore_eos,
                      "goodput_slos_ms": goodput, **dataset_kwargs(ns)}
            env = {"client": "jaxllm bench serve", **metadata}
            data = result_envelope("serve", env, config, {**flat, "errors": m.errors})
            data["requests"] = srv.per_request_record(results)
            path = write_json(out_dir / (ns.result_filename or stem + ".json"), data)
            print(f"Saved {path}")
        if ns.plot:
            from serving.bench.plots import plot_latency_distributions

            png = plot_latency_distributions(results, out_dir / (stem + ".png"),
                                             title=f"{model} @ {_rate_label(rate)} req/s ({ns.dataset_name})")
            print(f"Saved {png}")
    if ns.plot and len(sweep) > 1:
        from serving.bench.plots import plot_rate_sweep

        png = plot_rate_sweep(sweep, out_dir / f"{date}-{device}-serve-{ns.dataset_name}-sweep.png",
                              title=f"{model}: throughput vs latency ({ns.dataset_name})")
        print(f"Saved {png}")
    return 0


def cmd_throughput(ns: argparse.Namespace) -> int:
    from serving.bench.environment import engine_environment, result_envelope, write_json
    from serving.bench.throughput import (build_llm, format_throughput, run_engine_workload, throughput_results,
                                          warm_up)

    kwargs = engine_kwargs(ns)
    _check_dataset_flags(ns)
    built = build_llm(kwargs)
    llm = built.llm
    requests = _engine_requests(ns)(llm)
    warm_up(llm, requests)
    results, duration, counters = run_engine_workload(llm, requests, seed=ns.seed,
                                                      detokenize=False if ns.disable_detokenize else None)
    res = throughput_results(results, duration, counters)
    res.update(startup_s=built.startup_s, compile_s=built.compile_s,
               num_executables=llm.engine.runner.num_executables)
    print(format_throughput(res))
    print(f"Start-up {built.startup_s:.1f} s ({built.compile_s:.1f} s compiling {res['num_executables']} executables)")
    if ns.output_json:
        config = {"dataset": ns.dataset_name, "num_prompts": ns.num_prompts, "seed": ns.seed,
                  "engine_args": kwargs, **dataset_kwargs(ns)}
        path = write_json(ns.output_json, result_envelope("throughput", engine_environment(llm), config, res))
        print(f"Saved {path}")
    return 0


def cmd_buckets(ns: argparse.Namespace) -> int:
    from serving.bench.buckets import choose_ladder, format_ladder_table, parse_ladder_spec, run_ladder
    from serving.bench.environment import device_info, model_shape, result_envelope, write_json

    specs = ns.ladder or ["default"]
    for spec in specs:
        parse_ladder_spec(spec)           # every spec checked before the first (slow) engine build
    if ns.lone_prompts < 0:
        raise ValueError(f"--lone-prompts must be 0 or more, got {ns.lone_prompts}")
    if ns.tolerance < 0 or ns.latency_tolerance < 0:
        raise ValueError("--tolerance and --latency-tolerance must be non-negative")
    kwargs = engine_kwargs(ns)
    _check_dataset_flags(ns)
    make_requests, requests = _engine_requests(ns), None
    rows = []
    for spec in specs:
        print(f"Ladder {spec}: building and compiling ...", flush=True)
        row, requests = run_ladder(kwargs, spec, requests or make_requests, seed=ns.seed, lone_prompts=ns.lone_prompts)
        rows.append(row)
    pick, why = choose_ladder(rows, ns.tolerance, ns.latency_tolerance)
    print(format_ladder_table(rows))
    print(f"\nRecommended ladder: {pick['ladder']} (tokens {pick['token_buckets']}, seqs {pick['seq_buckets']}). {why}")
    if ns.output_json:
        from model_zoo.loader import resolve_model

        resolved = resolve_model(kwargs.get("model"), load_format=kwargs.get("load_format") or "auto")
        env = {**device_info(), "model": kwargs.get("model") or resolved.name,
               "model_shape": model_shape(resolved.config), "dtype": kwargs.get("dtype") or "auto"}
        config = {"dataset": ns.dataset_name, "num_prompts": ns.num_prompts, "seed": ns.seed,
                  "engine_args": kwargs, "ladders": specs, "tolerance": ns.tolerance,
                  "latency_tolerance": ns.latency_tolerance, "lone_prompts": ns.lone_prompts, **dataset_kwargs(ns)}
        path = write_json(ns.output_json, result_envelope(
            "buckets", env, config, {"ladders": rows, "recommended": pick["ladder"], "why": why}))
        print(f"Saved {path}")
    if ns.plot:
        from serving.bench.plots import plot_ladders

        print(f"Saved {plot_ladders(rows, ns.plot)}")
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    try:
        ns = parser.parse_args(argv)
        if ns.command is None:
            parser.print_help()
            return 2
        if ns.num_prompts < 1:
            raise ValueError(f"--num-prompts must be at least 1, got {ns.num_prompts}")
        logging.basicConfig(level=logging.WARNING, format="%(levelname)s [%(name)s] %(message)s")
        return {"serve": cmd_serve, "throughput": cmd_throughput, "buckets": cmd_buckets}[ns.command](ns)
    except (BenchUsageError, ValueError) as e:
        print(f"jaxllm bench {argv[0] if argv else ''}: error: {e}".replace("  ", " "), file=sys.stderr)
        return 2
