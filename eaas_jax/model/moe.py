"""Mixture-of-Experts pieces, split along the client/server boundary.

Client side (`Router`, `SharedExpert`): decide, per token, which experts and with
which gate weights; compute the always-on shared expert. Expert side
(`ExpertBank`): given tokens with their expert ids and gate weights, run the
routed SwiGLU experts and return the gate-weighted sum per token. The expert
side is stateless, so it can run in-graph (embedded) or in an expert server.
"""

from __future__ import annotations

import functools
import os
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from eaas_jax.kernels.expert_matvec import expert_matvec, expert_matvecs
from eaas_jax.kernels.grouped_matmul import grouped_matmul
from eaas_jax.kernels.router_top_k import gate_weights, softmax_top_k
from eaas_jax.model.config import ModelConfig
from eaas_jax.model.layers import SwiGLU, linear


class Routing(NamedTuple):
    expert_ids: jax.Array  # [N, k] int32
    weights: jax.Array  # [N, k] float32 gate weights
    probs: jax.Array  # [N, E] float32 full router distribution (for the aux loss)


class Router(nnx.Module):
    """Chooses each token's top-k experts and their gate weights.

    Covers the published routers: softmax top-k with or without renormalising
    (Mixtral, Qwen, OLMoE), DeepSeek-V2's group-limited softmax, and
    DeepSeek-V3's sigmoid scores with a selection-only bias, group-limited
    choice and a routed scaling factor. Scores are computed in float32: the
    gate's products (exact in float32 for bfloat16 inputs) are summed in
    float32, in the layer's own product (so a single row is a GEMM on GPUs,
    `layers.Linear`; its float32 copy of the inputs and weights, as before,
    was a reduction of 46 µs a step in W1's step at batch 1 on an H100).
    """

    def __init__(self, config: ModelConfig, *, dtype, rngs: nnx.Rngs):
        self.config = config
        self.gate = linear(config.hidden_size, config.num_experts, dtype=dtype, rngs=rngs,
                           preferred_element_type=jnp.float32)
        if config.router_score_bias:
            self.score_bias = nnx.Param(jnp.zeros((config.num_experts,), jnp.float32))

    def __call__(self, x: jax.Array) -> Routing:
        c = self.config
        logits = self.gate(x)
        if c.router_scoring == "softmax" and not c.router_score_bias and c.router_num_groups <= 1:
            ids, weights, probs = softmax_top_k(
                logits.reshape(-1, c.num_experts), c.num_experts_per_tok, normalize=c.norm_topk_prob,
                scale=c.routed_scaling_factor)
            lead = logits.shape[:-1]
            return Routing(ids.reshape(*lead, -1), weights.reshape(*lead, -1), probs.reshape(logits.shape))
        if c.router_scoring == "softmax":
            probs = jax.nn.softmax(logits, axis=-1)
        else:
            probs = jax.nn.sigmoid(logits)
        choice = probs + self.score_bias[...] if c.router_score_bias else probs
        if c.router_num_groups > 1:
            choice = self._keep_best_groups(choice)
        _, ids = jax.lax.top_k(choice, c.num_experts_per_tok)
        weights = gate_weights(probs, ids, normalize=c.norm_topk_prob, scale=c.routed_scaling_factor)
        return Routing(ids.astype(jnp.int32), weights, probs)

    def _keep_best_groups(self, choice: jax.Array) -> jax.Array:
        """Masks (to -inf) every expert outside the best `router_topk_groups` groups."""
        c = self.config
        groups = choice.reshape(*choice.shape[:-1], c.router_num_groups, -1)
        if c.router_group_score == "max":
            group_score = groups.max(axis=-1)
        else:
            group_score = jax.lax.top_k(groups, 2)[0].sum(axis=-1)
        _, best = jax.lax.top_k(group_score, c.router_topk_groups)
        keep = jax.nn.one_hot(best, c.router_num_groups, dtype=bool).any(axis=-2)
        return jnp.where(keep[..., None], groups, -jnp.inf).reshape(choice.shape)


