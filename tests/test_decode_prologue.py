"""The decode prologue kernel (norms, rotation, score scale and cache write in
one): interpreted here against the same done by the model's own functions;
which layers, shapes and settings take it; and an engine whose every decode
step's prologue is the kernel's generates what the default engine does."""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import triton_kernels_lowered_for_cuda
from eaas_jax.kernels import decode_prologue as dp
from eaas_jax.kernels.cache_write import xla_write
from eaas_jax.model.layers import rms_norm
from eaas_jax.model.rope import rope_cos_sin, rope_frequencies, rotate_half


def _reference(q, k, v, cos, sin, slots, k_pool, v_pool, *, q_norm=None, k_norm=None, eps=1e-6, q_scale=1.0):
    """What the model's attention does in a decode step, by its functions."""
    if q_norm is not None:
        q, k = rms_norm(q, q_norm, eps), rms_norm(k, k_norm, eps)
    q, k = rotate_half(q, cos[:, None], sin[:, None]), rotate_half(k, cos[:, None], sin[:, None])
    q = (q.astype(jnp.float32) * q_scale).astype(q.dtype)
    return q, xla_write(k_pool, slots, k), xla_write(v_pool, slots, v)


def _inputs(rows, heads, kv_heads, dim, dtype, num_blocks=6, block_size=4, seed=0):
    keys = jax.random.split(jax.random.key(seed), 7)
    q = jax.random.normal(keys[0], (rows, heads, dim), jnp.float32).astype(dtype)
    k, v = (jax.random.normal(key, (rows, kv_heads, dim), jnp.float32).astype(dtype) for key in keys[1:3])
    pools = [jax.random.normal(key, (kv_heads, num_blocks, block_size, dim), dtype) for key in keys[3:5]]
    norms = [(1 + 0.3 * jax.random.normal(key, (dim,), jnp.float32)).astype(dtype) for key in keys[5:7]]
    inv_freq, _ = rope_frequencies(dim, 10000.0, None)
    cos, sin = rope_cos_sin(jnp.arange(rows, dtype=jnp.int32) * 37 + 5, inv_freq, 0.9)
    return q, k, v, cos, sin, pools, norms


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("normed", [True, False])
@pytest.mark.parametrize("heads, kv_heads, dim", [(4, 2, 8), (8, 1, 16), (4, 4, 32)])
def test_the_kernel_does_what_the_models_functions_do(heads, kv_heads, dim, normed, dtype):
    rows = 5
    q, k, v, cos, sin, (k_pool, v_pool), (q_norm, k_norm) = _inputs(rows, heads, kv_heads, dim, dtype)
    num_slots = k_pool.shape[1] * k_pool.shape[2]
    slots = jnp.array([3, num_slots, num_slots - 1, 0, 10 * num_slots], jnp.int32)  # two padding rows
    settings = dict(q_norm=q_norm, k_norm=k_norm) if normed else {}
    got = dp.pallas_rope_write_kv(q, k, v, cos, sin, slots, k_pool, v_pool, eps=1e-5, q_scale=0.35,
                                  interpret=True, **settings)
    expected = _reference(q, k, v, cos, sin, slots, k_pool, v_pool, eps=1e-5, q_scale=0.35, **settings)
    # float32: equal to rounding; bfloat16: a sum taken in another order may round to the next value
    tolerance = dict(rtol=1e-5, atol=1e-6) if dtype == jnp.float32 else dict(rtol=1e-2, atol=1e-2)
    for g, e, original in zip(got, expected, (q, k_pool, v_pool)):
        assert g.shape == e.shape == original.shape and g.dtype == original.dtype
        np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(e, np.float32), **tolerance)
    # the pools: only the rows' slots change, and the values are copies
    written = np.zeros(num_slots, bool)
    written[[3, num_slots - 1, 0]] = True
    for g, pool in zip(got[1:], (k_pool, v_pool)):
        flat = np.asarray(g, np.float32).reshape(kv_heads, num_slots, dim)
        before = np.asarray(pool, np.float32).reshape(kv_heads, num_slots, dim)
        np.testing.assert_array_equal(flat[:, ~written], before[:, ~written])
    np.testing.assert_array_equal(np.asarray(got[2], np.float32).reshape(kv_heads, num_slots, dim)[:, 3],
                                  np.asarray(v[0], np.float32))


