"""One expert projection for a few token-expert slots, written several ways:
which formulation reads only the routed experts' weights at memory speed.

    python bench/expert_projection_forms.py [--experts 128 --dim 2048 --hidden 768]
        [--slots 8,32,64,128,256] [--dtype bfloat16] [--append bench/RESULTS.md]

Each slot s multiplies its row x[s] ([dim]) by its expert's weights: out[s] =
x[s] @ w[ids[s]]. Forms:
  einsum, [E, dim, hidden]      w[ids], then a batched matmul (the gathered path off GPUs);
  column sum, [E, dim, hidden]  multiply by w[ids], sum over dim (not the minor axis);
  split column sum              the same with dim cut into 16 parts summed apart, then together
                                (a column sum parallelizes over its columns only: slots x hidden);
  row sum, [E, hidden, dim]     weights stored transposed, sum over the minor axis;
  per-slot matvec, [E, hidden, dim]  one dynamic slice and matvec per slot, unrolled;
  Pallas matvec, [E, dim, hidden]    the package's expert_matvec kernel (the gathered path on GPUs):
                                reads each slot's expert's rows whole, parallel over slots, output
                                tiles (128) and 8 parts of dim, 4 warps; "Pallas N/P/Ww" the same
                                with tiles of N, P parts, W warps; "r64" loads of 64 rows (not 32),
                                "S stages" Triton's software pipelining of the loads;
                                "2 banks" the default setting over two banks in one call (the
                                gathered path's gate and up), its time halved: per projection;
  grouped matmul                eaas_jax's grouped_matmul over every expert (tokamax on GPUs);
  dense dot                     with --experts 1 only: x @ w[0], what XLA makes of a dense layer's
                                projection at these rows (the other forms then time a dense
                                projection too: is a kernel of theirs faster than XLA's).
A call runs --rounds projections, each with its own routing, in one compiled
loop (one projection is shorter than a host dispatch); time per projection,
median of --iters calls. Ideal: the routed experts' bytes (distinct ones
per round) at the measured copy bandwidth (bench/w1_decode_gpu.py).
"""

from __future__ import annotations

import argparse
import datetime
import functools
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "bench"))
sys.path.insert(0, REPO)

from _results import append_rows, git_commit, jax_device, median_seconds, publish, run_facts  # noqa: E402
import w1_decode_gpu as w1  # noqa: E402

from eaas_jax.kernels.expert_matvec import Plan, pallas_expert_matvec  # noqa: E402
from eaas_jax.kernels.grouped_matmul import grouped_matmul  # noqa: E402

SPLITS = 16


def einsum(x, w, ids):
    return jnp.einsum("sk,skn->sn", x, w[ids], preferred_element_type=jnp.float32)


def column_sum(x, w, ids):
    return (x[:, :, None].astype(jnp.float32) * w[ids].astype(jnp.float32)).sum(axis=1)


