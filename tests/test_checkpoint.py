"""Orbax checkpoint directories: exact round trip, dtype on restore, and named errors."""

from __future__ import annotations

import json
import os
import shutil

import jax.numpy as jnp
import numpy as np
import pytest

from eaas_jax.checkpoint import CheckpointError, flat_params, load_model, save_checkpoint
from eaas_jax.model import ConfigError, ModelConfig

from conftest import TINY_CONFIG, replace_config, tiny_model


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    model = tiny_model(seed=7)
    path = str(tmp_path_factory.mktemp("roundtrip") / "ckpt")
    save_checkpoint(path, model)
    return path, flat_params(model)


def _copy(saved, tmp_path) -> str:
    path = str(tmp_path / "copy")
    shutil.copytree(saved[0], path)
    return path


def test_round_trip_is_exact(saved):
    path, original = saved
    restored = flat_params(load_model(path, dtype=jnp.float32))
    assert set(restored) == set(original)
    for name, value in original.items():
        assert restored[name].dtype == jnp.float32
        np.testing.assert_array_equal(np.asarray(restored[name]), np.asarray(value), err_msg=name)


def test_restores_straight_into_the_requested_dtype(saved):
    path, original = saved
    restored = flat_params(load_model(path, dtype=jnp.bfloat16))
    for name, value in original.items():
        assert restored[name].dtype == jnp.bfloat16, name
        np.testing.assert_array_equal(
            np.asarray(restored[name]), np.asarray(value.astype(jnp.bfloat16)), err_msg=name
        )


def test_config_round_trip(saved):
    assert ModelConfig.load(os.path.join(saved[0], "config.json")) == TINY_CONFIG


def test_missing_directory(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_model(tmp_path / "nope")


def test_missing_config_names_the_file(saved, tmp_path):
    path = _copy(saved, tmp_path)
    os.remove(os.path.join(path, "config.json"))
    with pytest.raises(CheckpointError, match="missing config.json"):
        load_model(path)


def test_missing_params_names_the_directory(saved, tmp_path):
    path = _copy(saved, tmp_path)
    shutil.rmtree(os.path.join(path, "params"))
    with pytest.raises(CheckpointError, match=r"neither a checkpoint of this project \(no params/\) nor a HF"):
        load_model(path)


def test_config_that_does_not_match_the_stored_shapes(saved, tmp_path):
    path = _copy(saved, tmp_path)
    replace_config(moe_intermediate_size=32).save(os.path.join(path, "config.json"))
    with pytest.raises(CheckpointError, match=r"experts\.banks\.0\.\w+_proj has shape \(8, 32, 16\)|experts\.banks\.0\.\w+_proj has shape \(8, 16, 32\)") as err:
        load_model(path)
    assert "config.json" in str(err.value)


def test_config_with_other_layers_names_missing_and_extra_parameters(saved, tmp_path):
    path = _copy(saved, tmp_path)
    replace_config(num_layers=4).save(os.path.join(path, "config.json"))
    with pytest.raises(CheckpointError, match=r"missing parameters \[.*client\.layers\.3\."):
        load_model(path)
    replace_config(num_layers=2).save(os.path.join(path, "config.json"))
    with pytest.raises(CheckpointError, match=r"unexpected parameters \[.*layers\.2\."):
        load_model(path)


@pytest.mark.parametrize(
    "content, message",
    [
        ("{not json", "not valid JSON"),
        ("[1, 2]", "expected a JSON object"),
        (json.dumps({**TINY_CONFIG.to_dict(), "num_heads": 3}), "multiple of num_kv_heads"),
        (json.dumps({**TINY_CONFIG.to_dict(), "hidden_sise": 3}), "unknown config field"),
        (json.dumps({k: v for k, v in TINY_CONFIG.to_dict().items() if k != "vocab_size"}), "missing config field"),
        (json.dumps({**TINY_CONFIG.to_dict(), "num_experts_per_tok": 9}), "num_experts_per_tok"),
    ],
)
def test_malformed_config_is_named(saved, tmp_path, content, message):
    path = _copy(saved, tmp_path)
    with open(os.path.join(path, "config.json"), "w") as f:
        f.write(content)
    with pytest.raises(CheckpointError, match=message) as err:
        load_model(path)
    assert "config.json" in str(err.value)


def test_corrupt_array_data_is_reported(saved, tmp_path):
    path = _copy(saved, tmp_path)
    data_files = []
    for root, _, files in os.walk(os.path.join(path, "params")):
        data_files += [os.path.join(root, f) for f in files if "/d/" in os.path.join(root, f) + "/"]
    assert data_files
    for f in data_files:
        with open(f, "r+b") as fh:
            size = os.path.getsize(f)
            fh.truncate(max(0, size // 3))
    with pytest.raises(CheckpointError, match="params"):
        load_model(path)


def test_corrupt_metadata_is_reported(saved, tmp_path):
    path = _copy(saved, tmp_path)
    with open(os.path.join(path, "params", "_METADATA"), "w") as f:
        f.write("garbage")
    with pytest.raises(CheckpointError, match="params"):
        load_model(path)


def test_config_error_type_is_a_value_error():
    with pytest.raises(ConfigError):
        replace_config(first_k_dense=9)
    assert issubclass(CheckpointError, ValueError)
