"""HF safetensors import, checked against transformers' PyTorch models.

For every supported architecture a tiny random model is built with
transformers, saved with `save_pretrained`, loaded here, and must give the same
logits (1e-4 relative, float32) on prompts of different lengths and the same
32 greedy tokens as transformers' `generate`.
"""

from __future__ import annotations

import json
import os
import shutil

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

from eaas_jax.checkpoint import CheckpointError, load_expert_banks, load_model
from eaas_jax.engine import Engine, SamplingParams
import hf_models

GREEDY_32 = SamplingParams(temperature=0.0, max_tokens=32, ignore_eos=True)


@pytest.fixture(scope="module", params=sorted(hf_models.ARCHITECTURES))
def hf_dir(request, tmp_path_factory):
    """(transformers model, its save_pretrained directory) per architecture."""
    model = hf_models.build(request.param)
    directory = str(tmp_path_factory.mktemp("hf") / request.param)
    return model, hf_models.save(model, directory)


def _padded_logits(model, prompts) -> np.ndarray:
    """Our logits for a right-padded batch of the prompts (causal: padding at
    the end does not change earlier positions)."""
    width = max(map(len, prompts))
    tokens = np.zeros((len(prompts), width), np.int32)
    for i, p in enumerate(prompts):
        tokens[i, : len(p)] = p
    return np.asarray(model(jnp.asarray(tokens)))


def _assert_logits_match(ours_model, reference_model, prompts):
    ours = _padded_logits(ours_model, prompts)
    for i, prompt in enumerate(prompts):
        ref = hf_models.reference_logits(reference_model, prompt)
        got = ours[i, : len(prompt)]
        error = np.abs(got - ref).max() / np.abs(ref).max()
        assert error < 1e-4, f"prompt {i}: logits differ by {error:.2e} (relative)"


def test_logits_equal_transformers(hf_dir):
    reference, directory = hf_dir
    _assert_logits_match(load_model(directory), reference, hf_models.prompts())


def test_greedy_generation_equals_transformers(hf_dir):
    reference, directory = hf_dir
    prompts = hf_models.prompts()
    engine = Engine(directory, max_num_seqs=4, max_model_len=64, dtype="float32", block_size=8)
    outputs = engine.generate(prompts, GREEDY_32, use_tqdm=False)
    for prompt, out in zip(prompts, outputs):
        expected = hf_models.reference_greedy(reference, prompt, 32)
        assert out.outputs[0].token_ids == expected


@pytest.mark.parametrize("architecture", sorted(hf_models.ARCHITECTURES))
def test_fused_expert_layout(architecture, tmp_path):
    reference = hf_models.build(architecture, seed=1)
    directory = hf_models.save_fused(reference, str(tmp_path / "fused"))
    _assert_logits_match(load_model(directory), reference, hf_models.prompts()[:2])


def test_sharded_checkpoint(tmp_path):
    reference = hf_models.build("deepseek_v3", seed=2)
    directory = hf_models.save(reference, str(tmp_path / "sharded"), max_shard_size="100KB")
    shards = [f for f in os.listdir(directory) if f.endswith(".safetensors")]
    assert len(shards) > 3 and os.path.exists(os.path.join(directory, "model.safetensors.index.json"))
    _assert_logits_match(load_model(directory), reference, hf_models.prompts()[:2])


def test_expert_server_reads_only_its_banks_from_a_hf_directory(hf_dir):
    _, directory = hf_dir
    whole = load_model(directory)
    config, banks = load_expert_banks(directory, [1])
    assert sorted(banks) == [f"experts.banks.1.{p}" for p in ("down_proj", "gate_proj", "up_proj")]
    for name, array in banks.items():
        proj = name.rsplit(".", 1)[1]
        np.testing.assert_array_equal(array, getattr(whole.experts.banks[1], proj).get_value())


# ------------------------------------------------------------------ bad input


@pytest.fixture(scope="module")
def qwen3_dir(tmp_path_factory):
    model = hf_models.build("qwen3_moe", seed=3)
    return hf_models.save(model, str(tmp_path_factory.mktemp("hf") / "qwen3"))


def _copy(directory, tmp_path) -> str:
    target = str(tmp_path / "copy")
    shutil.copytree(directory, target)
    return target


def _edit_tensors(directory, edit) -> None:
    path = os.path.join(directory, "model.safetensors")
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path)


def test_unknown_architecture(qwen3_dir, tmp_path):
    directory = _copy(qwen3_dir, tmp_path)
    hf_models.edit_config(directory, architectures=["LlamaForCausalLM"])
    with pytest.raises(CheckpointError, match=r"LlamaForCausalLM.*not supported.*Qwen3MoeForCausalLM"):
        load_model(directory)


def test_unsupported_option_is_named(qwen3_dir, tmp_path):
    directory = _copy(qwen3_dir, tmp_path)
    hf_models.edit_config(directory, hidden_act="gelu")
    with pytest.raises(CheckpointError, match="hidden_act='gelu' is not supported"):
        load_model(directory)


def test_missing_tensor_is_named(qwen3_dir, tmp_path):
    directory = _copy(qwen3_dir, tmp_path)
    _edit_tensors(directory, lambda t: t.pop("model.layers.1.mlp.experts.3.up_proj.weight"))
    with pytest.raises(CheckpointError, match=r"missing tensors \['model.layers.1.mlp.experts.3.up_proj.weight'\]"):
        load_model(directory)