def split_column_sum(x, w, ids):
    slots, dim = x.shape
    parts = x.reshape(slots, SPLITS, dim // SPLITS, 1).astype(jnp.float32) \
        * w[ids].reshape(slots, SPLITS, dim // SPLITS, -1).astype(jnp.float32)
    return parts.sum(axis=2).sum(axis=1)


def row_sum(x, w_t, ids):
    return (x[:, None, :].astype(jnp.float32) * w_t[ids].astype(jnp.float32)).sum(axis=-1)


def per_slot_matvec(x, w_t, ids):
    return jnp.stack([jnp.dot(jax.lax.dynamic_index_in_dim(w_t, ids[s], 0, keepdims=False), x[s],
                              preferred_element_type=jnp.float32) for s in range(x.shape[0])])


def pallas_matvec(x, w, ids, *, tile: int = 128, parts: int = 8, rows: int = 32, num_warps: int = 4,
                  num_stages: int | None = None):
    """The package's expert matvec kernel (`eaas_jax.kernels.expert_matvec`,
    whose `kernel_plan` picks its setting; bench/expert_matvec_plans.py sweeps
    them) at a given setting, by default the plan of 2026-12-06 before that
    sweep (a ValueError where it does not tile the shape); interpreted off
    GPUs. `w` a tuple of banks: one call over all of them (the gathered
    path's gate and up), the first one's product returned (the others' are
    computed all the same: a kernel's outputs are not dropped)."""
    banks = w if isinstance(w, tuple) else (w,)
    return pallas_expert_matvec(x, banks, ids, Plan(tile, parts, rows, num_warps), num_stages=num_stages,
                                interpret=jax.default_backend() != "gpu")[0]


def grouped(x, w, ids):
    order = jnp.argsort(ids)
    sizes = jnp.bincount(ids, length=w.shape[0]).astype(jnp.int32)
    out = grouped_matmul(x[order], w, sizes).astype(jnp.float32)
    return jnp.zeros_like(out).at[order].set(out)


#: name -> (function, the weights it takes: False [E, dim, hidden], True
#: transposed [E, hidden, dim], TWO_BANKS two [E, dim, hidden] banks, timed per projection)
TWO_BANKS = "two banks"
FORMS = {"einsum": (einsum, False), "column sum": (column_sum, False),
         "split column sum": (split_column_sum, False), "row sum (transposed)": (row_sum, True),
         "per-slot matvec (transposed)": (per_slot_matvec, True), "Pallas matvec": (pallas_matvec, False),
         "Pallas 2 banks": (pallas_matvec, TWO_BANKS),
         # its tile shape, contraction parts and warps varied: which setting reads at memory speed
         "Pallas 256/8/8w": (functools.partial(pallas_matvec, tile=256, num_warps=8), False),
         "Pallas 128/16/4w": (functools.partial(pallas_matvec, parts=16), False),
         "Pallas 64/16/2w": (functools.partial(pallas_matvec, tile=64, parts=16, num_warps=2), False),
         # more bytes in flight per program: loads of 64 rows, Triton's pipelining of the loads
         "Pallas r64": (functools.partial(pallas_matvec, rows=64), False),
         "Pallas 3 stages": (functools.partial(pallas_matvec, num_stages=3), False),
         "Pallas r64, 4 stages": (functools.partial(pallas_matvec, rows=64, num_stages=4), False),
         "grouped matmul": (grouped, False)}
#: with --experts 1 (a dense projection: the attention's, at decode's few rows)
DENSE_FORMS = {"dense dot": (lambda x, w, ids: jnp.dot(x, w[0], preferred_element_type=jnp.float32), False)}


def rounds_of(form, rounds: int, hidden: int):
    """`form` for `rounds` routings in one compiled loop, outputs summed."""
    def run(x, w, ids):
        return jax.lax.fori_loop(0, rounds, lambda r, acc: acc + form(x, w, ids[r]),
                                 jnp.zeros((x.shape[0], hidden), jnp.float32))
    return jax.jit(run)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--experts", type=int, default=128)
    ap.add_argument("--dim", type=int, default=2048)
    ap.add_argument("--hidden", type=int, default=768)
    ap.add_argument("--slots", default="8,32,64,128,256")
    ap.add_argument("--rounds", type=int, default=32)
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--append")
    args = ap.parse_args()
    if args.dim % SPLITS:
        ap.error(f"--dim must be a multiple of {SPLITS}")
    dtype = jnp.dtype(args.dtype)
    w = jax.random.normal(jax.random.key(0), (args.experts, args.dim, args.hidden), dtype)
    weights = {False: w, True: jnp.swapaxes(w, 1, 2).copy(), TWO_BANKS: (w, w[::-1].copy())}
    forms = {**FORMS, **(DENSE_FORMS if args.experts == 1 else {})}
    on_gpu = jax.devices()[0].platform == "gpu"
    bandwidth = w1._copy_bandwidth() if on_gpu else None
    rows = []
    for slots in map(int, args.slots.split(",")):
        x = jax.random.normal(jax.random.key(1), (slots, args.dim), dtype)
        ids = jnp.sort(jax.random.randint(jax.random.key(slots), (args.rounds, slots), 0, args.experts), axis=1)
        results, times = {}, {}
        for name, (form, layout) in forms.items():
            fn = rounds_of(form, args.rounds, args.hidden)
            inputs = (x, weights[layout], ids)
            try:
                results[name] = np.asarray(fn(*inputs))
            except ValueError as e:  # a kernel setting this shape does not divide
                print(f"{name}: {e}", file=sys.stderr)
                continue
            times[name] = median_seconds(fn, inputs, args.iters) / args.rounds / (2 if layout == TWO_BANKS else 1)
        reference = results["einsum"]
        scale = np.abs(reference).max()
        for name, out in results.items():  # one function: a wrong form would time nothing useful
            np.testing.assert_allclose(out / scale, reference / scale, atol=0.02, err_msg=name)
        touched = np.mean([len(np.unique(np.asarray(r))) for r in ids])
        ideal = touched * args.dim * args.hidden * dtype.itemsize / bandwidth if bandwidth else None
        rows.append((slots, times, ideal))
    device_text = jax_device()
    names = list(forms)
    lines = [
        f"### One expert projection for few slots, {len(forms)} formulations ({datetime.date.today()}, commit {git_commit()})",
        "",
        f"Device: {device_text}; JAX {jax.__version__}; `python bench/expert_projection_forms.py "
        f"{' '.join(sys.argv[1:])}`; {args.experts} experts, {args.dim} x {args.hidden}, {args.dtype}; "
        f"{args.rounds} routings in one compiled loop, µs per projection, median of {args.iters} calls"
        + (f"; ideal: the routed experts' bytes at {bandwidth / 1e12:.2f} TB/s (copy, read+write)"
           if bandwidth else "") + ".",
        "",
        "| slots | " + " | ".join(names) + (" | ideal |" if bandwidth else " |"),
        "|---|" + "---|" * len(names) + ("---|" if bandwidth else ""),
        *(f"| {s} | " + " | ".join(f"{t[n] * 1e6:.1f}" if n in t else "n/a" for n in names)
          + (f" | {i * 1e6:.1f} |" if i else " |") for s, t, i in rows),
        "",
    ]
    publish(lines, args.append)
    if args.append:
        common = run_facts(device_text, "s")
        append_rows(os.path.join(REPO, "bench", "results", "expert_projection_forms.jsonl"), [
            dict(metric=f"expert_projection_{name.split(' (')[0].replace(' ', '_').replace('/', '_')}", batch=s, value=t[name],
                 peer="grouped matmul", peer_value=t["grouped matmul"], ratio=t[name] / t["grouped matmul"],
                 ideal=i, experts=args.experts, dim=args.dim, hidden=args.hidden, **common)
            for s, t, i in rows for name in names if name in t])


if __name__ == "__main__":
    main()
