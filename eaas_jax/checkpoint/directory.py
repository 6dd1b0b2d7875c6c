"""The project's checkpoint directory: `config.json`, `params/` (orbax), `tokenizer.json`.

Parameters are restored straight into the requested dtype and device: orbax reads
each stored array and casts it while placing it, so a bf16 checkpoint can be
served in float32 (or the reverse) without a host-side copy of the whole model.
Everything that can be wrong with a directory (a missing file, a config that does
not match the stored shapes, unreadable array data) raises `CheckpointError`
naming the file and the mismatch.
"""

from __future__ import annotations

import os
import shutil

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from flax import nnx

from eaas_jax.checkpoint.params import flat_params, with_params
from eaas_jax.model.config import ConfigError, ModelConfig
from eaas_jax.model.transformer import AttentionClientModel, MoeTransformer

CONFIG_FILE = "config.json"
PARAMS_DIR = "params"
TOKENIZER_FILE = "tokenizer.json"


class CheckpointError(ValueError):
    """A checkpoint directory that cannot be loaded as asked."""


def save_checkpoint(
    directory: str | os.PathLike,
    model: MoeTransformer,
    *,
    tokenizer_file: str | os.PathLike | None = None,
    dtype=None,
) -> None:
    """Writes `model` (cast to `dtype` if given) as a checkpoint directory.

    An existing `params/` is replaced; the config and tokenizer are copied beside it.
    """
    directory = os.path.abspath(os.fspath(directory))
    os.makedirs(directory, exist_ok=True)
    params = flat_params(model)
    if dtype is not None:
        params = {k: v.astype(dtype) for k, v in params.items()}
    params_dir = os.path.join(directory, PARAMS_DIR)
    if os.path.exists(params_dir):
        shutil.rmtree(params_dir)
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(params_dir, params)
    checkpointer.wait_until_finished()
    model.config.save(os.path.join(directory, CONFIG_FILE))
    if tokenizer_file is not None:
        target = os.path.join(directory, TOKENIZER_FILE)
        if os.path.abspath(os.fspath(tokenizer_file)) != target:
            shutil.copyfile(tokenizer_file, target)


def load_config(directory: str | os.PathLike) -> ModelConfig:
    path = os.path.join(os.fspath(directory), CONFIG_FILE)
    if not os.path.isfile(path):
        raise CheckpointError(f"missing {CONFIG_FILE} in checkpoint directory {directory}")
    try:
        return ModelConfig.load(path)
    except ConfigError as e:
        raise CheckpointError(str(e)) from None


def _stored_arrays(params_dir: str) -> dict:
    try:
        metadata = ocp.StandardCheckpointer().metadata(params_dir)
    except Exception as e:  # orbax raises assorted types for unreadable metadata
        raise CheckpointError(f"{params_dir}: not a readable orbax checkpoint ({e})") from None
    tree = getattr(getattr(metadata, "item_metadata", None), "tree", None)
    if not isinstance(tree, dict):
        raise CheckpointError(f"{params_dir}: checkpoint metadata holds no parameter table")
    return tree


def check_stored_shapes(params_dir: str, expected: dict, config_path: str) -> None:
    """Raises CheckpointError unless the stored arrays are exactly `expected`'s names and shapes."""
    stored = _stored_arrays(params_dir)
    missing = sorted(set(expected) - set(stored))
    extra = sorted(set(stored) - set(expected))
    if missing or extra:
        raise CheckpointError(
            f"{params_dir} does not match {config_path}: "
            + (f"missing parameters {missing[:8]}" if missing else "")
            + ("; " if missing and extra else "")
            + (f"unexpected parameters {extra[:8]}" if extra else "")
        )
    for name, spec in expected.items():
        shape = tuple(stored[name].shape)
        if shape != tuple(spec.shape):
            raise CheckpointError(
                f"{params_dir}: parameter {name} has shape {shape} but {config_path} "
                f"implies {tuple(spec.shape)}"
            )


def _open(directory, dtype) -> tuple[str, MoeTransformer, dict]:
    """Checks a checkpoint directory; returns its params dir, the abstract model
    (from `nnx.eval_shape`) and the expected {name: ShapeDtypeStruct}."""
    directory = os.path.abspath(os.fspath(directory))
    if not os.path.isdir(directory):
        raise CheckpointError(f"checkpoint directory not found: {directory}")
    config = load_config(directory)
    params_dir = os.path.join(directory, PARAMS_DIR)
    if not os.path.isdir(params_dir):
        raise CheckpointError(f"missing {PARAMS_DIR}/ (orbax parameters) in {directory}")
    abstract_model = nnx.eval_shape(lambda: MoeTransformer(config, dtype=dtype, rngs=nnx.Rngs(0)))
    expected = flat_params(abstract_model)
    check_stored_shapes(params_dir, expected, os.path.join(directory, CONFIG_FILE))
    return params_dir, abstract_model, expected


def load_model(
    directory: str | os.PathLike, *, dtype=jnp.float32, device: jax.Device | None = None
) -> MoeTransformer:
    """Restores the model of a checkpoint directory in `dtype` on `device`."""
    params_dir, abstract_model, expected = _open(directory, dtype)
    return with_params(abstract_model, _restore(params_dir, expected, dtype, device))


def load_client(
    directory: str | os.PathLike, *, dtype=jnp.float32, device: jax.Device | None = None
) -> AttentionClientModel:
    """Restores only the attention client (no routed experts): what a client of
    expert servers needs."""
    params_dir, abstract_model, expected = _open(directory, dtype)
    wanted = {k: v for k, v in expected.items() if k.startswith("client.")}
    params = _restore(params_dir, wanted, dtype, device, partial=True)
    return with_params(abstract_model.client, {k[len("client."):]: v for k, v in params.items()})


def _restore(params_dir: str, expected: dict, dtype, device, *, partial: bool = False) -> dict:
    """Reads the arrays named in `expected` (all of them, or a subset if `partial`)."""
    sharding = jax.sharding.SingleDeviceSharding(device or jax.devices()[0])
    target = {
        name: jax.ShapeDtypeStruct(spec.shape, jnp.dtype(dtype), sharding=sharding)
        for name, spec in expected.items()
    }
    try:
        if not partial:
            return ocp.StandardCheckpointer().restore(params_dir, target)
        args = ocp.args.PyTreeRestore(
            item=target,
            restore_args=ocp.checkpoint_utils.construct_restore_args(target),
            partial_restore=True,
        )
        return ocp.PyTreeCheckpointer().restore(params_dir, args=args)
    except Exception as e:  # corrupt or truncated array data
        raise CheckpointError(f"{params_dir}: failed to read parameters ({e})") from None


def load_expert_banks(
    directory: str | os.PathLike, moe_layers, *, dtype=jnp.float32, device: jax.Device | None = None
) -> tuple[ModelConfig, dict[str, jax.Array]]:
    """Reads only the routed-expert banks of `moe_layers` (what an expert server
    needs), checked like `load_model` checks the whole model.

    Returns the config and `{"experts.banks.<i>.<proj>": array}` for those layers.
    """
    params_dir, abstract_model, expected = _open(directory, dtype)
    prefixes = tuple(f"experts.banks.{int(i)}." for i in sorted(set(moe_layers)))
    wanted = {k: v for k, v in expected.items() if k.startswith(prefixes)}
    return abstract_model.config, _restore(params_dir, wanted, dtype, device, partial=True)


def tokenizer_path(directory: str | os.PathLike) -> str | None:
    path = os.path.join(os.fspath(directory), TOKENIZER_FILE)
    return path if os.path.isfile(path) else None
