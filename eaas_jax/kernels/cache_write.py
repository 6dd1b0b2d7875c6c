"""Writing a step's new keys and values into their slots of the paged KV cache.

`write_kv` puts row r of `k` and `v` ([rows, kv_heads, head_dim]) at flat slot
`slots[r]` of each pool (`[kv_heads, num_blocks, block_size, head_dim]`, the
layout of `eaas_jax.model.attention`); a slot at or past the pool's end (a
padding row's: the runner gives them the pool's size) writes nothing. Slots
are never negative (XLA's scatter would count a negative one from the end).
Two forms:

- On GPUs (EAAS_JAX_CACHE_WRITE=xla turns it off; read once a process): one
  Pallas kernel (Triton) writes both pools in place (its outputs alias the
  pools), a program per row, where the head dim and head count are powers
  of two.
- XLA's scatter, one per pool. At one row a token (decode at batch 1) XLA
  turns each into a dynamic-update-slice, with a select for the dropped
  slots: in W1's decode step at batch 1 on an H100 the write took 4 kernels
  and ~53 µs a token over 8 layers (bench/RESULTS.md, W1 decode, commit
  07d3021), for 16 KiB of new keys and values.

In that step the kernel took 20 µs a token, but its inputs are whole arrays
where XLA fused their producers into its write (the keys' rotary embedding,
the values' slice of their padded projection): 2 kernels more, ~20 µs. Net,
912 against 920 µs of kernels a token, and steps as fast or slightly faster
at batches 1, 64 and 256 (RESULTS, W1 decode, commit 521125b).

Both are exact copies (the values cast to the pool's dtype), so the forms
must agree bit for bit: tests/test_cache_write.py.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from eaas_jax.kernels.common import kernel_switched_on, powers_of_two


def write_kv(k_pool: jax.Array, v_pool: jax.Array, slots: jax.Array, k: jax.Array, v: jax.Array, *,
             interpret: bool = False) -> tuple[jax.Array, jax.Array]:
    """The pools with rows `k`, `v` [rows, kv_heads, dim] at flat `slots`
    [rows] (past the end: dropped). interpret=True runs the kernel
    interpreted on any platform, where the shapes take it (tests)."""
    if slots.shape[0] != k.shape[0] or k.shape[0] != v.shape[0]:
        raise ValueError(f"{slots.shape[0]} slots for {k.shape[0]} key and {v.shape[0]} value rows")
    if (interpret or (jax.default_backend() == "gpu" and kernel_switched_on("EAAS_JAX_CACHE_WRITE"))) \
            and kernel_supports(k_pool.shape, v_pool.shape) and slots.shape[0]:
        return pallas_write_kv(k_pool, v_pool, slots, k, v, interpret=interpret)
    return xla_write(k_pool, slots, k), xla_write(v_pool, slots, v)


def xla_write(pool: jax.Array, slots: jax.Array, values: jax.Array) -> jax.Array:
    """values [rows, kv_heads, dim] into flat slots [rows] of one pool, by
    XLA's scatter (past the end: dropped)."""
    kv_heads, num_blocks, block_size, dim = pool.shape
    flat = pool.reshape(kv_heads, num_blocks * block_size, dim)
    rows = values.astype(pool.dtype).transpose(1, 0, 2)
    return flat.at[:, slots].set(rows, mode="drop").reshape(pool.shape)


def kernel_supports(k_shape, v_shape) -> bool:
    """Whether the kernel takes pools of these shapes: equal, with a head dim
    and head count that are powers of two (Triton's loads; an MLA cache's
    latent of 576 and its empty values are not)."""
    kv_heads, _, _, dim = k_shape
    return tuple(k_shape) == tuple(v_shape) and powers_of_two(kv_heads, dim)


def pallas_write_kv(k_pool: jax.Array, v_pool: jax.Array, slots: jax.Array, k: jax.Array, v: jax.Array, *,
                    interpret: bool = False) -> tuple[jax.Array, jax.Array]:
    """`write_kv` as one Pallas kernel: program r stores row r's heads at its
    slot in both pools, which the outputs alias (nothing else is copied)."""
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import triton as pltriton

    kv_heads, num_blocks, block_size, dim = k_pool.shape
    flat_shape = (kv_heads, num_blocks * block_size, dim)
    rows = slots.shape[0]
    pool_spec = pl.BlockSpec(flat_shape, lambda r: (0, 0, 0))  # the whole pool: the kernel picks the slot
    row_spec = pl.BlockSpec((None, kv_heads, dim), lambda r: (r, 0, 0))
    k_flat, v_flat = pl.pallas_call(
        functools.partial(_write_kernel, num_slots=flat_shape[1], kv_heads=kv_heads),
        grid=(rows,),
        in_specs=[pl.BlockSpec((1,), lambda r: (r,)), row_spec, row_spec, pool_spec, pool_spec],
        out_specs=[pool_spec, pool_spec],
        out_shape=[jax.ShapeDtypeStruct(flat_shape, k_pool.dtype), jax.ShapeDtypeStruct(flat_shape, v_pool.dtype)],
        input_output_aliases={3: 0, 4: 1},
        compiler_params=pltriton.CompilerParams(num_warps=1),
        interpret=interpret,
    )(slots.astype(jnp.int32), k.astype(k_pool.dtype), v.astype(v_pool.dtype),
      k_pool.reshape(flat_shape), v_pool.reshape(flat_shape))
    return k_flat.reshape(k_pool.shape), v_flat.reshape(v_pool.shape)


def _write_kernel(slot_ref, k_ref, v_ref, _k_in, _v_in, k_out, v_out, *, num_slots: int, kv_heads: int):
    """One row: its heads' keys and values to its slot, unless the slot is
    past the pool's end (a padding row). The pools' inputs are the outputs
    (aliased): only the row's slot is written."""
    from jax.experimental import pallas as pl

    slot = slot_ref[0]

    @pl.when(slot < num_slots)
    def _():
        at = pl.ds(slot, 1)
        for head in range(kv_heads):  # (few: unrolled)
            k_out[head, at, :] = k_ref[head, :][None]
            v_out[head, at, :] = v_ref[head, :][None]
