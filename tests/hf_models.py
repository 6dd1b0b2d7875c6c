"""Tiny random HF transformers models of every supported architecture, saved
as HF model directories: the independent reference for the importer tests.

Each config turns on what makes its architecture differ (dense layers, shared
experts, q/k norms, clipping, MLA with and without a query low rank, YaRN,
grouped routing, a score-correction bias), at sizes that run in milliseconds
with PyTorch on the CPU.
"""

from __future__ import annotations

import json
import os

import numpy as np
import torch
import transformers

VOCAB = 128
EOS = 2

_BASE = dict(
    vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
    num_attention_heads=4, num_key_value_heads=2, bos_token_id=1, eos_token_id=EOS,
    pad_token_id=0, max_position_embeddings=256,
    # Larger than the default 0.02 so logits are spread out and greedy choices
    # are not near-ties that float rounding could flip.
    initializer_range=0.1,
)
_YARN = {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64,
         "beta_fast": 32, "beta_slow": 1}
# DeepSeek's MLA expands keys to every head, so transformers needs kv heads = heads.
_MLA = dict(num_key_value_heads=4, kv_lora_rank=16, qk_nope_head_dim=16, qk_rope_head_dim=8,
            v_head_dim=12, moe_intermediate_size=32, first_k_dense_replace=1)

ARCHITECTURES = {
    "mixtral": dict(num_local_experts=4, num_experts_per_tok=2),
    "qwen2_moe": dict(num_experts=6, num_experts_per_tok=2, moe_intermediate_size=32,
                      shared_expert_intermediate_size=48, mlp_only_layers=[1], norm_topk_prob=True),
    "qwen3_moe": dict(num_experts=6, num_experts_per_tok=2, moe_intermediate_size=32,
                      mlp_only_layers=[0], norm_topk_prob=True, head_dim=32,
                      rope_scaling={**_YARN, "rope_theta": 10000.0}),
    "olmoe": dict(num_experts=6, num_experts_per_tok=2, clip_qkv=3.0),
    "deepseek_v2": dict(**_MLA, n_routed_experts=8, num_experts_per_tok=2, q_lora_rank=None,
                        n_shared_experts=2, topk_method="group_limited_greedy", n_group=4,
                        topk_group=2, routed_scaling_factor=1.5,
                        rope_scaling={**_YARN, "mscale": 0.707, "mscale_all_dim": 0.707}),
    "deepseek_v3": dict(**_MLA, n_routed_experts=8, num_experts_per_tok=2, q_lora_rank=24,
                        n_shared_experts=1, n_group=4, topk_group=2,
                        rope_scaling={**_YARN, "mscale": 1.0, "mscale_all_dim": 1.0}),
}


def build(architecture: str, seed: int = 0) -> transformers.PreTrainedModel:
    torch.manual_seed(seed)
    config = transformers.AutoConfig.for_model(architecture, **{**_BASE, **ARCHITECTURES[architecture]})
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for layer in model.model.layers:
            gate = getattr(layer.mlp, "gate", None)
            bias = getattr(gate, "e_score_correction_bias", None)
            if bias is not None:  # zero at init; make it matter
                bias.normal_(0, 0.1)
    return model


def save(model, directory: str, **kwargs) -> str:
    """`save_pretrained` (per-expert tensors, as published checkpoints have them)."""
    model.save_pretrained(directory, **kwargs)
    return directory


def save_fused(model, directory: str) -> str:
    """The fused expert layout (`experts.gate_up_proj` [E, 2f, d], `experts.down_proj`
    [E, d, f]) that transformers holds in memory, written as one safetensors file."""
    from safetensors.torch import save_file

    os.makedirs(directory, exist_ok=True)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    assert any(k.endswith("experts.gate_up_proj") for k in state), "transformers no longer fuses experts"
    save_file(state, os.path.join(directory, "model.safetensors"))
    model.config.architectures = [type(model).__name__]
    model.config.save_pretrained(directory)
    return directory


def prompts(lengths=(5, 17, 9), seed=0) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(3, VOCAB, size=n).tolist() for n in lengths]


def reference_logits(model, prompt: list[int]) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor([prompt])).logits[0].numpy()


def reference_greedy(model, prompt: list[int], num_tokens: int, eos=None) -> list[int]:
    """transformers' greedy `generate`; with eos=None it never stops early."""
    model.generation_config.eos_token_id = eos
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=num_tokens, do_sample=False,
                             pad_token_id=0, attention_mask=torch.ones(1, len(prompt), dtype=torch.long))
    return out[0, len(prompt):].tolist()


def edit_config(directory: str, **changes) -> None:
    path = os.path.join(directory, "config.json")
    with open(path) as f:
        config = json.load(f)
    config.update(changes)
    with open(path, "w") as f:
        json.dump(config, f)
