"""How long a jitted call takes to return, by how its inputs arrive: many
small host (numpy) arrays as a decode step's are, the same bytes packed into
one host array (what eaas_jax.engine.packed does), or already on the device.

The step: 40 chained 64 x 2048 by 2048 x 2048 float32 products (about a
millisecond on an H100), its inputs summed into them, and an update of a
donated 256 MiB "cache" (the KV cache's part), called back to back as the
engine calls its steps (each call queued behind the one still running).
Reported: the median time a call takes to return (the host's dispatch; the
device runs on), and one step waited for from its call.

    python bench/dispatch_host_arrays.py [--calls 30] [--arrays 20] [--values 256]
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np


def work(cache, inputs, w):
    y = jnp.ones((64, 2048), jnp.float32) + sum(jnp.sum(x.astype(jnp.float32)) for x in inputs) * 1e-9
    for _ in range(40):
        y = jnp.tanh(y @ w)
    return cache.at[0].add(y.sum()), y.sum()


def measure(step, cache, inputs, w, calls: int) -> tuple[float, float, jax.Array]:
    """(median µs a call takes to return, µs of one step waited for from its
    call, the cache)."""
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        cache, _ = step(cache, inputs, w)
        times.append(time.perf_counter() - start)
    jax.block_until_ready(cache)
    start = time.perf_counter()
    cache, total = step(cache, inputs, w)
    jax.block_until_ready(total)
    one = time.perf_counter() - start
    return statistics.median(times[2:]) * 1e6, one * 1e6, cache


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--calls", type=int, default=30)
    parser.add_argument("--arrays", type=int, default=20, help="small host arrays a step takes")
    parser.add_argument("--values", type=int, default=256, help="int32 values in each")
    args = parser.parse_args()
    w = jnp.ones((2048, 2048), jnp.float32) * 1e-3
    cache = jnp.zeros((64, 1 << 20), jnp.float32)
    step = jax.jit(work, donate_argnums=(0,))
    small = [np.arange(args.values, dtype=np.int32) + i for i in range(args.arrays)]
    forms = {
        f"{args.arrays} host arrays of {args.values} int32": small,
        "the same packed into one host array": [np.concatenate(small)],
        f"{args.arrays} arrays on the device": [jnp.asarray(x) for x in small],
        "one array on the device": [jnp.asarray(np.concatenate(small))],
    }
    print(f"device: {jax.devices()[0].device_kind}; JAX {jax.__version__}; {args.calls} calls a form")
    print("| inputs | a call returns after µs (median) | one step µs |\n|---|---|---|")
    for name, inputs in forms.items():
        _, _, cache = measure(step, cache, inputs, w, 5)  # compiled, queue warm
        call, one, cache = measure(step, cache, inputs, w, args.calls)
        print(f"| {name} | {call:.1f} | {one:.1f} |")


if __name__ == "__main__":
    main()
