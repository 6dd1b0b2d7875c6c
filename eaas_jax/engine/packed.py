"""A step's host inputs, and its results, each moved in one transfer.

Each numpy argument of a jitted call is a host-to-device copy of its own,
made while the call dispatches, and each result read back is a copy of its
own too. W1's decode step has about twenty small host arrays (tokens,
positions, cache slots, block tables, the sampling parameters) and eleven
results (tokens, logprobs, ranks, top logprobs, the exchanges' reports). On
an H100 (2026-12-06) its dispatch took 1.2 ms of the host's 1.6 ms a step at
batch 1 and starting the results' copies 0.28 ms, while the step's kernels
took 1.0 ms: the host set the pace. A jitted call whose arguments were all
on the device dispatched in 39 µs, against 281 µs with one host array
(bench/RESULTS.md, "W1 decode", commit 2a2555b).

So the runner packs the host's inputs into one int32 buffer and the step
unpacks it on the device (`pack`, `unpack`), and the step packs its results
into one int32 buffer that the host unpacks (`pack_on_device`,
`unpack_on_host`). Every field is 4 bytes wide (int32, uint32 and float32
travel bit for bit) or bool (as int32). A `Layout` says where each field
lies: it follows from the shapes, so it is static for a compiled program.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np


class Layout(NamedTuple):
    """Where each array of a packed pytree lies in its buffer, in order."""

    treedef: Any  # the pytree's structure
    fields: tuple[tuple[tuple[int, ...], np.dtype], ...]  # each leaf's shape and dtype


def _field(shape, dtype) -> tuple[tuple[int, ...], np.dtype]:
    dtype = np.dtype(dtype)
    if not (dtype.itemsize == 4 and dtype.kind in "iuf") and dtype != np.bool_:
        raise TypeError(f"a packed array must have a 4-byte number dtype or be bool, not {dtype} {tuple(shape)}")
    return tuple(shape), dtype


def pack(tree) -> tuple[np.ndarray, Layout]:
    """A pytree of numpy arrays as one int32 array, and its layout (host side)."""
    leaves, treedef = jax.tree.flatten(tree)
    if not all(isinstance(leaf, np.ndarray) for leaf in leaves):  # (a device array would be fetched first)
        raise TypeError("pack takes host (numpy) arrays; pack_on_device packs device arrays")
    fields = tuple(_field(leaf.shape, leaf.dtype) for leaf in leaves)
    parts = [leaf.reshape(-1).astype(np.int32) if leaf.dtype == np.bool_ else leaf.reshape(-1).view(np.int32)
             for leaf in leaves]
    return (np.concatenate(parts) if parts else np.zeros((0,), np.int32)), Layout(treedef, fields)


def unpack(buffer: jax.Array, layout: Layout):
    """`pack`'s pytree again from its buffer, on the device (in a jitted step)."""
    leaves = []
    for (shape, dtype), flat in zip(layout.fields, _slices(buffer, layout)):
        if dtype == np.bool_:
            flat = flat != 0
        elif dtype != np.int32:
            flat = jax.lax.bitcast_convert_type(flat, dtype)
        leaves.append(flat.reshape(shape))
    return jax.tree.unflatten(layout.treedef, leaves)


def pack_on_device(tree) -> tuple[jax.Array, Layout]:
    """A pytree of device arrays as one int32 array, and its layout (in a
    jitted step: the layout comes from the traced shapes)."""
    leaves, treedef = jax.tree.flatten(tree)
    fields = tuple(_field(leaf.shape, leaf.dtype) for leaf in leaves)
    parts = [leaf.reshape(-1).astype(jnp.int32) if leaf.dtype in (jnp.bool_, jnp.int32)
             else jax.lax.bitcast_convert_type(leaf.reshape(-1), jnp.int32) for leaf in leaves]
    return (jnp.concatenate(parts) if parts else jnp.zeros((0,), jnp.int32)), Layout(treedef, fields)


def unpack_on_host(buffer: np.ndarray, layout: Layout):
    """`pack_on_device`'s pytree again from its buffer, as numpy arrays."""
    leaves = [(flat != 0 if dtype == np.bool_ else flat.view(dtype)).reshape(shape)
              for (shape, dtype), flat in zip(layout.fields, _slices(buffer, layout))]
    return jax.tree.unflatten(layout.treedef, leaves)


def _slices(buffer, layout: Layout) -> list:
    """The buffer cut into its fields' flat pieces; ValueError if its length
    is not the layout's."""
    sizes = [math.prod(shape) for shape, _ in layout.fields]
    if sum(sizes) != buffer.shape[0]:
        raise ValueError(f"a packed buffer of {buffer.shape[0]} values does not match its layout's {sum(sizes)}")
    offsets = np.cumsum([0, *sizes])
    return [buffer[int(start):int(start) + size] for start, size in zip(offsets, sizes)]
