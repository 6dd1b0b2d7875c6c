"""Decode attention over the paged KV cache: one new query per sequence.

Every decode step attends each sequence's single new query over the keys and
values in its cache blocks. Gathering those blocks into a padded
`[batch, max_blocks * block_size, ...]` copy first (what prefill does, see
`eaas_jax.model.attention`) writes and re-reads the whole visible cache once
more per layer; `paged_decode_attention` avoids that where it can:

- on GPUs, JAX's Pallas paged-attention kernel
  (`jax.experimental.pallas.ops.gpu.paged_attention`, Triton) reads the blocks
  in place through the block table, split over the sequence (flash-decoding)
  and combined at the end; set EAAS_JAX_PAGED_ATTENTION=gather to compare;
- elsewhere (and for shapes the kernel does not take: head_dim or block_size
  not a power of two >= 16) the gathered computation, which is also the
  reference the kernel is tested against.

Pool layout: `[num_kv_heads, num_blocks, block_size, head_dim]`, the kernel's.
"""

from __future__ import annotations

import functools
import logging
import os

import jax
import jax.numpy as jnp

from eaas_jax.kernels.attention import grouped_query_attention
from eaas_jax.kernels.common import powers_of_two

log = logging.getLogger(__name__)

MAX_SPLITS = 16  # sequence partitions per (sequence, kv head), combined at the end
QUERY_HEADS_PER_PROGRAM = 16  # the kernel's block of a KV head's query heads (it pads fewer to 16)
PAGES_PER_ITERATION = (1, 2, 4, 8)  # cache blocks one kernel iteration may load (Triton tiles: powers of two)


def paged_decode_attention(
    q: jax.Array,
    k_pool: jax.Array,
    v_pool: jax.Array,
    block_tables: jax.Array,
    lengths: jax.Array,
    *,
    scale: float | None = None,
) -> jax.Array:
    """Attention of one query per sequence over the first `lengths` keys of its blocks.

    Args:
      q: [B, H, D] queries, H a multiple of the kv heads.
      k_pool, v_pool: [KV, num_blocks, block_size, D] the layer's cache.
      block_tables: [B, M] int32 block ids of each sequence in order; entries
        past a sequence's blocks must still be valid ids (the runner pads with 0).
      lengths: [B] int32 keys each query sees (its position + 1), 1..M * block_size.
      scale: score scale (default D ** -0.5).

    Returns:
      [B, H, D] in q's dtype; softmax in float32.
    """
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    if kernel_enabled() and _kernel_supports(k_pool.shape, v_pool.shape):
        return pallas_paged_attention(q, k_pool, v_pool, block_tables, lengths, scale=scale)
    return gathered_paged_attention(q, k_pool, v_pool, block_tables, lengths, scale=scale)


def gathered_paged_attention(q, k_pool, v_pool, block_tables, lengths, *, scale: float) -> jax.Array:
    """The reference: gather each sequence's blocks, then dense masked attention."""
    batch = block_tables.shape[0]
    keys = gather_blocks(k_pool, block_tables)
    values = gather_blocks(v_pool, block_tables)
    key_positions = jnp.broadcast_to(jnp.arange(keys.shape[1], dtype=jnp.int32), (batch, keys.shape[1]))
    out = grouped_query_attention(q[:, None], keys, values, (lengths - 1)[:, None], key_positions, scale=scale)
    return out[:, 0]


def gather_blocks(pool: jax.Array, block_tables: jax.Array) -> jax.Array:
    """[KV, N, block_size, D] pool, [B, M] block ids -> [B, M * block_size, KV, D]."""
    batch, max_blocks = block_tables.shape
    kv_heads, _, block_size, dim = pool.shape
    gathered = pool[:, block_tables]  # [KV, B, M, block_size, D]
    return gathered.transpose(1, 2, 3, 0, 4).reshape(batch, max_blocks * block_size, kv_heads, dim)


