"""Grouped-query attention over a paged KV cache.

The cache of one layer is a pool of fixed-size blocks, `[num_kv_heads,
num_blocks, block_size, head_dim]` for keys and the same for values (kv-head
major, so a block of one head is contiguous: the layout the paged decode kernel
reads). A sequence owns a list of blocks (its row of `block_tables`); token at
position p lives in slot `block_tables[p // block_size] * block_size + p %
block_size`. Memory therefore grows with the tokens actually held, not with
`max_model_len` per sequence.

Decode steps (one new token per sequence) attend over the blocks in place
(`eaas_jax.kernels.paged_attention`); prefill gathers each sequence's blocks.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from eaas_jax.kernels import decode_prologue
from eaas_jax.kernels.attention import grouped_query_attention
from eaas_jax.kernels.cache_write import write_kv
from eaas_jax.kernels.paged_attention import gather_blocks, paged_decode_attention
from eaas_jax.model.config import ModelConfig
from eaas_jax.model.layers import RMSNorm, linear
from eaas_jax.model.rope import apply_rope, rope_cos_sin, rope_frequencies


class LayerCache(NamedTuple):
    """One layer's block pool."""

    k: jax.Array  # [num_kv_heads, num_blocks, block_size, head_dim]
    v: jax.Array

    @property
    def num_slots(self) -> int:
        return self.k.shape[1] * self.k.shape[2]


class PagedAttentionInputs(NamedTuple):
    """Where this step's tokens go in the cache and what each sequence can see.

    slot_mapping: [B, T] flat cache slot of each new token; padding tokens hold an
      out-of-range slot so their writes are dropped.
    block_tables: [B, M] block ids of each sequence (unused entries arbitrary).
    """

    slot_mapping: jax.Array
    block_tables: jax.Array


def init_layer_cache(config: ModelConfig, num_blocks: int, block_size: int, dtype) -> LayerCache:
    if config.attention == "mla":
        # One latent (and its rotary key part) per token, shared by every head;
        # the values are the latent itself, so `v` is empty.
        shape = (1, num_blocks, block_size, config.kv_lora_rank + config.qk_rope_head_dim)
        return LayerCache(jnp.zeros(shape, dtype), jnp.zeros(shape[:-1] + (0,), dtype))
    shape = (config.num_kv_heads, num_blocks, block_size, config.head_dim)
    return LayerCache(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype))


def kv_cache_bytes_per_token(config: ModelConfig, itemsize: int) -> int:
    """KV cache bytes one token takes over all layers."""
    if config.attention == "mla":
        per_layer = config.kv_lora_rank + config.qk_rope_head_dim
    else:
        per_layer = 2 * config.num_kv_heads * config.head_dim
    return config.num_layers * per_layer * itemsize


def write_cache(cache: LayerCache, paged: PagedAttentionInputs, k, v) -> LayerCache:
    """The cache with this step's keys/values [B, T, kv_heads, *] in their slots."""
    slots = paged.slot_mapping.reshape(-1)
    return LayerCache(*write_kv(cache.k, cache.v, slots, k.reshape(slots.size, *k.shape[2:]),
                                v.reshape(slots.size, *v.shape[2:])))


