"""Logical-axis rules: the one table that maps the model's logical axis names to mesh axes.

Model code and the parameter tree (model_zoo/params.py) name logical axes only (vocab, embed,
q_heads, kv_heads, mlp, layers, norm; activations: act_tokens, act_embed). A layout is a
`ShardingRules` value: a named preset or a rules file, so a research script swaps layouts
without touching model code:

    {"preset": "megatron", "rules": {"vocab": null}}        # JSON (or the same keys in YAML)

A rule's value is a mesh axis name ("tp", "pp"), a list of them (the dimension is split over
their product), or null (replicated). Axes a file does not mention keep the preset's value.

This module imports no jax: rules are plain data, resolved against a mesh in sharding/layout.py.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Mapping, Optional, Union

MESH_AXES = ("pp", "tp")

# Every logical axis a rule may name. Weight axes come from model_zoo.params; act_* are the
# activation axes the model constrains (the residual stream between layers).
LOGICAL_AXES = ("vocab", "embed", "q_heads", "kv_heads", "mlp", "layers", "norm",
                "act_tokens", "act_embed")

MeshAxes = Union[None, str, tuple[str, ...]]

# Megatron-style tensor parallelism: column-parallel QKV / gate / up, row-parallel O / down, so a
# layer needs one all-reduce after attention and one after the MLP; vocab-parallel embedding and
# logits; decoder layers split over pipeline stages.
_MEGATRON = {
    "vocab": "tp", "embed": None, "q_heads": "tp", "kv_heads": "tp", "mlp": "tp",
    "layers": "pp", "norm": None, "act_tokens": None, "act_embed": None,
}

PRESETS: dict[str, dict[str, MeshAxes]] = {
    "megatron": _MEGATRON,
    # Embedding and LM head replicated: no collective around the vocabulary, more memory per device.
    "replicated-vocab": {**_MEGATRON, "vocab": None},
    # Sequence-parallel residual stream: between layers the tokens are split over tp, so the
    # attention/MLP all-reduces become reduce-scatter + all-gather and the norms run on 1/tp of
    # the tokens.
    "sequence-parallel": {**_MEGATRON, "act_tokens": "tp"},
    # Embedding and LM head split over every device (stages too): with pipeline stages the
    # vocabulary matrices otherwise sit whole on each stage (2 GB per stage for Llama-3-70B).
    "vocab-over-stages": {**_MEGATRON, "vocab": ("pp", "tp")},
    # Only the MLP split; attention weights and the KV cache replicated (small attention matrices).
    "mlp-only": {**_MEGATRON, "q_heads": None, "kv_heads": None},
    # Every matrix split on its input/hidden side instead: one all-reduce per matmul. A
    # deliberately different layout for comparisons; it must give the same outputs.
    "embed-parallel": {**_MEGATRON, "vocab": None, "q_heads": None, "kv_heads": None, "mlp": None,
                       "embed": "tp"},
    # Nothing split over tp (layers still over pp): the data-movement-free baseline.
    "replicated": {**_MEGATRON, "vocab": None, "q_heads": None, "kv_heads": None, "mlp": None},
}
DEFAULT_PRESET = "megatron"


def _normalize(axis: str, value) -> MeshAxes:
    if value is None or value == "none" or value == "null":
        return None
    names = (value,) if isinstance(value, str) else tuple(value)
    for n in names:
        if not isinstance(n, str) or n not in MESH_AXES:
            raise ValueError(f"sharding rule for {axis!r}: mesh axis must be one of "
                             f"{', '.join(MESH_AXES)} or null; got {value!r}")
    if len(set(names)) != len(names):
        raise ValueError(f"sharding rule for {axis!r} repeats a mesh axis: {value!r}")
    if not names:
        return None
    return names[0] if len(names) == 1 else names


@dataclasses.dataclass(frozen=True)
class ShardingRules:
    """logical axis -> mesh axes; `name` says where it came from (for logs and benchmarks)."""

    rules: tuple[tuple[str, MeshAxes], ...]
    name: str = DEFAULT_PRESET

    def __post_init__(self):
        seen = set()
        for axis, value in self.rules:
            if axis not in LOGICAL_AXES:
                raise ValueError(f"unknown logical axis {axis!r} in sharding rules; known axes: "
                                 f"{', '.join(LOGICAL_AXES)}")
            if axis in seen:
                raise ValueError(f"logical axis {axis!r} appears twice in sharding rules")
            seen.add(axis)
            _normalize(axis, value)

    @classmethod
    def from_mapping(cls, mapping: Mapping[str, object], *, base: str = DEFAULT_PRESET,
                     name: Optional[str] = None) -> "ShardingRules":
        if base not in PRESETS:
            raise ValueError(f"unknown sharding preset {base!r}; presets: {', '.join(PRESETS)}")
        table = dict(PRESETS[base])
        for axis, value in mapping.items():
            if axis not in LOGICAL_AXES:
                raise ValueError(f"unknown logical axis {axis!r} in sharding rules; known axes: "
                                 f"{', '.join(LOGICAL_AXES)}")
            table[axis] = _normalize(axis, value)
        return cls(tuple(table.items()), name=name or base)

    def as_dict(self) -> dict[str, MeshAxes]:
        return dict(self.rules)

    def mesh_axes(self, logical_axis: Optional[str]) -> MeshAxes:
        if logical_axis is None:
            return None
        table = self.as_dict()
        if logical_axis not in table:
            raise ValueError(f"no sharding rule for logical axis {logical_axis!r}")
        return table[logical_axis]


def preset(name: str) -> ShardingRules:
    if name not in PRESETS:
        raise ValueError(f"unknown sharding preset {name!r}; presets: {', '.join(PRESETS)}")
    return ShardingRules(tuple(PRESETS[name].items()), name=name)


def load_rules_file(path: str | os.PathLike) -> ShardingRules:
    """A JSON or YAML file: {"preset": base (optional), "rules": {logical axis: mesh axes}}.

    A bare mapping of logical axes (no "rules" key) is accepted too.
    """
    path = os.fspath(path)
    with open(path) as f:
        text = f.read()
    if path.endswith((".yaml", ".yml")):
        try:
            import yaml
        except ImportError:
            raise ValueError(f"{path}: reading YAML rules needs PyYAML; use a .json file") from None
        data = yaml.safe_load(text)
    else:
        try:
            data = json.loads(text)
        except ValueError as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, Mapping):
        raise ValueError(f"{path}: sharding rules must be a mapping, got {type(data).__name__}")
    if "rules" in data or "preset" in data:
        unknown = set(data) - {"rules", "preset"}
        if unknown:
            raise ValueError(f"{path}: unknown keys {sorted(unknown)} (expected 'preset', 'rules')")
        base = data.get("preset", DEFAULT_PRESET)
        mapping = data.get("rules") or {}
        if not isinstance(mapping, Mapping):
            raise ValueError(f"{path}: 'rules' must be a mapping of logical axis -> mesh axes")
    else:
        base, mapping = DEFAULT_PRESET, data
    return ShardingRules.from_mapping(mapping, base=base, name=os.path.basename(path))


def resolve_rules(spec: "str | os.PathLike | ShardingRules | Mapping | None") -> ShardingRules:
    """`--sharding-rules`: None (the default preset), a preset name, a rules file, a mapping."""
    if spec is None:
        return preset(DEFAULT_PRESET)
    if isinstance(spec, ShardingRules):
        return spec
    if isinstance(spec, Mapping):
        return ShardingRules.from_mapping(spec, name="custom")
    spec = os.fspath(spec)
    if spec in PRESETS:
        return preset(spec)
    if os.path.isfile(spec):
        return load_rules_file(spec)
    raise ValueError(f"sharding rules {spec!r} is neither a preset ({', '.join(PRESETS)}) nor an "
                     "existing rules file")