def test_unexpected_tensor_is_named(qwen3_dir, tmp_path):
    directory = _copy(qwen3_dir, tmp_path)
    _edit_tensors(directory, lambda t: t.update({"model.layers.0.self_attn.rotary.weight": torch.zeros(4)}))
    with pytest.raises(CheckpointError, match=r"unexpected tensors \['model.layers.0.self_attn.rotary.weight'\]"):
        load_model(directory)


def test_shape_mismatch_names_tensor_and_shapes(qwen3_dir, tmp_path):
    directory = _copy(qwen3_dir, tmp_path)
    _edit_tensors(directory, lambda t: t.update({"model.layers.2.self_attn.k_proj.weight": torch.zeros(64, 65)}))
    with pytest.raises(CheckpointError, match=r"k_proj.weight has shape \(64, 65\), expected \(64, 64\)"):
        load_model(directory)


def test_integer_tensor_is_refused(qwen3_dir, tmp_path):
    directory = _copy(qwen3_dir, tmp_path)
    _edit_tensors(directory, lambda t: t.update({"model.norm.weight": torch.ones(64, dtype=torch.int32)}))
    with pytest.raises(CheckpointError, match=r"model.norm.weight has dtype int32; expected a floating"):
        load_model(directory)


def test_truncated_file_is_reported(qwen3_dir, tmp_path):
    directory = _copy(qwen3_dir, tmp_path)
    path = os.path.join(directory, "model.safetensors")
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) - 100)
    with pytest.raises(CheckpointError, match=r"byte range .* does not hold"):
        load_model(directory)


def test_index_naming_a_missing_shard(tmp_path):
    reference = hf_models.build("mixtral", seed=4)
    directory = hf_models.save(reference, str(tmp_path / "sharded"), max_shard_size="100KB")
    with open(os.path.join(directory, "model.safetensors.index.json")) as f:
        shard = sorted(set(json.load(f)["weight_map"].values()))[-1]
    os.remove(os.path.join(directory, shard))
    with pytest.raises(CheckpointError, match=f"shard {shard} .* does not exist"):
        load_model(directory)


def test_failed_load_leaves_nothing_half_done(qwen3_dir, tmp_path):
    """A mismatch found after some tensors were read raises, and a later
    correct load is unaffected (no state is kept between loads)."""
    directory = _copy(qwen3_dir, tmp_path)
    _edit_tensors(directory, lambda t: t.update({"model.norm.weight": torch.ones(3)}))
    with pytest.raises(CheckpointError):
        load_model(directory)
    load_model(qwen3_dir)


def _quantize_fp8_blocks(weight: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """DeepSeek-V3's release format: float8 e4m3 values and one float32 scale
    per (block x block) tile, weight ~= fp8 * scale."""
    rows, cols = weight.shape
    tiles_r, tiles_c = -(-rows // block), -(-cols // block)
    padded = torch.zeros(tiles_r * block, tiles_c * block)
    padded[:rows, :cols] = weight
    tiles = padded.reshape(tiles_r, block, tiles_c, block)
    scale = tiles.abs().amax(dim=(1, 3)) / 448.0
    quantized = (tiles / scale[:, None, :, None]).reshape(padded.shape)[:rows, :cols]
    return quantized.to(torch.float8_e4m3fn), scale


def test_fp8_block_quantized_checkpoint(tmp_path):
    """Float8 weights with per-block scales (as DeepSeek-V3 ships) load
    dequantized: logits equal transformers' model holding the same dequantized weights."""
    block = 16
    reference = hf_models.build("deepseek_v3", seed=7)
    directory = hf_models.save(reference, str(tmp_path / "fp8"))
    path = os.path.join(directory, "model.safetensors")
    tensors = load_file(path)
    dequantized = {}
    for name in list(tensors):
        # Every linear layer but the router, as in the release.
        if name.startswith("model.layers.") and name.endswith("proj.weight"):
            q, scale = _quantize_fp8_blocks(tensors[name], block)
            tensors[name], tensors[name + "_scale_inv"] = q, scale
            s = scale.repeat_interleave(block, 0).repeat_interleave(block, 1)[: q.shape[0], : q.shape[1]]
            dequantized[name] = q.float() * s
    assert len(dequantized) > 20
    save_file(tensors, path)
    hf_models.edit_config(directory, quantization_config={
        "quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
        "weight_block_size": [block, block]})
    # The reference: transformers' model loaded from the dequantized weights.
    plain = hf_models.save(reference, str(tmp_path / "dequantized"))
    plain_tensors = load_file(os.path.join(plain, "model.safetensors"))
    save_file({**plain_tensors, **dequantized}, os.path.join(plain, "model.safetensors"))
    dequantized_model = transformers.AutoModelForCausalLM.from_pretrained(plain, dtype=torch.float32).eval()
    original = reference.state_dict()["model.layers.1.self_attn.o_proj.weight"]
    assert not torch.equal(dequantized_model.state_dict()["model.layers.1.self_attn.o_proj.weight"], original)
    _assert_logits_match(load_model(directory), dequantized_model, hf_models.prompts()[:2])


def test_quantization_other_than_fp8_blocks_is_refused(qwen3_dir, tmp_path):
    directory = _copy(qwen3_dir, tmp_path)
    hf_models.edit_config(directory, quantization_config={"quant_method": "awq", "bits": 4})
    with pytest.raises(CheckpointError, match="quant_method='awq' is not supported"):
        load_model(directory)
