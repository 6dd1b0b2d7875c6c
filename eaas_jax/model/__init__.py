"""The MoE transformer: config, client half, expert half."""

from eaas_jax.model.attention import LayerCache, PagedAttentionInputs, init_layer_cache
from eaas_jax.model.config import ConfigError, ModelConfig
from eaas_jax.model.moe import ExpertBank, Routing
from eaas_jax.model.transformer import (
    AttentionClientModel,
    ExpertFn,
    ExpertStack,
    KVCache,
    MoeTransformer,
    load_balancing_loss,
)

__all__ = [
    "AttentionClientModel",
    "ConfigError",
    "ExpertBank",
    "ExpertFn",
    "ExpertStack",
    "KVCache",
    "LayerCache",
    "ModelConfig",
    "MoeTransformer",
    "PagedAttentionInputs",
    "Routing",
    "init_layer_cache",
    "load_balancing_loss",
]
