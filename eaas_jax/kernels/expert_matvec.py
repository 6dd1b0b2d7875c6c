"""Expert matvec: `x[s] @ w[ids[s]]` for a few token-expert slots, reading
only the routed experts' weights.

This is the gathered path of `routed_experts` (decode at small batch: fewer
slots than experts). Every platform goes through `expert_matvec` (one bank)
or `expert_matvecs` (several banks of one shape, the same rows and ids: an
expert's gate and up projections), which pick:

- on GPUs, a Pallas kernel (Triton) that reads each slot's expert's rows of
  the [E, in, out] bank in place: no gathered copy of the weights is written
  and read again. Measured on an H200 (bench/RESULTS.md, 2026-12-06) for 128
  experts of 2048 x 768 / 768 x 2048 in bfloat16 at 8 slots: 25 / 18 µs per
  projection, against 75 / 67 µs for XLA's gather-then-einsum (what the
  gathered path ran before) and 44 / 39 µs for tokamax's grouped matmul over
  the whole bank; a row sum over weights stored transposed took 21 / 23 µs;
- elsewhere (and for shapes the kernel does not tile), gather and einsum: on
  the CPU that reads only the routed experts too, and is fast.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp


class Plan(NamedTuple):
    """How the kernel cuts one call: a program per (slot, output tile of
    `tile`, contraction part of `parts`), loading `rows` rows of weights at a
    time, with `warps` warps."""

    tile: int
    parts: int
    rows: int
    warps: int


#: output tile widths tried, widest first (a program computes one tile of a slot)
TILES = (256, 128, 64, 32, 16)
#: rows of the contraction one load takes, most first
ROWS = (64, 32, 16)
#: contraction parts tried, fewest first: parts run in parallel and are summed
#: after, so that few slots still fill the GPU
PARTS = (1, 2, 4, 8, 16, 32)
#: a call's programs that fill an H100 or H200 (132 SMs: about two each), and
#: the loads a program makes at most. A program's loads run one after another,
#: so few long programs leave the memory system idle; many short ones write
#: more partial sums. Swept on an H100 (bench/RESULTS.md, "Expert matvec
#: settings", 2026-12-06): for 8 slots of 2048 x 768 (gate and up) the plan
#: these give (tiles of 256, 16 parts of 2 loads of 64 rows, 8 warps) took
#: 30.8 µs against 41.6 for the earlier fixed plan (tiles of 128, 8 parts of 8
#: loads of 32 rows, 4 warps); it was the fastest of 72 settings at 8 slots of
#: both projections, and within 1% of it at 32. In W1's decode step at batch 1
#: gate and up then took 154 µs over 8 layers against 219 (RESULTS, W1
#: decode, commit 07d3021).
MIN_PROGRAMS = 256
MAX_LOADS = 4


def expert_matvec(x: jax.Array, w: jax.Array, ids: jax.Array, *, slots_per_row: int = 1,
                  interpret: bool = False) -> jax.Array:
    """out[s] = x[s // slots_per_row] @ w[ids[s]].

    Args:
      x: [S / slots_per_row, K] one row per `slots_per_row` consecutive slots
        (a token's top-k slots share its row: not copied k times).
      w: [E, K, N] the expert bank.
      ids: [S] int, each in [0, E).
      interpret: run the kernel on any platform, interpreted, where the
        shape tiles (tests).

    Returns:
      [S, N] float32.
    """
    return expert_matvecs(x, (w,), ids, slots_per_row=slots_per_row, interpret=interpret)[0]


def expert_matvecs(x: jax.Array, banks: tuple[jax.Array, ...], ids: jax.Array, *, slots_per_row: int = 1,
                   interpret: bool = False) -> tuple[jax.Array, ...]:
    """`expert_matvec` of the same rows and ids by several banks of one shape
    (an expert's gate and up projections): on GPUs one kernel reads them all,
    so a layer launches fewer kernels and each program has more bytes in
    flight (unmeasured against a call per bank as of 2026-12-06)."""
    if ids.shape[0] != x.shape[0] * slots_per_row:
        raise ValueError(f"{ids.shape[0]} slots for {x.shape[0]} rows of {slots_per_row} slots each")
    plan = kernel_plan(*banks[0].shape[1:], slots=ids.shape[0])
    if (interpret or jax.default_backend() == "gpu") and plan is not None and ids.shape[0]:  # (no grid of 0 programs)
        return differentiable_kernel(x, tuple(banks), ids, plan, slots_per_row, interpret)
    return tuple(gathered_einsum(x, w, ids, slots_per_row) for w in banks)


def gathered_einsum(x: jax.Array, w: jax.Array, ids: jax.Array, slots_per_row: int = 1) -> jax.Array:
    """`expert_matvec` by XLA: the slots' weights gathered, then a batched matmul."""
    return jnp.einsum("sk,skn->sn", jnp.repeat(x, slots_per_row, axis=0), w[ids],
                      preferred_element_type=jnp.float32)


def kernel_plan(k: int, n: int, slots: int) -> Plan | None:
    """The kernel's plan for `slots` slots of a [K, N] expert projection, or
    None when N is not a multiple of the narrowest tile or K of the fewest
    rows a load: the widest tile (8 warps for the widest, else 4), the most
    rows a load, and the fewest parts that give MIN_PROGRAMS programs of at
    most MAX_LOADS loads each (where none does, the most parts)."""
    tile = next((t for t in TILES if n % t == 0), None)
    rows = next((r for r in ROWS if k % r == 0), None)
    if tile is None or rows is None:
        return None
    fitting = [p for p in PARTS if k % (p * rows) == 0]
    parts = next((p for p in fitting if k // p <= MAX_LOADS * rows and slots * (n // tile) * p >= MIN_PROGRAMS),
                 fitting[-1])
    return Plan(tile, parts, rows, 8 if tile == TILES[0] else 4)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def differentiable_kernel(x, banks, ids, plan: Plan, slots_per_row: int, interpret: bool) -> tuple[jax.Array, ...]:
    """`pallas_expert_matvec` with gradients: a pallas_call has no
    differentiation rule, so the backward pass is the einsum's (training
    steps of few tokens also take the gathered path)."""
    return pallas_expert_matvec(x, banks, ids, plan, slots_per_row=slots_per_row, interpret=interpret)


def _kernel_forward(x, banks, ids, plan, slots_per_row, interpret):
    return differentiable_kernel(x, banks, ids, plan, slots_per_row, interpret), (x, banks, ids)


def _kernel_backward(plan, slots_per_row, interpret, residuals, cotangents):
    x, banks, ids = residuals
    _, vjp = jax.vjp(lambda x, banks: tuple(gathered_einsum(x, w, ids, slots_per_row) for w in banks), x, banks)
    return (*vjp(tuple(cotangents)), None)


differentiable_kernel.defvjp(_kernel_forward, _kernel_backward)


def pallas_expert_matvec(x: jax.Array, banks: tuple[jax.Array, ...], ids: jax.Array, plan: Plan, *,
                         slots_per_row: int = 1, num_stages: int | None = None,
                         interpret: bool = False) -> tuple[jax.Array, ...]:
    """`expert_matvecs` as a Pallas kernel: a program per (slot, output tile,
    contraction part) reads that part of the slot's expert's rows in every
    bank; the parts' sums are added after. `kernel_plan` gives a valid plan;
    num_stages is Triton's software pipelining of the loads (None: its
    default); interpret=True runs it anywhere (tests)."""
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import triton as pltriton

    slots, k = ids.shape[0], x.shape[1]
    num_experts, _, n = banks[0].shape
    tile, parts, rows, warps = plan
    if any(w.shape != banks[0].shape for w in banks):
        raise ValueError(f"the banks' shapes differ: {[w.shape for w in banks]}")
    if n % tile or k % parts or (k // parts) % rows:
        raise ValueError(f"a [{k}, {n}] projection does not tile into {parts} parts of {rows}-row loads "
                         f"and outputs of {tile}")
    # the whole bank: the kernel loads its slot's expert's tiles itself
    bank_spec = pl.BlockSpec((num_experts, k, n), lambda s, j, p: (0, 0, 0))
    out_spec = pl.BlockSpec((None, None, tile), lambda s, j, p: (p, s, j))
    outs = pl.pallas_call(
        functools.partial(_matvec_kernel, chunk=k // parts, tile=tile, rows=rows),
        grid=(slots, n // tile, parts),
        in_specs=[pl.BlockSpec((1,), lambda s, j, p: (s,)),
                  pl.BlockSpec((None, k), lambda s, j, p: (s // slots_per_row, 0)),
                  *[bank_spec] * len(banks)],
        out_specs=[out_spec] * len(banks),
        out_shape=[jax.ShapeDtypeStruct((parts, slots, n), jnp.float32)] * len(banks),
        # Triton, not Mosaic GPU (which would stage the whole bank in shared memory)
        compiler_params=pltriton.CompilerParams(num_warps=warps, num_stages=num_stages),
        interpret=interpret,
    )(ids.astype(jnp.int32), x, *banks)
    return tuple(out.sum(axis=0) for out in outs)


def _matvec_kernel(ids_ref, x_ref, *refs, chunk: int, tile: int, rows: int):
    """One slot, one tile of outputs, one part (`chunk` rows) of the
    contraction, in each bank (`refs`: the banks, then their outputs):
    `rows` rows of the expert's weights at a time, each row's tile
    contiguous in memory, times the slot's inputs, summed over rows."""
    from jax.experimental import pallas as pl

    w_refs, out_refs = refs[:len(refs) // 2], refs[len(refs) // 2:]
    expert, j, part = ids_ref[0], pl.program_id(1), pl.program_id(2)
    columns = pl.ds(j * tile, tile)

    def add_rows(i, sums):
        block = pl.ds(part * chunk + i * rows, rows)
        inputs = x_ref[block].astype(jnp.float32)[:, None]
        return tuple(total + jnp.sum(inputs * w_ref[expert, block, columns].astype(jnp.float32), axis=0)
                     for total, w_ref in zip(sums, w_refs))

    sums = jax.lax.fori_loop(0, chunk // rows, add_rows, tuple(jnp.zeros((tile,), jnp.float32) for _ in w_refs))
    for out_ref, total in zip(out_refs, sums):
        out_ref[...] = total
