"""The tokenizer: transformers' fast tokenizer behind a small interface, plus our chat templates.

``load_tokenizer`` reads a model directory, a Hub id (resolved by transformers / huggingface_hub) or
a GGUF file. Encoding and decoding go through the Rust ``tokenizers`` backend; chat templates are
rendered by serving.chat_template (our sandbox, not transformers'), so the server's prompt text does
not depend on the installed transformers version.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from typing import Any, Optional

from serving.chat_template import render_chat_template, resolve_chat_template
from serving.gguf_tokenizer import build_gguf_tokenizer, read_gguf_metadata, supports_gguf_vocab

logger = logging.getLogger(__name__)


class Tokenizer:
    """A loaded tokenizer. ``hf`` is the underlying transformers tokenizer."""

    def __init__(self, hf: Any, *, chat_template: Optional[str] = None, name_or_path: Optional[str] = None):
        self.hf = hf
        self.name_or_path = name_or_path or getattr(hf, "name_or_path", None)
        self._backend = hf.backend_tokenizer  # the Rust tokenizer: encode/decode without Python overhead
        templates = chat_template if chat_template is not None else getattr(hf, "chat_template", None)
        # Some tokenizers carry several named templates; "tool_use" is picked when tools are given.
        if isinstance(templates, Mapping):
            self._named_templates = dict(templates)
            self.chat_template = templates.get("default")
        else:
            self._named_templates = {}
            self.chat_template = templates
        # Added tokens (special or not) decode as standalone pieces; see decode().
        self._added_tokens = {int(i): tok.content for i, tok in hf.added_tokens_decoder.items()}
        self._special_added = frozenset(int(i) for i, tok in hf.added_tokens_decoder.items() if tok.special)
        # SentencePiece byte fallback: <0xNN> tokens. Its decoder turns a run of them into text only
        # if the whole run is valid UTF-8 (else one U+FFFD per token), which the detokenizer must know.
        self._byte_fallback_ids = frozenset()
        if "ByteFallback" in repr(self._backend.decoder):
            ids = (self._backend.token_to_id(f"<0x{b:02X}>") for b in range(256))
            self._byte_fallback_ids = frozenset(i for i in ids if i is not None)

    # ---- vocabulary ---------------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        """Number of token ids the tokenizer can produce, added tokens included."""
        return len(self.hf)

    @property
    def eos_token_id(self) -> Optional[int]:
        return self.hf.eos_token_id

    @property
    def bos_token_id(self) -> Optional[int]:
        return self.hf.bos_token_id

    @property
    def all_special_ids(self) -> list[int]:
        return list(self.hf.all_special_ids)

    @property
    def special_tokens_map(self) -> dict[str, str]:
        """bos_token, eos_token, ...: the variables transformers passes to chat templates."""
        return {k: str(v) for k, v in self.hf.special_tokens_map.items() if isinstance(v, str) or hasattr(v, "content")}

    @property
    def added_tokens(self) -> dict[int, str]:
        return dict(self._added_tokens)

    @property
    def byte_fallback_ids(self) -> frozenset[int]:
        """Ids of <0xNN> byte tokens when the decoder uses byte fallback (else empty)."""
        return self._byte_fallback_ids

    @property
    def special_ids(self) -> frozenset[int]:
        """Ids that skip_special_tokens drops."""
        return self._special_added

    def is_special(self, token_id: int) -> bool:
        """True for tokens that skip_special_tokens drops (the backend's special added tokens)."""
        return token_id in self._special_added

    def convert_ids_to_tokens(self, ids):
        return self.hf.convert_ids_to_tokens(ids)

    # ---- encode / decode ----------------------------------------------------------------------

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        if not isinstance(text, str):
            raise ValueError(f"text to encode must be a string, got {type(text).__name__}")
        return self.hf.encode(text, add_special_tokens=add_special_tokens)

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True,
               spaces_between_special_tokens: bool = True) -> str:
        """Token ids to text.

        With ``spaces_between_special_tokens=True`` (the default) this is exactly transformers'
        ``decode`` of the fast tokenizer: the backend's decoder decides spacing around added tokens.
        With False, added tokens are glued to their neighbours: runs of ordinary tokens are decoded
        on their own and concatenated with the added tokens' text (the legacy transformers rule that
        vLLM applies). Tokenization-space clean-up is never applied: it is not incremental, so
        streamed text could not equal the final text.
        """
        ids = [int(i) for i in ids]
        if spaces_between_special_tokens or not any(i in self._added_tokens for i in ids):
            return self._backend.decode(ids, skip_special_tokens=skip_special_tokens)
        pieces, run = [], []
        for i in ids:
            if i in self._added_tokens:
                if run:
                    pieces.append(self._backend.decode(run, skip_special_tokens=skip_special_tokens))
                    run = []
                if not (skip_special_tokens and i in self._special_added):
                    pieces.append(self._added_tokens[i])
            else:
                run.append(i)
        if run:
            pieces.append(self._backend.decode(run, skip_special_tokens=skip_special_tokens))
        return "".join(pieces)

    # ---- chat ---------------------------------------------------------------------------------

    def apply_chat_template(
        self,
        messages: Sequence[Mapping[str, Any]],
        *,
        add_generation_prompt: bool = True,
        continue_final_message: bool = False,
        chat_template: Optional[str] = None,
        tools: Optional[list] = None,
        documents: Optional[list] = None,
        content_format: str = "auto",
        **template_kwargs: Any,
    ) -> str:
        """Render a conversation to prompt text with the model's (or the given) chat template.

        The prompt text usually begins with the template's own BOS text, so encode it with
        ``add_special_tokens=False`` (as vLLM does for chat requests).
        """
        template = chat_template
        if template is None and tools and "tool_use" in self._named_templates:
            template = self._named_templates["tool_use"]
        if template is None:
            template = self.chat_template
        return render_chat_template(
            template, messages,
            add_generation_prompt=add_generation_prompt,
            continue_final_message=continue_final_message,
            tools=tools, documents=documents,
            special_tokens=self.special_tokens_map,
            content_format=content_format,
            **template_kwargs,
        )

    def __repr__(self) -> str:
        return f"Tokenizer({self.name_or_path!r}, vocab_size={self.vocab_size})"


