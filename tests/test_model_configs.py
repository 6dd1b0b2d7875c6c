"""The real-model shapes in configs/models/ instantiate (abstractly, with
nnx.eval_shape: no memory) to the parameter counts their publishers state."""

from __future__ import annotations

import math
import os

import jax.numpy as jnp
import pytest
from flax import nnx

from eaas_jax.checkpoint import flat_params
from eaas_jax.model import ModelConfig, MoeTransformer

from conftest import REPO

# Total parameters as published (model cards / papers), without DeepSeek-V3's
# 14B multi-token-prediction module.
PUBLISHED_TOTAL = {
    "qwen3-30b-a3b": 30.5e9,
    "mixtral-8x7b": 46.7e9,
    "olmoe-1b-7b": 6.92e9,
    "deepseek-v2-lite": 15.7e9,
    "deepseek-v3": 671e9,
}


def test_every_shipped_model_config_is_checked():
    shipped = {f[: -len(".json")] for f in os.listdir(os.path.join(REPO, "configs", "models"))}
    assert shipped == set(PUBLISHED_TOTAL)


@pytest.mark.parametrize("name", sorted(PUBLISHED_TOTAL))
def test_parameter_count_matches_the_published_one(name):
    config = ModelConfig.load(os.path.join(REPO, "configs", "models", f"{name}.json"))
    model = nnx.eval_shape(lambda: MoeTransformer(config, dtype=jnp.bfloat16, rngs=nnx.Rngs(0)))
    total = sum(math.prod(p.shape) for p in flat_params(model).values())
    assert abs(total / PUBLISHED_TOTAL[name] - 1) < 0.01, f"{name}: {total / 1e9:.2f}B parameters"
