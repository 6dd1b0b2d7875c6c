"""The model configuration: every architectural choice of the MoE transformer.

A `ModelConfig` is what `config.json` of a checkpoint directory holds. It is
validated on construction so that a malformed file fails with a message naming
the offending field instead of a shape error deep inside a jitted function.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

from eaas_jax.model.rope import check_rope_scaling


class ConfigError(ValueError):
    """A model config that is malformed or inconsistent."""


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    # Dense FFN width, used by the first `first_k_dense` layers.
    intermediate_size: int
    num_experts: int
    num_experts_per_tok: int
    moe_intermediate_size: int
    # Renormalise the top-k router weights to sum to one.
    norm_topk_prob: bool = True
    # Router scores: "softmax" over all experts, or an independent "sigmoid" per
    # expert (DeepSeek-V3).
    router_scoring: str = "softmax"
    # A learned per-expert bias added to the scores for choosing experts only,
    # not to the gate weights (DeepSeek-V3's e_score_correction_bias).
    router_score_bias: bool = False
    # Group-limited routing (DeepSeek): experts form `router_num_groups` equal
    # groups, each group is scored ("max": its best expert; "top2_sum": its two
    # best) and experts are chosen only from the best `router_topk_groups`.
    router_num_groups: int = 1
    router_topk_groups: int = 1
    router_group_score: str = "max"
    # Gate weights are multiplied by this after any renormalisation.
    routed_scaling_factor: float = 1.0
    num_shared_experts: int = 0
    # Width of the shared expert MLP (all shared experts fused into one MLP).
    shared_expert_intermediate_size: int = 0
    # Scale the shared expert output by sigmoid(x @ w_gate) (Qwen2-MoE style).
    shared_expert_gate: bool = False
    first_k_dense: int = 0
    # Beyond the first `first_k_dense`, layer i is MoE only if (i + 1) is a
    # multiple of `moe_layer_step` and i is not in `dense_layers` (Qwen's
    # decoder_sparse_step and mlp_only_layers).
    moe_layer_step: int = 1
    dense_layers: tuple[int, ...] = ()
    # "gqa": grouped-query attention; "mla": DeepSeek's multi-head latent
    # attention, which caches one compressed latent per token.
    attention: str = "gqa"
    # RMSNorm on queries and keys before RoPE: per head (Qwen3) or, with
    # qk_norm_per_head false, over all heads at once (OLMoE).
    qk_norm: bool = False
    qk_norm_per_head: bool = True
    # Clamp q, k, v projections to [-clip_qkv, clip_qkv] (OLMoE option).
    clip_qkv: float | None = None
    attention_bias: bool = False
    # MLA shapes (attention = "mla"); q_lora_rank 0 projects queries directly.
    q_lora_rank: int = 0
    kv_lora_rank: int = 0
    qk_nope_head_dim: int = 0
    qk_rope_head_dim: int = 0
    v_head_dim: int = 0
    rope_theta: float = 10000.0
    # None, or {"rope_type": "yarn", "factor": ..., ...} with HF's yarn keys
    # (see eaas_jax.model.rope).
    rope_scaling: dict | None = None
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 2048
    # Weight of the load-balancing auxiliary loss (training only).
    router_aux_loss_coef: float = 0.01
    bos_token_id: int | None = None
    # One id, or a list of ids that all end a sequence (the first is the main one).
    eos_token_id: int | tuple[int, ...] | None = None

    def __post_init__(self):
        # JSON gives lists; keep the frozen config hashable and comparable.
        for name in ("dense_layers", "eos_token_id"):
            if isinstance(getattr(self, name), list):
                object.__setattr__(self, name, tuple(getattr(self, name)))
        positive = (
            "vocab_size hidden_size num_layers num_heads num_kv_heads head_dim "
            "max_position_embeddings"
        ).split()
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(
                f"num_heads ({self.num_heads}) must be a multiple of "
                f"num_kv_heads ({self.num_kv_heads})"
            )
        if not 0 <= self.first_k_dense <= self.num_layers:
            raise ConfigError(
                f"first_k_dense must be in [0, num_layers={self.num_layers}], "
                f"got {self.first_k_dense}"
            )
        self._check_layers()
        if self.num_moe_layers < self.num_layers and self.intermediate_size <= 0:
            raise ConfigError("intermediate_size must be positive when some layers are dense")
        if self.num_moe_layers:
            if self.num_experts <= 0 or self.moe_intermediate_size <= 0:
                raise ConfigError(
                    "num_experts and moe_intermediate_size must be positive for MoE layers"
                )
            if not 1 <= self.num_experts_per_tok <= self.num_experts:
                raise ConfigError(
                    f"num_experts_per_tok must be in [1, num_experts={self.num_experts}], "
                    f"got {self.num_experts_per_tok}"
                )
        if self.num_shared_experts < 0:
            raise ConfigError("num_shared_experts must be >= 0")
        if self.num_shared_experts and self.shared_expert_intermediate_size <= 0:
            raise ConfigError(
                "shared_expert_intermediate_size must be positive when num_shared_experts > 0"
            )
        if self.shared_expert_gate and not self.num_shared_experts:
            raise ConfigError("shared_expert_gate needs num_shared_experts > 0")
        if self.rope_theta <= 0 or self.rms_norm_eps <= 0:
            raise ConfigError("rope_theta and rms_norm_eps must be positive")
        self._check_routing()
        self._check_attention()
        if self.rope_scaling is not None:
            check_rope_scaling(self.rope_scaling)
        ids = {"eos_token_id": self.eos_token_ids}
        if self.bos_token_id is not None:
            ids["bos_token_id"] = (self.bos_token_id,)
        for name, values in ids.items():
            for value in values:
                if not isinstance(value, int) or not 0 <= value < self.vocab_size:
                    raise ConfigError(
                        f"{name}={value!r} is outside the vocabulary [0, {self.vocab_size})"
                    )

    def _check_routing(self):
        if self.router_scoring not in ("softmax", "sigmoid"):
            raise ConfigError(
                f"router_scoring must be 'softmax' or 'sigmoid', got {self.router_scoring!r}"
            )
        if self.router_group_score not in ("max", "top2_sum"):
            raise ConfigError(
                f"router_group_score must be 'max' or 'top2_sum', got {self.router_group_score!r}"
            )
        groups, chosen = self.router_num_groups, self.router_topk_groups
        if not (isinstance(groups, int) and groups >= 1 and isinstance(chosen, int)
                and 1 <= chosen <= groups):
            raise ConfigError(
                f"router_topk_groups ({chosen!r}) must be in [1, router_num_groups={groups!r}]"
            )
        if self.num_moe_layers and groups > 1:
            if self.num_experts % groups:
                raise ConfigError(
                    f"num_experts ({self.num_experts}) must be a multiple of "
                    f"router_num_groups ({groups})"
                )
            if chosen * (self.num_experts // groups) < self.num_experts_per_tok:
                raise ConfigError(
                    f"router_topk_groups={chosen} groups of {self.num_experts // groups} experts "
                    f"hold fewer than num_experts_per_tok={self.num_experts_per_tok}"
                )
        if not self.routed_scaling_factor > 0:
            raise ConfigError("routed_scaling_factor must be positive")

    def _check_layers(self):
        if not isinstance(self.moe_layer_step, int) or self.moe_layer_step < 1:
            raise ConfigError(f"moe_layer_step must be a positive integer, got {self.moe_layer_step!r}")
        bad = [i for i in self.dense_layers if not isinstance(i, int) or not 0 <= i < self.num_layers]
        if bad:
            raise ConfigError(f"dense_layers {bad} are not layers of a {self.num_layers}-layer model")

    def _check_attention(self):
        if self.attention not in ("gqa", "mla"):
            raise ConfigError(f"attention must be 'gqa' or 'mla', got {self.attention!r}")
        if self.clip_qkv is not None and not self.clip_qkv > 0:
            raise ConfigError(f"clip_qkv must be positive or null, got {self.clip_qkv!r}")
        if self.attention == "mla":
            for name in ("kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim"):
                if getattr(self, name) <= 0:
                    raise ConfigError(f"{name} must be positive for attention = 'mla'")
            if self.qk_rope_head_dim % 2:
                raise ConfigError("qk_rope_head_dim must be even")
            if self.head_dim != self.qk_nope_head_dim + self.qk_rope_head_dim:
                raise ConfigError(
                    f"head_dim ({self.head_dim}) must equal qk_nope_head_dim + qk_rope_head_dim "
                    f"({self.qk_nope_head_dim + self.qk_rope_head_dim}) for attention = 'mla'"
                )
            if self.qk_norm or self.clip_qkv is not None or self.attention_bias:
                raise ConfigError("qk_norm, clip_qkv and attention_bias apply to 'gqa' attention only")
            if self.q_lora_rank < 0:
                raise ConfigError("q_lora_rank must be >= 0")
        elif self.head_dim % 2:
            raise ConfigError(f"head_dim must be even for rotary embeddings, got {self.head_dim}")

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        """Every id that ends a sequence (empty without one)."""
        if self.eos_token_id is None:
            return ()
        if isinstance(self.eos_token_id, tuple):
            return self.eos_token_id
        return (self.eos_token_id,)

    @property
    def rope_dim(self) -> int:
        """Dimensions of each query/key head that rotary embeddings rotate."""
        return self.qk_rope_head_dim if self.attention == "mla" else self.head_dim

    @property
    def num_moe_layers(self) -> int:
        return sum(map(self.is_moe_layer, range(self.num_layers)))

    def is_moe_layer(self, layer: int) -> bool:
        return (
            layer >= self.first_k_dense
            and (layer + 1) % self.moe_layer_step == 0
            and layer not in self.dense_layers
        )

    def __hash__(self) -> int:
        # Explicit because rope_scaling is a dict; modules keep the config as
        # static (hashed) data.
        return hash(json.dumps(self.to_dict(), sort_keys=True))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, source: str = "config") -> "ModelConfig":
        if not isinstance(data, dict):
            raise ConfigError(f"{source}: expected a JSON object, got {type(data).__name__}")
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - fields)
        if unknown:
            raise ConfigError(f"{source}: unknown config field(s) {unknown}")
        required = {
            f.name
            for f in dataclasses.fields(cls)
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        }
        missing = sorted(required - set(data))
        if missing:
            raise ConfigError(f"{source}: missing config field(s) {missing}")
        try:
            return cls(**data)
        except ConfigError as e:
            raise ConfigError(f"{source}: {e}") from None

    @classmethod
    def load(cls, path: str | os.PathLike) -> "ModelConfig":
        path = os.fspath(path)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"model config not found: {path}")
        try:
            with open(path) as f:
                data = json.load(f)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}: not valid JSON ({e})") from None
        return cls.from_dict(data, source=path)

    def save(self, path: str | os.PathLike) -> None:
        with open(path, "w") as f:
            json.dump(self.to_dict(), f, indent=2)
            f.write("\n")
