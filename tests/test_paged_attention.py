"""Decode attention over the paged cache: the Pallas kernel (interpreted on the
CPU, compiled on a GPU) and the gathered reference against a NumPy reference."""

from __future__ import annotations

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from eaas_jax.kernels.paged_attention import (
    gathered_paged_attention,
    kernel_partition,
    kernel_programs,
    pallas_paged_attention,
    paged_decode_attention,
)

ON_GPU = jax.default_backend() == "gpu"


def _case(seed=0, batch=5, heads=8, kv_heads=2, dim=64, num_blocks=40, block_size=16, max_blocks=8,
          dtype=jnp.float32):
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((batch, heads, dim)).astype(np.float32)
    k = rng.standard_normal((kv_heads, num_blocks, block_size, dim)).astype(np.float32)
    v = rng.standard_normal((kv_heads, num_blocks, block_size, dim)).astype(np.float32)
    # Distinct blocks per sequence, then padding entries of 0 past each one's blocks
    # (what the runner sends); lengths from 1 key to every slot of the table.
    lengths = np.array([1, 17, 50, max_blocks * block_size, 31][:batch], np.int32)
    tables = np.zeros((batch, max_blocks), np.int32)
    free = rng.permutation(num_blocks)
    used = 0
    for b, n in enumerate(lengths):
        blocks = -(-n // block_size)
        tables[b, :blocks] = free[used:used + blocks] % num_blocks
        used += blocks
    return [jnp.asarray(a, dtype) for a in (q, k, v)] + [jnp.asarray(tables), jnp.asarray(lengths)]


def _numpy_reference(q, k, v, tables, lengths, scale):
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    batch, heads, dim = q.shape
    kv_heads, _, block_size, _ = k.shape
    group = heads // kv_heads
    out = np.zeros_like(q)
    for b in range(batch):
        n = int(lengths[b])
        slots = [(int(tables[b, p // block_size]), p % block_size) for p in range(n)]
        for h in range(heads):
            keys = np.stack([k[h // group, blk, off] for blk, off in slots])
            values = np.stack([v[h // group, blk, off] for blk, off in slots])
            scores = keys @ q[b, h] * scale
            weights = np.exp(scores - scores.max())
            out[b, h] = weights @ values / weights.sum()
    return out


def test_gathered_reference_equals_numpy():
    q, k, v, tables, lengths = _case()
    out = gathered_paged_attention(q, k, v, tables, lengths, scale=0.3)
    np.testing.assert_allclose(np.asarray(out), _numpy_reference(q, k, v, tables, lengths, 0.3),
                               rtol=1e-5, atol=1e-5)


def test_kernel_equals_numpy_reference():
    """Compiled on a GPU, interpreted elsewhere: same inputs, same answer, padded
    table entries and keys past `lengths` ignored."""
    q, k, v, tables, lengths = _case(seed=1)
    out = pallas_paged_attention(q, k, v, tables, lengths, scale=64**-0.5, interpret=not ON_GPU)
    tol = 2e-3 if ON_GPU else 1e-5  # tf32 / bf16 partial outputs on the GPU
    np.testing.assert_allclose(np.asarray(out), _numpy_reference(q, k, v, tables, lengths, 64**-0.5),
                               rtol=tol, atol=tol)


@pytest.mark.parametrize("partition", [(1, 1), (1, 8), (2, 2), (8, 1)])
def test_every_partition_the_kernel_takes_gives_the_same_attention(partition):
    """A partition other than kernel_partition's (bench/paged_attention_partitions.py times them)."""
    q, k, v, tables, lengths = _case(seed=5)
    call = functools.partial(pallas_paged_attention, scale=0.25, interpret=not ON_GPU, partition=partition)
    jaxpr = str(jax.make_jaxpr(call)(q, k, v, tables, lengths))
    grid = re.search(r"grid=\(([\d, ]+)\)", jaxpr)
    assert int(grid.group(1).split(",")[-1]) == partition[0]  # the grid's last axis: each sequence's splits
    assert f"pages_per_compute_block={partition[1]}" in jaxpr  # (the kernel's name)
    out = call(q, k, v, tables, lengths)
    tol = 2e-3 if ON_GPU else 1e-5
    np.testing.assert_allclose(np.asarray(out), _numpy_reference(q, k, v, tables, lengths, 0.25), rtol=tol, atol=tol)


def test_kernel_ignores_the_cache_past_each_length():
    """Keys/values written past a sequence's length (in its last block or in
    blocks the table pads with) must not change its output."""
    q, k, v, tables, lengths = _case(seed=2)
    base = pallas_paged_attention(q, k, v, tables, lengths, scale=0.2, interpret=not ON_GPU)
    mask = np.zeros(k.shape, bool)
    for b, n in enumerate(np.asarray(lengths)):
        for p in range(int(n), tables.shape[1] * k.shape[2]):
            mask[:, int(tables[b, p // k.shape[2]]), p % k.shape[2]] = True
    # Only slots no sequence reads below its length: the blocks are distinct per sequence.
    for b, n in enumerate(np.asarray(lengths)):
        for p in range(int(n)):
            mask[:, int(tables[b, p // k.shape[2]]), p % k.shape[2]] = False
    poisoned_k = jnp.where(jnp.asarray(mask), 1e4, k)
    poisoned_v = jnp.where(jnp.asarray(mask), 1e4, v)
    out = pallas_paged_attention(q, poisoned_k, poisoned_v, tables, lengths, scale=0.2, interpret=not ON_GPU)
    np.testing.assert_allclose(np.asarray(out), np.asarray(base), rtol=1e-6, atol=1e-6)


@pytest.mark.skipif(not ON_GPU, reason="the compiled kernel needs a GPU")
def test_bfloat16_decode_on_the_gpu_takes_the_kernel_and_matches_the_reference():
    q, k, v, tables, lengths = _case(seed=3, heads=32, kv_heads=4, dim=128, max_blocks=16, dtype=jnp.bfloat16)
    lowered = jax.jit(paged_decode_attention).lower(q, k, v, tables, lengths).as_text()
    assert "paged_attention" in lowered  # the Pallas kernel, not the gathered path
    out = paged_decode_attention(q, k, v, tables, lengths)
    ref = _numpy_reference(*(np.asarray(a.astype(jnp.float32)) for a in (q, k, v)), tables, lengths, 128**-0.5)
    np.testing.assert_allclose(np.asarray(out.astype(jnp.float32)), ref, rtol=3e-2, atol=3e-2)


def test_off_the_gpu_decode_attention_gathers():
    q, k, v, tables, lengths = _case(seed=4)
    if ON_GPU:
        pytest.skip("checks the CPU path")
    lowered = jax.jit(paged_decode_attention).lower(q, k, v, tables, lengths).as_text()
    assert "paged_attention" not in lowered
    np.testing.assert_allclose(np.asarray(paged_decode_attention(q, k, v, tables, lengths)),
                               _numpy_reference(q, k, v, tables, lengths, 64**-0.5), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("programs", [1, 4, 32, 256, 4096])
@pytest.mark.parametrize("max_blocks", [1, 2, 3, 8, 12, 16, 24, 40, 64, 256, 1000])
def test_kernel_partition_meets_the_kernels_constraints(max_blocks, programs):
    splits, pages = kernel_partition(max_blocks, programs, multiprocessors=132)
    assert max_blocks % splits == 0 and 1 <= splits <= 16
    per_split = max_blocks // splits
    assert per_split % pages == 0 and pages in (1, 2, 4, 8)  # (Triton tiles: powers of two up to 8)
    assert per_split >= 2 or splits == 1


@pytest.mark.parametrize("heads, kv_heads, expected", [(32, 4, 2 * 4), (128, 4, 2 * 4 * 2), (4, 4, 2 * 4)])
def test_kernel_programs_count_blocks_of_16_query_heads(heads, kv_heads, expected):
    q = jnp.zeros((2, heads, 64), jnp.bfloat16)
    assert kernel_programs(q, jnp.zeros((kv_heads, 3, 16, 64), jnp.bfloat16)) == expected


@pytest.mark.parametrize("programs, max_blocks, expected", [
    (4, 16, (8, 2)), (4, 128, (16, 8)),  # one sequence: split as far as blocks allow, a split per iteration
    (256, 16, (1, 4)), (256, 128, (1, 8)), (1024, 128, (1, 8)),  # many: no split, >= 4 iterations
    (32, 16, (8, 2)), (64, 16, (4, 4)),  # a few: the fewest splits that fill the multiprocessors
])
def test_kernel_partition_splits_only_to_fill_the_device(programs, max_blocks, expected):
    assert kernel_partition(max_blocks, programs, multiprocessors=132) == expected


def test_an_unknown_decode_attention_choice_is_refused(monkeypatch):
    from eaas_jax.kernels import paged_attention

    monkeypatch.setenv("EAAS_JAX_PAGED_ATTENTION", "gathre")
    paged_attention._kernel_switched_on.cache_clear()
    try:
        with pytest.raises(ValueError, match="'auto' or 'gather'"):
            paged_attention._kernel_switched_on()
    finally:
        paged_attention._kernel_switched_on.cache_clear()
