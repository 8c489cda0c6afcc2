"""Benchmark workloads: lists of :class:`SampleRequest` (prompt, its token ids, output length).

- ``random``: uniform random token ids; lengths uniform in ``[L*(1-r), L*(1+r)]`` (vLLM's ``random``).
- ``sharegpt-synthetic``: ShareGPT's length shape without the download: seeded log-normal input and
  output lengths, filtered like vLLM filters ShareGPT (both >= 4, input <= 1024, sum <= 2048); the
  parameters below were fitted so the filtered means are about 202 input and 179 output tokens, the
  averages behind vLLM's published H100 runs (medians about 133 / 112, P99 about 900 / 1050). Text is
  random tokens of the vocabulary: the lengths, not the words, decide the cost.
- ``prefix-repetition``: ``num_prefixes`` shared prefixes, each prompt one of them plus a random
  suffix, to measure prefix caching.
- ``custom``: a JSONL file, one object a line with ``"prompt"`` (text) and optionally
  ``"output_len"`` (or ``"max_tokens"``).

Prompts built from random ids are decoded to text and re-encoded, so ``prompt_token_ids`` is what a
server tokenizing ``prompt`` sees (without BOS). With no tokenizer (dummy-weight models) the ids are
the prompt and ``prompt`` is None.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

DATASETS = ("random", "sharegpt-synthetic", "prefix-repetition", "custom")

# Fitted by bisection on 400k samples (see the module docstring); sigma sets the tail.
SHAREGPT_INPUT_LOGNORMAL = (4.9402, 1.1)     # (mu, sigma) of ln(input tokens)
SHAREGPT_OUTPUT_LOGNORMAL = (4.7212, 1.0)    # (mu, sigma) of ln(output tokens)
SHAREGPT_MAX_INPUT = 1024
SHAREGPT_MAX_TOTAL = 2048
SHAREGPT_MIN_LEN = 4


@dataclasses.dataclass(frozen=True)
class SampleRequest:
    prompt: Optional[str]            # text sent to a server; None: send prompt_token_ids
    prompt_token_ids: list[int]
    expected_output_len: int

    @property
    def prompt_len(self) -> int:
        return len(self.prompt_token_ids)


class TokenSource:
    """Random token ids and their text, from a tokenizer (serving's or transformers') or a vocab size."""

    def __init__(self, tokenizer=None, vocab_size: Optional[int] = None):
        if tokenizer is None and vocab_size is None:
            raise ValueError("a dataset needs a tokenizer or a vocab_size")
        self.tokenizer = tokenizer
        if tokenizer is not None:
            hf = getattr(tokenizer, "hf", tokenizer)
            size = len(hf) if hasattr(hf, "__len__") else tokenizer.vocab_size
            special = set(getattr(tokenizer, "all_special_ids", []) or [])
            special |= set(getattr(hf, "all_special_ids", []) or [])
            special |= set(getattr(hf, "added_tokens_decoder", {}) or {})
            vocab_size = size if vocab_size is None else min(size, vocab_size)
        else:
            special = set()
        # Special tokens would end generation early or change the chat framing.
        self.allowed = np.array([i for i in range(int(vocab_size)) if i not in special], dtype=np.int64)
        if len(self.allowed) == 0:
            raise ValueError("the vocabulary has no ordinary tokens to build prompts from")

    def random_ids(self, rng: np.random.Generator, n: int) -> list[int]:
        return rng.choice(self.allowed, size=int(n)).tolist()

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=False)

    def make_prompt(self, rng: np.random.Generator, ids: list[int], target_len: int) -> tuple[Optional[str], list[int]]:
        """Text whose re-encoding has exactly ``target_len`` tokens (a few passes of trim / top up,
        since decode -> encode may merge or split tokens); ids-only without a tokenizer."""
        if self.tokenizer is None:
            return None, list(ids)
        text = self.decode(ids)
        for _ in range(8):
            enc = self.encode(text)
            if len(enc) == target_len:
                return text, enc
            if len(enc) > target_len:
                enc = enc[:target_len]
            else:
                enc = enc + self.random_ids(rng, target_len - len(enc))
            text = self.decode(enc)
        # Some token sequences never round-trip exactly; the re-encoded ids are the truth either way.
        return text, self.encode(text)


def _check_positive(**values):
    for name, v in values.items():
        if v is None or v < 1:
            raise ValueError(f"{name.replace('_', '-')} must be at least 1, got {v}")


def sample_random(source: TokenSource, num_prompts: int, *, input_len: int = 1024, output_len: int = 128,
                  range_ratio: float = 0.0, prefix_len: int = 0, seed: int = 0) -> list[SampleRequest]:
    _check_positive(num_prompts=num_prompts, random_input_len=input_len, random_output_len=output_len)
    if not 0.0 <= range_ratio < 1.0:
        raise ValueError(f"random-range-ratio must be in [0, 1), got {range_ratio}")
    if prefix_len < 0:
        raise ValueError(f"random-prefix-len must be non-negative, got {prefix_len}")
    rng = np.random.default_rng(seed)
    lo_in, hi_in = max(1, int(input_len * (1 - range_ratio))), int(input_len * (1 + range_ratio))
    lo_out, hi_out = max(1, int(output_len * (1 - range_ratio))), int(output_len * (1 + range_ratio))
    in_lens = rng.integers(lo_in, hi_in + 1, size=num_prompts)
    out_lens = rng.integers(lo_out, hi_out + 1, size=num_prompts)
    prefix = source.random_ids(rng, prefix_len)
    out = []
    for n_in, n_out in zip(in_lens, out_lens):
        ids = prefix + source.random_ids(rng, int(n_in))
        text, ids = source.make_prompt(rng, ids, prefix_len + int(n_in))
        out.append(SampleRequest(text, ids, int(n_out)))
    return out


def sharegpt_lengths(rng: np.random.Generator, num: int) -> list[tuple[int, int]]:
    """Seeded (input, output) lengths with ShareGPT's shape, filtered like vLLM filters ShareGPT."""
    pairs: list[tuple[int, int]] = []
    while len(pairs) < num:
        k = max(16, 2 * (num - len(pairs)))
        ins = np.rint(rng.lognormal(*SHAREGPT_INPUT_LOGNORMAL, size=k)).astype(np.int64)
        outs = np.rint(rng.lognormal(*SHAREGPT_OUTPUT_LOGNORMAL, size=k)).astype(np.int64)
        keep = ((ins >= SHAREGPT_MIN_LEN) & (outs >= SHAREGPT_MIN_LEN) & (ins <= SHAREGPT_MAX_INPUT)
                & (ins + outs <= SHAREGPT_MAX_TOTAL))
        pairs += [(int(i), int(o)) for i, o in zip(ins[keep], outs[keep])]
    return pairs[:num]


