"""In-graph token sampling, one row per sequence, each row with its own parameters.

The order follows vLLM: suppress banned tokens (EOS before `min_tokens`), apply
the repetition, frequency and presence penalties, scale by temperature, drop
tokens under `min_p` x the top probability, keep the `top_k` most likely, then
the smallest prefix of the rest whose renormalised mass reaches `top_p`. Temperature 0 rows take the argmax. Each row draws from its own key,
`fold_in(fold_in(key(seed), stream), step)`, so a seeded request samples the same
tokens whatever else is in the batch. Returned log-probabilities are those of the
model's raw distribution (before any of the above), as vLLM reports them.
"""

from __future__ import annotations

import functools
import operator
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np


class SamplingInputs(NamedTuple):
    """Per-row sampling parameters, all [B] unless noted."""

    temperature: jax.Array  # float32, 0 = greedy
    top_p: jax.Array  # float32 in (0, 1]
    top_k: jax.Array  # int32, <= 0 = disabled
    min_p: jax.Array  # float32
    seed: jax.Array  # uint32
    stream: jax.Array  # int32: which completion of the request
    step: jax.Array  # int32: index of the token being sampled within the completion
    banned: jax.Array  # [B, S] int32 token ids to suppress, -1 = none
    presence_penalty: jax.Array  # float32, 0 = none
    frequency_penalty: jax.Array  # float32, 0 = none
    repetition_penalty: jax.Array  # float32, 1 = none
    # [B, P]: the tokens of each penalized row's prompt and output that the host
    # knows (-1 = none), and how often each occurs in the output. P = 0 when no
    # row is penalized: the penalties are then left out of the program.
    penalty_ids: jax.Array  # int32
    penalty_counts: jax.Array  # int32

    @classmethod
    def padded(cls, rows: list[dict], batch: int, num_banned: int, num_penalized: int = 0) -> "SamplingInputs":
        """Host-side arrays for `rows` (dicts of the fields, at least
        NEUTRAL_ROW's; the penalty ones may be missing: none), padded to
        `batch` rows. A row's "penalized" is its (token id, output count)
        pairs, at most `num_penalized`."""
        n = len(rows)
        # The fields every row has, read in one pass (this runs every step, for
        # every row): float64 holds each of them exactly, seeds included.
        fixed = np.array([_FIXED_FIELDS(r) for r in rows], np.float64).reshape(n, len(_FIXED))

        def column(name, dtype, fill):
            out = np.full((batch,), fill, dtype)
            if name in _FIXED:
                out[:n] = fixed[:, _FIXED.index(name)]
            elif num_penalized:  # (P = 0: no row is penalized, the penalty columns are left out)
                out[:n] = [r.get(name, fill) for r in rows]
            return out

        banned = np.full((batch, num_banned), -1, np.int32)
        penalty_ids = np.full((batch, num_penalized), -1, np.int32)
        penalty_counts = np.zeros((batch, num_penalized), np.int32)
        for i, r in enumerate(rows):
            if r["banned"]:
                banned[i, : len(r["banned"])] = r["banned"]
            pairs = r.get("penalized", ())
            if pairs:
                penalty_ids[i, : len(pairs)], penalty_counts[i, : len(pairs)] = zip(*pairs)
        return cls(
            column("temperature", np.float32, 0.0),
            column("top_p", np.float32, 1.0),
            column("top_k", np.int32, 0),
            column("min_p", np.float32, 0.0),
            column("seed", np.uint32, 0),
            column("stream", np.int32, 0),
            column("step", np.int32, 0),
            banned,
            column("presence_penalty", np.float32, 0.0),
            column("frequency_penalty", np.float32, 0.0),
            column("repetition_penalty", np.float32, 1.0),
            penalty_ids,
            penalty_counts,
        )


_FIXED = ("temperature", "top_p", "top_k", "min_p", "seed", "stream", "step")
_FIXED_FIELDS = operator.itemgetter(*_FIXED)
# A row's fields with nothing set (greedy): `padded`'s rows have at least these.
NEUTRAL_ROW = {"temperature": 0.0, "top_p": 1.0, "top_k": 0, "min_p": 0.0, "seed": 0, "stream": 0, "step": 0,
               "banned": []}


# Banned ids per row (a step's width, bucketed: 4 and up) compared in place,
# one column at a time, up to this many; more are written into a mask first.
# Compared, the test fuses into the argmax that reads the logits next and no
# [B, V] mask is written: zeroing that mask alone took 47 µs of W1's decode
# step at batch 256 on an H100 (bench/RESULTS.md, 2026-12-06). Each column
# costs a comparison per logit, so wide rows (many stop ids while min_tokens
# is unmet: up to MAX_STOP_TOKEN_IDS and the EOS ids) keep the mask.
COMPARED_BANNED_IDS = 8


def _suppress(logits: jax.Array, banned: jax.Array) -> jax.Array:
    """[B, V] logits with each row's banned ids ([B, K], -1 = none) at -inf."""
    vocab = logits.shape[-1]
    banned = banned.astype(jnp.int32)
    if banned.shape[1] <= COMPARED_BANNED_IDS:
        ids = jnp.arange(vocab, dtype=jnp.int32)[None, :]
        hits = functools.reduce(jnp.logical_or, (ids == banned[:, j, None] for j in range(banned.shape[1])),
                                jnp.zeros((), bool))
    else:
        rows = jnp.arange(logits.shape[0])[:, None]
        hits = jnp.zeros(logits.shape, bool).at[rows, jnp.where(banned >= 0, banned, vocab)].set(True, mode="drop")
    return jnp.where(hits, -jnp.inf, logits)


