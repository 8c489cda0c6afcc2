"""Gemma 2 and Gemma 3 (text) decoders as Flax NNX modules, on the Llama module's parameter tree.

What differs from model_zoo.llama, following transformers' Gemma2/Gemma3 modules:

* the embedding is multiplied by sqrt(hidden_size), rounded to the activation dtype first;
* RMSNorm scales by (1 + w) (zero-centred weights), computed in float32;
* "sandwich" norms: the attention output and the MLP output are normalised before the residual add
  (post_attn_norm, post_mlp_norm) besides the usual pre-norms;
* GeGLU MLP with the tanh approximation of gelu;
* attention scale query_pre_attn_scalar ** -0.5 and optional tanh soft-capping of attention scores
  (Gemma 2) and of the final logits;
* local (sliding-window) and global layers interleave (``config.layer_types``); Gemma 3's local
  layers use their own rope base (``rope_local_theta``) and no rope scaling, and q/k are RMS-normed.

The attention kernels take the window as a static argument, so a layer's kind must be known at trace
time. The layer kinds repeat with a period p (2 for Gemma 2, 6 for Gemma 3): the forward scans (or
hands to the sharding hook) ``num_layers // p`` groups of p layers, each group unrolled with static
kinds, then unrolls the ``num_layers % p`` remaining layers (e.g. Gemma 3 1B: 26 = 4 x 6 + 2). Compile
time grows with p, not with depth.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from model_zoo.attention import AttentionMetadata, paged_attention_xla
from model_zoo.config import GEMMA_ARCHITECTURES, ModelConfig, rope_inv_freq
from model_zoo.llama import AttentionFn, LlamaForCausalLM, scan_layers, unrolled_layers


def layer_period(layer_types: tuple[str, ...]) -> int:
    """The smallest p with layer_types[i] == layer_types[i % p] for every layer."""
    n = len(layer_types)
    for p in range(1, n + 1):
        if all(layer_types[i] == layer_types[i % p] for i in range(n)):
            return p
    return n


class GemmaForCausalLM(LlamaForCausalLM):
    """Gemma2ForCausalLM and Gemma3ForCausalLM (text only); the serving interface of LlamaForCausalLM."""

    def __init__(self, config: ModelConfig, params: dict[str, jax.Array], *,
                 attention_fn: AttentionFn = paged_attention_xla):
        if config.architecture not in GEMMA_ARCHITECTURES:
            raise ValueError(f"GemmaForCausalLM cannot run {config.architecture!r}; "
                             f"it implements {', '.join(GEMMA_ARCHITECTURES)}")
        super().__init__(config, params, attention_fn=attention_fn)
        # Global layers: rope_theta with rope_scaling (the parent's tables); local layers: their base.
        if config.rope_local_theta is not None:
            local = dataclasses.replace(config, rope_theta=config.rope_local_theta, rope_scaling=None)
            inv, mscale = rope_inv_freq(local)
            self._local_inv_freq, self._local_mscale = inv.astype(np.float32), mscale
        else:
            self._local_inv_freq, self._local_mscale = self._inv_freq, self._rope_mscale
        self._period = layer_period(config.layer_types)

    # ---------------------------------------------------------------- pieces
    def _rms(self, x, w):
        xf = x.astype(jnp.float32)
        xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.config.rms_norm_eps)
        return ((1.0 + w.astype(jnp.float32)) * xf).astype(x.dtype)

    def _rope_local(self, x, positions, local: bool):
        if not local:
            return self._rope(x, positions)
        freqs = positions.astype(jnp.float32)[:, None] * jnp.asarray(self._local_inv_freq)[None, :]
        cos = (jnp.cos(freqs) * self._local_mscale)[:, None, :]
        sin = (jnp.sin(freqs) * self._local_mscale)[:, None, :]
        xf = x.astype(jnp.float32)
        x1, x2 = jnp.split(xf, 2, axis=-1)
        return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)

    def _embed(self, tokens):
        h = jnp.take(self.embed[...], tokens, axis=0)
        # transformers rounds sqrt(hidden) to the activation dtype before multiplying (bf16: 48.0
        # for hidden 2304, not 48.0000...), so do we.
        return h * jnp.asarray(self.config.hidden_size ** 0.5, dtype=h.dtype)

    def _gemma_layer(self, h, p, positions, attend, local: bool):
        """One decoder layer on flat tokens h: [T, E]; ``local`` (static) picks the rope table."""
        c = self.config
        t = h.shape[0]
        q, k, v = self._qkv(h, p)
        q, k = self._rope_local(q, positions, local), self._rope_local(k, positions, local)
        o = attend(q, k, v).reshape(t, c.num_heads * c.head_dim) @ p["wo"]
        resid = ("act_tokens", "act_embed")
        h = self._shard(h + self._rms(o, p["post_attn_norm"]), resid)
        x = self._rms(h, p["mlp_norm"])
        mlp = (jax.nn.gelu(x @ p["w_gate"], approximate=True) * (x @ p["w_up"])) @ p["w_down"]
        return self._shard(h + self._rms(mlp, p["post_mlp_norm"]), resid)

    def _logits(self, h):
        logits = super()._logits(h)                 # final (1 + w) norm, tied or separate head, f32
        cap = self.config.final_logit_softcap
        if cap is not None:
            logits = jnp.tanh(logits / cap) * cap
        return logits

    def _window(self, j: int) -> int | None:
        """Sliding window of the j-th layer of a period (the same for every group)."""
        return self.config.layer_window(j)

    # ---------------------------------------------------------------- forwards
    def __call__(self, tokens, kv_cache, md: AttentionMetadata, logits_indices, *, return_hidden: bool = False):
        """Serving forward; same arguments and results as ``LlamaForCausalLM.__call__``."""
        c = self.config
        period = self._period
        num_groups, tail = divmod(c.num_layers, period)
        run_layers = self.layer_stack or scan_layers
        if tail and run_layers not in (scan_layers, unrolled_layers):
            # A pipeline splits the grouped weights over stages; the tail layers would straddle them.
            raise ValueError(
                f"{c.architecture}: a custom layer stack (pipeline parallelism) needs num_layers "
                f"({c.num_layers}) to be a multiple of the local/global layer pattern ({period})")
        h = self._shard(self._embed(tokens), ("act_tokens", "act_embed"))
        per_token = (md.positions, md.token_seq_ids, md.slot_mapping)
        shared = (md.block_tables, md.seq_lens, md.query_start_loc)

        def make_layer_fn(j: int):
            window = self._window(j)

            def layer_fn(h, kv, p, layer, per_token, shared, valid):
                positions, seq_ids, slots = per_token
                k_cache, v_cache = kv
                slots = jnp.where(valid, slots, k_cache.shape[2] * k_cache.shape[3])
                md_mb = AttentionMetadata(positions, seq_ids, slots, *shared)
                cache = {}

                def attend(q, k, v):
                    out, kc, vc = self.attention_fn(
                        q, k_cache, v_cache, layer, md_mb, scale=c.attention_scale,
                        soft_cap=c.attn_logit_softcap, sliding_window=window, new_kv=(k, v))
                    cache["kv"] = (kc, vc)
                    return out

                h = self._gemma_layer(h, p, positions, attend, window is not None)
                return h, cache["kv"]

            return layer_fn

        layer_fns = [make_layer_fn(j) for j in range(period)]

        def group_fn(h, kv, p, group, per_token, shared, valid):
            """``period`` consecutive layers; ``group`` indexes groups of ``kv``'s layer axis."""
            for j in range(period):
                h, kv = layer_fns[j](h, kv, jax.tree.map(lambda a, j=j: a[j], p), group * period + j,
                                     per_token, shared, valid)
            return h, kv

        params = self._layer_params()
        kv = tuple(kv_cache)
        if num_groups:
            grouped = jax.tree.map(
                lambda a: a[:num_groups * period].reshape(num_groups, period, *a.shape[1:]), params)
            h, kv = run_layers(group_fn, h, kv, grouped, per_token, shared)
        for j in range(tail):
            layer = num_groups * period + j
            h, kv = layer_fns[j](h, kv, jax.tree.map(lambda a: a[layer], params), jnp.int32(layer),
                                 per_token, shared, True)
        logits = self._logits(h[logits_indices])
        if return_hidden:
            return logits, kv, h
        return logits, kv

    def forward_dense(self, tokens):
        """Plain causal forward, no cache (tests). tokens: [B, S] -> logits [B, S, V]."""
        c = self.config
        b, s = tokens.shape
        positions = jnp.tile(jnp.arange(s, dtype=jnp.int32), b)
        h = self._embed(tokens.reshape(-1))
        qpos, kpos = jnp.arange(s)[:, None], jnp.arange(s)[None, :]
        g = c.num_query_groups
        params = self._layer_params()

        def make_attend(window):
            visible = kpos <= qpos
            if window is not None:
                visible &= kpos > qpos - window

            def attend(q, k, v):
                q = q.reshape(b, s, c.num_kv_heads, g, c.head_dim).astype(jnp.float32)
                k = k.reshape(b, s, c.num_kv_heads, c.head_dim).astype(jnp.float32)
                v = v.reshape(b, s, c.num_kv_heads, c.head_dim).astype(jnp.float32)
                sc = jnp.einsum("bqkgd,bckd->bkgqc", q, k) * c.attention_scale
                if c.attn_logit_softcap is not None:
                    sc = jnp.tanh(sc / c.attn_logit_softcap) * c.attn_logit_softcap
                sc = jnp.where(visible[None, None, None], sc, -jnp.inf)
                o = jnp.einsum("bkgqc,bckd->bqkgd", jax.nn.softmax(sc, axis=-1), v)
                return o.reshape(b * s, c.num_heads, c.head_dim).astype(h.dtype)

            return attend

        # Unrolled: a test-only path on tiny models, where per-layer static windows are simplest.
        for layer in range(c.num_layers):
            window = c.layer_window(layer)
            h = self._gemma_layer(h, jax.tree.map(lambda a: a[layer], params), positions,
                                  make_attend(window), window is not None)
        return self._logits(h).reshape(b, s, -1)


# The transformers class names, for readers looking them up.
Gemma2ForCausalLM = GemmaForCausalLM
Gemma3ForCausalLM = GemmaForCausalLM
