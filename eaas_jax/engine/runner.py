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
from eaas_jax.model.transformer import KVCache, MoeTransformer

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


def _step(graphdef, params, kv_cache, tokens, positions, paged, last_index, sampling, *, num_top_logprobs):
    model = nnx.merge(graphdef, params)
    hidden, kv_cache, _ = model.hidden_states(tokens, positions, kv_cache, paged)
    last = jnp.take_along_axis(hidden, last_index[:, None, None], axis=1)[:, 0]
    logits = model.client.logits(last)
    return sample(logits, sampling, num_top_logprobs), kv_cache


class ModelRunner:
    def __init__(self, model: MoeTransformer, *, num_blocks: int, block_size: int):
        self.config = model.config
        self.block_size = block_size
        self.num_blocks = num_blocks
        self._graphdef, self._params = nnx.split(model)
        dtype = model.client.embed_tokens.embedding.get_value().dtype
        self.kv_cache: KVCache = tuple(
            init_layer_cache(self.config, num_blocks, block_size, dtype)
            for _ in range(self.config.num_layers)
        )
        self._jitted = jax.jit(
            functools.partial(_step, self._graphdef),
            donate_argnums=(1,),
            static_argnames=("num_top_logprobs",),
        )
        self._shapes: set[tuple] = set()

    @property
    def num_compilations(self) -> int:
        return len(self._shapes)

    def run(self, rows: StepRows, num_top_logprobs: int) -> StepResult:
        n = len(rows.tokens)
        batch = bucket(n)
        # Minimum buckets: a few padded rows/tokens cost less than a recompile.
        longest = max(len(t) for t in rows.tokens)
        seq = 1 if longest == 1 else bucket(longest, 16)
        max_blocks = bucket(max(len(b) for b in rows.block_tables), 8)
        num_banned = bucket(max(len(s["banned"]) for s in rows.sampling), 4)
        shape = (batch, seq, max_blocks, num_banned, num_top_logprobs)
        if shape not in self._shapes:
            self._shapes.add(shape)
            log.info(
                "compiling model step #%d: batch=%d tokens=%d blocks/seq=%d banned=%d logprobs=%d",
                len(self._shapes), *shape,
            )

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
        sampled, self.kv_cache = self._jitted(
            self._params,
            self.kv_cache,
            tokens,
            positions,
            PagedAttentionInputs(slots, tables),
            last_index,
            sampling,
            num_top_logprobs=num_top_logprobs,
        )
        return StepResult(*(x[:n] for x in jax.device_get(sampled)))
