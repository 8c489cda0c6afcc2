"""A layout: rules resolved against one mesh and one model config.

    layout = ShardingLayout(config, make_mesh(tp, pp), resolve_rules("megatron"))
    params = load_weights(resolved, dtype, sharding_for=layout.sharding_for)
    kv = init_kv_cache(config, pages, page_size, dtype, sharding=layout.kv_cache_sharding())

Divisibility is decided here, once, per logical axis (a dimension is split only if every device
gets an equal, head-aligned share):

* q_heads, mlp, embed, layers: a size that does not divide is a clear ValueError (padding heads
  would change the per-device work and is not worth the equivalence proof here);
* kv_heads: replicated when tp exceeds the number of KV heads or does not divide it — every device
  then holds all KV heads of its stage (vLLM does the same), and its query heads pick theirs
  (sharding/attention.py: attention runs per head shard, so a Pallas kernel needs no gather);
* vocab: replicated when the vocabulary does not divide (a memory cost, logged, never an error).
"""

from __future__ import annotations

import logging
import math
from typing import Optional

import jax
from jax.sharding import NamedSharding, PartitionSpec

from sharding.rules import MeshAxes, ShardingRules

logger = logging.getLogger("jaxllm")


def _axes_tuple(value: MeshAxes) -> tuple[str, ...]:
    if value is None:
        return ()
    return (value,) if isinstance(value, str) else tuple(value)


