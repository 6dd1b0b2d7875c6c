"""A decode step's attention prologue in one kernel: the new queries' and
keys' per-head norms and rotary embedding, the queries' score scale, and the
keys' and values' write into the paged KV cache.

Why: in W1's decode step at batch 1 on an H100 this work is about six kernels
a layer (the query and key norms' reductions, the keys' rotation, the values'
slice of their padded projection, the cache write, the queries' rotation and
scale fused into the paged kernel's padding), ~1.5 µs each; a Pallas call's
operands are whole arrays, so a kernel that does only the write leaves XLA to
make the rest kernels of their own (bench/RESULTS.md, W1 decode, commits
07d3021 and 521125b).

The model's attention takes it on GPUs with EAAS_JAX_DECODE_PROLOGUE=kernel
(not yet measured in the step, so not the default; read once a process), for
GQA layers whose norms, if any, are per head (Qwen3-MoE; none: Mixtral,
Qwen2-MoE), without clipping (OLMoE's), where `kernel_supports` the shapes.
tests/test_decode_prologue.py holds the same by the model's own functions
(rms_norm, rotate_half, the cache write): the reference the kernel is tested
against.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from eaas_jax.kernels.common import kernel_switched_on, powers_of_two


def kernel_chosen() -> bool:
    """Whether decode steps on this backend take the kernel (for the layers
    and shapes it supports)."""
    return jax.default_backend() == "gpu" and kernel_switched_on("EAAS_JAX_DECODE_PROLOGUE", default="xla")


def kernel_supports(q_shape, k_pool_shape, v_pool_shape) -> bool:
    """Whether the kernel takes queries [N, H, D] and pools of these shapes."""
    _, heads, dim = q_shape
    kv_heads = k_pool_shape[0]
    return (tuple(k_pool_shape) == tuple(v_pool_shape) and k_pool_shape[-1] == dim and heads % kv_heads == 0
            and powers_of_two(dim, heads // kv_heads, kv_heads) and dim >= 2)


def pallas_rope_write_kv(q, k, v, cos, sin, slots, k_pool, v_pool, *, q_norm=None, k_norm=None,
                         eps: float = 1e-6, q_scale: float = 1.0, interpret: bool = False):
    """(queries normed, rotated and scaled by `q_scale`, the pools with the
    keys normed and rotated and the values at `slots`), each norm and the
    rotation in float32 and rounded to the inputs' dtype after each, as the
    model's attention does them. q [N, H, D], k and v [N, KV, D]; cos and sin
    [N, D / 2] (times the rotary scale); slots [N] flat cache slots (past the
    pools' end: dropped); the norms' weights [D], or None (no norms).

    One Pallas kernel (Triton): program (row, KV head) does that KV head's
    query heads, key and value; the pools are written in place (the outputs
    alias them)."""
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import triton as pltriton

    rows, heads, dim = q.shape
    kv_heads, num_blocks, block_size, _ = k_pool.shape
    group = heads // kv_heads
    flat_shape = (kv_heads, num_blocks * block_size, dim)
    normed = q_norm is not None
    pool_spec = pl.BlockSpec(flat_shape, lambda r, g: (0, 0, 0))  # the whole pool: the kernel picks the slot
    q_spec = pl.BlockSpec((None, group, dim), lambda r, g: (r, g, 0))
    kv_spec = pl.BlockSpec((None, 1, dim), lambda r, g: (r, g, 0))
    angle_spec = pl.BlockSpec((None, dim // 2), lambda r, g: (r, 0))
    norm_spec = pl.BlockSpec((dim,), lambda r, g: (0,))
    operands = [slots.astype(jnp.int32), q, k, v, cos.astype(jnp.float32), sin.astype(jnp.float32)]
    specs = [pl.BlockSpec((1,), lambda r, g: (r,)), q_spec, kv_spec, kv_spec, angle_spec, angle_spec]
    if normed:
        operands += [q_norm, k_norm]
        specs += [norm_spec, norm_spec]
    pools = len(operands)
    q_out, k_flat, v_flat = pl.pallas_call(
        functools.partial(_prologue_kernel, group=group, dim=dim, num_slots=flat_shape[1], normed=normed, eps=eps,
                          q_scale=q_scale, pool_dtype=k_pool.dtype),
        grid=(rows, kv_heads),
        in_specs=[*specs, pool_spec, pool_spec],
        out_specs=[q_spec, pool_spec, pool_spec],
        out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct(flat_shape, k_pool.dtype),
                   jax.ShapeDtypeStruct(flat_shape, v_pool.dtype)],
        input_output_aliases={pools: 1, pools + 1: 2},
        compiler_params=pltriton.CompilerParams(num_warps=1),
        interpret=interpret,
    )(*operands, k_pool.reshape(flat_shape), v_pool.reshape(flat_shape))
    return q_out, k_flat.reshape(k_pool.shape), v_flat.reshape(v_pool.shape)


def _prologue_kernel(slot_ref, q_ref, k_ref, v_ref, cos_ref, sin_ref, *refs, group: int, dim: int, num_slots: int,
                     normed: bool, eps: float, q_scale: float, pool_dtype):
    """One row, one KV head: its `group` query heads normed, rotated and
    scaled to the output; its key normed and rotated, and its value, to the
    row's slot unless that is past the pools' end (a padding row)."""
    from jax.experimental import pallas as pl

    if normed:
        q_norm_ref, k_norm_ref, *refs = refs
    _, _, q_out, k_out, v_out = refs  # (the pools' inputs are the outputs: aliased)
    half = dim // 2
    lo, hi = pl.ds(0, half), pl.ds(half, half)
    cos, sin = cos_ref[...], sin_ref[...]

    def prepare(ref, head, norm_ref):
        """A head's halves, normed (as the model's rms_norm: float32, then the
        dtype) and rotated (as its rotate_half: float32, then the dtype)."""
        dtype = ref.dtype
        a, b = ref[head, lo].astype(jnp.float32), ref[head, hi].astype(jnp.float32)
        if normed:
            inverse = jax.lax.rsqrt((jnp.sum(a * a) + jnp.sum(b * b)) / dim + eps)
            a = (a * inverse * norm_ref[lo].astype(jnp.float32)).astype(dtype).astype(jnp.float32)
            b = (b * inverse * norm_ref[hi].astype(jnp.float32)).astype(dtype).astype(jnp.float32)
        return (a * cos - b * sin).astype(dtype), (b * cos + a * sin).astype(dtype)

    for head in range(group):  # (few: unrolled)
        a, b = prepare(q_ref, head, q_norm_ref if normed else None)
        q_out[head, lo] = (a.astype(jnp.float32) * q_scale).astype(q_out.dtype)
        q_out[head, hi] = (b.astype(jnp.float32) * q_scale).astype(q_out.dtype)

    slot = slot_ref[0]
    kv_head = pl.program_id(1)

    @pl.when(slot < num_slots)
    def _():
        a, b = prepare(k_ref, 0, k_norm_ref if normed else None)
        at = pl.ds(slot, 1)
        k_out[kv_head, at, lo] = a.astype(pool_dtype)[None]
        k_out[kv_head, at, hi] = b.astype(pool_dtype)[None]
        v_out[kv_head, at, :] = v_ref[0, :].astype(pool_dtype)[None]
