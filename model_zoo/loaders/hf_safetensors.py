"""Hugging Face safetensors checkpoints (single file or sharded with an index) -> our parameter tree.

We parse the safetensors header ourselves and memory-map the data section with numpy: reads stay
lazy (the page cache, not a Python copy, holds the file), bfloat16 works through ml_dtypes, and a
truncated or damaged file is reported with the file and tensor it affects, before anything loads.

File layout (https://github.com/huggingface/safetensors):

    [8 bytes little-endian u64 N][N bytes JSON header][data section]
    header: {"name": {"dtype": "BF16", "shape": [..], "data_offsets": [begin, end]}, ...}
    offsets are relative to the start of the data section.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path
import ml_dtypes
import numpy as np

from model_zoo.config import ModelConfig
from model_zoo.loaders.placement import ParamSource, parallel_for
from model_zoo.params import param_specs

INDEX_FILE = "model.safetensors.index.json"

_DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn), "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
    "I64": np.dtype(np.int64), "I32": np.dtype(np.int32), "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8), "U8": np.dtype(np.uint8), "BOOL": np.dtype(np.bool_),
}
# Unquantized weights only: an integer or fp8 tensor needs scales we do not implement.
_WEIGHT_DTYPES = ("F32", "F16", "BF16", "F64")


class CheckpointError(ValueError):
    """A checkpoint file is missing, damaged, or does not match the model config."""


class SafetensorsFile:
    """One .safetensors file: header parsed eagerly, data memory-mapped on first use."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.is_file():
            raise CheckpointError(f"{self.path}: safetensors file does not exist")
        size = self.path.stat().st_size
        with open(self.path, "rb") as f:
            prefix = f.read(8)
            if len(prefix) < 8:
                raise CheckpointError(f"{self.path}: truncated safetensors file ({size} bytes, "
                                      "not even the 8-byte header length)")
            (header_len,) = struct.unpack("<Q", prefix)
            if 8 + header_len > size:
                raise CheckpointError(
                    f"{self.path}: truncated safetensors file: the header claims {header_len} bytes "
                    f"but the file has {size} bytes in all")
            try:
                header = json.loads(f.read(header_len))
            except ValueError as e:
                raise CheckpointError(f"{self.path}: not a safetensors file (bad header: {e})") from None
        if not isinstance(header, dict):
            raise CheckpointError(f"{self.path}: not a safetensors file (header is not a JSON object)")
        header.pop("__metadata__", None)
        self.data_start = 8 + header_len
        data_size = size - self.data_start
        self.entries: dict[str, tuple[str, tuple[int, ...], int, int]] = {}
        for name, info in header.items():
            try:
                dtype, shape = info["dtype"], tuple(int(d) for d in info["shape"])
                begin, end = (int(o) for o in info["data_offsets"])
            except (KeyError, TypeError, ValueError):
                raise CheckpointError(f"{self.path}: tensor {name!r} has a malformed header entry "
                                      f"{info!r}") from None
            if end > data_size:
                raise CheckpointError(
                    f"{self.path}: truncated safetensors file: tensor {name!r} needs data bytes "
                    f"[{begin}, {end}) but the file holds only {data_size} bytes of data "
                    f"(file size {size}); re-download or re-copy the file")
            if dtype in _DTYPES and end - begin != int(np.prod(shape)) * _DTYPES[dtype].itemsize:
                raise CheckpointError(
                    f"{self.path}: tensor {name!r} header is inconsistent: shape {list(shape)} of "
                    f"{dtype} needs {int(np.prod(shape)) * _DTYPES[dtype].itemsize} bytes, "
                    f"offsets give {end - begin}")
            self.entries[name] = (dtype, shape, begin, end)
        self._mmap: np.memmap | None = None

    def __contains__(self, name: str) -> bool:
        return name in self.entries

    def dtype_name(self, name: str) -> str:
        return self.entries[name][0]

    def shape(self, name: str) -> tuple[int, ...]:
        return self.entries[name][1]

    def tensor(self, name: str) -> np.ndarray:
        """A read-only numpy view of the tensor (no copy until sliced and cast)."""
        dtype, shape, begin, end = self.entries[name]
        if self._mmap is None:
            self._mmap = np.memmap(self.path, dtype=np.uint8, mode="r", offset=self.data_start)
        return self._mmap[begin:end].view(_DTYPES[dtype]).reshape(shape)


