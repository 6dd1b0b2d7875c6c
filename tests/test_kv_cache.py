"""Incremental decoding over the paged KV cache equals a full causal forward pass."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from eaas_jax.model import PagedAttentionInputs, init_layer_cache

from conftest import TINY_CONFIG, replace_config, tiny_model

BLOCK = 4
NUM_BLOCKS = 16


@nnx.jit
def _cached_logits(model, tokens, positions, cache, paged):
    hidden, cache, _ = model.hidden_states(tokens, positions, cache, paged)
    return model.client.logits(hidden), cache


@nnx.jit
def _full_logits(model, tokens):
    return model(tokens)


def _paged(block_tables, starts, lengths, width):
    """Slots and tables for rows writing `lengths[i]` tokens from `starts[i]`."""
    batch = len(block_tables)
    slots = np.full((batch, width), NUM_BLOCKS * BLOCK, np.int32)
    positions = np.zeros((batch, width), np.int32)
    for i, (table, start, n) in enumerate(zip(block_tables, starts, lengths)):
        pos = np.arange(start, start + n)
        positions[i, :n] = pos
        slots[i, :n] = np.asarray(table)[pos // BLOCK] * BLOCK + pos % BLOCK
    tables = np.asarray(block_tables, np.int32)
    return positions, PagedAttentionInputs(jnp.asarray(slots), jnp.asarray(tables))


@pytest.mark.parametrize("config", [TINY_CONFIG, replace_config(qk_norm=False, num_shared_experts=0,
                                                                 shared_expert_intermediate_size=0,
                                                                 shared_expert_gate=False, first_k_dense=0,
                                                                 tie_word_embeddings=True)],
                         ids=["all-options", "plain"])
def test_prefill_then_decode_matches_full_forward(config):
    model = tiny_model(config, seed=1)
    rng = np.random.default_rng(0)
    total = [13, 9]  # both cross several block boundaries (block size 4)
    prompt = [5, 3]
    seqs = [rng.integers(1, config.vocab_size, size=n) for n in total]
    # Deliberately scattered, non-contiguous blocks, different per sequence.
    tables = [[7, 2, 11, 0], [5, 14, 9, 3]]

    full = [np.asarray(_full_logits(model, jnp.asarray(s)[None]))[0] for s in seqs]  # [T, V] each

    cache = tuple(init_layer_cache(config, NUM_BLOCKS, BLOCK, jnp.float32) for _ in range(config.num_layers))
    width = max(prompt)
    tokens = np.zeros((2, width), np.int32)
    for i, s in enumerate(seqs):
        tokens[i, : prompt[i]] = s[: prompt[i]]
    positions, paged = _paged(tables, [0, 0], prompt, width)
    logits, cache = _cached_logits(model, jnp.asarray(tokens), jnp.asarray(positions), cache, paged)
    logits = np.asarray(logits)
    for i in range(2):
        np.testing.assert_allclose(logits[i, : prompt[i]], full[i][: prompt[i]], rtol=1e-5, atol=1e-5)

    steps = max(total) - min(prompt)
    for step in range(steps):
        pos = [min(prompt[i] + step, total[i] - 1) for i in range(2)]
        live = [prompt[i] + step < total[i] for i in range(2)]
        tok = np.array([[seqs[i][pos[i]]] for i in range(2)], np.int32)
        positions, paged = _paged(tables, pos, [1 if live[i] else 0 for i in range(2)], 1)
        positions[:, 0] = pos
        logits, cache = _cached_logits(model, jnp.asarray(tok), jnp.asarray(positions), cache, paged)
        logits = np.asarray(logits)[:, 0]
        for i in range(2):
            if live[i]:
                np.testing.assert_allclose(logits[i], full[i][pos[i]], rtol=1e-5, atol=1e-5)


def test_padding_rows_do_not_write_the_cache():
    config = TINY_CONFIG
    model = tiny_model(config, seed=2)
    cache = tuple(init_layer_cache(config, NUM_BLOCKS, BLOCK, jnp.float32) for _ in range(config.num_layers))
    tokens = jnp.asarray([[3, 4, 5, 0, 0]], jnp.int32)
    positions, paged = _paged([[1, 2]], [0], [3], 5)
    _, cache = _cached_logits(model, tokens, jnp.asarray(positions), cache, paged)
    k = np.asarray(cache[0].k)
    written = np.abs(k).sum(axis=(0, 3)) > 0  # [blocks, block]
    expected = np.zeros_like(written)
    expected[1, :3] = True
    np.testing.assert_array_equal(written, expected)