def pallas_paged_attention(q, k_pool, v_pool, block_tables, lengths, *, scale: float,
                           interpret: bool = False, partition: tuple[int, int] | None = None) -> jax.Array:
    """JAX's Pallas paged-attention kernel with its partitioning chosen for
    these shapes (`interpret=True` runs it on the CPU, for tests). `partition`
    (sequence splits, cache blocks per iteration) overrides `kernel_partition`'s
    choice (bench/paged_attention_partitions.py times them)."""
    from jax.experimental.pallas.ops.gpu.paged_attention import paged_attention

    splits, pages_per_block = partition or kernel_partition(block_tables.shape[1], kernel_programs(q, k_pool))
    # The kernel does not scale scores: scale the queries (in float32, once).
    scaled = (q.astype(jnp.float32) * scale).astype(q.dtype)
    return paged_attention(
        scaled, k_pool, v_pool, block_tables.astype(jnp.int32), lengths.astype(jnp.int32),
        k_splits=splits, pages_per_compute_block=pages_per_block, interpret=interpret,
    )


def kernel_partition(max_blocks: int, programs: int, multiprocessors: int | None = None) -> tuple[int, int]:
    """(sequence splits, cache blocks per kernel iteration) for M blocks per
    sequence and `programs` (sequence, KV head) pairs; the kernel runs one
    program per pair and split, on `multiprocessors` (default: the device's).

    Splits: the fewest that give every multiprocessor a program, dividing M
    (the kernel's requirement), at most MAX_SPLITS and leaving at least 2
    blocks each: each split costs a combine, so with enough sequences none
    pays. Blocks per iteration (powers of two up to 8, dividing a split): as
    many as a split holds when split (few, short loops); else the most that
    leave at least 4 iterations, since a sequence's last iteration loads up
    to a whole iteration's blocks past its end. On an H100 at W1's heads
    this is the fastest partition at batches 1, 64 and 256 and tables of 16
    and 128 blocks (bench/RESULTS.md, "Paged decode attention: the kernel's
    partitions", 2026-12-06); the rule before it, splitting whatever the
    batch, was 8-34% slower there."""
    multiprocessors = multiprocessors or _multiprocessors()
    allowed = [d for d in range(1, min(MAX_SPLITS, max_blocks) + 1)
               if max_blocks % d == 0 and (max_blocks // d >= 2 or d == 1)]
    enough = [d for d in allowed if programs * d >= multiprocessors]
    splits = min(enough) if enough else max(allowed)
    per_split = max_blocks // splits
    limit = per_split if splits > 1 else max(1, per_split // 4)
    pages = max(p for p in PAGES_PER_ITERATION if per_split % p == 0 and p <= limit)
    return splits, pages


def kernel_programs(q: jax.Array, k_pool: jax.Array) -> int:
    """The kernel's programs a split: one per sequence, KV head and block of
    up to QUERY_HEADS_PER_PROGRAM of the KV head's query heads."""
    batch, heads, _ = q.shape
    kv_heads = k_pool.shape[0]
    return batch * kv_heads * -(-(heads // kv_heads) // QUERY_HEADS_PER_PROGRAM)


# What kernel_partition assumes where the device does not say (an H100 has 132).
DEFAULT_MULTIPROCESSORS = 128


@functools.cache
def _multiprocessors() -> int:
    return getattr(jax.devices()[0], "core_count", None) or DEFAULT_MULTIPROCESSORS


def _kernel_supports(k_shape, v_shape) -> bool:
    _, _, block_size, dim = k_shape
    return powers_of_two(block_size, dim, at_least=16) and tuple(k_shape) == tuple(v_shape)


def kernel_enabled() -> bool:
    """Whether decode attention on this backend takes the Pallas kernel (for
    cache shapes it supports)."""
    return jax.default_backend() == "gpu" and _kernel_switched_on()


@functools.cache
def _kernel_switched_on() -> bool:
    choice = os.environ.get("EAAS_JAX_PAGED_ATTENTION", "auto")
    if choice not in ("auto", "gather"):
        raise ValueError(f"EAAS_JAX_PAGED_ATTENTION must be 'auto' or 'gather', got {choice!r}")
    if choice == "gather":
        return False
    try:
        import jax.experimental.pallas.ops.gpu.paged_attention  # noqa: F401
    except ImportError as e:  # a jaxlib without Pallas GPU support
        log.info("Pallas paged attention not available (%s); decode attention gathers the cache", e)
        return False
    return True
