"""`jaxllm convert SRC OUT [--dtype D]`: load any model jaxllm can read and save it as an orbax
checkpoint that later loads straight into its sharded layout (no dequantizing, no transposes).

The output directory is a complete model: pass it to `jaxllm serve` / `LLM(model=OUT)`.
"""

from __future__ import annotations

import argparse
import logging
import time

logger = logging.getLogger("jaxllm")


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    parser = parser or argparse.ArgumentParser(
        prog="jaxllm convert", description=__doc__.split("\n\n")[0])
    parser.add_argument("src", help="model to convert: a Hugging Face model directory, a .gguf "
                        "file, a Hub id, or 'default' for the embedded SmolLM2")
    parser.add_argument("out", help="output directory (created; must be empty unless --overwrite)")
    parser.add_argument("--dtype", default="checkpoint",
                        choices=["checkpoint", "float32", "bfloat16", "float16"],
                        help="dtype to store the weights in; 'checkpoint' keeps the source's own "
                        "dtype (bfloat16 for a quantized GGUF)")
    parser.add_argument("--revision", default=None, help="Hub revision (branch, tag or commit)")
    parser.add_argument("--download-dir", default=None, help="Hugging Face cache directory")
    parser.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    return parser


def convert(src: str | None, out: str, *, dtype: str = "checkpoint", revision: str | None = None,
            download_dir: str | None = None, overwrite: bool = False):
    """Load `src` on the default device and write it to `out`; returns the output Path."""
    from model_zoo.loader import load_weights, resolve_model, save_orbax

    t0 = time.perf_counter()
    resolved = resolve_model(src, revision=revision, download_dir=download_dir)
    if resolved.kind not in ("hf_dir", "gguf", "orbax"):
        raise ValueError(f"cannot convert a {resolved.kind} model")
    target = resolved.dtype if dtype == "checkpoint" else dtype
    if target not in ("float32", "bfloat16", "float16"):
        target = "bfloat16"
    params = load_weights(resolved, target)
    t_load = time.perf_counter() - t0
    t1 = time.perf_counter()
    path = save_orbax(params, resolved.config, out, generation_config=resolved.generation_config,
                      tokenizer_dir=resolved.tokenizer_path, gguf_file=resolved.gguf_file,
                      overwrite=overwrite)
    t_save = time.perf_counter() - t1
    nbytes = sum(a.nbytes for a in params.values())
    logger.info("Converted %s (%s, %s) to %s: %.3f GB, load %.2f s, save %.2f s",
                resolved.name, resolved.kind, target, path, nbytes / 1e9, t_load, t_save)
    return path


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    logger.setLevel(logging.INFO)
    src = None if args.src == "default" else args.src
    try:
        path = convert(src, args.out, dtype=args.dtype, revision=args.revision,
                       download_dir=args.download_dir, overwrite=args.overwrite)
    except ValueError as e:
        print(f"error: {e}")
        return 2
    print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
