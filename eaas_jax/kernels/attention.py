"""Causal grouped-query attention: the entry point per-platform kernels plug into."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def grouped_query_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    q_positions: jax.Array,
    k_positions: jax.Array,
    scale: float | None = None,
) -> jax.Array:
    """Softmax attention where a query sees the keys at positions <= its own.

    q: [B, T, H, D]; k: [B, S, KV, D], v: [B, S, KV, Dv] with H a multiple of KV;
    q_positions: [B, T]; k_positions: [B, S]. Scores are scaled by `scale`
    (default D ** -0.5). Returns [B, T, H, Dv] in q's dtype. Scores and softmax
    are computed in float32.
    """
    batch, seq, heads, dim = q.shape
    scale = dim**-0.5 if scale is None else scale
    kv_heads = k.shape[2]
    group = heads // kv_heads
    q = q.reshape(batch, seq, kv_heads, group, dim)
    scores = jnp.einsum(
        "btkgd,bskd->bkgts", q, k, preferred_element_type=jnp.float32
    ) * scale
    visible = k_positions[:, None, None, None, :] <= q_positions[:, None, None, :, None]
    scores = jnp.where(visible, scores, -jnp.inf)
    probs = jax.nn.softmax(scores, axis=-1)
    out = jnp.einsum("bkgts,bskd->btkgd", probs.astype(v.dtype), v, preferred_element_type=jnp.float32)
    return out.reshape(batch, seq, heads, v.shape[-1]).astype(q.dtype)
