"""The decoder-only MoE transformer, as two explicit halves.

`AttentionClientModel` holds everything a serving client keeps: embeddings,
attention (with its KV cache), norms, routers, shared experts, dense FFNs and the
LM head. `ExpertStack` holds the routed experts of every MoE layer. The forward
pass calls the experts only through an `ExpertFn`, so the same client code runs
with experts in-graph (embedded) or behind a transport (expert servers).
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Protocol, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from eaas_jax.model.attention import Attention, LayerCache, PagedAttentionInputs
from eaas_jax.model.config import ModelConfig
from eaas_jax.model.layers import RMSNorm, SwiGLU, linear
from eaas_jax.model.mla import MultiHeadLatentAttention
from eaas_jax.model.moe import ExpertBank, Router, Routing, SharedExpert

# (moe layer index, tokens [N, d], routing) -> gate-weighted expert output [N, d]
ExpertFn = Callable[[int, jax.Array, Routing], jax.Array]
KVCache = tuple[LayerCache, ...]


class ExpertExchange(Protocol):
    """Routed experts computed elsewhere, in two halves so the caller can work
    between them: `send` hands tokens over and returns a handle, `receive`
    returns their gate-weighted expert output [N, d]. Calls come in program
    order; an implementation may chain them (e.g. with ordering tokens)."""

    def send(self, moe_layer: int, micro_batch: int, x: jax.Array, routing: Routing,
             token_mask: jax.Array) -> Any: ...

    def receive(self, handle: Any) -> jax.Array: ...


class _InGraphExchange:
    """An `ExpertFn` seen as an exchange: the work happens at `send`."""

    def __init__(self, expert_fn: ExpertFn):
        self.expert_fn = expert_fn

    def send(self, moe_layer, micro_batch, x, routing, token_mask):
        return self.expert_fn(moe_layer, x, routing)

    def receive(self, handle):
        return handle


def _as_exchange(experts) -> ExpertExchange:
    if hasattr(experts, "send") and hasattr(experts, "receive"):
        return experts
    return _InGraphExchange(experts)


def micro_batch_rows(batch: int, num_micro_batches: int) -> list[slice]:
    """The rows of each micro-batch: the batch cut into equal consecutive parts."""
    m = num_micro_batches
    if m < 1 or batch % m:
        raise ValueError(f"batch of {batch} rows cannot be split into {m} micro-batches")
    return [slice(i * batch // m, (i + 1) * batch // m) for i in range(m)]


class _PendingFfn(NamedTuple):
    """A micro-batch between sending its MoE tokens and adding their output."""

    residual: jax.Array  # [b, t, d]
    shared: jax.Array | None  # shared-expert output [b, t, d]
    handle: Any

    def finish(self, exchange: ExpertExchange) -> jax.Array:
        ffn = exchange.receive(self.handle).reshape(self.residual.shape).astype(self.residual.dtype)
        if self.shared is not None:
            ffn = ffn + self.shared
        return self.residual + ffn


class DecoderLayer(nnx.Module):
    """The client half of one transformer layer."""

    def __init__(self, config: ModelConfig, layer: int, *, dtype, rngs: nnx.Rngs):
        eps = config.rms_norm_eps
        self.is_moe = config.is_moe_layer(layer)
        self.input_layernorm = RMSNorm(config.hidden_size, eps=eps, dtype=dtype)
        attention = MultiHeadLatentAttention if config.attention == "mla" else Attention
        self.self_attn = attention(config, dtype=dtype, rngs=rngs)
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
            else linear(config.hidden_size, config.vocab_size, dtype=dtype, rngs=rngs, pad_one_row=False)
        )

    def hidden_states(
        self,
        tokens: jax.Array,
        positions: jax.Array,
        experts: ExpertFn | ExpertExchange,
        kv_cache: KVCache | None = None,
        paged: PagedAttentionInputs | None = None,
        *,
        num_micro_batches: int = 1,
        token_mask: jax.Array | None = None,
    ) -> tuple[jax.Array, KVCache | None, list[Routing]]:
        """tokens, positions: [B, T]. Returns the last layer's output [B, T, d],
        the updated cache (None without one) and each MoE layer's routing.

        `experts` computes the routed experts: an `ExpertFn` (in-graph, e.g. an
        `ExpertStack`) or an `ExpertExchange` (remote). With
        `num_micro_batches` = 2 the rows are split in two halves that ping-pong
        (double batching): every micro-batch sends its MoE tokens and the
        client goes on with the other micro-batch's attention before it
        receives them, so the expert servers and the client work at once.
        `token_mask` [B, T] marks real tokens (padding is not sent anywhere).
        """
        exchange = _as_exchange(experts)
        rows = micro_batch_rows(tokens.shape[0], num_micro_batches)
        m = len(rows)
        if token_mask is None:
            token_mask = jnp.ones(tokens.shape, bool)
        client = self
        x = [client.embed_tokens(tokens[r]) for r in rows]
        pending: list[_PendingFfn | None] = [None] * m
        cache = None if kv_cache is None else list(kv_cache)
        routings: list[list[Routing]] = []
        moe_layer = -1
        for i, layer in enumerate(client.layers):
            moe_layer += layer.is_moe
            for j, r in enumerate(rows):
                if pending[j] is not None:
                    x[j] = pending[j].finish(exchange)
                    pending[j] = None
                mb_paged = None if paged is None else PagedAttentionInputs(*(a[r] for a in paged))
                layer_cache = None if cache is None else cache[i]
                x[j], h, layer_cache = layer.attention_block(x[j], positions[r], layer_cache, mb_paged)
                if cache is not None:
                    cache[i] = layer_cache
                if not layer.is_moe:
                    x[j] = x[j] + layer.mlp(h)
                    continue
                flat = h.reshape(-1, h.shape[-1])
                routing = layer.router(flat)
                if j == 0:
                    routings.append([])
                routings[-1].append(routing)
                sent = exchange.send(moe_layer, j, flat, routing, token_mask[r].reshape(-1))
                # The shared expert runs while the routed experts are away.
                shared = None if layer.shared_expert is None else layer.shared_expert(h)
                pending[j] = _PendingFfn(x[j], shared, sent)
        x = [p.finish(exchange) if p is not None else xj for p, xj in zip(pending, x)]
        merged = [Routing(*(jnp.concatenate(f) for f in zip(*per_mb))) for per_mb in routings]
        return (
            jnp.concatenate(x) if m > 1 else x[0],
            None if cache is None else tuple(cache),
            merged,
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

    def hidden_states(self, tokens, positions, kv_cache=None, paged=None, experts=None, **kwargs):
        """`AttentionClientModel.hidden_states` with this model's own experts by default."""
        return self.client.hidden_states(
            tokens, positions, self.experts if experts is None else experts, kv_cache, paged, **kwargs
        )

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
