"""Build a fast tokenizer from a GGUF file's metadata, without PyTorch.

A GGUF file carries no tokenizer.json: llama.cpp stores the vocabulary, merges, token types and
special token ids as metadata (``tokenizer.ggml.*``). transformers can rebuild a tokenizer from
them (``from_pretrained(..., gguf_file=...)``), but its GGUF reader imports torch, which a plain
``pip install jaxllm`` does not have. This module reads the metadata itself and assembles the
``tokenizers`` object the same way transformers' converter does for the two vocabulary kinds the
Llama-architecture files use:

- ``gpt2``: byte-level BPE (SmolLM2, Llama 3, Qwen 2, ...). The split before BPE depends on
  ``tokenizer.ggml.pre``, the name llama.cpp gives the original tokenizer's pre-tokenizer.
- ``llama``: SentencePiece-style BPE over "▁"-marked text with <0xNN> byte fallback (Llama 2,
  TinyLlama, ...); merges come from the file or are derived from the token scores.

The result is wrapped in ``transformers.PreTrainedTokenizerFast`` (which imports without torch) with
the file's special tokens, BOS/EOS flags and chat template.
"""

from __future__ import annotations

import logging
import mmap
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np

logger = logging.getLogger(__name__)

# GGUF metadata value types -> struct format of fixed-size scalars (8 = string, 9 = array).
_GGUF_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_GGUF_STRING, _GGUF_ARRAY = 8, 9

# llama.cpp token types (tokenizer.ggml.token_type).
TOKEN_NORMAL, TOKEN_UNKNOWN, TOKEN_CONTROL, TOKEN_USER_DEFINED, TOKEN_UNUSED, TOKEN_BYTE = 1, 2, 3, 4, 5, 6

SUPPORTED_MODELS = ("gpt2", "llama")


def read_gguf_metadata(gguf_path: str, keys: Sequence[str]) -> dict[str, Any]:
    """The requested metadata values of a GGUF file (absent keys are left out).

    Strings come back as ``str``, scalars as Python numbers/bools, arrays as lists. A direct scan of
    the header: gguf.GGUFReader parses every tensor's and array item's entry into numpy views
    (seconds for a 49k vocabulary), while this skips what is not asked for and stops once it has
    every key. Raises ValueError for a file that is not GGUF (or is truncated).
    """
    wanted, found = set(keys), {}
    with open(gguf_path, "rb") as f:
        if f.read(4) != b"GGUF":
            raise ValueError(f"{gguf_path!r} is not a GGUF file")
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            try:
                _scan_metadata(buf, gguf_path, wanted, found)
            except struct.error as e:
                raise ValueError(f"{gguf_path!r}: truncated or corrupt GGUF metadata ({e})") from e
    return found


def _scan_metadata(buf, gguf_path: str, wanted: set, found: dict) -> None:
    (version,) = struct.unpack_from("<I", buf, 4)
    order = "<" if version < 65536 else ">"  # big-endian files store the version byte-swapped
    if version in (1, 1 << 24):
        raise ValueError(f"{gguf_path!r} uses GGUF version 1, which is not supported")
    _, kv_count = struct.unpack_from(order + "QQ", buf, 8)
    pos = 24

    def read(fmt):
        nonlocal pos
        value = struct.unpack_from(order + fmt, buf, pos)[0]
        pos += struct.calcsize(fmt)
        return value

    def read_bytes():
        nonlocal pos
        n = read("Q")
        if pos + n > len(buf):
            raise struct.error("string runs past the end of the file")
        data = buf[pos:pos + n]
        pos += n
        return data

    def skip(vtype):
        nonlocal pos
        if vtype == _GGUF_STRING:
            n = read("Q")  # not `pos += read(...)`: that adds to pos as it was before the read
            pos += n
        elif vtype == _GGUF_ARRAY:
            item_type, count = read("I"), read("Q")
            if item_type in _GGUF_SCALARS:
                pos += count * struct.calcsize(_GGUF_SCALARS[item_type])  # count was read above
            else:
                for _ in range(count):
                    skip(item_type)
        elif vtype in _GGUF_SCALARS:
            pos += struct.calcsize(_GGUF_SCALARS[vtype])
        else:
            raise ValueError(f"{gguf_path!r}: unknown GGUF metadata type {vtype}")

    def value(vtype):
        nonlocal pos
        if vtype == _GGUF_STRING:
            return read_bytes().decode("utf-8")
        if vtype in _GGUF_SCALARS:
            return read(_GGUF_SCALARS[vtype])
        if vtype != _GGUF_ARRAY:
            raise ValueError(f"{gguf_path!r}: unknown GGUF metadata type {vtype}")
        item_type, count = read("I"), read("Q")
        if item_type in _GGUF_SCALARS:
            dtype = np.dtype(_GGUF_SCALARS[item_type]).newbyteorder(order)
            items = np.frombuffer(buf, dtype=dtype, count=count, offset=pos)
            pos += items.nbytes
            return items.tolist()
        if item_type == _GGUF_STRING:
            # Tokens are not always valid UTF-8 on their own (a SentencePiece piece can be half a
            # character); llama.cpp keeps the bytes, and so does "replace" minus the bad bytes.
            return [read_bytes().decode("utf-8", errors="replace") for _ in range(count)]
        return [value(item_type) for _ in range(count)]

    for _ in range(kv_count):
        if len(found) == len(wanted):
            break
        key = read_bytes().decode("utf-8", errors="replace")
        vtype = read("I")
        if key in wanted:
            found[key] = value(vtype)
        else:
            skip(vtype)