def _gguf_metadata(gguf_path: str, keys: Sequence[str]) -> dict[str, Any]:
    """The requested metadata values of a GGUF file (absent keys are left out)."""
    return read_gguf_metadata(gguf_path, keys)


def _gguf_chat_template(gguf_path: str) -> Optional[str]:
    """The chat template stored in a GGUF file's metadata (`tokenizer.chat_template`), if any."""
    return _gguf_metadata(gguf_path, ["tokenizer.chat_template"]).get("tokenizer.chat_template")


def _gguf_tokenizer_built_here(directory: str, gguf_path: str) -> bool:
    """Whether serving.gguf_tokenizer builds this GGUF file's tokenizer (else transformers does).

    transformers' GGUF route imports torch, which a plain install lacks, and parses the whole file
    first (~10 s for SmolLM2). We build the tokenizer ourselves where transformers would give the
    generic fast class: Llama-architecture files (SmolLM2, Llama 2/3, ...) with a byte-level (gpt2)
    or SentencePiece (llama) vocabulary, when transformers (5.x) registers no tokenizer class of its
    own for "llama" and no tokenizer_config.json beside the file could change its choice. Files
    named Mistral are excluded (transformers maps them to their own type), as is every other
    architecture. tests/test_tokenizer.py checks that the result equals AutoTokenizer's.
    """
    try:
        from transformers.models.auto.tokenization_auto import TOKENIZER_MAPPING_NAMES
    except ImportError:
        return False
    if TOKENIZER_MAPPING_NAMES.get("llama") not in (None, "TokenizersBackend", "PreTrainedTokenizerFast"):
        return False  # transformers 4.x: a Llama tokenizer class of its own
    if os.path.exists(os.path.join(directory, "tokenizer_config.json")):
        return False
    meta = _gguf_metadata(gguf_path, ["general.architecture", "general.name", "tokenizer.ggml.model"])
    return (meta.get("general.architecture") == "llama"
            and "mistral" not in str(meta.get("general.name", "")).lower()
            and supports_gguf_vocab(meta.get("tokenizer.ggml.model")))


