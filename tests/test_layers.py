"""Linear layers: a single row's product written as a split reduction on GPUs."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from eaas_jax.model.layers import Linear, linear, one_row_product


def _dots(fn, *args) -> int:
    """dot_general equations in fn's jaxpr, traced anew (a trace of `fn`
    itself would be cached across the backend's monkeypatching)."""
    return str(jax.make_jaxpr(lambda *a: fn(*a))(*args)).count("dot_general")


@pytest.mark.parametrize("d_in, d_out", [(16, 8), (64, 48), (2048, 40)])
def test_one_row_product_equals_the_dot(d_in, d_out):
    x = jax.random.normal(jax.random.key(0), (1, 1, d_in), jnp.float32)
    kernel = jax.random.normal(jax.random.key(1), (d_in, d_out), jnp.float32)
    got = one_row_product(x, kernel)
    assert got.shape == (1, 1, d_out) and got.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(got), np.asarray(x @ kernel), rtol=1e-5, atol=1e-4)


def _pair(d_in: int, d_out: int, bias: bool, dtype=jnp.float32):
    """A Linear and an nnx.Linear with the same parameters."""
    ours = linear(d_in, d_out, dtype=dtype, rngs=nnx.Rngs(0), bias=bias)
    theirs = linear(d_in, d_out, dtype=dtype, rngs=nnx.Rngs(0), bias=bias, one_row_split=False)
    if bias:  # (initialized to zeros: make it count)
        ours.bias[...] = theirs.bias[...] = jnp.linspace(-1, 1, d_out, dtype=dtype)
    assert type(ours) is Linear and type(theirs) is nnx.Linear
    return ours, theirs


@pytest.mark.parametrize("bias", [False, True])
def test_a_single_row_takes_the_split_product_on_gpus_only(monkeypatch, bias):
    ours, theirs = _pair(64, 48, bias)
    one = jax.random.normal(jax.random.key(2), (1, 1, 64), jnp.float32)
    rows = jax.random.normal(jax.random.key(3), (2, 1, 64), jnp.float32)
    assert _dots(ours, one) == 1  # the CPU: the dot
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    assert _dots(ours, one) == 0
    np.testing.assert_allclose(np.asarray(ours(one)), np.asarray(theirs(one)), rtol=1e-5, atol=1e-5)
    assert _dots(ours, rows) == 1  # two rows: the dot
    odd, _ = _pair(60, 48, bias)  # a contraction not in parts: the dot
    assert _dots(odd, one[..., :60]) == 1
    assert _dots(theirs, one) == 1  # the LM head's kind keeps the dot
    monkeypatch.setenv("EAAS_JAX_ONE_ROW_SPLIT", "off")  # (benchmarks' comparison)
    assert _dots(ours, one) == 1


@pytest.mark.parametrize("setting", [dict(precision=jax.lax.Precision.HIGHEST),
                                     dict(preferred_element_type=jnp.float32),
                                     dict(dot_general=lambda *a, **k: jax.lax.dot_general(*a, **k))])
def test_a_layer_with_its_own_product_keeps_the_dot(monkeypatch, setting):
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    layer = Linear(64, 48, rngs=nnx.Rngs(0), **setting)
    assert _dots(layer, jnp.ones((1, 64))) == 1


def test_the_split_product_keeps_the_layers_dtype(monkeypatch):
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    ours, theirs = _pair(256, 32, True, jnp.bfloat16)
    x = jax.random.normal(jax.random.key(4), (1, 256), jnp.bfloat16)
    got, expected = ours(x), theirs(x)
    assert got.dtype == expected.dtype == jnp.bfloat16 and got.shape == (1, 32)
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(expected, np.float32), rtol=2e-2, atol=2e-2)


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="XLA's GPU compile of the split product "
                    "(bench/device_run.sh gpu_tests)")
@pytest.mark.parametrize("d_in, d_out", [(2048, 4096), (4096, 2048)])
def test_the_split_product_matches_the_dot_compiled_on_a_gpu(d_in, d_out):
    ours, theirs = _pair(d_in, d_out, False, jnp.bfloat16)
    x = jax.random.normal(jax.random.key(5), (1, 1, d_in), jnp.bfloat16)
    got = jax.jit(lambda x: ours(x))(x).astype(jnp.float32)
    expected = jnp.dot(x.astype(jnp.float32), theirs.kernel[...].astype(jnp.float32))
    np.testing.assert_allclose(np.asarray(got), np.asarray(expected), rtol=1e-2,
                               atol=1e-2 * float(jnp.abs(expected).max()))
    compiled = jax.jit(lambda x: ours(x)).lower(x).compile().as_text()
    assert "dot(" not in compiled and "gemm" not in compiled  # not made a dot or a GEMM again
