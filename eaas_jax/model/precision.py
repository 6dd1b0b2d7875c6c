"""The matmul precision a model's programs are traced in."""

from __future__ import annotations

import contextlib

import jax
import jax.numpy as jnp


def matmul_precision(dtype):
    """The context to trace a program over weights of `dtype` in: float32
    weights get float32 matmuls. (JAX's default computes float32 dots in
    TF32 on NVIDIA GPUs, ~10 mantissa bits: a float32 model would not compute
    what transformers' float32 does, which is what a user who asks for float32
    wants.) Other dtypes keep JAX's default."""
    if jnp.dtype(dtype) == jnp.dtype(jnp.float32):
        return jax.default_matmul_precision("highest")
    return contextlib.nullcontext()
