"""The Llama-family decoder (Llama 2/3/3.1, Mistral, SmolLM/SmolLM2, Qwen2/2.5, Qwen3) as a Flax NNX module.

Two forwards share one layer body:

* ``__call__`` — serving: a flat, ragged batch of tokens ``[T]`` (positions and owning sequence per
  token in :class:`AttentionMetadata`) reading and writing the paged KV cache, returning logits only
  at ``logits_indices`` (usually the last token of each sequence).
* ``forward_dense`` — a plain causal forward over ``[B, S]`` with no cache, for tests.

Decoder layers are stacked on a leading axis and scanned (compile time independent of depth); the KV
cache rides in the scan carry; each layer's attention function writes this step's K/V into its slice
in place (a scatter, or inside the decode kernel) and reads it (model_zoo/attention.py's contract).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from model_zoo.attention import AttentionFn, AttentionMetadata, paged_attention_xla
from model_zoo.config import ModelConfig, rope_inv_freq
from model_zoo.params import param_specs


class DecoderLayers(nnx.Module):
    """Holds the stacked per-layer weights (leading axis = layer)."""


class LlamaForCausalLM(nnx.Module):
    def __init__(self, config: ModelConfig, params: dict[str, jax.Array], *,
                 attention_fn: AttentionFn = paged_attention_xla):
        specs = param_specs(config)
        missing = sorted(set(specs) - set(params))
        extra = sorted(set(params) - set(specs))
        if missing or extra:
            raise ValueError(f"parameter tree does not match {config.architecture}: "
                             f"missing {missing}, unexpected {extra}")
        self.config = config
        self.attention_fn = attention_fn
        self.layers = DecoderLayers()
        for name, (shape, axes) in specs.items():
            value = params[name]
            if tuple(value.shape) != shape:
                raise ValueError(f"parameter {name!r} has shape {tuple(value.shape)}, expected {shape}")
            param = nnx.Param(value, logical_axes=axes)
            if name.startswith("layers/"):
                setattr(self.layers, name.split("/", 1)[1], param)
            else:
                setattr(self, name, param)
        inv_freq, mscale = rope_inv_freq(config)
        self._inv_freq = inv_freq.astype(np.float32)   # static constant, not a parameter
        self._rope_mscale = mscale

    # Sharding hooks, set by sharding.ShardingLayout.attach (model code names logical axes only):
    # constrain(x, logical_axes) places an activation; layer_stack(layer_fn, h, kv, params,
    # per_token, shared) runs the stacked layers (e.g. as pipeline stages). None: no constraint,
    # one plain scan (scan_layers).
    constrain = None
    layer_stack = None

    def _shard(self, x, logical_axes):
        return x if self.constrain is None else self.constrain(x, logical_axes)

    # ---------------------------------------------------------------- pieces
    @property
    def dtype(self):
        return self.embed[...].dtype

    def _rms(self, x, w):
        xf = x.astype(jnp.float32)
        xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.config.rms_norm_eps)
        return (w.astype(jnp.float32) * xf).astype(x.dtype)

    def _rope(self, x, positions):
        """x: [T, heads, D] rotated by absolute positions [T] (half-split layout, as transformers)."""
        freqs = positions.astype(jnp.float32)[:, None] * jnp.asarray(self._inv_freq)[None, :]
        cos = (jnp.cos(freqs) * self._rope_mscale)[:, None, :]
        sin = (jnp.sin(freqs) * self._rope_mscale)[:, None, :]
        xf = x.astype(jnp.float32)
        x1, x2 = jnp.split(xf, 2, axis=-1)
        out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
        return out.astype(x.dtype)

    def _qkv(self, h, p):
        """Attention input: pre-norm, q/k/v projections (+ bias), heads split, q/k norm; no rope."""
        c = self.config
        t = h.shape[0]
        x = self._rms(h, p["attn_norm"])
        q, k, v = x @ p["wq"], x @ p["wk"], x @ p["wv"]
        if c.attention_bias:
            q, k, v = q + p["bq"], k + p["bk"], v + p["bv"]
        q = q.reshape(t, c.num_heads, c.head_dim)
        k = k.reshape(t, c.num_kv_heads, c.head_dim)
        v = v.reshape(t, c.num_kv_heads, c.head_dim)
        if c.qk_norm:
            q, k = self._rms(q, p["q_norm"]), self._rms(k, p["k_norm"])
        return q, k, v

    def _layer(self, h, p, positions, attend):
        """One decoder layer on flat tokens h: [T, E]. ``attend(q, k, v) -> [T, H, D]``."""
        c = self.config
        t = h.shape[0]
        q, k, v = self._qkv(h, p)
        q, k = self._rope(q, positions), self._rope(k, positions)
        o = attend(q, k, v)
        resid = ("act_tokens", "act_embed")
        h = self._shard(h + o.reshape(t, c.num_heads * c.head_dim) @ p["wo"], resid)
        x = self._rms(h, p["mlp_norm"])
        mlp = (jax.nn.silu(x @ p["w_gate"]) * (x @ p["w_up"])) @ p["w_down"]
        return self._shard(h + mlp, resid)

    def _layer_params(self):
        return {name: var[...] for name, var in vars(self.layers).items()
                if isinstance(var, nnx.Param)}

    def _logits(self, h):
        h = self._rms(h, self.final_norm[...])
        if self.config.tie_word_embeddings:
            logits = h @ self.embed[...].T
        else:
            logits = h @ self.lm_head[...]
        return logits.astype(jnp.float32)

    # ---------------------------------------------------------------- forwards
    def __call__(self, tokens, kv_cache, md: AttentionMetadata, logits_indices, *, return_hidden: bool = False):
        """Serving forward.

        tokens: [T] int32; kv_cache: (k_cache, v_cache) each [L, Hkv, P, page, D];
        logits_indices: [S] int32 rows of the flat batch whose logits are returned.
        Returns (logits [S, V] float32, new kv_cache), plus the final hidden states [T, E] (before the
        final norm; feed them to ``logits_from_hidden``) when ``return_hidden``.
        """
        c = self.config
        scale = c.head_dim ** -0.5
        h = self._shard(jnp.take(self.embed[...], tokens, axis=0), ("act_tokens", "act_embed"))
        # Per-token metadata may be split into pipeline micro-batches; per-sequence metadata is not.
        token_index = jnp.arange(tokens.shape[0], dtype=jnp.int32)
        per_token = (md.positions, md.token_seq_ids, md.slot_mapping, token_index)
        shared = (md.block_tables, md.seq_lens, md.query_start_loc)

        def layer_fn(h, kv, p, layer, per_token, shared, valid):
            """One layer on (a micro-batch of) the tokens; ``layer`` indexes ``kv``'s leading axis.
            ``valid`` False (a pipeline bubble) gives every token the out-of-range slot: no writes."""
            positions, seq_ids, slots, index = per_token
            block_tables, seq_lens, qsl = shared
            k_cache, v_cache = kv
            slots = jnp.where(valid, slots, k_cache.shape[2] * k_cache.shape[3])
            # A micro-batch holds tokens [index[0], index[0] + len): rebase each sequence's query
            # range onto it (empty for sequences outside). Keys stay causal by position, so a
            # prompt split over micro-batches sees exactly the keys written before it.
            qsl = jnp.clip(qsl - index[0], 0, index.shape[0])
            md_mb = AttentionMetadata(positions, seq_ids, slots, block_tables, seq_lens, qsl)
            cache = {}

            def attend(q, k, v):
                # The backend writes k/v at the slots (possibly inside its kernel) and attends.
                out, kc, vc = self.attention_fn(q, k_cache, v_cache, layer, md_mb, scale=scale,
                                                sliding_window=c.sliding_window, new_kv=(k, v))
                cache["kv"] = (kc, vc)
                return out

            h = self._layer(h, p, positions, attend)
            return h, cache["kv"]

        run_layers = self.layer_stack or scan_layers
        h, (k_cache, v_cache) = run_layers(layer_fn, h, tuple(kv_cache), self._layer_params(),
                                           per_token, shared)
        logits = self._logits(h[logits_indices])
        if return_hidden:
            return logits, (k_cache, v_cache), h
        return logits, (k_cache, v_cache)

    def logits_from_hidden(self, h):
        """Float32 logits of final hidden states [R, E] (e.g. every prompt position for prompt logprobs)."""
        return self._logits(h)

    def forward_dense(self, tokens):
        """Plain causal forward, no cache. tokens: [B, S] -> logits [B, S, V] (right padding is harmless)."""
        c = self.config
        b, s = tokens.shape
        scale = c.head_dim ** -0.5
        positions = jnp.tile(jnp.arange(s, dtype=jnp.int32), b)
        h = jnp.take(self.embed[...], tokens.reshape(-1), axis=0)
        causal = jnp.tril(jnp.ones((s, s), dtype=bool))
        if c.sliding_window is not None:
            causal &= ~jnp.tril(jnp.ones((s, s), dtype=bool), -c.sliding_window)
        g = c.num_query_groups

        def attend(q, k, v):
            q = q.reshape(b, s, c.num_kv_heads, g, c.head_dim).astype(jnp.float32)
            k = k.reshape(b, s, c.num_kv_heads, c.head_dim).astype(jnp.float32)
            v = v.reshape(b, s, c.num_kv_heads, c.head_dim).astype(jnp.float32)
            sc = jnp.einsum("bqkgd,bckd->bkgqc", q, k) * scale
            sc = jnp.where(causal[None, None, None], sc, -jnp.inf)
            o = jnp.einsum("bkgqc,bckd->bqkgd", jax.nn.softmax(sc, axis=-1), v)
            return o.reshape(b * s, c.num_heads, c.head_dim).astype(h.dtype)

        def body(h, p):
            return self._layer(h, p, positions, attend), None

        h, _ = jax.lax.scan(body, h, self._layer_params())
        return self._logits(h).reshape(b, s, -1)


def scan_layers(layer_fn, h, kv, params, per_token, shared):
    """The default layer stack: one scan over all layers of ``params`` (stacked on axis 0)."""
    num_layers = jax.tree.leaves(params)[0].shape[0]

    def body(carry, xs):
        h, kv = carry
        p, layer = xs
        return layer_fn(h, kv, p, layer, per_token, shared, True), None

    (h, kv), _ = jax.lax.scan(body, (h, kv), (params, jnp.arange(num_layers, dtype=jnp.int32)))
    return h, kv


def unrolled_layers(layer_fn, h, kv, params, per_token, shared):
    """The layers as straight-line code, one slice of the stacked weights each.

    The GPU default: on an H100, Llama-3.1-8B bf16 batch-1 decode took 17.65 ms a token with the
    scan and 8.37 ms unrolled (benchmarks/gpu_layers_probe.py, results/2026-11-21-h100-layers-probe.json):
    XLA materialises each scanned layer's weight slice instead of feeding the GEMMs in place. The
    price is compile time that grows with depth, which the persistent compilation cache absorbs.
    """
    num_layers = jax.tree.leaves(params)[0].shape[0]
    for i in range(num_layers):
        h, kv = layer_fn(h, kv, jax.tree.map(lambda a, i=i: a[i], params), jnp.int32(i), per_token, shared, True)
    return h, kv


def kv_cache_spec(config: ModelConfig, num_pages: int, page_size: int, dtype, sharding=None):
    """The cache as (k, v) ShapeDtypeStructs: what executables are compiled against before (or
    without) allocating it."""
    shape = (config.num_layers, config.num_kv_heads, num_pages, page_size, config.head_dim)
    spec = jax.ShapeDtypeStruct(shape, jnp.dtype(dtype), sharding=sharding)
    return spec, spec


def init_kv_cache(config: ModelConfig, num_pages: int, page_size: int, dtype, sharding=None):
    """Zeroed (k_cache, v_cache), each [L, Hkv, num_pages, page_size, D] (``kv_cache_spec``)."""
    spec, _ = kv_cache_spec(config, num_pages, page_size, dtype)

    def make():
        return jnp.zeros(spec.shape, spec.dtype), jnp.zeros(spec.shape, spec.dtype)

    if sharding is None:
        return jax.jit(make)()
    return jax.jit(make, out_shardings=(sharding, sharding))()