def _auto_tokenizer_from_gguf(auto_tokenizer, path: str, gguf_file: str, kwargs: dict):
    """transformers' own GGUF route, for the files serving.gguf_tokenizer does not build."""
    try:
        return auto_tokenizer.from_pretrained(path, gguf_file=gguf_file, use_fast=True, **kwargs)
    except ModuleNotFoundError as e:
        if e.name != "torch":
            raise
        raise ValueError(f"transformers needs PyTorch to read the tokenizer of GGUF file {gguf_file!r} "
                         "(only Llama-architecture files with a gpt2/llama vocabulary and no tokenizer_config.json "
                         "beside them are read without it); install torch, or pass --tokenizer with a "
                         "tokenizer directory") from e


def load_tokenizer(path: str, *, gguf_file: Optional[str] = None, revision: Optional[str] = None,
                   chat_template: Optional[str] = None) -> Tokenizer:
    """Load the fast tokenizer of a model directory, Hub id or GGUF file.

    ``path`` may be a ``.gguf`` file itself, or a directory with ``gguf_file`` naming the file in it.
    ``chat_template`` (a file path or template text) overrides the model's own template.
    """
    if not path:
        raise ValueError("tokenizer path must be a model directory, a Hub id or a .gguf file")
    from transformers import AutoTokenizer  # heavy import, deferred to first use

    path = os.path.expanduser(path)
    if gguf_file is None and path.endswith(".gguf"):
        if not os.path.isfile(path):
            raise ValueError(f"GGUF file {path!r} does not exist")
        path, gguf_file = os.path.dirname(os.path.abspath(path)), os.path.basename(path)
    if gguf_file is not None:
        gguf_path = os.path.join(path, gguf_file)
        if not os.path.isfile(gguf_path):
            raise ValueError(f"GGUF file {gguf_path!r} does not exist")
    elif os.path.sep in path and not os.path.isdir(path):
        raise ValueError(f"tokenizer directory {path!r} does not exist")

    kwargs = {"revision": revision} if revision is not None else {}
    try:
        if gguf_file is not None and _gguf_tokenizer_built_here(path, os.path.join(path, gguf_file)):
            # A local file: revision has nothing to select.
            hf = build_gguf_tokenizer(os.path.join(path, gguf_file), name_or_path=path)
        elif gguf_file is not None:
            hf = _auto_tokenizer_from_gguf(AutoTokenizer, path, gguf_file, kwargs)
        else:
            hf = AutoTokenizer.from_pretrained(path, use_fast=True, **kwargs)
    except (OSError, ValueError) as e:
        raise ValueError(f"could not load a tokenizer from {path!r}"
                         f"{f' (GGUF file {gguf_file!r})' if gguf_file else ''}: {e}") from e
    if not hasattr(hf, "backend_tokenizer"):
        raise ValueError(f"{path!r} has no fast (tokenizers-backed) tokenizer; jaxllm needs tokenizer.json "
                         "or a GGUF vocabulary")

    template = resolve_chat_template(chat_template)
    if template is None and gguf_file is not None and not getattr(hf, "chat_template", None):
        # Older transformers versions do not copy the GGUF template onto the tokenizer.
        template = _gguf_chat_template(os.path.join(path, gguf_file))
    name = os.path.join(path, gguf_file) if gguf_file else path
    tok = Tokenizer(hf, chat_template=template, name_or_path=name)
    if tok.chat_template is None:
        logger.info("tokenizer %s has no chat template; chat requests need --chat-template", name)
    return tok