class SharedExpert(nnx.Module):
    """The always-active expert(s), optionally scaled by a sigmoid gate."""

    def __init__(self, config: ModelConfig, *, dtype, rngs: nnx.Rngs):
        self.mlp = SwiGLU(
            config.hidden_size, config.shared_expert_intermediate_size, dtype=dtype, rngs=rngs
        )
        self.gate = (
            linear(config.hidden_size, 1, dtype=dtype, rngs=rngs)
            if config.shared_expert_gate
            else None
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        out = self.mlp(x)
        if self.gate is not None:
            out = out * jax.nn.sigmoid(self.gate(x).astype(jnp.float32)).astype(out.dtype)
        return out


class ExpertBank(nnx.Module):
    """The routed experts of one layer, weights stacked as [E, d, f] / [E, f, d]."""

    def __init__(self, num_experts: int, dim: int, hidden: int, *, dtype, rngs: nnx.Rngs):
        init = nnx.initializers.lecun_normal(in_axis=1, out_axis=2, batch_axis=0)
        self.gate_proj = nnx.Param(init(rngs.params(), (num_experts, dim, hidden), dtype))
        self.up_proj = nnx.Param(init(rngs.params(), (num_experts, dim, hidden), dtype))
        self.down_proj = nnx.Param(init(rngs.params(), (num_experts, hidden, dim), dtype))

    @property
    def num_experts(self) -> int:
        return self.gate_proj.shape[0]

    def __call__(self, x: jax.Array, expert_ids: jax.Array, weights: jax.Array) -> jax.Array:
        return routed_experts(
            x, expert_ids, weights, self.gate_proj[...], self.up_proj[...], self.down_proj[...]
        )


def expert_token_counts(routings: list[Routing], token_mask: jax.Array, num_experts: int) -> jax.Array:
    """[len(routings), num_experts] int32: the real tokens (`token_mask`, [N]
    or any shape of N elements) that each MoE layer's routing sent to each
    expert; a token counts once for each of its top-k experts."""
    # One scatter for every layer (layer l's expert e at l * num_experts + e),
    # not one a layer: at decode's few tokens each is a kernel launch of its own.
    num_layers = len(routings)
    if not num_layers:
        return jnp.zeros((0, num_experts), jnp.int32)
    ids = jnp.stack([r.expert_ids.reshape(token_mask.size, -1) for r in routings])  # [L, N, k]
    counted = token_mask.reshape(1, -1, 1) & (ids >= 0) & (ids < num_experts)
    layer_base = num_experts * jnp.arange(num_layers, dtype=jnp.int32)[:, None, None]
    flat = jnp.where(counted, layer_base + ids, num_layers * num_experts)  # out of range: dropped
    counts = jnp.zeros((num_layers * num_experts,), jnp.int32).at[flat.reshape(-1)].add(1, mode="drop")
    return counts.reshape(num_layers, num_experts)


# A token-expert slot on the gathered path reads its expert's weights
# (`expert_matvec`); the grouped path visits every expert of the bank once.
# Gathering wins while the slots are fewer than the experts by a factor per
# backend, measured (bench/RESULTS.md): on CPUs 2 (2026-12-05); on an H200 1
# (2026-12-06, W1's 128 experts in bfloat16, per projection: expert_matvec's
# kernel against tokamax's grouped matmul 25 / 44 µs at 8 slots, 76 / 96 at
# 64, 103 / 111 at 128, 175 / 136 at 256). Other backends are unmeasured:
# grouped.
GATHER_FACTOR = {"cpu": 2, "gpu": 1}


def uses_gathered_experts(num_slots: int, num_experts: int) -> bool:
    """Whether `routed_experts` computes `num_slots` token-expert slots by
    gathering each slot's expert weights (few slots: decode at small batch)
    rather than one grouped matmul over all `num_experts`: while the slots
    are fewer than the experts by the backend's GATHER_FACTOR.
    EAAS_JAX_GATHERED_EXPERTS=on gathers whenever the slots are at most the
    experts, =off never (benchmarks compare the paths with them)."""
    setting = os.environ.get("EAAS_JAX_GATHERED_EXPERTS", "auto")
    if setting == "off":
        return False
    if setting == "on":
        return num_slots <= num_experts
    factor = GATHER_FACTOR.get(jax.default_backend())
    return factor is not None and factor * num_slots <= num_experts


def routed_experts(
    x: jax.Array,
    expert_ids: jax.Array,
    weights: jax.Array,
    gate_proj: jax.Array,
    up_proj: jax.Array,
    down_proj: jax.Array,
    out_dtype=None,
) -> jax.Array:
    """sum_j weights[n, j] * expert[expert_ids[n, j]](x[n]) for every token n.

    x: [N, d]; expert_ids: [N, k] in [0, E), or any value outside it to skip
    that slot; weights: [N, k]; expert weights stacked [E, d, f], [E, d, f],
    [E, f, d]. Returns [N, d] in `out_dtype` (default x's dtype), summed in
    float32. Few slots (`uses_gathered_experts`) multiply by their own
    experts' gathered weights, so the cost follows the routed experts, not
    the bank's size; else one grouped matmul per projection over all experts.
    """
    gathered = uses_gathered_experts(expert_ids.size, gate_proj.shape[0])
    return _routed_experts(x, expert_ids, weights, gate_proj, up_proj, down_proj, gathered=gathered,
                           out_dtype=jnp.dtype(out_dtype or x.dtype), backend=jax.default_backend())


# One jitted function for every layer. A model's MoE layers call it with the
# same shapes, so a step program traces and lowers it once, not once per
# layer (jit's trace cache; equal calls lower to one function, which XLA
# inlines: the compiled program is the same). Tracing and lowering the expert
# kernels is what costs on GPUs (tokamax's Mosaic GPU grouped matmul, the
# Pallas matvec): W1's 8 layers made each step program seconds of Python,
# one program at a time, and a server's warm-up minutes (bench/RESULTS.md).
# What the trace depends on besides the arguments is in the key: the path,
# chosen outside (an environment setting read in the trace would not reach
# programs traced before), and the backend the kernels are picked for.
@functools.partial(jax.jit, static_argnames=("gathered", "out_dtype", "backend"))
def _routed_experts(x, expert_ids, weights, gate_proj, up_proj, down_proj, *, gathered: bool, out_dtype,
                    backend: str):
    del backend  # (read again by the kernels' own choice)
    path = _gathered_experts if gathered else _grouped_experts
    return path(x, expert_ids, weights, gate_proj, up_proj, down_proj).astype(out_dtype)


def _grouped_experts(x, expert_ids, weights, gate_proj, up_proj, down_proj) -> jax.Array:
    """`routed_experts` as grouped matmuls over every expert; float32."""
    num_experts = gate_proj.shape[0]
    num_tokens, top_k = expert_ids.shape
    flat_ids = expert_ids.reshape(-1)
    # Slots for experts not in this bank sort to the end, past every group,
    # where grouped_matmul leaves them as zeros.
    sort_key = jnp.where((flat_ids >= 0) & (flat_ids < num_experts), flat_ids, num_experts)
    order = jnp.argsort(sort_key, stable=True)
    token_of_row = order // top_k
    group_sizes = jnp.bincount(sort_key, length=num_experts + 1)[:num_experts]
    rows = x[token_of_row]
    hidden = jax.nn.silu(grouped_matmul(rows, gate_proj, group_sizes))
    hidden = hidden * grouped_matmul(rows, up_proj, group_sizes)
    out_rows = grouped_matmul(hidden, down_proj, group_sizes)
    # Back to slot order by a gather, then each token's k slots summed, in
    # the gathered path's order: not a scatter-add into the tokens, whose
    # float atomics on GPUs sum in no fixed order (and which took 75 µs over
    # W1's 8 layers at batch 256 on an H100, bench/RESULTS.md 2026-12-06).
    row_of_slot = jnp.zeros_like(order).at[order].set(jnp.arange(order.size, dtype=order.dtype),
                                                   unique_indices=True)  # (a permutation)
    slots = out_rows[row_of_slot].astype(jnp.float32) * weights.reshape(-1, 1).astype(jnp.float32)
    return slots.reshape(num_tokens, top_k, x.shape[-1]).sum(axis=1)


def _gathered_experts(x, expert_ids, weights, gate_proj, up_proj, down_proj) -> jax.Array:
    """`routed_experts` slot by slot, each with its own expert's weights
    gathered; float32. Rounds as the grouped path does (each projection's
    result in x's dtype), so the paths differ only in the order a token's k
    slots are summed."""
    num_experts = gate_proj.shape[0]
    num_tokens, top_k = expert_ids.shape
    flat_ids = expert_ids.reshape(-1)
    hosted = (flat_ids >= 0) & (flat_ids < num_experts)
    ids = jnp.where(hosted, flat_ids, 0)
    # slot s is token s // top_k (the kernel reads the token's row k times)
    gate, up = (out.astype(x.dtype) for out in expert_matvecs(x, (gate_proj, up_proj), ids, slots_per_row=top_k))
    hidden = jax.nn.silu(gate) * up
    out_rows = expert_matvec(hidden, down_proj, ids).astype(x.dtype).astype(jnp.float32)
    weighted = jnp.where(hosted[:, None], out_rows * weights.reshape(-1, 1).astype(jnp.float32), 0.0)
    return weighted.reshape(num_tokens, top_k, x.shape[-1]).sum(axis=1)
