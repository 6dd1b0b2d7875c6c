"""The in-graph sampler on known logits: filters, seeding, suppression, logprobs."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from eaas_jax.engine import sampler
from eaas_jax.engine.sampler import SamplingInputs, filtered_logits, sample

# Probabilities 0.4, 0.3, 0.15, 0.1, 0.05 for tokens 3, 0, 4, 1, 2.
PROBS = np.array([0.3, 0.1, 0.05, 0.4, 0.15], np.float32)
LOGITS = np.log(PROBS)


def _inputs(n=1, **fields):
    row = dict(temperature=1.0, top_p=1.0, top_k=0, min_p=0.0, seed=0, stream=0, step=0, banned=[])
    row.update(fields)
    return SamplingInputs.padded([dict(row) for _ in range(n)], n, max(1, len(row["banned"])))


def _kept(**fields) -> set[int]:
    ranked, order = jax.jit(filtered_logits)(jnp.asarray(LOGITS[None]), _inputs(**fields))
    ranked, order = np.asarray(ranked[0]), np.asarray(order[0])
    return {int(t) for t, v in zip(order, ranked) if np.isfinite(v)}


@pytest.mark.parametrize(
    "fields, expected",
    [
        ({}, {0, 1, 2, 3, 4}),
        ({"top_k": 2}, {3, 0}),
        ({"top_k": 1}, {3}),
        ({"top_p": 0.5}, {3, 0}),  # 0.4 < 0.5, 0.4 + 0.3 >= 0.5
        ({"top_p": 0.4}, {3}),
        ({"top_p": 0.71}, {3, 0, 4}),
        ({"top_p": 0.01}, {3}),  # the most likely token always stays
        ({"min_p": 0.3}, {3, 0, 4}),  # threshold 0.12
        ({"min_p": 0.5}, {3, 0}),  # threshold 0.2
        ({"top_k": 3, "top_p": 0.5}, {3, 0}),  # top_p on the renormalised top-3
        ({"top_k": 3, "top_p": 0.75}, {3, 0}),  # 0.4/0.85 + 0.3/0.85 = 0.82 >= 0.75
        ({"top_k": 3, "top_p": 0.85}, {3, 0, 4}),
        ({"banned": [3]}, {0, 1, 2, 4}),
    ],
)
def test_filters_keep_exactly_the_specified_tokens(fields, expected):
    assert _kept(**fields) == expected


def test_temperature_changes_the_distribution_not_the_support():
    ranked, order = filtered_logits(jnp.asarray(LOGITS[None]), _inputs(temperature=0.5))
    probs = np.asarray(jax.nn.softmax(ranked[0]))
    expected = PROBS**2 / (PROBS**2).sum()
    np.testing.assert_allclose(probs, expected[np.asarray(order[0])], rtol=1e-5)


def test_sampling_frequencies_follow_the_filtered_distribution():
    n = 4000
    logits = jnp.asarray(np.tile(LOGITS, (n, 1)))
    params = _inputs(n, top_k=3)._replace(stream=jnp.arange(n, dtype=jnp.int32))
    tokens, *_ = jax.jit(sample, static_argnums=2)(logits, params, 0)
    counts = np.bincount(np.asarray(tokens), minlength=5) / n
    expected = np.array([0.3, 0, 0, 0.4, 0.15]) / 0.85
    np.testing.assert_allclose(counts, expected, atol=0.03)


def test_same_seed_same_token_different_seed_differs():
    logits = jnp.asarray(np.tile(np.zeros(64, np.float32), (2, 1)))  # uniform over 64 tokens
    def draw(seeds, steps):
        params = _inputs(2)._replace(seed=jnp.asarray(seeds, jnp.uint32), step=jnp.asarray(steps, jnp.int32))
        return np.asarray(sample(logits, params, 0)[0])
    a = np.array([draw([7, 7], [s, s]) for s in range(20)])
    assert (a[:, 0] == a[:, 1]).all()  # same (seed, stream, step), same token, whatever the row
    b = np.array([draw([7, 8], [s, s]) for s in range(20)])
    assert (b[:, 0] != b[:, 1]).any()


def test_greedy_rows_take_the_argmax_and_respect_bans():
    logits = jnp.asarray(np.stack([LOGITS, LOGITS]))
    params = SamplingInputs.padded(
        [dict(temperature=0.0, top_p=1.0, top_k=0, min_p=0.0, seed=s, stream=0, step=0, banned=b)
         for s, b in ((1, []), (2, [3]))], 2, 1,
    )
    tokens, logprob, rank, top_ids, top_lp = sample(logits, params, 2)
    assert np.asarray(tokens).tolist() == [3, 0]
    np.testing.assert_allclose(np.asarray(logprob), np.log([0.4, 0.3]), rtol=1e-5)
    assert np.asarray(rank).tolist() == [1, 2]
    assert np.asarray(top_ids).tolist() == [[3, 0], [3, 0]]
    np.testing.assert_allclose(np.asarray(top_lp)[0], np.log([0.4, 0.3]), rtol=1e-5)


@pytest.mark.parametrize("width", [0, 4, sampler.COMPARED_BANNED_IDS, sampler.COMPARED_BANNED_IDS + 1, 40])
def test_banned_ids_are_suppressed_whichever_form(width):
    """Compared in place (few ids) or through a mask (many): the same logits
    at -inf, padding (-1) and ids past the vocabulary banning nothing."""
    rng = np.random.default_rng(width)
    vocab, batch = 50, 3
    logits = rng.normal(size=(batch, vocab)).astype(np.float32)
    banned = np.full((batch, width), -1, np.int32)
    for row in range(batch):
        n = rng.integers(0, width + 1)
        banned[row, :n] = rng.choice(vocab + 20, size=n, replace=False)  # some past the vocabulary
    if width:
        banned[0, -1] = 7  # (one id banned for sure; repeating one is allowed)
    expected = logits.copy()
    for row in range(batch):
        expected[row, [i for i in banned[row] if 0 <= i < vocab]] = -np.inf
    got = np.asarray(jax.jit(sampler._suppress)(jnp.asarray(logits), jnp.asarray(banned)))
    np.testing.assert_array_equal(got, expected)
    assert width == 0 or np.isinf(got[0, 7])


def test_all_greedy_batch_takes_the_argmax_path_with_the_same_tokens():
    """A batch of greedy rows skips the vocabulary sort (greedy_only); its tokens
    must equal those the same rows get beside a sampled row, bans included."""
    logits = jnp.asarray(np.random.default_rng(0).standard_normal((3, 50)), jnp.float32)
    greedy_row = dict(temperature=0.0, top_p=1.0, top_k=0, min_p=0.0, seed=0, stream=0, step=0, banned=[])
    best = np.asarray(logits).argmax(-1)
    rows = [dict(greedy_row), dict(greedy_row, banned=[int(best[1])]), dict(greedy_row)]
    alone = jax.jit(sample, static_argnums=(2, 3))(logits, SamplingInputs.padded(rows, 3, 1), 0, True)[0]
    mixed_rows = rows[:2] + [dict(greedy_row, temperature=1.0)]
    mixed = jax.jit(sample, static_argnums=(2, 3))(logits, SamplingInputs.padded(mixed_rows, 3, 1), 0, False)[0]
    assert np.asarray(alone).tolist()[:2] == np.asarray(mixed).tolist()[:2]
    assert int(alone[0]) == best[0] and int(alone[1]) != best[1]
    assert int(alone[1]) == int(np.argsort(-np.asarray(logits[1]))[1])


def _penalties_reference(logits, prompt, output, repetition, frequency, presence):
    """vLLM's penalties in NumPy, from a row's prompt and output token lists."""
    out = logits.astype(np.float64).copy()
    counts = np.bincount(np.asarray(output, np.int64), minlength=out.shape[-1]).astype(np.float64)
    seen = np.zeros(out.shape[-1], bool)
    seen[list(prompt) + list(output)] = True
    scale = np.where(seen, repetition, 1.0)
    out = np.where(out > 0, out / scale, out * scale)
    return out - frequency * counts - presence * (counts > 0)


def test_penalties_match_a_numpy_reference():
    """Random prompts and outputs, each row's latest output token either known
    to the host (in its counts) or still on the device (`pending`)."""
    from collections import Counter

    from eaas_jax.engine.sampler import apply_penalties

    rng = np.random.default_rng(3)
    vocab, rows_n = 40, 6
    logits = rng.standard_normal((rows_n, vocab)).astype(np.float32) * 3
    rows, pending, expected = [], [], []
    for i in range(rows_n):
        prompt = rng.integers(0, vocab, rng.integers(1, 12)).tolist()
        output = rng.integers(0, vocab, rng.integers(0, 15)).tolist()
        rep, freq, pres = (1.0, 0.0, 0.0) if i == 0 else (float(rng.uniform(0.5, 2)), float(rng.uniform(-2, 2)),
                                                          float(rng.uniform(-2, 2)))
        expected.append(_penalties_reference(logits[i], prompt, output, rep, freq, pres))
        on_device = bool(output) and i % 2 == 1
        known = output[:-1] if on_device else output
        counts = Counter(known)
        rows.append(dict(temperature=1.0, top_p=1.0, top_k=0, min_p=0.0, seed=0, stream=0, step=0, banned=[],
                         presence_penalty=pres, frequency_penalty=freq, repetition_penalty=rep,
                         penalized=[(t, counts.get(t, 0)) for t in set(prompt) | set(counts)]))
        pending.append(output[-1] if on_device else -1)
    params = SamplingInputs.padded(rows, 8, 1, 64)  # two padded rows
    got = jax.jit(apply_penalties)(jnp.asarray(np.pad(logits, ((0, 2), (0, 0)))), params,
                                   jnp.asarray(pending + [-1, -1], jnp.int32))
    np.testing.assert_allclose(np.asarray(got)[:rows_n], np.stack(expected), rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(got)[rows_n:], 0.0)  # padding rows: untouched zeros


def test_penalties_steer_sampling_but_not_the_returned_logprobs():
    """Greedy and sampled rows pick from the penalized logits; the logprobs
    returned are the model's raw ones (vLLM's default)."""
    logits = jnp.asarray(np.stack([LOGITS, LOGITS]))
    row = dict(temperature=0.0, top_p=1.0, top_k=0, min_p=0.0, seed=0, stream=0, step=0, banned=[],
               presence_penalty=2.0, penalized=[(3, 1)])  # token 3 (p 0.4) already generated once
    params = SamplingInputs.padded([row, dict(row, temperature=1.0, top_k=1)], 2, 1, 64)
    for greedy_only in (True, False):
        tokens, logprob, *_ = sample(logits, params if not greedy_only else
                                     SamplingInputs.padded([row, row], 2, 1, 64), 0, greedy_only)
        assert np.asarray(tokens).tolist() == [0, 0]  # log 0.4 - 2 < log 0.3
        np.testing.assert_allclose(np.asarray(logprob), np.log([0.3, 0.3]), rtol=1e-5)


def test_generation_config_gives_the_default_penalty_and_refuses_a_bad_one(tmp_path):
    from eaas_jax.engine.generation_config import GenerationDefaults

    (tmp_path / "generation_config.json").write_text(json.dumps({"repetition_penalty": 1.1, "temperature": 0.7}))
    params = GenerationDefaults.load(tmp_path).sampling_params()
    assert (params.repetition_penalty, params.temperature, params.presence_penalty) == (1.1, 0.7, 0.0)
    (tmp_path / "generation_config.json").write_text(json.dumps({"repetition_penalty": 0}))
    with pytest.raises(ValueError, match="generation_config.json: repetition_penalty must be"):
        GenerationDefaults.load(tmp_path)
