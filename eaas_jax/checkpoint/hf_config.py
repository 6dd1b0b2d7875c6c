"""HF `config.json` -> `ModelConfig`, one function per supported architecture.

Each converter reads the fields transformers reads for that architecture (with
transformers' defaults), and refuses options this project does not implement
(sliding windows, other activations, ...) with an error naming the field, so an
imported model is never silently a different model.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

from eaas_jax.model.config import ConfigError, ModelConfig


class HfConfigError(ConfigError):
    """A HF config this project cannot serve as it is."""


@dataclasses.dataclass(frozen=True)
class HfLayout:
    """How an architecture names and lays out its tensors on disk."""

    architecture: str
    # Module holding router and experts: "mlp" or Mixtral's "block_sparse_moe"
    # (checked against the tensor names: newer transformers writes "mlp").
    moe_modules: tuple[str, ...] = ("mlp",)
    # Per-expert tensor names of (gate, up, down).
    expert_projections: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj")
    shared_expert_module: str | None = None
    # DeepSeek rotates interleaved pairs of the rotary dims (see eaas_jax.model.mla).
    rope_interleaved: bool = False
    # Trailing layers holding multi-token-prediction weights, which serving skips.
    num_mtp_layers: int = 0
    # Block-quantized float8 weights (DeepSeek-V3's release): each `X.weight` in
    # float8 comes with `X.weight_scale_inv` holding one scale per block of
    # (rows, columns); they are dequantized while loading.
    fp8_block: tuple[int, int] | None = None


def _get(hf: dict, name: str, default: Any = ConfigError) -> Any:
    if name in hf and hf[name] is not None:
        return hf[name]
    if default is ConfigError:
        raise HfConfigError(f"missing field {name!r}")
    return default


def _refuse(hf: dict, name: str, allowed: Callable[[Any], bool], why: str) -> None:
    if name in hf and not allowed(hf[name]):
        raise HfConfigError(f"{name}={hf[name]!r} is not supported ({why})")


def _rope(hf: dict) -> dict:
    """rope_theta and rope_scaling from either the old (`rope_theta`,
    `rope_scaling`) or the new (`rope_parameters`) spelling."""
    params = dict(hf.get("rope_parameters") or {})
    scaling = dict(hf.get("rope_scaling") or params)
    theta = params.get("rope_theta", hf.get("rope_theta", 10000.0))
    kind = scaling.pop("type", None) or scaling.get("rope_type") or "default"
    scaling.pop("rope_theta", None)
    if scaling.pop("partial_rotary_factor", 1.0) != 1.0:
        raise HfConfigError("partial_rotary_factor != 1 is not supported")
    if kind == "default":
        return {"rope_theta": float(theta), "rope_scaling": None}
    scaling["rope_type"] = kind
    if kind == "yarn":
        scaling.setdefault("original_max_position_embeddings", _get(hf, "max_position_embeddings"))
        if scaling.get("factor") is None:
            scaling["factor"] = hf["max_position_embeddings"] / scaling["original_max_position_embeddings"]
    return {"rope_theta": float(theta), "rope_scaling": scaling}


def _common(hf: dict) -> dict:
    _refuse(hf, "hidden_act", lambda v: v == "silu", "only SwiGLU (silu) MLPs are implemented")
    if hf.get("use_sliding_window") or (
        "use_sliding_window" not in hf and hf.get("sliding_window") is not None
    ):
        raise HfConfigError("sliding-window attention is not supported")
    heads = _get(hf, "num_attention_heads")
    hidden = _get(hf, "hidden_size")
    eos = hf.get("eos_token_id")
    return dict(
        vocab_size=_get(hf, "vocab_size"),
        hidden_size=hidden,
        num_layers=_get(hf, "num_hidden_layers"),
        num_heads=heads,
        num_kv_heads=_get(hf, "num_key_value_heads", heads),
        head_dim=_get(hf, "head_dim", hidden // heads),
        intermediate_size=_get(hf, "intermediate_size", 0),
        rms_norm_eps=float(_get(hf, "rms_norm_eps", 1e-6)),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        max_position_embeddings=_get(hf, "max_position_embeddings"),
        router_aux_loss_coef=float(hf.get("router_aux_loss_coef") or 0.0),
        bos_token_id=hf.get("bos_token_id"),
        eos_token_id=tuple(eos) if isinstance(eos, list) else eos,
        **_rope(hf),
    )


def _mixtral(hf: dict):
    return dict(
        num_experts=_get(hf, "num_local_experts"),
        num_experts_per_tok=_get(hf, "num_experts_per_tok"),
        moe_intermediate_size=_get(hf, "intermediate_size"),
        norm_topk_prob=True,
    ), HfLayout("MixtralForCausalLM", moe_modules=("block_sparse_moe", "mlp"),
                expert_projections=("w1", "w3", "w2"))


def _qwen_moe_layers(hf: dict) -> dict:
    return dict(
        num_experts=_get(hf, "num_experts", None) or _get(hf, "num_local_experts"),
        num_experts_per_tok=_get(hf, "num_experts_per_tok"),
        moe_intermediate_size=_get(hf, "moe_intermediate_size"),
        norm_topk_prob=bool(hf.get("norm_topk_prob", False)),
        moe_layer_step=_get(hf, "decoder_sparse_step", 1),
        dense_layers=tuple(hf.get("mlp_only_layers") or ()),
    )


def _qwen2_moe(hf: dict):
    shared = _get(hf, "shared_expert_intermediate_size", 0)
    return dict(
        **_qwen_moe_layers(hf),
        num_shared_experts=1 if shared else 0,
        shared_expert_intermediate_size=shared,
        shared_expert_gate=bool(shared),
        attention_bias=bool(hf.get("qkv_bias", True)),
    ), HfLayout("Qwen2MoeForCausalLM", shared_expert_module="shared_expert")


def _qwen3_moe(hf: dict):
    return dict(
        **_qwen_moe_layers(hf), qk_norm=True, attention_bias=bool(hf.get("attention_bias", False))
    ), HfLayout("Qwen3MoeForCausalLM")


def _olmoe(hf: dict):
    return dict(
        num_experts=_get(hf, "num_experts"),
        num_experts_per_tok=_get(hf, "num_experts_per_tok"),
        moe_intermediate_size=_get(hf, "intermediate_size"),
        norm_topk_prob=bool(hf.get("norm_topk_prob", False)),
        qk_norm=True,
        qk_norm_per_head=False,
        clip_qkv=hf.get("clip_qkv"),
        attention_bias=bool(hf.get("attention_bias", False)),
    ), HfLayout("OlmoeForCausalLM")


def _deepseek_common(hf: dict) -> dict:
    _refuse(hf, "moe_layer_freq", lambda v: v == 1, "every layer after the dense ones must be MoE")
    _refuse(hf, "attention_bias", lambda v: not v, "MLA projections without bias only")
    _refuse(hf, "mlp_bias", lambda v: not v, "MLPs without bias only")
    nope, rope = _get(hf, "qk_nope_head_dim"), _get(hf, "qk_rope_head_dim")
    shared = _get(hf, "n_shared_experts", 0)
    return dict(
        num_experts=_get(hf, "n_routed_experts"),
        num_experts_per_tok=_get(hf, "num_experts_per_tok"),
        moe_intermediate_size=_get(hf, "moe_intermediate_size"),
        first_k_dense=_get(hf, "first_k_dense_replace", 0),
        num_shared_experts=shared,
        shared_expert_intermediate_size=shared * hf["moe_intermediate_size"],
        routed_scaling_factor=float(_get(hf, "routed_scaling_factor", 1.0)),
        attention="mla",
        head_dim=nope + rope,
        num_kv_heads=_get(hf, "num_attention_heads"),  # one latent serves every head
        q_lora_rank=_get(hf, "q_lora_rank", 0),
        kv_lora_rank=_get(hf, "kv_lora_rank"),
        qk_nope_head_dim=nope,
        qk_rope_head_dim=rope,
        v_head_dim=_get(hf, "v_head_dim"),
    )


def _deepseek_v2(hf: dict):
    method = hf.get("topk_method", "greedy")
    _refuse(hf, "scoring_func", lambda v: v == "softmax", "DeepSeek-V2 scores with softmax")
    if method not in ("greedy", "group_limited_greedy"):
        raise HfConfigError(f"topk_method={method!r} is not supported for DeepSeek-V2")
    grouped = method == "group_limited_greedy"
    # transformers' DeepSeek-V2 router never renormalises (norm_topk_prob is
    # unused there); published V2 configs all have it false.
    return dict(
        **_deepseek_common(hf),
        norm_topk_prob=False,
        router_num_groups=_get(hf, "n_group") if grouped else 1,
        router_topk_groups=_get(hf, "topk_group") if grouped else 1,
        router_group_score="max",
    ), HfLayout("DeepseekV2ForCausalLM", shared_expert_module="shared_experts",
                rope_interleaved=True)


def _deepseek_v3(hf: dict):
    _refuse(hf, "scoring_func", lambda v: v == "sigmoid", "DeepSeek-V3 scores with sigmoid")
    _refuse(hf, "topk_method", lambda v: v == "noaux_tc", "DeepSeek-V3 routes with noaux_tc")
    return dict(
        **_deepseek_common(hf),
        norm_topk_prob=bool(hf.get("norm_topk_prob", True)),
        router_scoring="sigmoid",
        router_score_bias=True,
        router_num_groups=_get(hf, "n_group", 1),
        router_topk_groups=_get(hf, "topk_group", 1),
        router_group_score="top2_sum",
    ), HfLayout("DeepseekV3ForCausalLM", shared_expert_module="shared_experts",
                rope_interleaved=bool(hf.get("rope_interleave", True)),
                num_mtp_layers=int(hf.get("num_nextn_predict_layers") or 0))


def _fp8_block(hf: dict) -> tuple[int, int] | None:
    quantization = hf.get("quantization_config")
    if not quantization:
        return None
    method = quantization.get("quant_method")
    if method != "fp8" or quantization.get("fmt", "e4m3") != "e4m3":
        raise HfConfigError(
            f"quantization_config with quant_method={method!r} is not supported "
            "(only block-wise float8 e4m3, as DeepSeek-V3 ships)"
        )
    block = quantization.get("weight_block_size")
    if not (isinstance(block, list) and len(block) == 2 and all(isinstance(b, int) and b > 0 for b in block)):
        raise HfConfigError(f"quantization_config.weight_block_size must be [rows, columns], got {block!r}")
    return tuple(block)


CONVERTERS = {
    "MixtralForCausalLM": _mixtral,
    "Qwen2MoeForCausalLM": _qwen2_moe,
    "Qwen3MoeForCausalLM": _qwen3_moe,
    "OlmoeForCausalLM": _olmoe,
    "DeepseekV2ForCausalLM": _deepseek_v2,
    "DeepseekV3ForCausalLM": _deepseek_v3,
}


def convert_config(hf: dict, *, source: str = "config.json") -> tuple[ModelConfig, HfLayout]:
    """The `ModelConfig` of a HF config and how its tensors are laid out."""
    if not isinstance(hf, dict):
        raise HfConfigError(f"{source}: expected a JSON object")
    architectures = hf.get("architectures") or []
    known = [a for a in architectures if a in CONVERTERS]
    if not known:
        raise HfConfigError(
            f"{source}: architecture {architectures or '(none given)'} is not supported; "
            f"supported: {sorted(CONVERTERS)}"
        )
    try:
        specific, layout = CONVERTERS[known[0]](hf)
        fields = {**_common(hf), **specific}
        return ModelConfig(**fields), dataclasses.replace(layout, fp8_block=_fp8_block(hf))
    except (ConfigError, TypeError, KeyError) as e:
        raise HfConfigError(f"{source} ({known[0]}): {e}") from None
