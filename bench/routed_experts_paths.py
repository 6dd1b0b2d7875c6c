"""The routed experts at decode batch sizes: the gathered path (each
token-expert slot multiplies by its own expert's gathered weights) against
the grouped path (one grouped matmul over every expert), same inputs, same
process; and which one `routed_experts` picks (`uses_gathered_experts`).
Also a formulation of the gathered path not in the package: each projection
as multiply-and-sum over the gathered weights, which XLA can fuse into one
pass over them (the package's einsum may copy them out first).

    python bench/routed_experts_paths.py [--experts 128 --top-k 8 --dim 2048 --hidden 768]
        [--layers 8] [--dtype bfloat16] [--append bench/RESULTS.md]

One call runs --layers MoE layers in a row, each with its own expert weights
(an array per layer) and routing (as a decode step does: no layer finds its weights in a cache),
in one compiled program; times are per layer, medians of --iters calls after
one warm-up call. On GPUs also against the HBM roofline: the bytes of the
experts the routing touched, at the measured copy bandwidth.
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "bench"))

from _results import append_rows, git_commit, jax_device, median_seconds, publish, run_facts  # noqa: E402
import w1_decode_gpu as w1  # noqa: E402

from eaas_jax.model import moe  # noqa: E402


def gathered_by_reduce(x, expert_ids, weights, gate_proj, up_proj, down_proj) -> jax.Array:
    """moe._gathered_experts with each projection as a multiply-and-sum over
    the gathered weights, in float32 (each projection's result rounded to x's
    dtype, as the package's paths do)."""
    num_experts = gate_proj.shape[0]
    num_tokens, top_k = expert_ids.shape
    flat_ids = expert_ids.reshape(-1)
    hosted = (flat_ids >= 0) & (flat_ids < num_experts)
    ids = jnp.where(hosted, flat_ids, 0)
    rows = jnp.repeat(x, top_k, axis=0)

    def project(inputs, w):
        products = inputs[:, :, None].astype(jnp.float32) * w[ids].astype(jnp.float32)
        return products.sum(axis=1).astype(x.dtype)

    hidden = jax.nn.silu(project(rows, gate_proj)) * project(rows, up_proj)
    out_rows = project(hidden, down_proj).astype(jnp.float32)
    weighted = jnp.where(hosted[:, None], out_rows * weights.reshape(-1, 1).astype(jnp.float32), 0.0)
    return weighted.reshape(num_tokens, top_k, x.shape[-1]).sum(axis=1)


def layers_of(path):
    """`path` over layers in a row: layer l's output, normalized, is layer
    l + 1's input; each layer has its own weights and routing."""
    def run(x, expert_ids, weights, gate, up, down):
        for layer, (g, u, d) in enumerate(zip(gate, up, down)):
            out = path(x, expert_ids[layer], weights, g, u, d)
            x = (out * jax.lax.rsqrt(jnp.mean(out * out, axis=-1, keepdims=True) + 1e-6)).astype(x.dtype)
        return x
    return jax.jit(run)


PATHS = {"gathered": moe._gathered_experts, "gathered, multiply-and-sum": gathered_by_reduce,
         "grouped": moe._grouped_experts}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--experts", type=int, default=128)
    ap.add_argument("--top-k", type=int, default=8)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--batches", default="1,2,4,8,16,32,64")
    ap.add_argument("--iters", type=int, default=50)
    ap.add_argument("--append")
    args = ap.parse_args()
    dtype = jnp.dtype(args.dtype)
    keys = jax.random.split(jax.random.key(0), 4)
    # One array per layer, as the model holds them: slicing a stacked bank
    # would copy each layer's slice before a kernel reads it.
    def bank(key, shape):
        return [jax.random.normal(k, (args.experts, *shape), dtype) for k in jax.random.split(key, args.layers)]
    gate, up = (bank(k, (args.dim, args.hidden)) for k in keys[:2])
    down = bank(keys[2], (args.hidden, args.dim))
    paths = {name: layers_of(path) for name, path in PATHS.items()}
    on_gpu = jax.devices()[0].platform == "gpu"
    bandwidth = w1._copy_bandwidth() if on_gpu else None
    rows = []
    for batch in map(int, args.batches.split(",")):
        x = jax.random.normal(keys[3], (batch, args.dim), dtype)
        ids = jax.random.randint(jax.random.key(batch), (args.layers, batch, args.top_k), 0, args.experts)
        weights = jnp.full((batch, args.top_k), 1.0 / args.top_k)
        inputs = (x, ids, weights, gate, up, down)
        outputs = {name: np.asarray(fn(*inputs), np.float32) for name, fn in paths.items()}
        tolerance = 0.05 if dtype == jnp.float32 else 0.5  # on outputs normalized to RMS 1, over all layers
        for name, out in outputs.items():  # the same function: a wrong formulation would time nothing useful
            np.testing.assert_allclose(out, outputs["grouped"], rtol=tolerance, atol=tolerance, err_msg=name)
        times = {name: median_seconds(fn, inputs, args.iters) / args.layers for name, fn in paths.items()}
        touched = sum(len(np.unique(np.asarray(layer))) for layer in ids) / args.layers
        roofline = touched * 3 * args.dim * args.hidden * dtype.itemsize / bandwidth if bandwidth else None
        picked = "gathered" if moe.uses_gathered_experts(batch * args.top_k, args.experts) else "grouped"
        rows.append((batch, times, roofline, picked))
    device_text = jax_device()
    names = list(PATHS)
    lines = [
        f"### Routed experts at decode batch sizes: gathered vs grouped path ({datetime.date.today()}, "
        f"commit {git_commit()})",
        "",
        f"Device: {device_text}; JAX {jax.__version__}; `python bench/routed_experts_paths.py "
        f"{' '.join(sys.argv[1:])}`; {args.experts} experts, top-{args.top_k}, {args.dim} x {args.hidden}, "
        f"{args.dtype}; {args.layers} layers in one program, time per layer, median of {args.iters} calls"
        + (f"; roofline: the touched experts' bytes at {bandwidth / 1e12:.2f} TB/s (copy, read+write)"
           if bandwidth else "") + ".",
        "",
        "| tokens | slots | " + " | ".join(f"{n}, µs per layer" for n in names)
        + " | gathered vs grouped | routed_experts picks |"
        + (" roofline µs | best of roofline |" if bandwidth else ""),
        "|---|---|" + "---|" * len(names) + "---|---|" + ("---|---|" if bandwidth else ""),
        *(f"| {b} | {b * args.top_k} | " + " | ".join(f"{t[n] * 1e6:.1f}" for n in names)
          + f" | {t['gathered'] / t['grouped']:.2f} | {p} |"
          + (f" {r * 1e6:.1f} | {r / min(t.values()) * 100:.0f}% |" if r else "") for b, t, r, p in rows),
        "",
    ]
    publish(lines, args.append)
    if args.append:
        common = run_facts(device_text, "s")
        append_rows(os.path.join(REPO, "bench", "results", "routed_experts_paths.jsonl"), [
            dict(metric="routed_experts_gathered", batch=b, value=t["gathered"], peer="grouped",
                 peer_value=t["grouped"], ratio=t["gathered"] / t["grouped"], picked=p,
                 multiply_and_sum=t["gathered, multiply-and-sum"], roofline=r, **common) for b, t, r, p in rows])


if __name__ == "__main__":
    main()
