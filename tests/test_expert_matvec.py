"""The expert matvec kernel (the gathered expert path's projection on GPUs),
run by Pallas' interpreter here: its tiling against a float64 reference, its
gradients against the einsum's, and which shapes and platforms get it."""

import jax
import jax.numpy as jnp
import re

import numpy as np
import pytest

from conftest import triton_kernels_lowered_for_cuda
from eaas_jax.kernels import expert_matvec as em


def _inputs(slots, k, n, experts, dtype, seed=0):
    keys = jax.random.split(jax.random.key(seed), 3)
    x = jax.random.normal(keys[0], (slots, k), dtype)
    w = jax.random.normal(keys[1], (experts, k, n), dtype)
    ids = jax.random.randint(keys[2], (slots,), 0, experts).at[1].set(0).at[2].set(0)  # one expert twice
    return x, w, ids


def _reference(x, w, ids):
    x, w = (np.asarray(a.astype(jnp.float32), np.float64) for a in (x, w))
    return np.einsum("sk,skn->sn", x, w[np.asarray(ids)])


@pytest.mark.parametrize("k, n, slots, plan", [
    (2048, 768, 8, (256, 16, 64, 8)),  # 16 parts: 384 programs (8 would make 192) of 2 loads
    (2048, 768, 32, (256, 8, 64, 8)),  # 768 programs already at 8 parts, each of 4 loads (4 parts: 8)
    (768, 2048, 8, (256, 4, 64, 8)),  # 3 loads a program; 256 programs
    (768, 2048, 512, (256, 4, 64, 8)),  # enough programs at 1 part, but 12 loads each: 4 parts
    (96, 48, 8, (16, 1, 32, 4)),  # 96 = 3 loads of 32 rows: one part (2 would not divide into loads)
    (128, 64, 4, (64, 2, 64, 4)),  # too few slots for MIN_PROGRAMS: the most parts
    (100, 48, 8, None), (64, 24, 8, None)])
def test_kernel_plan_fills_the_gpu_with_programs_of_few_loads(k, n, slots, plan):
    assert em.kernel_plan(k, n, slots) == plan


@pytest.mark.parametrize("dtype, tolerance", [(jnp.float32, 1e-5), (jnp.bfloat16, 1e-2)])
@pytest.mark.parametrize("k, n", [(256, 64), (96, 48), (128, 96), (512, 64)])  # 512: 2 parts of 4 loads
def test_the_kernel_matches_the_reference_for_every_tiling(k, n, dtype, tolerance):
    """Guards the kernel's indexing: each slot's own expert, every output
    tile, every part of the contraction summed once."""
    x, w, ids = _inputs(5, k, n, experts=6, dtype=dtype)
    (got,) = em.pallas_expert_matvec(x, (w,), ids, em.kernel_plan(k, n, 5), interpret=True)
    assert got.dtype == jnp.float32 and got.shape == (5, n)
    expected = _reference(x, w, ids)
    np.testing.assert_allclose(np.asarray(got), expected, rtol=tolerance, atol=tolerance * np.abs(expected).max())


def test_the_kernel_refuses_a_tiling_that_would_drop_rows():
    x, w, ids = _inputs(2, 96, 32, experts=2, dtype=jnp.float32)
    with pytest.raises(ValueError, match="does not tile"):
        em.pallas_expert_matvec(x, (w,), ids, em.Plan(32, 1, 64, 4), interpret=True)
    with pytest.raises(ValueError, match="shapes differ"):
        em.pallas_expert_matvec(x, (w, w[:, :64]), ids, em.Plan(16, 1, 32, 4), interpret=True)


