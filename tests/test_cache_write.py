"""The KV cache write: the Pallas kernel (interpreted here) against XLA's
scatter, bit for bit, dropped slots included; which shapes and settings take
it; and an engine whose every cache write is the kernel's generates what the
default engine does."""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import triton_kernels_lowered_for_cuda
from eaas_jax.kernels import cache_write as cw


def _pools(kv_heads=2, num_blocks=5, block_size=4, dim=8, dtype=jnp.bfloat16, seed=0):
    keys = jax.random.split(jax.random.key(seed), 2)
    shape = (kv_heads, num_blocks, block_size, dim)
    return jax.random.normal(keys[0], shape, dtype), jax.random.normal(keys[1], shape, dtype)


def _rows(rows, kv_heads=2, dim=8, seed=1):
    keys = jax.random.split(jax.random.key(seed), 2)
    # float32 values into bfloat16 pools: both forms cast the same way
    return (jax.random.normal(keys[0], (rows, kv_heads, dim), jnp.float32),
            jax.random.normal(keys[1], (rows, kv_heads, dim), jnp.float32))


def _expected(pool, slots, values):
    """The pool written row by row in numpy, slots past its end skipped."""
    out = np.asarray(pool).copy()
    kv_heads, num_blocks, block_size, dim = out.shape
    for slot, row in zip(np.asarray(slots), np.asarray(values.astype(pool.dtype))):
        if slot < num_blocks * block_size:
            out[:, slot // block_size, slot % block_size] = row
    return out


@pytest.mark.parametrize("kv_heads, dim", [(2, 8), (1, 16), (4, 32)])
def test_the_kernel_writes_each_row_at_its_slot_and_drops_slots_past_the_pool(kv_heads, dim):
    k_pool, v_pool = _pools(kv_heads=kv_heads, dim=dim)
    num_slots = k_pool.shape[1] * k_pool.shape[2]
    # first and last slots, a middle one, and padding rows' slots: the pool's size (the runner's), far past
    slots = jnp.array([0, num_slots - 1, 7, num_slots, 10 * num_slots, num_slots], jnp.int32)
    k, v = _rows(slots.shape[0], kv_heads, dim)
    got_k, got_v = cw.pallas_write_kv(k_pool, v_pool, slots, k, v, interpret=True)
    xla_k, xla_v = cw.xla_write(k_pool, slots, k), cw.xla_write(v_pool, slots, v)
    for got, xla, pool, values in ((got_k, xla_k, k_pool, k), (got_v, xla_v, v_pool, v)):
        assert got.shape == pool.shape and got.dtype == pool.dtype
        expected = _expected(pool, slots, values)
        np.testing.assert_array_equal(np.asarray(got), expected)
        np.testing.assert_array_equal(np.asarray(xla), expected)  # (the reference form agrees too)


def test_write_kv_takes_the_kernel_only_on_gpus_when_switched_on_and_for_shapes_it_takes(monkeypatch,
                                                                                         kernel_switch):
    calls = []
    monkeypatch.setattr(cw, "pallas_write_kv", lambda *a, **k: calls.append(a[0].shape) or
                        (cw.xla_write(a[0], a[2], a[3]), cw.xla_write(a[1], a[2], a[4])))
    k_pool, v_pool = _pools()
    k, v = _rows(3)
    slots = jnp.array([1, 2, 3], jnp.int32)
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    cw.write_kv(k_pool, v_pool, slots, k, v)
    assert calls == [k_pool.shape]  # the default: the kernel
    monkeypatch.setattr(jax, "default_backend", lambda: "cpu")
    cw.write_kv(k_pool, v_pool, slots, k, v)
    assert len(calls) == 1  # not on the CPU
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    kernel_switch("EAAS_JAX_CACHE_WRITE", "xla")
    cw.write_kv(k_pool, v_pool, slots, k, v)
    assert len(calls) == 1  # switched off: XLA's scatter
    kernel_switch("EAAS_JAX_CACHE_WRITE", "kernal")
    with pytest.raises(ValueError, match="'kernel' or 'xla', got 'kernal'"):
        cw.write_kv(k_pool, v_pool, slots, k, v)
    with pytest.raises(ValueError, match="3 slots for 2 key and 3 value rows"):
        cw.write_kv(k_pool, v_pool, slots, k[:2], v)


@pytest.mark.parametrize("k_shape, v_shape, takes", [
    ((2, 5, 4, 8), (2, 5, 4, 8), True),
    ((1, 5, 4, 576), (1, 5, 4, 0), False),  # an MLA cache: a latent of 576, no values
    ((3, 5, 4, 8), (3, 5, 4, 8), False),  # three heads: not a power of two
    ((2, 5, 4, 8), (2, 5, 4, 16), False),
])
def test_the_kernel_takes_equal_pools_of_power_of_two_heads_and_dims(k_shape, v_shape, takes):
    assert cw.kernel_supports(k_shape, v_shape) is takes


def test_an_engine_writing_its_cache_by_the_kernel_generates_the_same_tokens(monkeypatch, tiny_checkpoint,
                                                                            tiny_engine):
    """Prefill's many rows a step and decode's one, through the model's
    reshapes: every write of this engine is the (interpreted) kernel's."""
    from eaas_jax.engine import Engine, SamplingParams
    from eaas_jax.model import attention

    prompts = [[5, 6, 7, 8, 9, 10], [11, 12, 13]]
    params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    reference = [o.outputs[0].token_ids for o in tiny_engine.generate(prompts, params, use_tqdm=False)]
    kernel_rows = []
    kernel = cw.pallas_write_kv
    monkeypatch.setattr(cw, "pallas_write_kv", lambda *a, **k: kernel_rows.append(a[2].shape[0]) or kernel(*a, **k))
    monkeypatch.setattr(attention, "write_kv", functools.partial(cw.write_kv, interpret=True))
    engine = Engine(tiny_checkpoint, max_num_seqs=8, max_model_len=128, dtype="float32", block_size=4,
                    decode_window=1)
    ours = [o.outputs[0].token_ids for o in engine.generate(prompts, params, use_tqdm=False)]
    assert ours == reference
    assert max(kernel_rows) > 2 and min(kernel_rows) <= 2  # prefill's rows and decode's (traced per shape)


@pytest.mark.parametrize("kv_heads, dim, rows", [(4, 128, 1), (4, 128, 256), (8, 64, 7), (1, 16, 3)])
def test_the_kernel_lowers_for_cuda_to_one_triton_kernel_writing_the_pools_in_place(kv_heads, dim, rows):
    """Lowered for CUDA here (no GPU): one Triton kernel, a program per row,
    whose two results are its pool operands (slots, keys, values, then the
    pools: operands 3 and 4), so XLA need not copy a pool to write a row."""
    pool = jax.ShapeDtypeStruct((kv_heads, 4096, 16, dim), jnp.bfloat16)  # nothing allocated
    values = jax.ShapeDtypeStruct((rows, kv_heads, dim), jnp.float32)
    (kernel,) = triton_kernels_lowered_for_cuda(cw.pallas_write_kv, pool, pool,
                                                jax.ShapeDtypeStruct((rows,), jnp.int32), values, values,
                                                donate_argnums=(0, 1))
    assert re.search(rf"\bgrid_x = {rows}\b", kernel)
    aliases = re.findall(r"output_tuple_indices = \[(\d)\], operand_index = (\d)", kernel)
    assert aliases == [("0", "3"), ("1", "4")]


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="the compiled kernel runs on GPUs (bench/device_run.sh gpu_tests)")
@pytest.mark.parametrize("kv_heads, dim, rows", [(4, 128, 1), (4, 128, 64), (8, 64, 7)])
def test_the_compiled_kernel_writes_in_place_what_xla_writes_on_a_gpu(kv_heads, dim, rows):
    k_pool, v_pool = _pools(kv_heads=kv_heads, num_blocks=64, block_size=16, dim=dim)
    num_slots = 64 * 16
    slots = jax.random.permutation(jax.random.key(3), num_slots)[:rows]
    if rows > 1:
        slots = slots.at[-1].set(num_slots)  # a padding row's: dropped
    k, v = _rows(rows, kv_heads, dim)
    expected = (_expected(k_pool, slots, k), _expected(v_pool, slots, v))
    write = jax.jit(lambda kp, vp, s, k, v: cw.pallas_write_kv(kp, vp, s, k, v), donate_argnums=(0, 1))
    hlo = write.lower(k_pool, v_pool, slots, k, v).compile().as_text()
    # the pools are written in place: no copy of a pool (flat or blocked) in the program
    pool_copies = [line for line in hlo.splitlines() if re.search(r"\bcopy(-start)?\(", line)
                   and re.search(rf"bf16\[{kv_heads},({num_slots}|64,16),{dim}\]", line)]
    assert not pool_copies, hlo
    got = write(k_pool, v_pool, slots, k, v)
    for g, e in zip(got, expected):
        np.testing.assert_array_equal(np.asarray(g), e)