def sample_sharegpt_synthetic(source: TokenSource, num_prompts: int, *, output_len: Optional[int] = None,
                              seed: int = 0) -> list[SampleRequest]:
    """``output_len`` overrides the sampled output lengths (vLLM's ``--sharegpt-output-len``)."""
    _check_positive(num_prompts=num_prompts)
    if output_len is not None:
        _check_positive(sharegpt_output_len=output_len)
    rng = np.random.default_rng(seed)
    out = []
    for n_in, n_out in sharegpt_lengths(rng, num_prompts):
        text, ids = source.make_prompt(rng, source.random_ids(rng, n_in), n_in)
        out.append(SampleRequest(text, ids, output_len or n_out))
    return out


def sample_prefix_repetition(source: TokenSource, num_prompts: int, *, prefix_len: int = 256,
                             suffix_len: int = 256, num_prefixes: int = 10, output_len: int = 128,
                             seed: int = 0) -> list[SampleRequest]:
    _check_positive(num_prompts=num_prompts, prefix_repetition_prefix_len=prefix_len,
                    prefix_repetition_num_prefixes=num_prefixes, prefix_repetition_output_len=output_len)
    if suffix_len < 0:
        raise ValueError(f"prefix-repetition-suffix-len must be non-negative, got {suffix_len}")
    rng = np.random.default_rng(seed)
    prefixes = []
    for _ in range(num_prefixes):
        # The prefix is fixed as ids, so every prompt sharing it shares its KV pages.
        _, ids = source.make_prompt(rng, source.random_ids(rng, prefix_len), prefix_len)
        prefixes.append(ids)
    out = []
    for i in range(num_prompts):
        prefix = prefixes[i % num_prefixes]
        ids = prefix + source.random_ids(rng, suffix_len)
        if source.tokenizer is None:
            out.append(SampleRequest(None, ids, output_len))
            continue
        # Only the suffix is re-fitted, so the prefix's tokens survive the text round trip.
        suffix_text, suffix_ids = source.make_prompt(rng, ids[len(prefix):], suffix_len) if suffix_len else ("", [])
        text = source.decode(prefix) + suffix_text
        out.append(SampleRequest(text, source.encode(text), output_len))
    rng.shuffle(out)
    return out