def test_the_kernels_gradients_are_the_einsums():
    x, w, ids = _inputs(3, 64, 32, experts=4, dtype=jnp.float32, seed=1)
    probe = jax.random.normal(jax.random.key(2), (3, 32))

    def loss(f):
        return lambda x, w: jnp.sum(f(x, w) * probe)

    ours = jax.grad(loss(lambda x, w: em.differentiable_kernel(x, (w,), ids, em.kernel_plan(64, 32, 3), 1, True)[0]),
                    argnums=(0, 1))(x, w)
    theirs = jax.grad(loss(lambda x, w: em.gathered_einsum(x, w, ids)), argnums=(0, 1))(x, w)
    for a, b in zip(ours, theirs):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5)
    assert np.abs(np.asarray(ours[1])).sum(axis=(1, 2)).min() == 0  # an expert no slot used gets no gradient


def test_one_kernel_over_several_banks_gives_each_banks_product_and_gradients():
    """Guards the kernel's bank and output order (gate and up in one call):
    each output is its own bank's product, and so are the gradients."""
    x, w, ids = _inputs(4, 128, 64, experts=5, dtype=jnp.float32, seed=3)
    other = jax.random.normal(jax.random.key(9), w.shape)
    plan = em.kernel_plan(128, 64, 4)
    first, second = em.pallas_expert_matvec(x, (w, other), ids, plan, interpret=True)
    for got, bank in ((first, w), (second, other)):
        expected = _reference(x, bank, ids)
        np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())
    probes = jax.random.normal(jax.random.key(4), (2, 4, 64))

    def loss(f):
        return lambda x, w, other: sum(jnp.sum(out * probe) for out, probe in zip(f(x, w, other), probes))

    ours = jax.grad(loss(lambda x, w, other: em.differentiable_kernel(x, (w, other), ids, plan, 1, True)),
                    argnums=(0, 1, 2))(x, w, other)
    theirs = jax.grad(loss(lambda x, w, other: (em.gathered_einsum(x, w, ids), em.gathered_einsum(x, other, ids))),
                      argnums=(0, 1, 2))(x, w, other)
    for a, b in zip(ours, theirs):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5)


def test_expert_matvec_takes_the_kernel_on_gpus_where_the_shape_tiles(monkeypatch):
    calls = []
    def recording(x, banks, ids, *args):
        calls.append(args)
        return tuple(em.gathered_einsum(x, w, ids) for w in banks)

    monkeypatch.setattr(em, "differentiable_kernel", recording)
    x, w, ids = _inputs(2, 64, 32, experts=3, dtype=jnp.float32)
    monkeypatch.setattr(jax, "default_backend", lambda: "cpu")
    em.expert_matvec(x, w, ids)
    assert calls == []  # the CPU: the einsum
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    em.expert_matvec(x, w, ids)
    assert calls == [(em.kernel_plan(64, 32, 2), 1, False)]
    em.expert_matvec(x[:, :60], w[:, :60], ids)  # 60 rows do not tile: the einsum
    assert em.expert_matvec(x[:0], w, ids[:0]).shape == (0, 32)  # no slots: no kernel of 0 programs
    assert len(calls) == 1


def test_slots_sharing_a_row_read_it_in_place_with_the_repeated_rows_products_and_gradients():
    """slots_per_row=k (a token's k routed slots): slot s takes row s // k,
    as if the rows were repeated k times; the rows' gradients sum their slots'."""
    k = 3
    x, w, ids = _inputs(4 * k, 128, 64, experts=5, dtype=jnp.float32, seed=6)
    x = x[:4]
    repeated = jnp.repeat(x, k, axis=0)
    plan = em.kernel_plan(128, 64, 4 * k)
    (got,) = em.pallas_expert_matvec(x, (w,), ids, plan, slots_per_row=k, interpret=True)
    expected = _reference(repeated, w, ids)
    np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())
    np.testing.assert_allclose(np.asarray(em.gathered_einsum(x, w, ids, k)), expected, rtol=1e-5,
                               atol=1e-5 * np.abs(expected).max())
    probe = jax.random.normal(jax.random.key(7), (4 * k, 64))
    ours = jax.grad(lambda x: jnp.sum(em.differentiable_kernel(x, (w,), ids, plan, k, True)[0] * probe))(x)
    theirs = jax.grad(lambda x: jnp.sum(em.gathered_einsum(jnp.repeat(x, k, axis=0), w, ids) * probe))(x)
    np.testing.assert_allclose(np.asarray(ours), np.asarray(theirs), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="12 slots for 4 rows of 2 slots each"):
        em.expert_matvec(x, w, ids, slots_per_row=2)


