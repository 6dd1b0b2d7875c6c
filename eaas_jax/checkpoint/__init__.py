"""Checkpoints: the project's orbax directory format (and, later, importers)."""

from eaas_jax.checkpoint.directory import (
    CheckpointError,
    load_client,
    load_config,
    load_expert_banks,
    load_model,
    save_checkpoint,
    tokenizer_path,
)
from eaas_jax.checkpoint.params import flat_params, with_params

__all__ = [
    "CheckpointError",
    "flat_params",
    "load_client",
    "load_config",
    "load_expert_banks",
    "load_model",
    "save_checkpoint",
    "tokenizer_path",
    "with_params",
]
