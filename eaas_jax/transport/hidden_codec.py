"""The hidden states of dispatched tokens, in the deployment's dispatch dtype.

float32 and bfloat16 rows travel as they are (cast); float8_e4m3fn rows travel
as codes with one float32 scale per row, the row's largest magnitude over
e4m3's largest finite value (448), so every row uses the format's whole range
and an all-zero row stays zero.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

_F8 = jnp.float8_e4m3fn
_F8_MAX = float(jnp.finfo(_F8).max)


def encode(x: jax.Array, dtype: str) -> tuple[jax.Array, jax.Array]:
    """[T, d] floats -> ([T, d] in `dtype`, [T] float32 scales)."""
    if dtype != "float8_e4m3fn":
        return x.astype(dtype), jnp.ones(x.shape[:1], jnp.float32)
    x = x.astype(jnp.float32)
    amax = jnp.max(jnp.abs(x), axis=-1)
    scales = jnp.where(amax > 0, amax / _F8_MAX, 1.0)
    return (x / scales[:, None]).astype(_F8), scales


def decode(payload: jax.Array, scales: jax.Array, dtype) -> jax.Array:
    """The rows `encode` sent, as `dtype`."""
    return (payload.astype(jnp.float32) * scales[:, None]).astype(dtype)
