"""Multi-head latent attention (DeepSeek-V2/V3).

Keys and values of every head are projections of one small per-token latent
(`kv_lora_rank` wide) plus one shared rotary key part (`qk_rope_head_dim`), so the
KV cache holds only `[latent, rotary key]` per token. Attention runs in the
latent space ("weight absorption"): each head's no-position query is mapped
into the latent space by its key up-projection, scored against the cached
latents, and the attention-weighted latent is mapped out by the head's value
up-projection. This is exactly softmax(q k^T) v of the expanded form, computed
without ever expanding per-head keys and values.

Rotary dimensions use this project's "rotate half" layout. DeepSeek's own
checkpoints rotate interleaved pairs; the importer permutes the rows producing
the rotary parts (`eaas_jax.checkpoint.hf`), which leaves every q.k product,
and so the model, unchanged.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from eaas_jax.kernels.attention import grouped_query_attention
from eaas_jax.model.attention import LayerCache, PagedAttentionInputs, attend_to
from eaas_jax.model.config import ModelConfig
from eaas_jax.model.layers import RMSNorm, linear
from eaas_jax.model.rope import apply_rope, rope_frequencies, yarn_mscale

# DeepSeek normalises its low-rank latents with a fixed epsilon, not the
# config's rms_norm_eps.
_LATENT_NORM_EPS = 1e-6


def mla_softmax_scale(config: ModelConfig) -> float:
    """1/sqrt(qk head dim), times YaRN's mscale^2 when the context is extended."""
    scale = (config.qk_nope_head_dim + config.qk_rope_head_dim) ** -0.5
    scaling = config.rope_scaling or {}
    if scaling.get("rope_type") == "yarn" and scaling.get("mscale_all_dim"):
        scale *= yarn_mscale(scaling["factor"], scaling["mscale_all_dim"]) ** 2
    return scale


class MultiHeadLatentAttention(nnx.Module):
    def __init__(self, config: ModelConfig, *, dtype, rngs: nnx.Rngs):
        c = self.config = config
        d, h = c.hidden_size, c.num_heads
        qk_dim = c.qk_nope_head_dim + c.qk_rope_head_dim
        if c.q_lora_rank:
            self.q_a_proj = linear(d, c.q_lora_rank, dtype=dtype, rngs=rngs)
            self.q_a_layernorm = RMSNorm(c.q_lora_rank, eps=_LATENT_NORM_EPS, dtype=dtype)
            self.q_b_proj = linear(c.q_lora_rank, h * qk_dim, dtype=dtype, rngs=rngs)
        else:
            self.q_proj = linear(d, h * qk_dim, dtype=dtype, rngs=rngs)
        self.kv_a_proj_with_mqa = linear(d, c.kv_lora_rank + c.qk_rope_head_dim, dtype=dtype, rngs=rngs)
        self.kv_a_layernorm = RMSNorm(c.kv_lora_rank, eps=_LATENT_NORM_EPS, dtype=dtype)
        self.kv_b_proj = linear(
            c.kv_lora_rank, h * (c.qk_nope_head_dim + c.v_head_dim), dtype=dtype, rngs=rngs
        )
        self.o_proj = linear(h * c.v_head_dim, d, dtype=dtype, rngs=rngs)

    def _queries(self, x: jax.Array) -> jax.Array:
        c = self.config
        if c.q_lora_rank:
            q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        else:
            q = self.q_proj(x)
        return q.reshape(*x.shape[:2], c.num_heads, c.qk_nope_head_dim + c.qk_rope_head_dim)

    def __call__(
        self,
        x: jax.Array,
        positions: jax.Array,
        cache: LayerCache | None = None,
        paged: PagedAttentionInputs | None = None,
    ) -> tuple[jax.Array, LayerCache | None]:
        """Same contract as `Attention.__call__`; the cache holds latents."""
        c = self.config
        nope, rank = c.qk_nope_head_dim, c.kv_lora_rank
        inv_freq, rope_scale = rope_frequencies(c.qk_rope_head_dim, c.rope_theta, c.rope_scaling)

        q = self._queries(x)
        q_nope = q[..., :nope]
        q_rope = apply_rope(q[..., nope:], positions, inv_freq, rope_scale)
        compressed = self.kv_a_proj_with_mqa(x)
        latent = self.kv_a_layernorm(compressed[..., :rank])[:, :, None, :]  # [B, T, 1, r]
        k_rope = apply_rope(compressed[..., None, rank:], positions, inv_freq, rope_scale)

        # kv_b_proj maps a latent to every head's [no-position key, value].
        up = self.kv_b_proj.kernel[...].reshape(rank, c.num_heads, nope + c.v_head_dim)
        key_up, value_up = up[..., :nope], up[..., nope:]
        q_latent = jnp.einsum("bthn,rhn->bthr", q_nope, key_up, preferred_element_type=jnp.float32)
        queries = jnp.concatenate([q_latent.astype(q.dtype), q_rope], axis=-1)
        new_keys = jnp.concatenate([latent, k_rope], axis=-1)  # [B, T, 1, r + rope]
        empty_values = new_keys[..., :0]
        keys, _, key_positions, cache = attend_to(cache, paged, new_keys, empty_values, positions)
        out_latent = grouped_query_attention(
            queries, keys, keys[..., :rank], positions, key_positions, scale=mla_softmax_scale(c)
        )
        out = jnp.einsum("bthr,rhv->bthv", out_latent, value_up, preferred_element_type=jnp.float32)
        return self.o_proj(out.astype(x.dtype).reshape(*x.shape[:2], -1)), cache
