"""Decode attention over the paged KV cache at W1's shapes, for every
partition `kernel_partition` chooses among (sequence splits up to 16, cache
blocks per kernel iteration up to 8): which reads the cache fastest, against
the one it chooses.

    python bench/paged_attention_partitions.py [--batches 1,64,256] [--contexts 192,2048]
        [--heads 32 --kv-heads 4 --head-dim 128] [--dtype bfloat16] [--append bench/RESULTS.md]

Each of `batch` sequences holds `context` tokens in its own shuffled blocks of
16; its block table is as wide as the runner pads it (the next power of two
of its blocks, at least 8) and its padding entries are block 0, as the
runner sends. JAX's Pallas kernel's grid is (sequences, KV heads, query-head
blocks, splits); each split loops over its blocks a few at a time and skips
those past the sequence's length. W1's decode step at batch 256 spent 502 µs
in the kernel over 8 layers on an H100 (bench/RESULTS.md, 2026-12-06), about
twice the bytes' time. A call runs --rounds attention calls (a model's
layers), each on queries of its own, in one compiled loop; µs per call,
median of --iters calls: what a layer pays, the kernel with its query scaling
and head padding and the splits' combine. Ideal: the cache bytes the
sequences hold (keys and values) at the measured copy bandwidth. Every
partition's output is checked against the chosen one's. Off GPUs the kernel
runs interpreted: small sizes only, a check of this script.
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
sys.path.insert(0, REPO)

from _results import append_rows, git_commit, jax_device, median_seconds, publish, run_facts  # noqa: E402
import w1_decode_gpu as w1  # noqa: E402

from eaas_jax.engine.runner import StepShape  # noqa: E402
from eaas_jax.kernels.paged_attention import (  # noqa: E402
    MAX_SPLITS, PAGES_PER_ITERATION, kernel_partition, kernel_programs, pallas_paged_attention)

BLOCK_SIZE = 16


def partitions(table_blocks: int) -> list[tuple[int, int]]:
    """Every (splits, blocks per iteration) of kernel_partition's space for a
    table of `table_blocks`: splits dividing it, iterations dividing a split."""
    return [(s, p) for s in range(1, min(MAX_SPLITS, table_blocks) + 1) if table_blocks % s == 0
            for p in PAGES_PER_ITERATION if (table_blocks // s) % p == 0]


def case(batch: int, context: int, heads: int, kv_heads: int, head_dim: int, rounds: int, dtype, seed: int = 0):
    """`rounds` sets of queries, the two block pools, block tables and
    lengths for `batch` sequences of `context` tokens each."""
    rng = np.random.default_rng(seed)
    blocks = -(-context // BLOCK_SIZE)
    table_blocks = StepShape.bucketed(rows=batch, longest=1, blocks=blocks, banned=0, penalized=0, logprobs=0,
                                      greedy=True).blocks  # (the runner's padding)
    num_blocks = batch * blocks + 1  # (block 0: the padding entries')
    tables = np.zeros((batch, table_blocks), np.int32)
    tables[:, :blocks] = 1 + rng.permutation(batch * blocks).reshape(batch, blocks)
    keys = jax.random.split(jax.random.key(seed), 3)
    q = jax.random.normal(keys[0], (rounds, batch, heads, head_dim), dtype)
    k = jax.random.normal(keys[1], (kv_heads, num_blocks, BLOCK_SIZE, head_dim), dtype)
    v = jax.random.normal(keys[2], (kv_heads, num_blocks, BLOCK_SIZE, head_dim), dtype)
    return q, k, v, jnp.asarray(tables), jnp.full((batch,), context, jnp.int32)


def rounds_of(partition: tuple[int, int], interpret: bool):
    """One attention call with `partition` per row of `queries` ([rounds,
    batch, heads, head_dim]: queries of its own, so that no call equals
    another), in one compiled loop, outputs summed."""
    def run(queries, k, v, tables, lengths):
        def body(i, acc):
            out = pallas_paged_attention(queries[i], k, v, tables, lengths, scale=queries.shape[-1] ** -0.5,
                                         interpret=interpret, partition=partition)
            return acc + out.astype(jnp.float32)
        return jax.lax.fori_loop(0, queries.shape[0], body, jnp.zeros(queries.shape[1:], jnp.float32))
    return jax.jit(run)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batches", default="1,64,256")
    ap.add_argument("--contexts", default="192,2048", help="tokens each sequence holds (W1's bench: 192)")
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=4)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--append")
    args = ap.parse_args()
    dtype = jnp.dtype(args.dtype)
    on_gpu = jax.devices()[0].platform == "gpu"
    bandwidth = w1._copy_bandwidth() if on_gpu else None
    rows = []
    for batch in map(int, args.batches.split(",")):
        for context in map(int, args.contexts.split(",")):
            inputs = case(batch, context, args.heads, args.kv_heads, args.head_dim, args.rounds, dtype)
            table_blocks = inputs[3].shape[1]
            chosen = kernel_partition(table_blocks, kernel_programs(inputs[0][0], inputs[1]))
            functions = {partition: rounds_of(partition, not on_gpu) for partition in partitions(table_blocks)}
            reference = np.asarray(functions[chosen](*inputs))
            scale = np.abs(reference).max()
            times = {}
            for partition, fn in functions.items():
                np.testing.assert_allclose(np.asarray(fn(*inputs)) / scale, reference / scale, atol=2e-2,
                                           err_msg=f"partition {partition}")
                times[partition] = median_seconds(fn, inputs, args.iters) / args.rounds
            kv_bytes = 2 * batch * context * args.kv_heads * args.head_dim * dtype.itemsize
            rows.append(dict(batch=batch, context=context, table_blocks=table_blocks, chosen=chosen,
                             times=times, ideal=kv_bytes / bandwidth if bandwidth else None))
        print(f"batch {batch} done", file=sys.stderr)

    def label(partition: tuple[int, int]) -> str:
        return f"{partition[0]}/{partition[1]}"

    device_text = jax_device()
    lines = [
        f"### Paged decode attention: the kernel's partitions at W1's shapes ({datetime.date.today()}, "
        f"commit {git_commit()})",
        "",
        f"Device: {device_text}; JAX {jax.__version__}; `python bench/paged_attention_partitions.py "
        f"{' '.join(sys.argv[1:])}`; {args.heads} query heads, {args.kv_heads} KV heads, head_dim {args.head_dim}, "
        f"{args.dtype}, blocks of {BLOCK_SIZE}; µs per attention call (one layer's: the kernel, its query scaling "
        f"and head padding, the splits' combine), median of {args.iters} calls of {args.rounds} in one compiled "
        f"loop; partitions as splits/blocks per iteration, among kernel_partition's"
        + (f"; ideal: the cache bytes held at {bandwidth / 1e12:.2f} TB/s (copy, read+write)" if bandwidth else "")
        + ".",
        "",
        "| batch | context | table blocks | package's choice: µs | fastest: µs | choice / fastest | "
        + ("ideal µs | choice / ideal | " if bandwidth else "") + "the five fastest |",
        "|---|---|---|---|---|---|" + ("---|---|" if bandwidth else "") + "---|",
    ]
    for r in rows:
        ranked = sorted(r["times"].items(), key=lambda kv: kv[1])
        best, chosen = ranked[0], (r["chosen"], r["times"][r["chosen"]])
        lines.append(
            f"| {r['batch']} | {r['context']} | {r['table_blocks']} | {label(chosen[0])}: {chosen[1] * 1e6:.1f} | "
            f"{label(best[0])}: {best[1] * 1e6:.1f} | {chosen[1] / best[1]:.2f} | "
            + (f"{r['ideal'] * 1e6:.1f} | {chosen[1] / r['ideal']:.2f} | " if r["ideal"] else "")
            + ", ".join(f"{label(p)} {t * 1e6:.1f}" for p, t in ranked[:5]) + " |")
    publish(lines + [""], args.append)
    if args.append:
        common = run_facts(device_text, "s")
        append_rows(os.path.join(REPO, "bench", "results", "paged_attention_partitions.jsonl"), [
            dict(metric=f"paged_attention_{label(p).replace('/', '_')}", batch=r["batch"], context=r["context"],
                 value=t, peer="kernel_partition's choice", peer_value=r["times"][r["chosen"]],
                 ratio=t / r["times"][r["chosen"]], ideal=r["ideal"], **common)
            for r in rows for p, t in r["times"].items()])


if __name__ == "__main__":
    main()
