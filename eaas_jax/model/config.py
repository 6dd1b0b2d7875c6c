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
    # Renormalise the top-k router probabilities to sum to one.
    norm_topk_prob: bool = True
    num_shared_experts: int = 0
    # Width of the shared expert MLP (all shared experts fused into one MLP).
    shared_expert_intermediate_size: int = 0
    # Scale the shared expert output by sigmoid(x @ w_gate) (Qwen2-MoE style).
    shared_expert_gate: bool = False
    first_k_dense: int = 0
    qk_norm: bool = False
    attention_bias: bool = False
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 2048
    # Weight of the load-balancing auxiliary loss (training only).
    router_aux_loss_coef: float = 0.01
    bos_token_id: int | None = None
    eos_token_id: int | None = None

    def __post_init__(self):
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
        if self.first_k_dense and self.intermediate_size <= 0:
            raise ConfigError("intermediate_size must be positive when first_k_dense > 0")
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
        for name in ("bos_token_id", "eos_token_id"):
            value = getattr(self, name)
            if value is not None and not 0 <= value < self.vocab_size:
                raise ConfigError(f"{name}={value} is outside the vocabulary [0, {self.vocab_size})")

    @property
    def num_moe_layers(self) -> int:
        return self.num_layers - self.first_k_dense

    def is_moe_layer(self, layer: int) -> bool:
        return layer >= self.first_k_dense

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
