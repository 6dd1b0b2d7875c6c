"""Checkpoint directories: the project's own (`config.json`, `params/` (orbax),
`tokenizer.json`) and HF model directories (`config.json`, `*.safetensors`), which
every loader here accepts alike.

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

from eaas_jax.checkpoint.hf import HfCheckpointError, is_hf_directory, load_hf_params, read_hf_config
from eaas_jax.checkpoint.params import flat_params, with_params
from eaas_jax.model.config import ConfigError, ModelConfig
from eaas_jax.model.transformer import AttentionClientModel, MoeTransformer

CONFIG_FILE = "config.json"
PARAMS_DIR = "params"
TOKENIZER_FILE = "tokenizer.json"
# Files beside the parameters that tokenization and generation read; all optional.
ASSET_FILES = (TOKENIZER_FILE, "tokenizer_config.json", "chat_template.jinja", "generation_config.json")


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
    """The model config of a project or HF checkpoint directory."""
    if is_hf_directory(directory):
        return _hf_config(directory)[0]
    path = os.path.join(os.fspath(directory), CONFIG_FILE)
    if not os.path.isfile(path):
        raise CheckpointError(f"missing {CONFIG_FILE} in checkpoint directory {directory}")
    try:
        return ModelConfig.load(path)
    except ConfigError as e:
        raise CheckpointError(str(e)) from None


def _hf_config(directory):
    try:
        return read_hf_config(directory)
    except HfCheckpointError as e:
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


class _Checkpoint:
    """An opened checkpoint directory of either kind: its config, the abstract
    model (from `nnx.eval_shape`) and the expected {name: ShapeDtypeStruct};
    `read(names)` restores those parameters."""

    def __init__(self, directory, dtype, device):
        directory = os.path.abspath(os.fspath(directory))
        if not os.path.isdir(directory):
            raise CheckpointError(f"checkpoint directory not found: {directory}")
        self.directory, self.dtype, self.device = directory, dtype, device
        self.hf_layout = None
        if is_hf_directory(directory):
            self.config, self.hf_layout = _hf_config(directory)
        else:
            self.config = load_config(directory)
            self.params_dir = os.path.join(directory, PARAMS_DIR)
            if not os.path.isdir(self.params_dir):
                raise CheckpointError(
                    f"{directory} is neither a checkpoint of this project (no {PARAMS_DIR}/) "
                    "nor a HF model directory (no *.safetensors)"
                )
        config = self.config
        self.abstract_model = nnx.eval_shape(
            lambda: MoeTransformer(config, dtype=dtype, rngs=nnx.Rngs(0))
        )
        self.expected = flat_params(self.abstract_model)
        if self.hf_layout is None:
            check_stored_shapes(self.params_dir, self.expected, os.path.join(directory, CONFIG_FILE))

    def read(self, names=None) -> dict[str, jax.Array]:
        """The parameters named in `names` (default: all)."""
        wanted = set(self.expected) if names is None else set(names)
        if self.hf_layout is not None:
            try:
                return load_hf_params(
                    self.directory, self.config, self.hf_layout, self.expected, wanted,
                    dtype=self.dtype, device=self.device,
                )
            except HfCheckpointError as e:
                raise CheckpointError(str(e)) from None
        expected = {k: v for k, v in self.expected.items() if k in wanted}
        return _restore(self.params_dir, expected, self.dtype, self.device,
                        partial=len(expected) < len(self.expected))


def load_model(
    directory: str | os.PathLike, *, dtype=jnp.float32, device: jax.Device | None = None
) -> MoeTransformer:
    """Restores the model of a checkpoint directory (project or HF) in `dtype` on `device`."""
    checkpoint = _Checkpoint(directory, dtype, device)
    return with_params(checkpoint.abstract_model, checkpoint.read())


def load_client(
    directory: str | os.PathLike, *, dtype=jnp.float32, device: jax.Device | None = None
) -> AttentionClientModel:
    """Restores only the attention client (no routed experts): what a client of
    expert servers needs."""
    checkpoint = _Checkpoint(directory, dtype, device)
    params = checkpoint.read(k for k in checkpoint.expected if k.startswith("client."))
    return with_params(
        checkpoint.abstract_model.client, {k[len("client."):]: v for k, v in params.items()}
    )


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
    checkpoint = _Checkpoint(directory, dtype, device)
    prefixes = tuple(f"experts.banks.{int(i)}." for i in sorted(set(moe_layers)))
    return checkpoint.config, checkpoint.read(k for k in checkpoint.expected if k.startswith(prefixes))


def convert_checkpoint(
    source: str | os.PathLike, out: str | os.PathLike, *, dtype=jnp.bfloat16, overwrite: bool = False
) -> ModelConfig:
    """Writes a HF model directory (or any loadable checkpoint) as this project's
    checkpoint directory, parameters in `dtype`, with its tokenizer and
    generation files, so later loads are one orbax restore."""
    source, out = os.path.abspath(os.fspath(source)), os.path.abspath(os.fspath(out))
    if source == out:
        raise CheckpointError("the output directory must differ from the source")
    if os.path.isdir(out) and os.listdir(out) and not overwrite:
        raise CheckpointError(f"output directory {out} is not empty (pass overwrite=True / --force)")
    model = load_model(source, dtype=dtype)
    save_checkpoint(out, model)
    for name in ASSET_FILES:
        if os.path.isfile(os.path.join(source, name)):
            shutil.copyfile(os.path.join(source, name), os.path.join(out, name))
    return model.config