def load_custom(path: str | Path, source: Optional[TokenSource], num_prompts: Optional[int] = None, *,
                output_len: int = 256, seed: int = 0, shuffle: bool = False) -> list[SampleRequest]:
    """JSONL prompts; each line ``{"prompt": str, "output_len"?: int}``. Without a tokenizer the
    line must carry ``"prompt_token_ids"`` instead."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"custom dataset {str(path)!r} does not exist")
    _check_positive(custom_output_len=output_len)
    out = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
            if not isinstance(row, dict):
                raise ValueError(f"{path}:{lineno}: expected a JSON object")
            n_out = row.get("output_len", row.get("max_tokens", output_len))
            if not isinstance(n_out, int) or n_out < 1:
                raise ValueError(f"{path}:{lineno}: output_len must be a positive integer, got {n_out!r}")
            if isinstance(row.get("prompt"), str) and row["prompt"]:
                if source is None or source.tokenizer is None:
                    raise ValueError("a custom dataset of text prompts needs a tokenizer (--tokenizer)")
                out.append(SampleRequest(row["prompt"], source.encode(row["prompt"]), n_out))
            elif isinstance(row.get("prompt_token_ids"), list) and row["prompt_token_ids"]:
                ids = [int(t) for t in row["prompt_token_ids"]]
                text = source.decode(ids) if source is not None and source.tokenizer is not None else None
                out.append(SampleRequest(text, ids, n_out))
            else:
                raise ValueError(f"{path}:{lineno}: needs a non-empty \"prompt\" string or \"prompt_token_ids\"")
    if not out:
        raise ValueError(f"custom dataset {path} holds no prompts")
    if shuffle:
        np.random.default_rng(seed).shuffle(out)
    if num_prompts is not None:
        if num_prompts < 1:
            raise ValueError(f"num-prompts must be at least 1, got {num_prompts}")
        # vLLM repeats a short dataset to reach --num-prompts; so do we (in order).
        out = [out[i % len(out)] for i in range(num_prompts)]
    return out


def build_dataset(name: str, source: Optional[TokenSource], num_prompts: int, *, seed: int = 0,
                  random_input_len: int = 1024, random_output_len: int = 128, random_range_ratio: float = 0.0,
                  random_prefix_len: int = 0, sharegpt_output_len: Optional[int] = None,
                  prefix_repetition_prefix_len: int = 256, prefix_repetition_suffix_len: int = 256,
                  prefix_repetition_num_prefixes: int = 10, prefix_repetition_output_len: int = 128,
                  dataset_path: Optional[str] = None, custom_output_len: int = 256) -> list[SampleRequest]:
    """One entry point for the CLI: the dataset ``name`` with its flags."""
    if name not in DATASETS:
        raise ValueError(f"dataset-name must be one of {', '.join(DATASETS)}; got {name!r}")
    if name == "custom":
        if not dataset_path:
            raise ValueError("--dataset-name custom needs --dataset-path FILE.jsonl")
        return load_custom(dataset_path, source, num_prompts, output_len=custom_output_len, seed=seed)
    if source is None:
        raise ValueError(f"dataset {name!r} needs a tokenizer or the model's vocabulary size")
    if name == "random":
        return sample_random(source, num_prompts, input_len=random_input_len, output_len=random_output_len,
                             range_ratio=random_range_ratio, prefix_len=random_prefix_len, seed=seed)
    if name == "sharegpt-synthetic":
        return sample_sharegpt_synthetic(source, num_prompts, output_len=sharegpt_output_len, seed=seed)
    return sample_prefix_repetition(source, num_prompts, prefix_len=prefix_repetition_prefix_len,
                                    suffix_len=prefix_repetition_suffix_len,
                                    num_prefixes=prefix_repetition_num_prefixes,
                                    output_len=prefix_repetition_output_len, seed=seed)