def test_a_rotation_by_the_wrong_half_or_without_its_scale_is_caught():
    """The comparison above can fail: the reference with the rotation's
    halves swapped or the score scale left out differs from the kernel."""
    q, k, v, cos, sin, (k_pool, v_pool), _ = _inputs(3, 4, 2, 8, jnp.float32)
    slots = jnp.array([1, 2, 3], jnp.int32)
    got, _, _ = dp.pallas_rope_write_kv(q, k, v, cos, sin, slots, k_pool, v_pool, q_scale=0.5, interpret=True)
    unscaled, _, _ = _reference(q, k, v, cos, sin, slots, k_pool, v_pool, q_scale=1.0)
    swapped, _, _ = _reference(q, k, v, sin, cos, slots, k_pool, v_pool, q_scale=0.5)
    for wrong in (unscaled, swapped):
        assert not np.allclose(np.asarray(got), np.asarray(wrong), rtol=1e-3)


@pytest.mark.parametrize("q_shape, pool_shape, takes", [
    ((1, 32, 128), (4, 64, 16, 128), True),
    ((7, 4, 8), (2, 6, 4, 8), True),
    ((1, 12, 128), (4, 64, 16, 128), False),  # 3 query heads a KV head
    ((1, 16, 96), (4, 64, 16, 96), False),  # a head dim of 96
    ((1, 16, 128), (4, 64, 16, 64), False),  # the pool's head dim differs
])
def test_the_kernel_takes_power_of_two_heads_and_dims(q_shape, pool_shape, takes):
    assert dp.kernel_supports(q_shape, pool_shape, pool_shape) is takes


def test_the_kernel_is_chosen_on_gpus_only_when_switched_on(monkeypatch, kernel_switch):
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    assert not dp.kernel_chosen()  # the default: XLA's ops
    kernel_switch("EAAS_JAX_DECODE_PROLOGUE", "kernel")
    assert dp.kernel_chosen()
    monkeypatch.setattr(jax, "default_backend", lambda: "cpu")
    assert not dp.kernel_chosen()
    kernel_switch("EAAS_JAX_DECODE_PROLOGUE", "on")
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    with pytest.raises(ValueError, match="EAAS_JAX_DECODE_PROLOGUE must be 'kernel' or 'xla', got 'on'"):
        dp.kernel_chosen()


@pytest.mark.parametrize("setting, takes", [({}, True), ({"qk_norm": False}, True),
                                            ({"qk_norm_per_head": False}, False), ({"clip_qkv": 1.0}, False),
                                            ({"num_heads": 6, "num_kv_heads": 2}, False)])
def test_which_attention_layers_take_the_kernel(monkeypatch, setting, takes):
    import dataclasses

    from flax import nnx

    from conftest import TINY_CONFIG
    from eaas_jax.model import attention

    config = dataclasses.replace(TINY_CONFIG, **setting)
    layer = attention.Attention(config, dtype=jnp.float32, rngs=nnx.Rngs(0))
    cache = attention.init_layer_cache(config, num_blocks=4, block_size=4, dtype=jnp.float32)
    monkeypatch.setattr(dp, "kernel_chosen", lambda: True)
    assert layer._prologue_kernel_takes(2, cache) is takes
    monkeypatch.setattr(dp, "kernel_chosen", lambda: False)
    assert not layer._prologue_kernel_takes(2, cache)