@dataclass(frozen=True)
class GGUFVocab:
    """The tokenizer a GGUF file describes, as llama.cpp stores it."""

    architecture: Optional[str]
    model: Optional[str]             # tokenizer.ggml.model: "gpt2", "llama", "t5", ...
    pre: Optional[str]               # tokenizer.ggml.pre: the original pre-tokenizer's name
    tokens: list[str]
    token_types: list[int]           # TOKEN_* per token (NORMAL when the file has none)
    scores: Optional[list[float]]
    merges: Optional[list[str]]      # "left right" pairs, best first
    bos_token_id: Optional[int]
    eos_token_id: Optional[int]
    unk_token_id: Optional[int]
    pad_token_id: Optional[int]
    add_bos_token: Optional[bool]
    add_eos_token: Optional[bool]
    add_space_prefix: Optional[bool]
    chat_template: Optional[str]

    def token(self, token_id: Optional[int]) -> Optional[str]:
        if token_id is None:
            return None
        if not 0 <= token_id < len(self.tokens):
            raise ValueError(f"GGUF special token id {token_id} is outside the vocabulary of {len(self.tokens)}")
        return self.tokens[token_id]


def read_gguf_vocab(gguf_path: str) -> GGUFVocab:
    """Read the ``tokenizer.*`` metadata of a GGUF file."""
    names = ["model", "pre", "tokens", "token_type", "scores", "merges", "bos_token_id", "eos_token_id",
             "unknown_token_id", "padding_token_id", "add_bos_token", "add_eos_token", "add_space_prefix"]
    keys = ["general.architecture", "tokenizer.chat_template"] + [f"tokenizer.ggml.{n}" for n in names]
    meta = read_gguf_metadata(gguf_path, keys)
    g = {n: meta.get(f"tokenizer.ggml.{n}") for n in names}
    tokens = g["tokens"]
    if not tokens:
        raise ValueError(f"{gguf_path!r} has no tokenizer vocabulary (tokenizer.ggml.tokens)")
    token_types = g["token_type"] or [TOKEN_NORMAL] * len(tokens)
    for name in ("token_type", "scores"):
        if g[name] is not None and len(g[name]) != len(tokens):
            raise ValueError(f"{gguf_path!r}: tokenizer.ggml.{name} has {len(g[name])} entries for "
                             f"{len(tokens)} tokens")
    return GGUFVocab(
        architecture=meta.get("general.architecture"), model=g["model"], pre=g["pre"], tokens=tokens,
        token_types=[int(t) for t in token_types], scores=g["scores"], merges=g["merges"],
        bos_token_id=g["bos_token_id"], eos_token_id=g["eos_token_id"], unk_token_id=g["unknown_token_id"],
        pad_token_id=g["padding_token_id"],
        add_bos_token=None if g["add_bos_token"] is None else bool(g["add_bos_token"]),
        add_eos_token=None if g["add_eos_token"] is None else bool(g["add_eos_token"]),
        add_space_prefix=None if g["add_space_prefix"] is None else bool(g["add_space_prefix"]),
        chat_template=meta.get("tokenizer.chat_template"))


# ---- byte-level BPE ("gpt2") --------------------------------------------------------------------

