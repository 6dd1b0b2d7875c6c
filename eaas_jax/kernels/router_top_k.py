"""A softmax router's choice of experts: the scores' softmax, its top k and
their gate weights, from the gate's logits [N, E] (float32).

Two forms:

- On GPUs (EAAS_JAX_ROUTER=xla turns it off; read once a process): one
  Pallas kernel (Triton), a program per row, where E and k are powers of
  two. In W1's decode step at batch 1 on an H100 it took 18 µs a token over
  8 layers, where XLA's three took ~50; with the kernels XLA then made
  around it, 908 against 920 µs of kernels a token, and steps as fast or
  slightly faster at batches 1, 64 and 256 (bench/RESULTS.md, W1 decode,
  commit 521125b).
- XLA's: `jax.nn.softmax`, `jax.lax.top_k`, a gather and the renormalising
  division. In that step these were 3 kernels a layer, for 128 scores a
  layer: a Triton softmax (13.7 µs), a sort (26.4; its kernels name no
  source line, but one a layer and no other sort in a greedy step: the
  top_k's) and a select (9.4; RESULTS, commit 07d3021).

Both pick the k largest probabilities, the lower expert first among equal
ones (as `lax.top_k` does), so the forms choose the same experts but where
two probabilities are within the softmax's last-bit rounding of each other
(its sums are taken in another order): tests/test_router_top_k.py.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from eaas_jax.kernels.common import kernel_switched_on, powers_of_two


def softmax_top_k(logits: jax.Array, k: int, *, normalize: bool, scale: float,
                  interpret: bool = False) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(ids [N, k] int32, weights [N, k] float32, probs [N, E] float32) of
    float32 `logits` [N, E]: the softmax's k largest, their probabilities
    (divided by their sum when `normalize`) times `scale`, and the softmax.
    interpret=True runs the kernel interpreted on any platform, where the
    shapes take it (tests)."""
    if (interpret or (jax.default_backend() == "gpu" and kernel_switched_on("EAAS_JAX_ROUTER"))) \
            and kernel_supports(logits.shape[-1], k) and logits.shape[0]:
        return pallas_softmax_top_k(logits, k, normalize=normalize, scale=scale, interpret=interpret)
    return xla_softmax_top_k(logits, k, normalize=normalize, scale=scale)


def xla_softmax_top_k(logits: jax.Array, k: int, *, normalize: bool, scale: float):
    """`softmax_top_k` by XLA's softmax and top_k."""
    probs = jax.nn.softmax(logits, axis=-1)
    _, ids = jax.lax.top_k(probs, k)
    return ids.astype(jnp.int32), gate_weights(probs, ids, normalize=normalize, scale=scale), probs


def gate_weights(probs: jax.Array, ids: jax.Array, *, normalize: bool, scale: float) -> jax.Array:
    """The chosen experts' probabilities ([..., E] at `ids` [..., k]), divided
    by their sum when `normalize`, times `scale` (every router's last step)."""
    weights = jnp.take_along_axis(probs, ids, axis=-1)
    if normalize:
        weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
    return weights * scale


def kernel_supports(num_experts: int, k: int) -> bool:
    """Whether the kernel takes E experts and a top k: powers of two (Triton's
    vectors), k at most E."""
    return powers_of_two(num_experts, k) and k <= num_experts


def pallas_softmax_top_k(logits: jax.Array, k: int, *, normalize: bool, scale: float,
                         interpret: bool = False):
    """`softmax_top_k` as one Pallas kernel, program r taking row r."""
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import triton as pltriton

    rows, num_experts = logits.shape
    scores = pl.BlockSpec((None, num_experts), lambda r: (r, 0))
    chosen = pl.BlockSpec((None, k), lambda r: (r, 0))
    ids, weights, probs = pl.pallas_call(
        functools.partial(_kernel, k=k, normalize=normalize, scale=scale),
        grid=(rows,),
        in_specs=[scores],
        out_specs=[chosen, chosen, scores],
        out_shape=[jax.ShapeDtypeStruct((rows, k), jnp.int32), jax.ShapeDtypeStruct((rows, k), jnp.float32),
                   jax.ShapeDtypeStruct((rows, num_experts), jnp.float32)],
        compiler_params=pltriton.CompilerParams(num_warps=1),
        interpret=interpret,
    )(logits.astype(jnp.float32))
    return ids, weights, probs


def _kernel(logits_ref, ids_ref, weights_ref, probs_ref, *, k: int, normalize: bool, scale: float):
    """One row: its softmax, then k rounds of taking the largest probability
    left (the lowest expert among equal ones) and masking it out."""
    logits = logits_ref[...]
    num_experts = logits.shape[0]
    shifted = jnp.exp(logits - jnp.max(logits))
    probs = shifted / jnp.sum(shifted)
    probs_ref[...] = probs
    expert = jax.lax.broadcasted_iota(jnp.int32, (num_experts,), 0)
    place = jax.lax.broadcasted_iota(jnp.int32, (k,), 0)
    ids = jnp.zeros((k,), jnp.int32)
    weights = jnp.zeros((k,), jnp.float32)
    left = probs
    for j in range(k):  # (k is small: unrolled)
        best = jnp.max(left)
        # The lowest expert holding it; a row of NaNs holds none: the last
        # expert then, so an id is never out of range.
        chosen = jnp.minimum(jnp.min(jnp.where(left == best, expert, num_experts)), num_experts - 1)
        ids = jnp.where(place == j, chosen, ids)
        weights = jnp.where(place == j, best, weights)
        left = jnp.where(expert == chosen, -jnp.inf, left)
    if normalize:
        weights = weights / jnp.sum(weights)
    ids_ref[...] = ids
    weights_ref[...] = weights * scale
