"""Rotary position embeddings: plain, linearly scaled and YaRN (context extension).

Frequencies follow HF transformers' `modeling_rope_utils` so imported checkpoints
see exactly the rotations they were trained with. A scaling spec is the dict
HF keeps in `rope_scaling`/`rope_parameters`, e.g. DeepSeek-V3's
`{"rope_type": "yarn", "factor": 40, "original_max_position_embeddings": 4096,
"beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0}`.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

_YARN_KEYS = {
    "rope_type", "factor", "original_max_position_embeddings", "beta_fast", "beta_slow",
    "mscale", "mscale_all_dim", "attention_factor", "truncate",
}
_KEYS = {"yarn": _YARN_KEYS, "linear": {"rope_type", "factor"}}


def check_rope_scaling(spec) -> None:
    """Raises ConfigError unless `spec` is a scaling this module implements."""
    from eaas_jax.model.config import ConfigError

    if not isinstance(spec, dict):
        raise ConfigError(f"rope_scaling must be an object or null, got {spec!r}")
    kind = spec.get("rope_type")
    if kind not in _KEYS:
        raise ConfigError(
            f"rope_scaling type {kind!r} is not supported (supported: {sorted(_KEYS)})"
        )
    unknown = sorted(set(spec) - _KEYS[kind])
    if unknown:
        raise ConfigError(f"rope_scaling: unknown key(s) {unknown} for {kind!r}")
    factor = spec.get("factor")
    if not isinstance(factor, (int, float)) or isinstance(factor, bool) or factor <= 0:
        raise ConfigError(f"rope_scaling.factor must be a positive number, got {factor!r}")
    if kind == "yarn":
        original = spec.get("original_max_position_embeddings")
        if not isinstance(original, int) or original <= 0:
            raise ConfigError(
                "rope_scaling.original_max_position_embeddings must be a positive integer, "
                f"got {original!r}"
            )


def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    """YaRN's attention temperature correction for a context extended `factor` times."""
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def rope_frequencies(dim: int, theta: float, scaling: dict | None) -> tuple[np.ndarray, float]:
    """Inverse frequencies [dim // 2] (float32) and the factor cos/sin are scaled by."""
    exponents = np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim)
    base_freq = (np.float32(theta) ** exponents).astype(np.float32)
    inv_freq = (1.0 / base_freq).astype(np.float32)
    if scaling is None:
        return inv_freq, 1.0
    factor = float(scaling["factor"])
    if scaling["rope_type"] == "linear":
        return (inv_freq / np.float32(factor)).astype(np.float32), 1.0
    return _yarn(dim, theta, factor, base_freq, scaling)


def _yarn(dim, theta, factor, base_freq, spec) -> tuple[np.ndarray, float]:
    attention_factor = spec.get("attention_factor")
    mscale, mscale_all_dim = spec.get("mscale"), spec.get("mscale_all_dim")
    if attention_factor is None:
        if mscale and mscale_all_dim:
            attention_factor = yarn_mscale(factor, mscale) / yarn_mscale(factor, mscale_all_dim)
        else:
            attention_factor = yarn_mscale(factor)
    beta_fast = spec.get("beta_fast") or 32
    beta_slow = spec.get("beta_slow") or 1
    original = spec["original_max_position_embeddings"]

    def correction_dim(rotations):
        # The dimension whose wavelength fits `rotations` times in the original context.
        return dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if spec.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - low) / (high - low), 0, 1)
    extrapolation = (1 - ramp).astype(np.float32)
    # High frequencies keep their trained values (extrapolation), low ones are
    # interpolated by `factor`, with a linear blend in between.
    inv_freq = (1.0 / (factor * base_freq)) * (1 - extrapolation) + (1.0 / base_freq) * extrapolation
    return inv_freq.astype(np.float32), float(attention_factor)


def apply_rope(x: jax.Array, positions: jax.Array, inv_freq: np.ndarray, scale: float = 1.0) -> jax.Array:
    """Rotary embedding in the "rotate half" layout (first half pairs with second).

    x: [..., T, H, D]; positions: [..., T] integer positions; inv_freq: [D / 2].
    `scale` multiplies cos and sin (YaRN's attention factor).
    """
    cos, sin = rope_cos_sin(positions, inv_freq, scale)
    return rotate_half(x, cos[..., None, :], sin[..., None, :])


def rope_cos_sin(positions: jax.Array, inv_freq: np.ndarray, scale: float = 1.0) -> tuple[jax.Array, jax.Array]:
    """cos and sin [..., D / 2] (float32, times `scale`) of `positions`' angles."""
    angles = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)
    return jnp.cos(angles) * scale, jnp.sin(angles) * scale


def rotate_half(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """x [..., D] rotated by cos and sin [..., D / 2] (broadcast against x's
    leading axes) in float32, in x's dtype: the first half pairs with the second."""
    dim = x.shape[-1]
    x32 = x.astype(jnp.float32)
    x1, x2 = x32[..., : dim // 2], x32[..., dim // 2 :]
    rotated = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return rotated.astype(x.dtype)