# The regexes llama.cpp applies before BPE, keyed by tokenizer.ggml.pre (llama-vocab.cpp), written
# as the original tokenizers' Split patterns; the same table transformers' GGUF converter uses, so
# both give the same ids. Any other name gets GPT-2's own split (ByteLevel(use_regex=True)), as in
# transformers. That includes "smollm", where llama.cpp (and SmolLM2's tokenizer.json) also split
# off every numeric character first: the ids differ only where the vocabulary merges a space or a
# numeric character with a following numeric character's bytes: for SmolLM2, text like " ²" (its
# vocabulary has no merge with an ASCII digit).
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_GPT4O_SPLIT = (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
                r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
                r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_TEKKEN_SPLIT = (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
                 r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
                 r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_PRE_SPLITS = {
    **dict.fromkeys(("llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0", "lfm2",
                     "dbrx", "smaug-bpe"), _LLAMA3_SPLIT),
    **dict.fromkeys(("qwen2", "deepseek-r1-qwen", "megrez"), _QWEN2_SPLIT),
    **dict.fromkeys(("gpt-4o", "llama4", "minimax-m2"), _GPT4O_SPLIT),
    "tekken": _TEKKEN_SPLIT,
}
# Names whose split is GPT-2's (or close to it, as "smollm" above): no warning for these.
_PRE_GPT2 = frozenset({"default", "gpt2", "gpt-2", "mpt", "olmo", "jais", "smollm", "starcoder", "refact"})


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table: bytes that are printable map to themselves, the
    rest to code points from 256 up, in byte order. Byte-level vocabularies are spelled in it."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def _byte_level_pre_tokenizer(pre: Optional[str]):
    from tokenizers import Regex, pre_tokenizers

    if pre in _PRE_SPLITS:
        return pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(_PRE_SPLITS[pre]), behavior="isolated"),
                                        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    if pre is not None and pre not in _PRE_GPT2:
        logger.warning("GGUF pre-tokenizer %r is not known here; splitting text with GPT-2's regex", pre)
    return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)


def _byte_level_backend(vocab: GGUFVocab):
    from tokenizers import Tokenizer, decoders, models

    spelling = _bytes_to_unicode()
    alphabet = set(spelling.values())
    # Tokens are stored in the byte alphabet; one that is not (a raw added token) is respelled so
    # that its text can still be reached through the byte-level pre-tokenizer.
    tokens = [t if set(t) <= alphabet else "".join(spelling[b] for b in t.encode("utf-8")) for t in vocab.tokens]
    if vocab.merges is None:
        raise ValueError("this byte-level (gpt2) GGUF vocabulary has no merges (tokenizer.ggml.merges)")
    merges = [_split_merge(m) for m in vocab.merges]
    backend = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges,
                                   fuse_unk=False, byte_fallback=False, dropout=None,
                                   continuing_subword_prefix="", end_of_word_suffix=""))
    backend.normalizer = None
    backend.pre_tokenizer = _byte_level_pre_tokenizer(vocab.pre)
    backend.decoder = decoders.ByteLevel(add_prefix_space=True, trim_offsets=True, use_regex=True)
    # Control tokens spelled outside the byte alphabet are llama.cpp labelling mistakes: adding them
    # as whole tokens would give the vocabulary ids the model does not have.
    return backend, lambda token: set(token) <= alphabet


def _split_merge(merge: str) -> tuple[str, str]:
    left, sep, right = merge.partition(" ")
    if not sep or not left or not right:
        raise ValueError(f"malformed GGUF merge {merge!r} (expected 'left right')")
    return left, right


# ---- SentencePiece-style BPE ("llama") ----------------------------------------------------------

def _merges_from_scores(tokens: list[str], scores: list[float]) -> list[tuple[str, str]]:
    """The BPE merges a SentencePiece vocabulary implies: every way to cut a token into two tokens
    is a merge ranked by the whole token's score (higher first, longer left then right piece first on
    ties); cuts of one token are ordered by their pieces' ids. The same order transformers derives."""
    ids = {t: i for i, t in enumerate(tokens)}
    score_of = dict(zip(tokens, scores))
    candidates = []
    for token, score in score_of.items():
        cuts = [(token[:k], token[k:]) for k in range(1, len(token)) if token[:k] in ids and token[k:] in ids]
        cuts.sort(key=lambda lr: (ids[lr[0]], ids[lr[1]]))
        candidates.extend((left, right, score) for left, right in cuts)
    candidates.sort(key=lambda c: (c[2], len(c[0]), len(c[1])), reverse=True)
    return [(left, right) for left, right, _ in candidates]