@pytest.mark.parametrize("banks", [1, 2])
@pytest.mark.parametrize("k, n, slots, slots_per_row", [
    (2048, 768, 8, 1), (2048, 768, 32, 8), (768, 2048, 8, 1), (768, 2048, 512, 1), (96, 48, 8, 4), (128, 64, 4, 1)])
def test_every_plan_lowers_to_one_triton_kernel_for_cuda(k, n, slots, slots_per_row, banks):
    """The plans of the plan rule's shapes above, lowered for CUDA here: each
    is one Triton kernel of its plan's grid and warps (what XLA and Triton
    then compile runs in gpu_tests)."""
    plan = em.kernel_plan(k, n, slots)
    rows = jax.ShapeDtypeStruct((slots // slots_per_row, k), jnp.bfloat16)
    bank = jax.ShapeDtypeStruct((128, k, n), jnp.bfloat16)  # nothing allocated
    ids = jax.ShapeDtypeStruct((slots,), jnp.int32)
    (kernel,) = triton_kernels_lowered_for_cuda(
        lambda x, ids, *banks: em.pallas_expert_matvec(x, banks, ids, plan, slots_per_row=slots_per_row),
        rows, ids, *[bank] * banks)
    settings = dict(re.findall(r"\b(grid_[xyz]|num_warps) = (\d+)", kernel))
    assert settings == {"grid_x": str(slots), "grid_y": str(n // plan.tile), "grid_z": str(plan.parts),
                        "num_warps": str(plan.warps)}


def test_a_tile_triton_cannot_take_fails_when_lowered_here():
    """What the test above guards against: a plan that tiles the shape (so
    interpreted tests pass) but whose loads Triton cannot make (96 columns:
    not a power of two) fails at lowering, with no GPU."""
    plan = em.Plan(96, 1, 32, 4)
    with pytest.raises(ValueError, match="power of 2"):
        triton_kernels_lowered_for_cuda(lambda x, w, ids: em.pallas_expert_matvec(x, (w,), ids, plan),
                                        jax.ShapeDtypeStruct((8, 96), jnp.float32),
                                        jax.ShapeDtypeStruct((4, 96, 96), jnp.float32),
                                        jax.ShapeDtypeStruct((8,), jnp.int32))


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="the compiled kernel runs on GPUs (bench/device_run.sh gpu_tests)")
@pytest.mark.parametrize("k, n", [(2048, 768), (768, 2048), (96, 48)])
def test_the_compiled_kernel_matches_the_reference_on_a_gpu(k, n):
    x, w, ids = _inputs(8, k, n, experts=16, dtype=jnp.bfloat16)
    other = jax.random.normal(jax.random.key(5), w.shape, w.dtype)
    one = jax.jit(em.expert_matvec)(x, w, ids)
    pair = jax.jit(em.expert_matvecs)(x, (w, other), ids)  # the gate and up projections' call
    for got, bank in ((one, w), (pair[0], w), (pair[1], other)):
        expected = _reference(x, bank, ids)
        np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-2, atol=1e-2 * np.abs(expected).max())
    # Two tokens' 4 slots each, the tokens' rows read in place (the MoE layer's call)
    shared = jax.jit(em.expert_matvecs, static_argnames="slots_per_row")(x[:2], (w, other), ids, slots_per_row=4)
    for got, bank in zip(shared, (w, other)):
        expected = _reference(jnp.repeat(x[:2], 4, axis=0), bank, ids)
        np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-2, atol=1e-2 * np.abs(expected).max())
