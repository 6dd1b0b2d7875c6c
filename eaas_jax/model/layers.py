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
        return rms_norm(x, self.weight[...], self.eps)


def rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
    """x over its last axis divided by its root mean square, times `weight`,
    in x's dtype. Normalised in float32: bf16 sums of squares lose too much
    precision."""
    x32 = x.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return (x32 * weight.astype(jnp.float32)).astype(x.dtype)


# A projection of one row (decode at batch 1) is a matrix-vector product,
# which XLA's GPU compiler strength-reduces to a multiply and a reduction over
# the weights' major axis: on an H100 17 µs for 2048 -> 4096 and 40 µs for
# 4096 -> 2048 in bfloat16, against 6 µs for the weights' bytes; in W1's
# decode step the output projection became two kernels (28.6 µs a layer).
# From 4 rows on the dot is a GEMM, 11.5-12.2 µs at both shapes (bench/
# RESULTS.md, "One expert projection for few slots", 2026-12-06, `--experts
# 1`). So on GPUs a single row is padded to GEMM_ROWS rows (zeros: a GEMM's
# rows are independent, so the row's result is the dot's) and the rest
# dropped. A reduction written out by hand instead (a 16-part split sum) was
# 12 µs alone but slower in the step, where XLA fused it with its neighbours:
# 1.49 against 1.36 ms of kernels at batch 1 (RESULTS, W1 decode, commit
# abdbd76). The LM head's dot at one row is a GEMM already (its vocabulary
# is past XLA's size threshold): it is left alone.
# The expert matvec kernel (kernels/expert_matvec.py) with the weights as a
# bank of one expert was slower in the step too: 0.94 against 0.85 ms a
# token at batch 1 (RESULTS, W1 decode, commit 07d3021).
# EAAS_JAX_ONE_ROW_GEMM=off keeps the plain dot everywhere (benchmarks compare
# the two in one run with it; read when a program is traced).
# The row repeated GEMM_ROWS times (a broadcast) instead of padded was no
# better: XLA kept it a kernel of its own too, as each pad is (~1.5 µs, 3 a
# layer), 927 against 920 µs of kernels a token at batch 1 (RESULTS, W1
# decode, commit 521125b).
ONE_ROW_GEMM_BACKENDS = frozenset({"gpu"})
ONE_ROW_GEMM_FORMS = ("auto", "off")
GEMM_ROWS = 4


def one_row_gemm_form() -> str:
    """EAAS_JAX_ONE_ROW_GEMM's value, one of ONE_ROW_GEMM_FORMS."""
    form = os.environ.get("EAAS_JAX_ONE_ROW_GEMM", "auto")
    if form not in ONE_ROW_GEMM_FORMS:
        raise ValueError(f"EAAS_JAX_ONE_ROW_GEMM={form!r}: expected one of {', '.join(ONE_ROW_GEMM_FORMS)}")
    return form


class Linear(nnx.Linear):
    """nnx.Linear, with its parameters and product, whose single row is padded
    to GEMM_ROWS rows on the backends in ONE_ROW_GEMM_BACKENDS (see above)."""

    def __call__(self, inputs: jax.Array, out_sharding=None) -> jax.Array:
        if (out_sharding is not None or math.prod(inputs.shape[:-1]) != 1
                or jax.default_backend() not in ONE_ROW_GEMM_BACKENDS):
            return super().__call__(inputs, out_sharding)
        if one_row_gemm_form() == "off":
            return super().__call__(inputs)
        rows = jnp.pad(inputs.reshape(1, self.in_features), ((0, GEMM_ROWS - 1), (0, 0)))
        return super().__call__(rows)[:1].reshape(*inputs.shape[:-1], self.out_features)


def linear(in_dim: int, out_dim: int, *, dtype, rngs: nnx.Rngs, bias: bool = False,
           pad_one_row: bool = True, preferred_element_type=None) -> nnx.Linear:
    """A projection; `pad_one_row=False` keeps XLA's dot for single rows too;
    `preferred_element_type` is its product's dtype (default: the inputs')."""
    return (Linear if pad_one_row else nnx.Linear)(
        in_dim, out_dim, use_bias=bias, dtype=dtype, param_dtype=dtype, rngs=rngs,
        preferred_element_type=preferred_element_type,
    )


class SwiGLU(nnx.Module):
    """down(silu(gate(x)) * up(x)): the dense FFN and the shared expert."""

    def __init__(self, dim: int, hidden: int, *, dtype, rngs: nnx.Rngs):
        self.gate_proj = linear(dim, hidden, dtype=dtype, rngs=rngs)
        self.up_proj = linear(dim, hidden, dtype=dtype, rngs=rngs)
        self.down_proj = linear(hidden, dim, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))