class HFCheckpoint:
    """All safetensors files of a model directory, name -> file."""

    def __init__(self, model_dir: str | os.PathLike):
        self.dir = Path(model_dir)
        index_path = self.dir / INDEX_FILE
        self.files: dict[str, SafetensorsFile] = {}
        self.location: dict[str, str] = {}  # tensor name -> file name
        if index_path.is_file():
            try:
                weight_map = json.loads(index_path.read_text())["weight_map"]
            except (ValueError, KeyError) as e:
                raise CheckpointError(f"{index_path}: not a valid safetensors index ({e})") from None
            self.location = dict(weight_map)
            # Check every listed shard up front, naming a tensor that lives in it, so a partial
            # download fails before minutes of loading rather than in the middle.
            for fname in dict.fromkeys(weight_map.values()):
                if not (self.dir / fname).is_file():
                    tensors = [t for t, f in weight_map.items() if f == fname]
                    raise CheckpointError(
                        f"{self.dir / fname}: safetensors file does not exist, but {INDEX_FILE} "
                        f"lists it for tensor {tensors[0]!r}"
                        + (f" and {len(tensors) - 1} others" if len(tensors) > 1 else "")
                        + "; the download is incomplete")
        else:
            shards = sorted(self.dir.glob("*.safetensors"))
            if not shards:
                raise CheckpointError(f"{self.dir}: no *.safetensors files (and no {INDEX_FILE}); "
                                      "jaxllm loads Hugging Face checkpoints in safetensors format")
            for shard in shards:
                f = self._open(shard.name)
                for name in f.entries:
                    self.location.setdefault(name, shard.name)

    def _open(self, fname: str) -> SafetensorsFile:
        if fname not in self.files:
            self.files[fname] = SafetensorsFile(self.dir / fname)
        return self.files[fname]

    def find(self, name: str) -> SafetensorsFile | None:
        fname = self.location.get(name)
        if fname is None:
            return None
        f = self._open(fname)
        if name not in f:
            raise CheckpointError(f"{f.path}: tensor {name!r} is missing from this file although "
                                  f"{INDEX_FILE} says it is there")
        return f


# Our name -> (HF name, or template with {i} for stacked layers; stored [out, in] so transpose).
_HF_NAMES: dict[str, tuple[str, bool]] = {
    "embed": ("model.embed_tokens.weight", False),
    "layers/attn_norm": ("model.layers.{i}.input_layernorm.weight", False),
    "layers/wq": ("model.layers.{i}.self_attn.q_proj.weight", True),
    "layers/wk": ("model.layers.{i}.self_attn.k_proj.weight", True),
    "layers/wv": ("model.layers.{i}.self_attn.v_proj.weight", True),
    "layers/bq": ("model.layers.{i}.self_attn.q_proj.bias", False),
    "layers/bk": ("model.layers.{i}.self_attn.k_proj.bias", False),
    "layers/bv": ("model.layers.{i}.self_attn.v_proj.bias", False),
    "layers/q_norm": ("model.layers.{i}.self_attn.q_norm.weight", False),
    "layers/k_norm": ("model.layers.{i}.self_attn.k_norm.weight", False),
    "layers/wo": ("model.layers.{i}.self_attn.o_proj.weight", True),
    "layers/mlp_norm": ("model.layers.{i}.post_attention_layernorm.weight", False),
    "layers/w_gate": ("model.layers.{i}.mlp.gate_proj.weight", True),
    "layers/w_up": ("model.layers.{i}.mlp.up_proj.weight", True),
    "layers/w_down": ("model.layers.{i}.mlp.down_proj.weight", True),
    "final_norm": ("model.norm.weight", False),
    "lm_head": ("lm_head.weight", True),
    # Gemma 2/3 only (see _GEMMA_HF_NAMES).
    "layers/post_attn_norm": ("model.layers.{i}.post_attention_layernorm.weight", False),
    "layers/post_mlp_norm": ("model.layers.{i}.post_feedforward_layernorm.weight", False),
}
# Gemma names its pre-MLP norm pre_feedforward_layernorm; its post_attention_layernorm normalises
# the attention output (our post_attn_norm), not the MLP input as in Llama.
_GEMMA_HF_NAMES: dict[str, tuple[str, bool]] = {
    "layers/mlp_norm": ("model.layers.{i}.pre_feedforward_layernorm.weight", False),
}