def test_an_engine_whose_decode_prologues_are_the_kernels_generates_the_same_tokens(monkeypatch, tiny_checkpoint,
                                                                                 tiny_engine):
    """Every decode step of every layer through the (interpreted) kernel:
    per-head norms, attention biases, rotation, the queries' scale and the
    cache write together give the default engine's greedy tokens."""
    from eaas_jax.engine import Engine, SamplingParams

    prompts = [[5, 6, 7, 8, 9, 10], [11, 12, 13]]
    params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    reference = [o.outputs[0].token_ids for o in tiny_engine.generate(prompts, params, use_tqdm=False)]
    kernel_rows = []
    kernel = functools.partial(dp.pallas_rope_write_kv, interpret=True)
    monkeypatch.setattr(dp, "kernel_chosen", lambda: True)
    monkeypatch.setattr(dp, "pallas_rope_write_kv", lambda *a, **k: kernel_rows.append(a[0].shape) or kernel(*a, **k))
    engine = Engine(tiny_checkpoint, max_num_seqs=8, max_model_len=128, dtype="float32", block_size=4,
                    decode_window=1)
    ours = [o.outputs[0].token_ids for o in engine.generate(prompts, params, use_tqdm=False)]
    assert ours == reference
    assert kernel_rows and all(shape[1:] == (4, 8) for shape in kernel_rows)  # decode steps' queries only


@pytest.mark.parametrize("normed", [True, False])
@pytest.mark.parametrize("heads, kv_heads, dim, rows", [(32, 4, 128, 1), (32, 4, 128, 256), (16, 8, 64, 7)])
def test_the_kernel_lowers_for_cuda_to_one_triton_kernel_writing_the_pools_in_place(heads, kv_heads, dim, rows,
                                                                                     normed):
    """Lowered for CUDA here (no GPU): one Triton kernel, a program per row
    and KV head, whose pool results are its pool operands (the last two)."""
    pool = jax.ShapeDtypeStruct((kv_heads, 4096, 16, dim), jnp.bfloat16)  # nothing allocated
    q = jax.ShapeDtypeStruct((rows, heads, dim), jnp.bfloat16)
    kv = jax.ShapeDtypeStruct((rows, kv_heads, dim), jnp.bfloat16)
    angles = jax.ShapeDtypeStruct((rows, dim // 2), jnp.float32)
    norm = jax.ShapeDtypeStruct((dim,), jnp.bfloat16)

    def prologue(k_pool, v_pool, slots, q, k, v, cos, sin, q_norm, k_norm):
        norms = dict(q_norm=q_norm, k_norm=k_norm) if normed else {}
        return dp.pallas_rope_write_kv(q, k, v, cos, sin, slots, k_pool, v_pool, q_scale=dim ** -0.5, **norms)

    (kernel,) = triton_kernels_lowered_for_cuda(prologue, pool, pool, jax.ShapeDtypeStruct((rows,), jnp.int32),
                                                q, kv, kv, angles, angles, norm, norm, donate_argnums=(0, 1))
    assert re.search(rf"\bgrid_x = {rows}\b", kernel) and re.search(rf"\bgrid_y = {kv_heads}\b", kernel)
    pools = 8 if normed else 6  # (slots, q, k, v, cos, sin, [the norms,] the pools)
    aliases = re.findall(r"output_tuple_indices = \[(\d)\], operand_index = (\d)", kernel)
    assert aliases == [("1", str(pools)), ("2", str(pools + 1))]


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="the compiled kernel runs on GPUs (bench/device_run.sh gpu_tests)")
@pytest.mark.parametrize("heads, kv_heads, dim, rows", [(32, 4, 128, 1), (32, 4, 128, 64), (16, 8, 64, 7)])
def test_the_compiled_kernel_does_what_xla_does_on_a_gpu(heads, kv_heads, dim, rows):
    q, k, v, cos, sin, (k_pool, v_pool), (q_norm, k_norm) = _inputs(rows, heads, kv_heads, dim, jnp.bfloat16,
                                                                    num_blocks=64, block_size=16)
    slots = jax.random.permutation(jax.random.key(3), 64 * 16)[:rows].astype(jnp.int32)
    settings = dict(q_norm=q_norm, k_norm=k_norm, eps=1e-6, q_scale=dim ** -0.5)
    expected = jax.jit(functools.partial(_reference, **settings))(q, k, v, cos, sin, slots, k_pool, v_pool)
    got = jax.jit(functools.partial(dp.pallas_rope_write_kv, **settings), donate_argnums=(6, 7))(
        q, k, v, cos, sin, slots, jnp.copy(k_pool), jnp.copy(v_pool))
    for g, e in zip(got, expected):
        np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(e, np.float32), rtol=1e-2, atol=1e-2)