def _sentencepiece_backend(vocab: GGUFVocab):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    if vocab.merges is not None:
        merges = [_split_merge(m) for m in vocab.merges]
    elif vocab.scores is not None:
        merges = _merges_from_scores(vocab.tokens, vocab.scores)
    else:
        raise ValueError("this SentencePiece (llama) GGUF vocabulary has neither merges nor scores")
    backend = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(vocab.tokens)}, merges=merges,
                                   fuse_unk=True, byte_fallback=True, dropout=None))
    # llama.cpp prepends a space to the text unless the file says otherwise (add_space_prefix).
    prefix = vocab.add_space_prefix is not False
    backend.normalizer = None
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first" if prefix else "never",
                                                     split=False)
    steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    if prefix:
        steps.append(decoders.Strip(content=" ", left=1, right=0))
    backend.decoder = decoders.Sequence(steps)
    return backend, lambda token: True


# ---- assembly -----------------------------------------------------------------------------------

def supports_gguf_vocab(model: Optional[str]) -> bool:
    """Whether build_gguf_tokenizer handles a file whose tokenizer.ggml.model is ``model``."""
    return model in SUPPORTED_MODELS


def build_gguf_backend(vocab: GGUFVocab):
    """The ``tokenizers.Tokenizer`` for a GGUF vocabulary: model, pre-tokenizer, decoder, added tokens."""
    from tokenizers import AddedToken

    if vocab.model == "gpt2":
        backend, addable = _byte_level_backend(vocab)
    elif vocab.model == "llama":
        backend, addable = _sentencepiece_backend(vocab)
    else:
        raise ValueError(f"GGUF tokenizer model {vocab.model!r} is not supported without transformers' GGUF "
                         f"support; supported: {', '.join(SUPPORTED_MODELS)}")
    pairs = list(zip(vocab.tokens, vocab.token_types))
    # Control tokens (<|im_start|>, <s>) are special: matched whole, skipped by skip_special_tokens.
    control = [AddedToken(t, normalized=False, special=True) for t, kind in pairs
               if kind == TOKEN_CONTROL and addable(t)]
    if control:
        backend.add_special_tokens(control)
    # User-defined tokens (<think>) are matched whole too (llama.cpp does) but are not special.
    model_vocab = backend.get_vocab(with_added_tokens=False)
    user = [AddedToken(t, normalized=False, special=False) for t, kind in pairs
            if kind == TOKEN_USER_DEFINED and t in model_vocab]
    if user:
        backend.add_tokens(user)
    return backend


def build_gguf_tokenizer(gguf_path: str, *, name_or_path: Optional[str] = None):
    """A ``transformers.PreTrainedTokenizerFast`` for the tokenizer in a GGUF file, torch not needed.

    Raises ValueError for a file that is not GGUF, has no vocabulary, or uses a tokenizer model
    other than ``gpt2``/``llama``.
    """
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast

    vocab = read_gguf_vocab(gguf_path)
    backend = build_gguf_backend(vocab)
    specials = {"bos_token": vocab.token(vocab.bos_token_id), "eos_token": vocab.token(vocab.eos_token_id),
                "unk_token": vocab.token(vocab.unk_token_id), "pad_token": vocab.token(vocab.pad_token_id)}
    # llama.cpp adds BOS to a SentencePiece vocabulary whose file does not say otherwise.
    add_bos = vocab.add_bos_token if vocab.add_bos_token is not None else vocab.model == "llama"
    add_eos = bool(vocab.add_eos_token)
    add_bos = add_bos and specials["bos_token"] is not None
    add_eos = add_eos and specials["eos_token"] is not None
    # The post-processor adds BOS/EOS in the backend itself. transformers 5 rebuilds the same one
    # from add_bos_token/add_eos_token; 4.x's generic class does not, so it is set here as well.
    single = " ".join([f"{specials['bos_token']}:0"] * add_bos + ["$A:0"] + [f"{specials['eos_token']}:0"] * add_eos)
    pair = " ".join([single] + [f"{specials['bos_token']}:1"] * add_bos + ["$B:1"]
                    + [f"{specials['eos_token']}:1"] * add_eos)
    special_ids = ([(specials["bos_token"], vocab.bos_token_id)] * add_bos
                   + [(specials["eos_token"], vocab.eos_token_id)] * add_eos)
    backend.post_processor = processors.TemplateProcessing(single=single, pair=pair, special_tokens=special_ids)

    kwargs = {k: v for k, v in specials.items() if v is not None}
    if vocab.chat_template is not None:
        kwargs["chat_template"] = vocab.chat_template
    if name_or_path is not None:
        kwargs["name_or_path"] = name_or_path
    return PreTrainedTokenizerFast(tokenizer_object=backend, add_bos_token=add_bos, add_eos_token=add_eos, **kwargs)
