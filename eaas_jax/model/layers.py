"""Small building blocks: RMSNorm, linear layers, the SwiGLU MLP."""

from __future__ import annotations

import math
import os

import jax
import jax.numpy as jnp
from flax import nnx


class RMSNorm(nnx.Module):
    def __init__(self, dim: int, *, eps: float, dtype):
        self.eps = eps
        self.weight = nnx.Param(jnp.ones((dim,), dtype=dtype))

    def __call__(self, x: jax.Array) -> jax.Array:
        # Normalise in float32: bf16 sums of squares lose too much precision.
        x32 = x.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return (x32 * self.weight[...].astype(jnp.float32)).astype(x.dtype)


# A projection of one row (decode at batch 1) is a matrix-vector product.
# XLA's GPU dot makes it a reduction over the weights' major axis: on an H100
# 17 µs for 2048 -> 4096 and 40 µs for 4096 -> 2048 in bfloat16, against 6 µs
# for the weights' bytes; in W1's decode step the output projection became
# two kernels, a multiply that writes the product and its reduction (28.6 µs
# a layer). The same product written as a multiply and a sum over the
# contraction cut into CONTRACTION_PARTS parts, summed apart and then
# together, took 12 µs at both shapes; from 4 rows on the dot was as fast or
# faster (bench/RESULTS.md, "One expert projection for few slots", 2026-12-06,
# `--experts 1`). So only single rows are written out, on GPUs (measured on an
# H100 only). The LM head's dot at one row was already at its bytes' time
# there (a GEMM kernel, not a reduction): it keeps the dot. The split product
# is float32 throughout, whatever the matmul precision setting.
# EAAS_JAX_ONE_ROW_SPLIT=off keeps the dot everywhere (benchmarks compare the
# two in one run with it; read when a program is traced).
ONE_ROW_SPLIT_BACKENDS = frozenset({"gpu"})
CONTRACTION_PARTS = 16


def one_row_product(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """x [..., in] holding one row, times kernel [in, out]: [..., out] in
    float32, summed over the contraction's CONTRACTION_PARTS parts apart, then
    together (in a multiple of CONTRACTION_PARTS)."""
    d_in, d_out = kernel.shape
    parts = x.reshape(CONTRACTION_PARTS, d_in // CONTRACTION_PARTS, 1).astype(jnp.float32) \
        * kernel.reshape(CONTRACTION_PARTS, d_in // CONTRACTION_PARTS, d_out).astype(jnp.float32)
    return parts.sum(axis=1).sum(axis=0).reshape(*x.shape[:-1], d_out)


class Linear(nnx.Linear):
    """nnx.Linear, with its parameters, whose product for a single row is
    `one_row_product` on the backends in ONE_ROW_SPLIT_BACKENDS (see above),
    where the layer keeps nnx.Linear's default product (no precision, output
    type or dot_general of its own)."""

    def _splits(self, inputs: jax.Array) -> bool:
        return (math.prod(inputs.shape[:-1]) == 1 and jax.default_backend() in ONE_ROW_SPLIT_BACKENDS
                and os.environ.get("EAAS_JAX_ONE_ROW_SPLIT", "auto") != "off"
                and self.in_features % CONTRACTION_PARTS == 0 and self.precision is None
                and getattr(self, "preferred_element_type", None) is None
                and self.dot_general is jax.lax.dot_general)

    def __call__(self, inputs: jax.Array, out_sharding=None) -> jax.Array:
        if out_sharding is not None:
            return super().__call__(inputs, out_sharding)
        if not self._splits(inputs):
            return super().__call__(inputs)
        kernel = self.kernel[...]
        bias = self.bias[...] if self.bias is not None else None
        inputs, kernel, bias = self.promote_dtype((inputs, kernel, bias), dtype=self.dtype)
        y = one_row_product(inputs, kernel).astype(kernel.dtype)
        return y if bias is None else y + bias


def linear(in_dim: int, out_dim: int, *, dtype, rngs: nnx.Rngs, bias: bool = False,
           one_row_split: bool = True) -> nnx.Linear:
    """A projection; `one_row_split=False` keeps XLA's dot for single rows too."""
    return (Linear if one_row_split else nnx.Linear)(
        in_dim, out_dim, use_bias=bias, dtype=dtype, param_dtype=dtype, rngs=rngs
    )


class SwiGLU(nnx.Module):
    """down(silu(gate(x)) * up(x)): the dense FFN and the shared expert."""

    def __init__(self, dim: int, hidden: int, *, dtype, rngs: nnx.Rngs):
        self.gate_proj = linear(dim, hidden, dtype=dtype, rngs=rngs)
        self.up_proj = linear(dim, hidden, dtype=dtype, rngs=rngs)
        self.down_proj = linear(hidden, dim, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))
