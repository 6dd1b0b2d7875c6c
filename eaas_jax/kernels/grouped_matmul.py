"""Grouped matmul: one matmul per group of consecutive rows, all groups in one call.

This is the expert FFN's workhorse. Rows of `x` are sorted by expert so that
group g is `x[offsets[g]:offsets[g+1]]` and is multiplied by `w[g]`. Every
platform goes through `grouped_matmul`, which picks the implementation:

- on GPUs, tokamax's `ragged_dot` (Mosaic GPU kernels for Hopper) when the
  optional `tokamax` package is installed: measured on an H100 for 128 experts
  x 2048 x 768 in bf16 at 0.23 / 0.33 / 0.49 / 0.54 ms for 128 / 512 / 2048 /
  8192 rows against 0.36 / 0.62 / 1.54 / 5.34 ms for `lax.ragged_dot`, with
  equal results; set EAAS_JAX_GROUPED_MATMUL=lax to compare;
- `lax.ragged_dot` elsewhere off the CPU (and on GPUs without tokamax);
- on the CPU, XLA lowers `ragged_dot` to a dense matmul of every row with every
  group's weights (G times the work, and slower still in the backward pass), so
  there we pad each group to a multiple of a row tile and run one batched matmul
  over tiles, each tile multiplying by its own group's weights. That does at most
  `G * tile` rows of extra work and is exact.
"""

from __future__ import annotations

import functools
import logging
import os

import jax
import jax.numpy as jnp

log = logging.getLogger(__name__)


def grouped_matmul(x: jax.Array, w: jax.Array, group_sizes: jax.Array) -> jax.Array:
    """Computes `x[rows of g] @ w[g]` for every group g.

    Args:
      x: [M, K] rows sorted by group.
      w: [G, K, N] one weight matrix per group.
      group_sizes: [G] int32, summing to at most M; rows past the sum give zeros.

    Returns:
      [M, N] in x's dtype, accumulated in float32.
    """
    backend = jax.default_backend()
    if backend == "cpu":
        out = tiled_grouped_matmul(x, w, group_sizes)
    elif backend == "gpu" and _tokamax() is not None:
        out = tokamax_grouped_matmul(_tokamax(), x, w, group_sizes)
    else:
        out = jax.lax.ragged_dot(
            x, w, group_sizes.astype(jnp.int32), preferred_element_type=jnp.float32
        )
    return out.astype(x.dtype)


def skips_rows_past_groups() -> bool:
    """Whether `grouped_matmul` does no work for rows past the last group, so
    that padding a batch with such rows costs (almost) nothing: true of
    tokamax's kernel, which plans its tiles from `group_sizes` on the device;
    `lax.ragged_dot` and the CPU's tiled matmul compute every row."""
    return jax.default_backend() == "gpu" and _tokamax() is not None


@functools.cache
def _tokamax():
    """The tokamax module if it is installed and not switched off, else None.
    Imported on first use: it is an optional, GPU-only dependency."""
    if os.environ.get("EAAS_JAX_GROUPED_MATMUL", "auto") == "lax":
        return None
    try:
        import tokamax
    except ImportError as e:
        log.info("tokamax not available (%s); grouped matmul uses lax.ragged_dot", e)
        return None
    log.info("grouped matmul uses tokamax %s", getattr(tokamax, "__version__", "?"))
    return tokamax


def tokamax_grouped_matmul(tokamax, x: jax.Array, w: jax.Array, group_sizes: jax.Array) -> jax.Array:
    """tokamax's ragged_dot, with rows past the last group zeroed: tokamax does
    not promise zeros there (lax.ragged_dot does, and callers rely on it)."""
    sizes = group_sizes.astype(jnp.int32)
    out = tokamax.ragged_dot(x, w, sizes)
    valid = jnp.arange(x.shape[0]) < jnp.sum(sizes)
    return jnp.where(valid[:, None], out, 0)


def _row_tile(num_rows: int, num_groups: int) -> int:
    # About two tiles per group on average, at most 128 rows: small batches
    # (decode) waste little padding, large ones (prefill, training) get big tiles.
    per_group = max(1, -(-num_rows // (2 * num_groups)))
    return min(128, 1 << (per_group - 1).bit_length())


def tiled_grouped_matmul(x: jax.Array, w: jax.Array, group_sizes: jax.Array) -> jax.Array:
    """Exact grouped matmul as a batched matmul over group-aligned row tiles."""
    num_rows, k = x.shape
    num_groups, _, n = w.shape
    tile = _row_tile(num_rows, num_groups)
    num_tiles = -(-num_rows // tile) + num_groups  # every group may waste < one tile
    padded_rows = num_tiles * tile

    sizes = group_sizes.astype(jnp.int32)
    ends = jnp.cumsum(sizes)
    starts = ends - sizes
    padded_sizes = -(-sizes // tile) * tile
    padded_ends = jnp.cumsum(padded_sizes)
    padded_starts = padded_ends - padded_sizes

    rows = jnp.arange(num_rows, dtype=jnp.int32)
    row_group = jnp.searchsorted(ends, rows, side="right")  # num_groups past the last group
    in_group = row_group < num_groups
    g = jnp.minimum(row_group, num_groups - 1)
    dest = jnp.where(in_group, padded_starts[g] + rows - starts[g], padded_rows)

    x_tiles = jnp.zeros((padded_rows, k), x.dtype).at[dest].set(x, mode="drop")
    tile_group = jnp.searchsorted(padded_ends, jnp.arange(num_tiles) * tile, side="right")
    tile_weights = w[jnp.minimum(tile_group, num_groups - 1)]  # [num_tiles, K, N]
    out_tiles = jnp.einsum(
        "tik,tkn->tin",
        x_tiles.reshape(num_tiles, tile, k),
        tile_weights,
        preferred_element_type=jnp.float32,
    )
    out = out_tiles.reshape(padded_rows, n)[jnp.minimum(dest, padded_rows - 1)]
    return jnp.where(in_group[:, None], out, 0.0)
