"""Grouped-query attention over a paged KV cache.

The cache of one layer is a pool of fixed-size blocks, `[num_blocks, block_size,
num_kv_heads, head_dim]` for keys and the same for values. A sequence owns a list
of blocks (its row of `block_tables`); token at position p lives in slot
`block_tables[p // block_size] * block_size + p % block_size`. Memory therefore
grows with the tokens actually held, not with `max_model_len` per sequence.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from eaas_jax.kernels.attention import grouped_query_attention
from eaas_jax.model.config import ModelConfig
from eaas_jax.model.layers import RMSNorm, apply_rope, linear


class LayerCache(NamedTuple):
    """One layer's block pool."""

    k: jax.Array  # [num_blocks, block_size, num_kv_heads, head_dim]
    v: jax.Array


class PagedAttentionInputs(NamedTuple):
    """Where this step's tokens go in the cache and what each sequence can see.

    slot_mapping: [B, T] flat cache slot of each new token; padding tokens hold an
      out-of-range slot so their writes are dropped.
    block_tables: [B, M] block ids of each sequence (unused entries arbitrary).
    """

    slot_mapping: jax.Array
    block_tables: jax.Array


def init_layer_cache(config: ModelConfig, num_blocks: int, block_size: int, dtype) -> LayerCache:
    shape = (num_blocks, block_size, config.num_kv_heads, config.head_dim)
    return LayerCache(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype))


def _write(pool: jax.Array, slots: jax.Array, values: jax.Array) -> jax.Array:
    num_blocks, block_size, kv_heads, head_dim = pool.shape
    flat = pool.reshape(num_blocks * block_size, kv_heads, head_dim)
    flat = flat.at[slots.reshape(-1)].set(
        values.reshape(-1, kv_heads, head_dim).astype(pool.dtype), mode="drop"
    )
    return flat.reshape(pool.shape)


def _gather(pool: jax.Array, block_tables: jax.Array) -> jax.Array:
    """[B, M] block ids -> [B, M * block_size, kv_heads, head_dim] keys or values."""
    batch, max_blocks = block_tables.shape
    gathered = pool[block_tables]  # [B, M, block_size, kv, hd]
    return gathered.reshape(batch, max_blocks * pool.shape[1], *pool.shape[2:])


class Attention(nnx.Module):
    def __init__(self, config: ModelConfig, *, dtype, rngs: nnx.Rngs):
        self.config = config
        d, h, kv, hd = config.hidden_size, config.num_heads, config.num_kv_heads, config.head_dim
        bias = config.attention_bias
        self.q_proj = linear(d, h * hd, dtype=dtype, rngs=rngs, bias=bias)
        self.k_proj = linear(d, kv * hd, dtype=dtype, rngs=rngs, bias=bias)
        self.v_proj = linear(d, kv * hd, dtype=dtype, rngs=rngs, bias=bias)
        self.o_proj = linear(h * hd, d, dtype=dtype, rngs=rngs)
        if config.qk_norm:
            self.q_norm = RMSNorm(hd, eps=config.rms_norm_eps, dtype=dtype)
            self.k_norm = RMSNorm(hd, eps=config.rms_norm_eps, dtype=dtype)

    def _qkv(self, x: jax.Array, positions: jax.Array):
        c = self.config
        batch, seq = x.shape[:2]
        q = self.q_proj(x).reshape(batch, seq, c.num_heads, c.head_dim)
        k = self.k_proj(x).reshape(batch, seq, c.num_kv_heads, c.head_dim)
        v = self.v_proj(x).reshape(batch, seq, c.num_kv_heads, c.head_dim)
        if c.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        return apply_rope(q, positions, c.rope_theta), apply_rope(k, positions, c.rope_theta), v

    def __call__(
        self,
        x: jax.Array,
        positions: jax.Array,
        cache: LayerCache | None = None,
        paged: PagedAttentionInputs | None = None,
    ) -> tuple[jax.Array, LayerCache | None]:
        """x: [B, T, d], positions: [B, T].

        Without a cache, attends causally within x (training, reference forward).
        With one, writes the new keys/values to their slots and attends over each
        sequence's blocks up to its own position.
        """
        q, k, v = self._qkv(x, positions)
        if cache is None:
            out = grouped_query_attention(q, k, v, positions, positions)
        else:
            cache = LayerCache(
                _write(cache.k, paged.slot_mapping, k), _write(cache.v, paged.slot_mapping, v)
            )
            keys = _gather(cache.k, paged.block_tables)
            values = _gather(cache.v, paged.block_tables)
            key_positions = jnp.broadcast_to(
                jnp.arange(keys.shape[1], dtype=jnp.int32), keys.shape[:2]
            )
            out = grouped_query_attention(q, keys, values, positions, key_positions)
        batch, seq = x.shape[:2]
        return self.o_proj(out.reshape(batch, seq, -1)), cache
