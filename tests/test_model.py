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
        ({"eos_token_id": [0, 4096]}, r"eos_token_id=4096 is outside"),
        ({"router_scoring": "relu"}, "router_scoring"),
        ({"router_group_score": "mean"}, "router_group_score"),
        ({"router_num_groups": 3}, r"num_experts \(8\) must be a multiple of router_num_groups \(3\)"),
        ({"router_num_groups": 4, "router_topk_groups": 5}, "router_topk_groups"),
        ({"router_num_groups": 8, "router_topk_groups": 1}, "hold fewer than num_experts_per_tok"),
        ({"moe_layer_step": 0}, "moe_layer_step"),
        ({"dense_layers": [3]}, r"dense_layers \[3\] are not layers"),
        ({"attention": "mqa"}, "attention must be"),
        ({"attention": "mla", "qk_norm": False, "attention_bias": False}, "kv_lora_rank must be positive"),
        ({"attention": "mla", "qk_norm": False, "attention_bias": False, "kv_lora_rank": 8,
          "qk_nope_head_dim": 4, "qk_rope_head_dim": 2, "v_head_dim": 4}, "head_dim .* must equal"),
        ({"attention": "mla", "kv_lora_rank": 8, "qk_nope_head_dim": 6, "qk_rope_head_dim": 2,
          "v_head_dim": 4}, "apply to 'gqa' attention only"),
        ({"clip_qkv": 0.0}, "clip_qkv"),
        ({"rope_scaling": {"rope_type": "dynamic", "factor": 2.0}}, "'dynamic' is not supported"),
        ({"rope_scaling": {"rope_type": "yarn", "factor": 2.0}}, "original_max_position_embeddings"),
        ({"rope_scaling": {"rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": 64,
                           "alpha": 1}}, r"unknown key\(s\) \['alpha'\]"),
        ({"rope_scaling": {"rope_type": "linear", "factor": -1}}, "factor must be a positive number"),
    ],
)
def test_inconsistent_configs_are_rejected(changes, message):
    with pytest.raises(ConfigError, match=message):
        replace_config(**changes)


def test_moe_layer_placement():
    config = replace_config(num_layers=6, first_k_dense=1, moe_layer_step=2, dense_layers=(5,))
    assert [config.is_moe_layer(i) for i in range(6)] == [False, True, False, True, False, False]
    assert config.num_moe_layers == 2
    model = nnx.eval_shape(lambda: MoeTransformer(config, rngs=nnx.Rngs(0)))
    assert [layer.is_moe for layer in model.client.layers] == [config.is_moe_layer(i) for i in range(6)]
    assert len(model.experts.banks) == 2


def test_config_json_round_trip_keeps_new_fields(tmp_path):
    config = replace_config(eos_token_id=[0, 5], dense_layers=[2], rope_scaling={
        "rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64})
    config.save(tmp_path / "config.json")
    loaded = type(config).load(tmp_path / "config.json")
    assert loaded == config and hash(loaded) == hash(config)
    assert loaded.eos_token_ids == (0, 5) and loaded.dense_layers == (2,)