def hf_tensor_names(name: str, num_layers: int, config: ModelConfig | None = None) -> list[str]:
    """The checkpoint tensor names of one parameter (one per layer for stacked ones)."""
    template, _ = (_GEMMA_HF_NAMES.get(name) if config is not None and config.is_gemma
                   else None) or _HF_NAMES[name]
    if name.startswith("layers/"):
        return [template.format(i=i) for i in range(num_layers)]
    return [template]


def safetensors_readers(model_dir: str | os.PathLike, config: ModelConfig, dtype=None
                        ) -> tuple[dict, dict[str, ParamSource]]:
    """Validate the checkpoint against `config` and return (specs, name -> reader).

    Every tensor's presence, dtype and shape is checked here, from the headers alone, so errors
    come before any weight is read.
    """
    ckpt = HFCheckpoint(model_dir)
    specs = param_specs(config)
    readers = {}
    for name, (shape, _axes) in specs.items():
        _, transpose = _HF_NAMES[name]
        per_tensor = shape[1:] if name.startswith("layers/") else shape
        expected = tuple(reversed(per_tensor)) if transpose else tuple(per_tensor)
        sources = []
        for hf_name in hf_tensor_names(name, config.num_layers, config):
            f = ckpt.find(hf_name)
            if f is None:
                where = (f"{ckpt.dir / INDEX_FILE}" if (ckpt.dir / INDEX_FILE).is_file()
                         else ", ".join(str(p.path) for p in ckpt.files.values()))
                hint = (" (config.json says tie_word_embeddings=false; a tied checkpoint should "
                        "say true)" if name == "lm_head" else "")
                raise CheckpointError(f"tensor {hf_name!r} is missing from the checkpoint "
                                      f"(looked in {where}){hint}")
            st_dtype = f.dtype_name(hf_name)
            if st_dtype not in _WEIGHT_DTYPES:
                raise CheckpointError(
                    f"{f.path}: tensor {hf_name!r} has dtype {st_dtype}; jaxllm loads unquantized "
                    f"floating-point weights only ({', '.join(_WEIGHT_DTYPES)})")
            if f.shape(hf_name) != expected:
                raise CheckpointError(
                    f"{f.path}: tensor {hf_name!r} has shape {list(f.shape(hf_name))}, expected "
                    f"{list(expected)} for this config.json ({config.architecture}, hidden "
                    f"{config.hidden_size}, {config.num_heads} heads / {config.num_kv_heads} KV "
                    f"heads of dim {config.head_dim}, intermediate {config.intermediate_size}, "
                    f"vocab {config.vocab_size})")
            sources.append((f, hf_name))
        readers[name] = _make_source(sources, transpose, name.startswith("layers/"))
    return specs, readers


def _make_source(sources, transpose: bool, stacked: bool) -> ParamSource:
    """Blocks of the parameter as stored: [layers?, out, in] in the checkpoint's dtype (float64
    narrowed to float32, which is all JAX holds without x64). Transpose and cast happen on device."""
    first_dtype = sources[0][0].tensor(sources[0][1]).dtype
    host_dtype = np.dtype(np.float32) if first_dtype == np.float64 else first_dtype

    def tensor_block(f: SafetensorsFile, hf_name: str, index: tuple) -> np.ndarray:
        return np.asarray(f.tensor(hf_name)[index]).astype(host_dtype, copy=False)

    if not stacked:
        (f, hf_name), = sources
        return ParamSource(lambda index: np.ascontiguousarray(tensor_block(f, hf_name, index)),
                           host_dtype, transpose)

    def read(index: tuple) -> np.ndarray:
        layer_ids = range(len(sources))[index[0]]
        first = tensor_block(*sources[layer_ids[0]], index[1:])
        out = np.empty((len(layer_ids),) + first.shape, host_dtype)
        out[0] = first

        def fill(j: int) -> None:
            out[j + 1] = tensor_block(*sources[layer_ids[j + 1]], index[1:])

        parallel_for(fill, len(layer_ids) - 1)
        return out

    return ParamSource(read, host_dtype, transpose)


def checkpoint_dtype(model_dir: str | os.PathLike) -> str | None:
    """The dtype of the first weight tensor, as a jnp dtype name (None if unknown)."""
    try:
        ckpt = HFCheckpoint(model_dir)
        name = "model.embed_tokens.weight"
        f = ckpt.find(name)
    except CheckpointError:
        return None
    if f is None:
        return None
    return {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}.get(f.dtype_name(name))
