"""Model-level checks: bf16 tracks fp32, routing uses top-k, config validation."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from eaas_jax.checkpoint import flat_params, with_params
from eaas_jax.model import ConfigError, MoeTransformer

from conftest import TINY_CONFIG, replace_config, tiny_model


def test_bfloat16_model_tracks_float32():
    model32 = tiny_model(seed=4)
    abstract16 = nnx.eval_shape(lambda: MoeTransformer(TINY_CONFIG, dtype=jnp.bfloat16, rngs=nnx.Rngs(0)))
    model16 = with_params(abstract16, {k: v.astype(jnp.bfloat16) for k, v in flat_params(model32).items()})
    tokens = jnp.asarray(np.random.default_rng(0).integers(1, 4096, size=(2, 24)))
    logits32 = np.asarray(nnx.jit(lambda m, t: m(t))(model32, tokens))
    logits16 = np.asarray(nnx.jit(lambda m, t: m(t))(model16, tokens))
    assert logits16.dtype == np.float32  # logits are always returned in fp32
    scale = np.abs(logits32).max()
    # Near-ties in the router can send a token to another expert in bf16, so
    # compare in aggregate rather than element by element.
    assert np.abs(logits16 - logits32).mean() < 0.01 * scale
    # A random model has near-tied logits; a broken bf16 path would agree ~never.
    assert (logits16.argmax(-1) == logits32.argmax(-1)).mean() > 0.75


def test_router_renormalises_only_when_asked():
    h = jnp.asarray(np.random.default_rng(1).standard_normal((16, TINY_CONFIG.hidden_size)), jnp.float32)
    for norm in (True, False):
        model = MoeTransformer(replace_config(norm_topk_prob=norm), rngs=nnx.Rngs(0))
        routing = model.client.layers[1].router(h)
        sums = np.asarray(routing.weights.sum(-1))
        if norm:
            np.testing.assert_allclose(sums, 1.0, rtol=1e-6)
        else:
            assert (sums < 1.0).all()
        top = np.sort(np.asarray(routing.probs), axis=-1)[:, ::-1][:, : TINY_CONFIG.num_experts_per_tok]
        np.testing.assert_allclose(np.sort(np.asarray(routing.probs)[np.arange(16)[:, None], np.asarray(routing.expert_ids)], -1)[:, ::-1], top)


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"hidden_size": 0}, "hidden_size"),
        ({"num_kv_heads": 3}, "multiple"),
        ({"num_experts_per_tok": 0}, "num_experts_per_tok"),
        ({"shared_expert_intermediate_size": 0}, "shared_expert_intermediate_size"),
        ({"num_shared_experts": 0, "shared_expert_intermediate_size": 0}, "shared_expert_gate"),
        ({"eos_token_id": 5000}, "outside the vocabulary"),
        ({"rope_theta": -1.0}, "rope_theta"),
    ],
)
def test_inconsistent_configs_are_rejected(changes, message):
    with pytest.raises(ConfigError, match=message):
        replace_config(**changes)
