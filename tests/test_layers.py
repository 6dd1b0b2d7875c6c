"""Linear layers: a single row's product padded to a GEMM's rows on GPUs."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from eaas_jax.model.layers import GEMM_ROWS, Linear, linear


def _dot_rows(fn, *args) -> list[int]:
    """The rows of each dot_general's left operand in fn's jaxpr, traced
    anew (a trace of `fn` itself would be cached across the backend's
    monkeypatching)."""
    jaxpr = jax.make_jaxpr(lambda *a: fn(*a))(*args)
    return [_prod(e.invars[0].aval.shape[:-1]) for e in jaxpr.eqns if e.primitive.name == "dot_general"]


def _prod(shape) -> int:
    return int(np.prod(shape, dtype=np.int64))


def _pair(d_in: int, d_out: int, bias: bool, dtype=jnp.float32, **setting):
    """A Linear and an nnx.Linear with the same parameters."""
    ours = Linear(d_in, d_out, use_bias=bias, dtype=dtype, param_dtype=dtype, rngs=nnx.Rngs(0), **setting)
    theirs = nnx.Linear(d_in, d_out, use_bias=bias, dtype=dtype, param_dtype=dtype, rngs=nnx.Rngs(0), **setting)
    if bias:  # (initialized to zeros: make it count)
        ours.bias[...] = theirs.bias[...] = jnp.linspace(-1, 1, d_out, dtype=dtype)
    return ours, theirs


def test_linear_builds_the_padding_layer_but_for_the_lm_head():
    assert type(linear(8, 4, dtype=jnp.float32, rngs=nnx.Rngs(0))) is Linear
    assert type(linear(8, 4, dtype=jnp.float32, rngs=nnx.Rngs(0), pad_one_row=False)) is nnx.Linear


@pytest.mark.parametrize("bias", [False, True])
def test_a_single_row_is_padded_to_a_gemm_on_gpus_only(monkeypatch, bias):
    ours, theirs = _pair(64, 48, bias)
    one = jax.random.normal(jax.random.key(2), (1, 1, 64), jnp.float32)
    rows = jax.random.normal(jax.random.key(3), (2, 1, 64), jnp.float32)
    monkeypatch.setattr(jax, "default_backend", lambda: "cpu")
    assert _dot_rows(ours, one) == [1]
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    assert _dot_rows(ours, one) == [GEMM_ROWS]
    got = ours(one)
    assert got.shape == (1, 1, 48) and got.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(got), np.asarray(theirs(one)), rtol=1e-6, atol=1e-6)
    assert _dot_rows(ours, rows) == [2]  # two rows: as they are
    np.testing.assert_allclose(np.asarray(ours(rows)), np.asarray(theirs(rows)), rtol=1e-6, atol=1e-6)
    monkeypatch.setenv("EAAS_JAX_ONE_ROW_GEMM", "off")  # (benchmarks' comparison)
    assert _dot_rows(ours, one) == [1]
    monkeypatch.setenv("EAAS_JAX_ONE_ROW_GEMM", "pad")
    with pytest.raises(ValueError, match="EAAS_JAX_ONE_ROW_GEMM='pad': expected one of auto, off"):
        ours(one)


@pytest.mark.parametrize("setting", [dict(precision=jax.lax.Precision.HIGHEST),
                                     dict(preferred_element_type=jnp.float32)])
def test_the_padded_row_keeps_the_layers_own_product(monkeypatch, setting):
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    ours, theirs = _pair(256, 32, True, jnp.bfloat16, **setting)
    x = jax.random.normal(jax.random.key(4), (1, 256), jnp.bfloat16)
    got, expected = ours(x), theirs(x)
    assert _dot_rows(ours, x) == [GEMM_ROWS]
    name, value = next(iter(setting.items()))
    (dot,) = [e for e in jax.make_jaxpr(lambda x: ours(x))(x).eqns if e.primitive.name == "dot_general"]
    assert dot.params[name] in (value, (value, value))  # (precision is one per operand)
    assert got.dtype == expected.dtype and got.shape == expected.shape == (1, 32)
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(expected, np.float32), rtol=1e-2, atol=1e-2)


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="XLA's GPU compile of the padded row "
                    "(bench/device_run.sh gpu_tests)")
@pytest.mark.parametrize("d_in, d_out", [(2048, 4096), (4096, 2048)])
def test_the_padded_row_compiles_to_a_gemm_on_a_gpu(d_in, d_out):
    ours, theirs = _pair(d_in, d_out, False, jnp.bfloat16)
    x = jax.random.normal(jax.random.key(5), (1, 1, d_in), jnp.bfloat16)
    got = jax.jit(lambda x: ours(x))(x).astype(jnp.float32)
    expected = jnp.dot(x.astype(jnp.float32), theirs.kernel[...].astype(jnp.float32))
    np.testing.assert_allclose(np.asarray(got), np.asarray(expected), rtol=1e-2,
                               atol=1e-2 * float(jnp.abs(expected).max()))
    compiled = jax.jit(lambda x: ours(x)).lower(x).compile().as_text()
    plain = jax.jit(lambda x: theirs(x)).lower(x).compile().as_text()
    # A GEMM: a cuBLAS call or a Triton GEMM fusion (its backend config's kind).
    gemm = re.compile(r'custom_call_target="__cublas|"kind":"__triton[a-z_]*gemm')
    # the padded row is a GEMM, where the plain dot of one row is a
    # reduction: the reason the padding is there
    assert gemm.search(compiled), compiled
    assert not gemm.search(plain), plain
