"""The parameter tree every decoder family shares: names, shapes and logical axes.

Weights are stored ``[in, out]`` (x @ W) and the decoder layers are stacked on a leading ``layers``
axis so the forward scans over them. Loaders produce exactly these keys; the sharding rules table
maps the logical axis names to mesh axes.

    embed              [vocab, embed]
    layers/attn_norm   [layers, embed]
    layers/wq          [layers, embed, q_heads * head_dim]
    layers/wk, wv      [layers, embed, kv_heads * head_dim]
    layers/bq          [layers, q_heads * head_dim]          (attention_bias)
    layers/bk, bv      [layers, kv_heads * head_dim]         (attention_bias)
    layers/q_norm      [layers, head_dim]                     (qk_norm)
    layers/k_norm      [layers, head_dim]                     (qk_norm)
    layers/wo          [layers, q_heads * head_dim, embed]
    layers/post_attn_norm [layers, embed]                     (Gemma: norm of the attention output)
    layers/mlp_norm    [layers, embed]
    layers/post_mlp_norm  [layers, embed]                     (Gemma: norm of the MLP output)
    layers/w_gate      [layers, embed, mlp]
    layers/w_up        [layers, embed, mlp]
    layers/w_down      [layers, mlp, embed]
    final_norm         [embed]
    lm_head            [embed, vocab]                         (untied embeddings only)
"""

from __future__ import annotations

from model_zoo.config import ModelConfig


def param_specs(config: ModelConfig) -> dict[str, tuple[tuple[int, ...], tuple[str, ...]]]:
    """name -> (shape, logical axes) for this config, in a stable order."""
    c = config
    L, E, F, V, D = c.num_layers, c.hidden_size, c.intermediate_size, c.vocab_size, c.head_dim
    qd, kd = c.num_heads * D, c.num_kv_heads * D
    specs: dict[str, tuple[tuple[int, ...], tuple[str, ...]]] = {
        "embed": ((V, E), ("vocab", "embed")),
        "layers/attn_norm": ((L, E), ("layers", "norm")),
        "layers/wq": ((L, E, qd), ("layers", "embed", "q_heads")),
        "layers/wk": ((L, E, kd), ("layers", "embed", "kv_heads")),
        "layers/wv": ((L, E, kd), ("layers", "embed", "kv_heads")),
    }
    if c.attention_bias:
        specs["layers/bq"] = ((L, qd), ("layers", "q_heads"))
        specs["layers/bk"] = ((L, kd), ("layers", "kv_heads"))
        specs["layers/bv"] = ((L, kd), ("layers", "kv_heads"))
    if c.qk_norm:
        specs["layers/q_norm"] = ((L, D), ("layers", "norm"))
        specs["layers/k_norm"] = ((L, D), ("layers", "norm"))
    specs["layers/wo"] = ((L, qd, E), ("layers", "q_heads", "embed"))
    if c.is_gemma:
        specs["layers/post_attn_norm"] = ((L, E), ("layers", "norm"))
    specs["layers/mlp_norm"] = ((L, E), ("layers", "norm"))
    if c.is_gemma:
        specs["layers/post_mlp_norm"] = ((L, E), ("layers", "norm"))
    specs.update({
        "layers/w_gate": ((L, E, F), ("layers", "embed", "mlp")),
        "layers/w_up": ((L, E, F), ("layers", "embed", "mlp")),
        "layers/w_down": ((L, F, E), ("layers", "mlp", "embed")),
        "final_norm": ((E,), ("norm",)),
    })
    if not c.tie_word_embeddings:
        specs["lm_head"] = ((E, V), ("embed", "vocab"))
    return specs