def apply_penalties(logits: jax.Array, params: SamplingInputs, pending: jax.Array | None = None) -> jax.Array:
    """vLLM's penalties on [B, V] float32 logits: the logit of a token in the
    row's prompt or output is divided by repetition_penalty if positive, else
    multiplied by it; then frequency_penalty x its output count and
    presence_penalty (if it occurs in the output) are subtracted. `pending`
    [B] or [B, P]: each row's latest output tokens still on the device (the
    host's counts lack them), -1 = none. Rows without penalties are unchanged."""
    batch, vocab = logits.shape
    if params.penalty_ids.shape[1] == 0:
        return logits
    rows = jnp.arange(batch)[:, None]
    ids = jnp.where(params.penalty_ids >= 0, params.penalty_ids, vocab)  # -1: dropped
    counts = jnp.zeros(logits.shape, jnp.float32).at[rows, ids].add(params.penalty_counts, mode="drop")
    seen = jnp.zeros(logits.shape, bool).at[rows, ids].set(True, mode="drop")
    if pending is not None:
        extra = jnp.where(pending >= 0, pending, vocab).reshape(batch, -1)
        counts = counts.at[rows, extra].add(1.0, mode="drop")
        seen = seen.at[rows, extra].set(True, mode="drop")
    repetition = jnp.where(seen, params.repetition_penalty[:, None], 1.0)
    logits = jnp.where(logits > 0, logits / repetition, logits * repetition)
    return (logits - params.frequency_penalty[:, None] * counts
            - params.presence_penalty[:, None] * (counts > 0).astype(jnp.float32))


def filtered_logits(logits: jax.Array, params: SamplingInputs) -> tuple[jax.Array, jax.Array]:
    """Temperature-scaled logits (penalties already applied) with every
    filtered-out token at -inf, sorted descending per row, and the token id
    of each sorted position: ([B, V], [B, V])."""
    logits = _suppress(logits.astype(jnp.float32), params.banned)
    temperature = jnp.where(params.temperature > 0, params.temperature, 1.0)[:, None]
    scaled = logits / temperature
    order = jnp.argsort(-scaled, axis=-1, stable=True)
    ranked = jnp.take_along_axis(scaled, order, axis=-1)
    rank = jnp.arange(ranked.shape[-1])[None, :]

    probs = jax.nn.softmax(ranked, axis=-1)
    keep = probs >= params.min_p[:, None] * probs[:, :1]
    keep &= (params.top_k[:, None] <= 0) | (rank < params.top_k[:, None])
    ranked = jnp.where(keep, ranked, -jnp.inf)
    # top_p over what is left, renormalised; the most likely token always stays.
    probs = jax.nn.softmax(ranked, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    keep &= (mass_before < params.top_p[:, None]) | (rank == 0)
    return jnp.where(keep, ranked, -jnp.inf), order


def _sample_or_argmax(logits: jax.Array, params: SamplingInputs) -> jax.Array:
    """Rows with temperature > 0 draw from their filtered distribution; the
    others take its most likely token."""
    ranked, order = filtered_logits(logits, params)

    def draw(seed, stream, step, row):
        key = jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), stream), step)
        return jax.random.categorical(key, row)

    choice = jax.vmap(draw)(params.seed, params.stream, params.step, ranked)
    sampled = jnp.take_along_axis(order, choice[:, None], axis=-1)[:, 0]
    return jnp.where(params.temperature > 0, sampled, order[:, 0])


def sample(
    logits: jax.Array, params: SamplingInputs, num_top_logprobs: int, greedy_only: bool = False,
    pending: jax.Array | None = None,
) -> tuple[jax.Array, ...]:
    """Samples one token per row (`pending`: see apply_penalties).

    Returns (token [B] int32, its logprob [B], its rank [B] (1 = most likely),
    top token ids [B, L], their logprobs [B, L]) with L = num_top_logprobs (static).
    `greedy_only` (static) promises that every row has temperature 0: sorting the
    vocabulary (150k entries for Qwen) costs more than the rest of the sampler,
    and such a batch only needs an argmax. It is a trace-time choice rather than
    a `lax.cond` because a conditional makes a GPU program wait for its
    predicate on the host, which would stall the next step queued behind it.
    """
    raw_logprobs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    penalized = apply_penalties(logits.astype(jnp.float32), params, pending)
    if greedy_only:
        token = jnp.argmax(_suppress(penalized, params.banned), axis=-1)
    else:
        token = _sample_or_argmax(penalized, params)
    token = token.astype(jnp.int32)
    token_logprob = jnp.take_along_axis(raw_logprobs, token[:, None], axis=-1)[:, 0]
    token_rank = 1 + jnp.sum(raw_logprobs > token_logprob[:, None], axis=-1, dtype=jnp.int32)
    top_logprobs, top_ids = jax.lax.top_k(raw_logprobs, num_top_logprobs)
    return token, token_logprob, token_rank, top_ids.astype(jnp.int32), top_logprobs
