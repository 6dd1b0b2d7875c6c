"""The decoder-only MoE transformer, as two explicit halves.

`AttentionClientModel` holds everything a serving client keeps: embeddings,
attention (with its KV cache), norms, routers, shared experts, dense FFNs and the
LM head. `ExpertStack` holds the routed experts of every MoE layer. The forward
pass calls the experts only through an `ExpertFn`, so the same client code runs
with experts in-graph (embedded) or behind a transport (expert servers).
"""

from __future__ import annotations

from typing import Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from eaas_jax.model.attention import Attention, LayerCache, PagedAttentionInputs
from eaas_jax.model.config import ModelConfig
from eaas_jax.model.layers import RMSNorm, SwiGLU, linear
from eaas_jax.model.moe import ExpertBank, Router, Routing, SharedExpert

# (moe layer index, tokens [N, d], routing) -> gate-weighted expert output [N, d]
ExpertFn = Callable[[int, jax.Array, Routing], jax.Array]
KVCache = tuple[LayerCache, ...]


class DecoderLayer(nnx.Module):
    """The client half of one transformer layer."""

    def __init__(self, config: ModelConfig, layer: int, *, dtype, rngs: nnx.Rngs):
        eps = config.rms_norm_eps
        self.is_moe = config.is_moe_layer(layer)
        self.input_layernorm = RMSNorm(config.hidden_size, eps=eps, dtype=dtype)
        self.self_attn = Attention(config, dtype=dtype, rngs=rngs)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps=eps, dtype=dtype)
        if self.is_moe:
            self.router = Router(config, dtype=dtype, rngs=rngs)
            self.shared_expert = (
                SharedExpert(config, dtype=dtype, rngs=rngs) if config.num_shared_experts else None
            )
        else:
            self.mlp = SwiGLU(config.hidden_size, config.intermediate_size, dtype=dtype, rngs=rngs)

    def attention_block(self, x, positions, cache=None, paged=None):
        """Returns the residual stream after attention and its normalised copy."""
        attn_out, cache = self.self_attn(self.input_layernorm(x), positions, cache, paged)
        x = x + attn_out
        return x, self.post_attention_layernorm(x), cache


class AttentionClientModel(nnx.Module):
    def __init__(self, config: ModelConfig, *, dtype, rngs: nnx.Rngs):
        self.config = config
        self.embed_tokens = nnx.Embed(
            config.vocab_size,
            config.hidden_size,
            dtype=dtype,
            param_dtype=dtype,
            embedding_init=nnx.initializers.normal(0.02),
            rngs=rngs,
        )
        self.layers = nnx.List(
            [DecoderLayer(config, i, dtype=dtype, rngs=rngs) for i in range(config.num_layers)]
        )
        self.norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps, dtype=dtype)
        self.lm_head = (
            None
            if config.tie_word_embeddings
            else linear(config.hidden_size, config.vocab_size, dtype=dtype, rngs=rngs)
        )

    def logits(self, hidden: jax.Array) -> jax.Array:
        """Final norm and LM head; logits in float32."""
        hidden = self.norm(hidden)
        if self.lm_head is None:
            out = self.embed_tokens.attend(hidden)
        else:
            out = self.lm_head(hidden)
        return out.astype(jnp.float32)


class ExpertStack(nnx.Module):
    """Routed experts of every MoE layer; `banks[i]` serves MoE layer i."""

    def __init__(self, config: ModelConfig, *, dtype, rngs: nnx.Rngs):
        self.banks = nnx.List(
            [
                ExpertBank(
                    config.num_experts,
                    config.hidden_size,
                    config.moe_intermediate_size,
                    dtype=dtype,
                    rngs=rngs,
                )
                for _ in range(config.num_moe_layers)
            ]
        )

    def __call__(self, moe_layer: int, x: jax.Array, routing: Routing) -> jax.Array:
        return self.banks[moe_layer](x, routing.expert_ids, routing.weights)


class MoeTransformer(nnx.Module):
    def __init__(self, config: ModelConfig, *, dtype=jnp.float32, rngs: nnx.Rngs):
        self.config = config
        self.client = AttentionClientModel(config, dtype=dtype, rngs=rngs)
        self.experts = ExpertStack(config, dtype=dtype, rngs=rngs)

    def hidden_states(
        self,
        tokens: jax.Array,
        positions: jax.Array,
        kv_cache: KVCache | None = None,
        paged: PagedAttentionInputs | None = None,
        expert_fn: ExpertFn | None = None,
    ) -> tuple[jax.Array, KVCache | None, list[Routing]]:
        """tokens, positions: [B, T]. Returns the last layer's output [B, T, d],
        the updated cache (None without one) and each MoE layer's routing."""
        expert_fn = expert_fn or self.experts
        client = self.client
        x = client.embed_tokens(tokens)
        new_cache, routings = [], []
        batch, seq = tokens.shape
        for i, layer in enumerate(client.layers):
            layer_cache = None if kv_cache is None else kv_cache[i]
            x, h, layer_cache = layer.attention_block(x, positions, layer_cache, paged)
            new_cache.append(layer_cache)
            if layer.is_moe:
                flat = h.reshape(batch * seq, -1)
                routing = layer.router(flat)
                routings.append(routing)
                ffn = expert_fn(len(routings) - 1, flat, routing).reshape(h.shape)
                if layer.shared_expert is not None:
                    ffn = ffn + layer.shared_expert(h)
            else:
                ffn = layer.mlp(h)
            x = x + ffn
        return x, (None if kv_cache is None else tuple(new_cache)), routings

    def __call__(self, tokens: jax.Array, positions: jax.Array | None = None) -> jax.Array:
        """Full causal forward without a cache: logits [B, T, V] in float32."""
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
        hidden, _, _ = self.hidden_states(tokens, positions)
        return self.client.logits(hidden)


def load_balancing_loss(routings: Sequence[Routing], num_experts: int) -> jax.Array:
    """Switch-style auxiliary loss: E * sum_e (fraction routed to e) * (mean prob of e).

    Equals 1 when routing is perfectly uniform; grows as it concentrates.
    """
    losses = []
    for r in routings:
        counts = jax.nn.one_hot(r.expert_ids, num_experts).sum(axis=(0, 1))
        fraction = counts / r.expert_ids.size
        losses.append(num_experts * jnp.sum(fraction * r.probs.mean(axis=0)))
    return jnp.mean(jnp.stack(losses)) if losses else jnp.zeros(())
