"""The expert matvec kernel's settings swept: which output tile, contraction
parts, rows per load and warps read the routed experts at memory speed, and
how far `kernel_plan`'s choice is from the best.

    python bench/expert_matvec_plans.py [--experts 128 --dim 2048 --hidden 768 --banks 2]
        [--slots 8,32] [--dtype bfloat16] [--append bench/RESULTS.md]

Each setting runs `pallas_expert_matvec` over --banks banks of [experts, dim,
hidden] (2: an expert's gate and up in one call, as the gathered path runs
them) for --rounds routings in one compiled loop; µs per call, median of
--iters calls, and its share of the ideal: the routed experts' bytes (distinct
ones per round, every bank) at the measured copy bandwidth
(bench/w1_decode_gpu.py). A setting's output is checked against the gathered
einsum before it is timed. Prints the --top fastest settings and
`kernel_plan`'s, per slot count; off GPUs the kernel runs interpreted (a
check of the script, not a measurement).
"""

from __future__ import annotations

import argparse
import datetime
import itertools
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
from expert_projection_forms import rounds_of  # noqa: E402

from eaas_jax.kernels.expert_matvec import Plan, gathered_einsum, kernel_plan, pallas_expert_matvec  # noqa: E402

TILES = (64, 128, 256)
PARTS = (4, 8, 16, 32)
ROWS = (16, 32, 64)
WARPS = (4, 8)


def settings(dim: int, hidden: int):
    """The kernel's plans that tile a [dim, hidden] projection."""
    for tile, parts, rows, warps in itertools.product(TILES, PARTS, ROWS, WARPS):
        if hidden % tile == 0 and dim % parts == 0 and (dim // parts) % rows == 0:
            yield Plan(tile, parts, rows, warps)


def summed(matvecs):
    """`matvecs(x, banks, ids)` (one product per bank) as one product: their sum."""
    return lambda x, banks, ids: sum(matvecs(x, banks, ids))


def kernel(plan: Plan, interpret: bool):
    return summed(lambda x, banks, ids: pallas_expert_matvec(x, banks, ids, plan, interpret=interpret))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--experts", type=int, default=128)
    ap.add_argument("--dim", type=int, default=2048)
    ap.add_argument("--hidden", type=int, default=768)
    ap.add_argument("--banks", type=int, default=2)
    ap.add_argument("--slots", default="8,32")
    ap.add_argument("--rounds", type=int, default=32)
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--top", type=int, default=8)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--append")
    args = ap.parse_args()
    dtype = jnp.dtype(args.dtype)
    banks = tuple(jax.random.normal(jax.random.key(b), (args.experts, args.dim, args.hidden), dtype)
                  for b in range(args.banks))
    on_gpu = jax.devices()[0].platform == "gpu"
    bandwidth = w1._copy_bandwidth() if on_gpu else None
    grid = list(settings(args.dim, args.hidden))
    tables = []
    for slots in map(int, args.slots.split(",")):
        chosen = kernel_plan(args.dim, args.hidden, slots)
        print(f"{len(grid)} settings; kernel_plan at {slots} slots: {chosen}", file=sys.stderr)
        x = jax.random.normal(jax.random.key(1), (slots, args.dim), dtype)
        ids = jax.random.randint(jax.random.key(slots), (args.rounds, slots), 0, args.experts)
        einsums = rounds_of(summed(lambda x, banks, ids: [gathered_einsum(x, w, ids) for w in banks]),
                            args.rounds, args.hidden)
        reference = np.asarray(einsums(x, banks, ids))
        scale = np.abs(reference).max()
        times = {}
        for setting in grid + ([chosen] if chosen and chosen not in grid else []):
            fn = rounds_of(kernel(setting, not on_gpu), args.rounds, args.hidden)
            # (a wrong setting would time nothing useful)
            np.testing.assert_allclose(np.asarray(fn(x, banks, ids)) / scale, reference / scale, atol=0.02,
                                       err_msg=str(setting))
            times[setting] = median_seconds(fn, (x, banks, ids), args.iters) / args.rounds
            print(f"slots {slots} {setting}: {times[setting] * 1e6:.1f} µs", file=sys.stderr, flush=True)
        touched = np.mean([len(np.unique(np.asarray(r))) for r in ids])
        ideal = (touched * args.banks * args.dim * args.hidden * dtype.itemsize / bandwidth) if bandwidth else None
        tables.append((slots, times, ideal, chosen))

    device_text = jax_device()
    lines = [f"### Expert matvec settings, {args.banks} bank(s) of {args.experts} x {args.dim} x {args.hidden} "
             f"({datetime.date.today()}, commit {git_commit()})", "",
             f"Device: {device_text}; JAX {jax.__version__}; `python bench/expert_matvec_plans.py "
             f"{' '.join(sys.argv[1:])}`; {args.dtype}; {args.rounds} routings in one compiled loop, µs per call "
             f"(all banks), median of {args.iters} calls"
             + (f"; ideal: the routed experts' bytes at {bandwidth / 1e12:.2f} TB/s (copy, read+write)"
                if bandwidth else "") + f". The {args.top} fastest of {len(grid)} settings, and "
             f"kernel_plan's, per slot count.",
             "", "| slots | tile | parts | rows a load | warps | µs | of ideal |", "|---|---|---|---|---|---|---|"]
    rows = []
    for slots, times, ideal, chosen in tables:
        ranked = sorted(times, key=times.get)
        shown = ranked[:args.top] + ([chosen] if chosen in times and chosen not in ranked[:args.top] else [])
        for setting in shown:
            mark = " (kernel_plan)" if setting == chosen else ""
            share = f"{ideal / times[setting]:.0%}" if ideal else "n/a"
            lines.append(f"| {slots} | {setting[0]}{mark} | {setting[1]} | {setting[2]} | {setting[3]} | "
                         f"{times[setting] * 1e6:.1f} | {share} |")
        rows += [dict(metric="expert_matvec_setting", batch=slots, value=t, tile=s[0], parts=s[1], rows=s[2],
                      warps=s[3], banks=args.banks, experts=args.experts, dim=args.dim, hidden=args.hidden,
                      ideal=ideal, kernel_plan=s == chosen) for s, t in times.items()]
    lines.append("")
    publish(lines, args.append)
    if args.append:
        common = run_facts(device_text, "s")
        append_rows(os.path.join(REPO, "bench", "results", "expert_matvec_plans.jsonl"),
                    [{**r, **common} for r in rows])


if __name__ == "__main__":
    main()