def attend_to(cache: LayerCache | None, paged: PagedAttentionInputs | None, k, v, positions):
    """The keys, values and key positions this step's queries attend over, and
    the updated cache: the new k/v alone without a cache; with one, the new k/v
    are written to their slots and each sequence's blocks are read back."""
    if cache is None:
        return k, v, positions, None
    cache = write_cache(cache, paged, k, v)
    keys = gather_blocks(cache.k, paged.block_tables)
    values = gather_blocks(cache.v, paged.block_tables)
    key_positions = jnp.broadcast_to(jnp.arange(keys.shape[1], dtype=jnp.int32), keys.shape[:2])
    return keys, values, key_positions, cache


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
            q_dim, k_dim = (hd, hd) if config.qk_norm_per_head else (h * hd, kv * hd)
            self.q_norm = RMSNorm(q_dim, eps=config.rms_norm_eps, dtype=dtype)
            self.k_norm = RMSNorm(k_dim, eps=config.rms_norm_eps, dtype=dtype)

    def _qkv(self, x: jax.Array, positions: jax.Array):
        c = self.config
        batch, seq = x.shape[:2]
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        if c.qk_norm and not c.qk_norm_per_head:
            q, k = self.q_norm(q), self.k_norm(k)
        if c.clip_qkv is not None:  # after the full-width norm, as OLMoE does
            q, k, v = (jnp.clip(t, -c.clip_qkv, c.clip_qkv) for t in (q, k, v))
        q = q.reshape(batch, seq, c.num_heads, c.head_dim)
        k = k.reshape(batch, seq, c.num_kv_heads, c.head_dim)
        v = v.reshape(batch, seq, c.num_kv_heads, c.head_dim)
        if c.qk_norm and c.qk_norm_per_head:
            q, k = self.q_norm(q), self.k_norm(k)
        inv_freq, scale = self._rotary()
        return (
            apply_rope(q, positions, inv_freq, scale),
            apply_rope(k, positions, inv_freq, scale),
            v,
        )

    def _rotary(self):
        """The rotary embedding's inverse frequencies and cos/sin scale."""
        c = self.config
        return rope_frequencies(c.head_dim, c.rope_theta, c.rope_scaling)

    def _prologue_kernel_takes(self, batch: int, cache: LayerCache) -> bool:
        """Whether a decode step's norms, rotation and cache write go by
        kernels/decode_prologue.py: switched on, for per-head norms or none,
        no clipping, shapes it takes."""
        c = self.config
        return (decode_prologue.kernel_chosen() and (c.qk_norm_per_head or not c.qk_norm) and c.clip_qkv is None
                and decode_prologue.kernel_supports((batch, c.num_heads, c.head_dim), cache.k.shape, cache.v.shape))

    def _decode_by_prologue_kernel(self, x, positions, cache: LayerCache, paged: PagedAttentionInputs):
        """A decode step's attention [B, H, D] and cache: the projections, then
        one kernel for the norms, the rotation, the queries' score scale and
        the cache write, then the paged attention (over queries scaled already)."""
        c = self.config
        batch = x.shape[0]
        q = self.q_proj(x).reshape(batch, c.num_heads, c.head_dim)
        k = self.k_proj(x).reshape(batch, c.num_kv_heads, c.head_dim)
        v = self.v_proj(x).reshape(batch, c.num_kv_heads, c.head_dim)
        cos, sin = rope_cos_sin(positions[:, 0], *self._rotary())
        norms = dict(q_norm=self.q_norm.weight[...], k_norm=self.k_norm.weight[...]) if c.qk_norm else {}
        q, k_pool, v_pool = decode_prologue.pallas_rope_write_kv(
            q, k, v, cos, sin, paged.slot_mapping.reshape(-1), cache.k, cache.v, eps=c.rms_norm_eps,
            q_scale=c.head_dim ** -0.5, **norms)
        out = paged_decode_attention(q, k_pool, v_pool, paged.block_tables, positions[:, 0] + 1, scale=1.0)
        return out, LayerCache(k_pool, v_pool)

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
        batch, seq = x.shape[:2]
        if cache is not None and seq == 1:  # decode: read the blocks in place
            if self._prologue_kernel_takes(batch, cache):
                out, cache = self._decode_by_prologue_kernel(x, positions, cache, paged)
            else:
                q, k, v = self._qkv(x, positions)
                cache = write_cache(cache, paged, k, v)
                out = paged_decode_attention(q[:, 0], cache.k, cache.v, paged.block_tables, positions[:, 0] + 1)
            return self.o_proj(out.reshape(batch, seq, -1)), cache
        q, k, v = self._qkv(x, positions)
        keys, values, key_positions, cache = attend_to(cache, paged, k, v, positions)
        out = grouped_query_attention(q, keys, values, positions, key_positions)
        return self.o_proj(out.reshape(batch, seq, -1)), cache
