"""Checkpoints: the project's orbax directory format (and, later, importers)."""

from eaas_jax.checkpoint.directory import (
    CheckpointError,
    load_config,
    load_model,
    save_checkpoint,
    tokenizer_path,
)
from eaas_jax.checkpoint.params import flat_params, with_params

__all__ = [
    "CheckpointError",
    "flat_params",
    "load_config",
    "load_model",
    "save_checkpoint",
    "tokenizer_path",
    "with_params",
]
