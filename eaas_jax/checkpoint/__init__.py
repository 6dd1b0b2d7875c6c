"""Checkpoints: the project's orbax directory format and HF safetensors imports."""

from eaas_jax.checkpoint.directory import (
    CheckpointError,
    load_client,
    load_config,
    load_expert_banks,
    load_model,
    convert_checkpoint,
    save_checkpoint,
)
from eaas_jax.checkpoint.params import flat_params, with_params

__all__ = [
    "CheckpointError",
    "convert_checkpoint",
    "flat_params",
    "load_client",
    "load_config",
    "load_expert_banks",
    "load_model",
    "save_checkpoint",
    "with_params",
]