class ShardingLayout:
    KV_CACHE_AXES = ("layers", "kv_heads", None, None, None)   # [L, Hkv, pages, page_size, D]

    def __init__(self, config, mesh: jax.sharding.Mesh, rules: ShardingRules):
        self.config = config
        self.mesh = mesh
        self.rules = rules
        self.table = self._resolve(config, mesh, rules)

    # ------------------------------------------------------------------ resolution
    def axis_size(self, value: MeshAxes) -> int:
        return math.prod(self.mesh.shape[a] for a in _axes_tuple(value))

    def _resolve(self, c, mesh, rules) -> dict[str, MeshAxes]:
        table = rules.as_dict()
        for axis in {m for val in table.values() for m in _axes_tuple(val)}:
            if axis not in mesh.shape:
                raise ValueError(f"sharding rules name mesh axis {axis!r}, not in the mesh "
                                 f"{dict(mesh.shape)}")
        size = lambda a: self.axis_size(table[a])  # noqa: E731

        def require(axis: str, dim: int, what: str, hint: str = ""):
            n = size(axis)
            if n > 1 and dim % n:
                raise ValueError(f"{what} ({dim}) is not divisible by the {n} devices of mesh axes "
                                 f"{_axes_tuple(table[axis])} that logical axis {axis!r} is split "
                                 f"over (layout {rules.name!r}){hint}")

        tp_hint = "; choose a tensor_parallel_size that divides it"
        require("q_heads", c.num_heads, "the number of attention heads", tp_hint)
        require("mlp", c.intermediate_size, "the MLP intermediate size", tp_hint)
        require("embed", c.hidden_size, "the hidden size")
        require("layers", c.num_layers, "the number of layers",
                "; choose a pipeline_parallel_size that divides it")
        n = size("kv_heads")
        if n > 1 and c.num_kv_heads % n:
            logger.info("KV heads (%d) do not split over %d devices: K/V projections and the KV "
                        "cache are replicated across them", c.num_kv_heads, n)
            table["kv_heads"] = None
        n = size("vocab")
        if n > 1 and c.vocab_size % n:
            logger.warning("Vocabulary (%d) does not split over %d devices: embedding and LM head "
                           "are replicated", c.vocab_size, n)
            table["vocab"] = None
        return table

    # ------------------------------------------------------------------ shardings
    def spec(self, logical_axes: tuple[Optional[str], ...]) -> PartitionSpec:
        """PartitionSpec for an array whose dimensions carry these logical axes.

        A mesh axis may split only one dimension of an array: a later dimension asking for a mesh
        axis already used by an earlier one stays replicated (e.g. "embed-parallel" on a square
        matrix whose both axes map to tp).
        """
        out, used = [], set()
        for a in logical_axes:
            # Mesh axes of size 1 split nothing; leaving them out keeps specs readable.
            names = tuple(x for x in _axes_tuple(self.table.get(a) if a else None)
                          if x not in used and self.mesh.shape[x] > 1)
            used.update(names)
            out.append(None if not names else names[0] if len(names) == 1 else names)
        while out and out[-1] is None:
            out.pop()
        return PartitionSpec(*out)

    def sharding(self, logical_axes: tuple[Optional[str], ...]) -> NamedSharding:
        return NamedSharding(self.mesh, self.spec(logical_axes))

    def sharding_for(self, name: str, shape: tuple, logical_axes: tuple) -> NamedSharding:
        """The loader's hook: where parameter `name` lives."""
        if len(shape) != len(logical_axes):
            raise ValueError(f"parameter {name!r}: {len(shape)} dims but logical axes {logical_axes}")
        return self.sharding(tuple(logical_axes))

    def replicated(self) -> NamedSharding:
        return NamedSharding(self.mesh, PartitionSpec())

    def kv_cache_sharding(self) -> NamedSharding:
        """k_cache / v_cache [L, Hkv, P, page, D]: layers over stages, KV heads over tp."""
        return self.sharding(self.KV_CACHE_AXES)

    @property
    def kv_cache_shards(self) -> int:
        """How many devices one KV page is split over (each holds 1/n of its bytes)."""
        mesh_axes = [m for entry in self.spec(self.KV_CACHE_AXES) for m in _axes_tuple(entry)]
        return self.axis_size(tuple(mesh_axes) or None)

    @property
    def pipeline_stages(self) -> int:
        return self.axis_size(self.table["layers"])

    @property
    def pipeline_axis(self) -> Optional[str]:
        axes = _axes_tuple(self.table["layers"])
        if len(axes) > 1:
            raise ValueError(f"the layers axis may map to one mesh axis; got {axes}")
        return axes[0] if axes and self.mesh.shape[axes[0]] > 1 else None

    def constrain(self, x, logical_axes: tuple[Optional[str], ...]):
        """Activation sharding hook for model code (logical names in, mesh placement out).

        Axes mapped to the pipeline axis are dropped: inside a pipeline stage that axis is manual.
        """
        pp = self.pipeline_axis
        names = []
        for a in logical_axes:
            axes = tuple(m for m in _axes_tuple(self.table.get(a) if a else None) if m != pp)
            names.append(None if not axes else axes[0] if len(axes) == 1 else axes)
        spec = PartitionSpec(*names)
        ambient = jax.sharding.get_abstract_mesh()
        if not ambient.empty and ambient.manual_axes:
            # Inside the pipeline's shard_map the ambient mesh is the abstract one with pp
            # manual; a bare PartitionSpec resolves against it.
            return jax.lax.with_sharding_constraint(x, spec)
        return jax.lax.with_sharding_constraint(x, NamedSharding(self.mesh, spec))

    def _split_axes(self, logical_axis: str) -> tuple[str, ...]:
        """Mesh axes (size > 1, pipeline axis excluded) that split a logical axis."""
        pp = self.pipeline_axis
        return tuple(m for m in _axes_tuple(self.table.get(logical_axis))
                     if m != pp and self.mesh.shape[m] > 1)

    def shard_local_attention(self, attention_fn):
        """`attention_fn` run per head shard (sharding/attention.py): a Pallas kernel, which GSPMD
        cannot partition, then sees only its device's heads and needs no collective."""
        heads, kv = self._split_axes("q_heads"), self._split_axes("kv_heads")
        if not heads or hasattr(attention_fn, "shard_local"):
            return attention_fn
        if kv and kv != heads:
            logger.warning("KV heads split over %s but query heads over %s: attention is left to "
                           "GSPMD (a Pallas kernel would be gathered)", kv, heads)
            return attention_fn
        from sharding.attention import shard_local_attention

        return shard_local_attention(attention_fn, self.mesh, self.config, heads, kv_split=bool(kv))

    def attach(self, model, *, num_micro_batches: Optional[int] = None,
               unroll_stage_layers: bool = False):
        """Install the layout's hooks on a model (activation constraints; shard-local attention;
        pipeline stages).

        Micro-batches default to the number of stages: enough to keep every stage busy in the
        steady state without making each micro-batch too small for the tensor cores.
        `unroll_stage_layers`: a stage runs its layers as straight-line code instead of a scan.
        """
        model.constrain = self.constrain
        model.attention_fn = self.shard_local_attention(model.attention_fn)
        pp = self.pipeline_axis
        if pp is not None:
            from sharding.pipeline import make_pipeline

            model.layer_stack = make_pipeline(self.mesh, pp, num_micro_batches or self.pipeline_stages,
                                              unroll=unroll_stage_layers)
        return model

    def describe(self) -> str:
        mesh = " x ".join(f"{k}={v}" for k, v in self.mesh.shape.items())
        rules = ", ".join(f"{k}->{v}" for k, v in self.table.items() if v is not None)
        return f"mesh {mesh}, layout {self.rules.name!r} ({rules or 'all replicated'})"
