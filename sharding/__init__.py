"""Meshes, logical-axis rules and layouts (tensor / pipeline parallel); imports jax only.

    layout = build_layout(config, tensor_parallel_size=2, pipeline_parallel_size=1,
                          rules="megatron")            # or a rules file path, or None
    params = load_weights(resolved, dtype, sharding_for=layout.sharding_for)
"""

from __future__ import annotations

from sharding.layout import ShardingLayout
from sharding.mesh import initialize_distributed, make_mesh
from sharding.rules import PRESETS, ShardingRules, load_rules_file, preset, resolve_rules


def build_layout(config, *, tensor_parallel_size: int = 1, pipeline_parallel_size: int = 1,
                 rules=None, devices=None) -> ShardingLayout:
    """Mesh from the parallel sizes + rules (preset name, rules file, mapping or None)."""
    mesh = make_mesh(tensor_parallel_size, pipeline_parallel_size, devices=devices)
    return ShardingLayout(config, mesh, resolve_rules(rules))


__all__ = ["ShardingLayout", "ShardingRules", "PRESETS", "build_layout", "initialize_distributed",
           "load_rules_file", "make_mesh", "preset", "resolve_rules"]
