"""The routed experts at decode batch sizes: the gathered path (each
token-expert slot multiplies by its own expert's gathered weights) against
the grouped path (one grouped matmul over every expert), same inputs, same
process; and which one `routed_experts` picks (`uses_gathered_experts`).

    python bench/routed_experts_paths.py [--experts 128 --top-k 8 --dim 2048 --hidden 768]
        [--dtype bfloat16] [--append bench/RESULTS.md]

Times are medians of --iters jitted calls after one warm-up call.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "bench"))

from _results import append_rows, git_commit, publish  # noqa: E402

from eaas_jax.model import moe  # noqa: E402


def timed(fn, args, iters: int) -> float:
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--experts", type=int, default=128)
    ap.add_argument("--top-k", type=int, default=8)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--batches", default="1,2,4,8,16,32,64")
    ap.add_argument("--iters", type=int, default=50)
    ap.add_argument("--append")
    args = ap.parse_args()
    dtype = jnp.dtype(args.dtype)
    keys = jax.random.split(jax.random.key(0), 4)
    gate, up = (jax.random.normal(k, (args.experts, args.dim, args.hidden), dtype) for k in keys[:2])
    down = jax.random.normal(keys[2], (args.experts, args.hidden, args.dim), dtype)
    paths = {"gathered": jax.jit(moe._gathered_experts), "grouped": jax.jit(moe._grouped_experts)}
    rows = []
    for batch in map(int, args.batches.split(",")):
        x = jax.random.normal(keys[3], (batch, args.dim), dtype)
        ids = jax.random.randint(jax.random.key(batch), (batch, args.top_k), 0, args.experts)
        weights = jnp.full((batch, args.top_k), 1.0 / args.top_k)
        inputs = (x, ids, weights, gate, up, down)
        times = {name: timed(fn, inputs, args.iters) for name, fn in paths.items()}
        picked = "gathered" if moe.uses_gathered_experts(batch * args.top_k, args.experts) else "grouped"
        rows.append((batch, times["gathered"], times["grouped"], picked))
    device = jax.devices()[0]
    device_text = (f"{platform.machine()}, {os.cpu_count()} cores (CPU)" if device.platform == "cpu"
                   else device.device_kind)
    lines = [
        f"### Routed experts at decode batch sizes: gathered vs grouped path ({datetime.date.today()}, "
        f"commit {git_commit()})",
        "",
        f"Device: {device_text}; JAX {jax.__version__}; `python bench/routed_experts_paths.py "
        f"{' '.join(sys.argv[1:])}`; {args.experts} experts, top-{args.top_k}, {args.dim} x {args.hidden}, "
        f"{args.dtype}; median of {args.iters} calls.",
        "",
        "| tokens | slots | gathered, ms | grouped, ms | gathered vs grouped | routed_experts picks |",
        "|---|---|---|---|---|---|",
        *(f"| {b} | {b * args.top_k} | {g * 1e3:.3f} | {r * 1e3:.3f} | {g / r:.2f} | {p} |" for b, g, r, p in rows),
        "",
    ]
    publish(lines, args.append)
    if args.append:
        common = dict(unit="s", device=device_text, date=str(datetime.date.today()), commit=git_commit(),
                      command="python bench/routed_experts_paths.py " + " ".join(sys.argv[1:]))
        append_rows(os.path.join(REPO, "bench", "results", "routed_experts_paths.jsonl"), [
            dict(metric="routed_experts_gathered", batch=b, value=g, peer="grouped", peer_value=r, ratio=g / r,
                 picked=p, **common) for b, g, r, p in rows])


if __name__ == "__main__":
    main()
