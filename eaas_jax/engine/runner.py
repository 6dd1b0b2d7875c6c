"""The compiled model step: forward over a padded batch, paged KV cache update,
LM head on each sequence's last token, and in-graph sampling.

Shapes are bucketed to powers of two (batch rows, tokens per row, blocks per row)
so that a whole run compiles a handful of programs; each new one is logged.
"""

from __future__ import annotations

import functools
import logging
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from eaas_jax.engine.sampler import SamplingInputs, sample
from eaas_jax.model.attention import PagedAttentionInputs, init_layer_cache
from eaas_jax.model.transformer import AttentionClientModel, ExpertStack, KVCache

log = logging.getLogger(__name__)


def bucket(n: int, minimum: int = 1) -> int:
    """The smallest power of two >= max(n, minimum)."""
    n = max(n, minimum)
    return 1 << (n - 1).bit_length()


class StepRows(NamedTuple):
    """One row per sequence, built on the host (numpy), before padding."""

    tokens: list[list[int]]  # new tokens of each sequence
    start_positions: list[int]  # position of each row's first new token
    block_tables: list[list[int]]
    sampling: list[dict]  # SamplingInputs fields per row


class StepResult(NamedTuple):
    tokens: np.ndarray  # [rows]
    logprobs: np.ndarray  # [rows]
    ranks: np.ndarray  # [rows]
    top_ids: np.ndarray  # [rows, L]
    top_logprobs: np.ndarray  # [rows, L]


class StepStatuses(NamedTuple):
    """What the expert exchanges of one step reported (empty when embedded)."""

    statuses: np.ndarray  # [exchanges, servers] transport status codes
    labels: list[tuple[int, int]]  # (moe_layer, micro_batch) of each exchange


class EmbeddedExperts:
    """The routed experts computed in the client's own graph."""

    def __init__(self, experts: ExpertStack):
        self._graphdef, self.arrays = nnx.split(experts)

    def num_micro_batches(self, batch: int) -> int:
        return 1

    def exchange(self, arrays):
        return nnx.merge(self._graphdef, arrays)

    def traced_exchanges(self) -> list[tuple[int, int]]:
        return []


def _step(client_graphdef, backend, client_params, expert_arrays, kv_cache, tokens, positions, paged,
          last_index, sampling, *, num_top_logprobs):
    client = nnx.merge(client_graphdef, client_params)
    experts = backend.exchange(expert_arrays)
    token_mask = paged.slot_mapping < kv_cache[0].k.shape[0] * kv_cache[0].k.shape[1]
    hidden, kv_cache, _ = client.hidden_states(
        tokens, positions, experts, kv_cache, paged,
        num_micro_batches=backend.num_micro_batches(tokens.shape[0]), token_mask=token_mask,
    )
    last = jnp.take_along_axis(hidden, last_index[:, None, None], axis=1)[:, 0]
    logits = client.logits(last)
    statuses = getattr(experts, "statuses", [])
    statuses = jnp.stack(statuses) if statuses else jnp.zeros((0, 0), jnp.int32)
    return sample(logits, sampling, num_top_logprobs), kv_cache, statuses


class ModelRunner:
    """Runs steps of `client` with routed experts from `experts`: an
    `EmbeddedExperts` or a remote backend (`eaas_jax.runtime.client`) with the
    same members (`arrays`, `num_micro_batches`, `exchange`, `traced_exchanges`:
    the (moe_layer, micro_batch) of each status row of the last traced step)."""

    def __init__(self, client: AttentionClientModel, experts, *, num_blocks: int, block_size: int):
        self.config = client.config
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.experts = experts
        client_graphdef, self._client_params = nnx.split(client)
        dtype = client.embed_tokens.embedding.get_value().dtype
        self.kv_cache: KVCache = tuple(
            init_layer_cache(self.config, num_blocks, block_size, dtype)
            for _ in range(self.config.num_layers)
        )
        self._jitted = jax.jit(
            functools.partial(_step, client_graphdef, experts),
            donate_argnums=(2,),
            static_argnames=("num_top_logprobs",),
        )
        # (moe_layer, micro_batch) of each exchange, per compiled step shape
        self._labels: dict[tuple, list[tuple[int, int]]] = {}

    @property
    def num_compilations(self) -> int:
        return len(self._labels)

    def _prepare(self, rows: StepRows, num_top_logprobs: int) -> tuple[tuple, tuple]:
        """The step's shape key and padded arguments for `rows`."""
        n = len(rows.tokens)
        batch = bucket(n)
        # Minimum buckets: a few padded rows/tokens cost less than a recompile.
        longest = max(len(t) for t in rows.tokens)
        seq = 1 if longest == 1 else bucket(longest, 16)
        max_blocks = bucket(max(len(b) for b in rows.block_tables), 8)
        num_banned = bucket(max(len(s["banned"]) for s in rows.sampling), 4)
        shape = (batch, seq, max_blocks, num_banned, num_top_logprobs)

        tokens = np.zeros((batch, seq), np.int32)
        positions = np.zeros((batch, seq), np.int32)
        invalid_slot = self.num_blocks * self.block_size  # dropped by the cache write
        slots = np.full((batch, seq), invalid_slot, np.int32)
        tables = np.zeros((batch, max_blocks), np.int32)
        last_index = np.zeros((batch,), np.int32)
        for i, (toks, start, table) in enumerate(zip(rows.tokens, rows.start_positions, rows.block_tables)):
            k = len(toks)
            pos = np.arange(start, start + k)
            tokens[i, :k] = toks
            positions[i, :k] = pos
            table_arr = np.asarray(table, np.int32)
            slots[i, :k] = table_arr[pos // self.block_size] * self.block_size + pos % self.block_size
            tables[i, : len(table)] = table
            last_index[i] = k - 1
        sampling = SamplingInputs.padded(rows.sampling, batch, num_banned)
        args = (
            self._client_params,
            self.experts.arrays,
            self.kv_cache,
            tokens,
            positions,
            PagedAttentionInputs(slots, tables),
            last_index,
            sampling,
        )
        return shape, args

    def lower(self, rows: StepRows, num_top_logprobs: int = 0) -> jax.stages.Lowered:
        """The compiled step for `rows`' shapes, lowered (to inspect its HLO)."""
        _, args = self._prepare(rows, num_top_logprobs)
        return self._jitted.lower(*args, num_top_logprobs=num_top_logprobs)

    def run(self, rows: StepRows, num_top_logprobs: int) -> tuple[StepResult, StepStatuses]:
        n = len(rows.tokens)
        shape, args = self._prepare(rows, num_top_logprobs)
        new_shape = shape not in self._labels
        if new_shape:
            log.info(
                "compiling model step #%d: batch=%d tokens=%d blocks/seq=%d banned=%d logprobs=%d",
                len(self._labels) + 1, *shape,
            )
        sampled, self.kv_cache, statuses = self._jitted(*args, num_top_logprobs=num_top_logprobs)
        if new_shape:  # this call traced the step: its exchanges are known now
            self._labels[shape] = self.experts.traced_exchanges()
        sampled, statuses = jax.device_get((sampled, statuses))
        return StepResult(*(x[:n] for x in sampled)), StepStatuses(statuses, self._labels[shape])
