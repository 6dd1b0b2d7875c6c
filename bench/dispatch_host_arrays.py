"""How long a jitted call takes to return, by how its inputs arrive: many
small host (numpy) arrays as a decode step's are, the same bytes packed into
one host array (what eaas_jax.engine.packed does), that array put on the
device one call ahead (jax.device_put returns at once), or already on the
device; and with 100 or 600 more device arrays (a model's weights: W1 has
~100, the 48-layer W2 ~600).

The step: 40 chained 64 x 2048 by 2048 x 2048 float32 products (about a
millisecond on an H100), its inputs summed into them, and an update of a
donated 256 MiB "cache" (the KV cache's part), called back to back as the
engine calls its steps (each call queued behind the one still running).
Reported: the median time a call takes to return (the host's dispatch; the
device runs on), the steps' rate (the calls and their end, over the calls:
above the step's own time where the device waits between steps), and one
step waited for from its call. Run it again with
XLA_PYTHON_CLIENT_USE_TFRT_GPU_CLIENT=1 for JAX's newer GPU client.

    python bench/dispatch_host_arrays.py [--calls 30] [--arrays 20] [--values 256]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np


def work(cache, inputs, w, weights):
    y = jnp.ones((64, 2048), jnp.float32) + sum(jnp.sum(x.astype(jnp.float32)) for x in inputs) * 1e-9
    y = y + sum(weight[0] for weight in weights) * 1e-9  # (each used: jit drops unused arguments)
    for _ in range(40):
        y = jnp.tanh(y @ w)
    return cache.at[0].add(y.sum()), y.sum()


def measure(step, cache, inputs, w, weights, calls: int, ahead: bool = False):
    """(median µs a call takes to return, µs a step over `calls` queued calls
    and their end, µs of one step waited for from its call, the cache).
    `ahead`: the host inputs are put on the device one call before theirs."""
    times = []
    put = [jax.device_put(x) for x in inputs] if ahead else inputs
    start_all = time.perf_counter()
    for _ in range(calls):
        start = time.perf_counter()
        cache, _ = step(cache, put, w, weights)
        times.append(time.perf_counter() - start)
        if ahead:
            put = [jax.device_put(x) for x in inputs]  # the next call's, while this one runs
    jax.block_until_ready(cache)
    rate = (time.perf_counter() - start_all) / calls
    start = time.perf_counter()
    cache, total = step(cache, put, w, weights)
    jax.block_until_ready(total)
    one = time.perf_counter() - start
    return statistics.median(times[2:]) * 1e6, rate * 1e6, one * 1e6, cache


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
    packed = [np.concatenate(small)]
    forms = [  # (inputs, put one call ahead, extra device arrays)
        (f"{args.arrays} host arrays of {args.values} int32", small, False, 0),
        ("the same packed into one host array", packed, False, 0),
        ("the packed array put on the device one call ahead", packed, True, 0),
        (f"{args.arrays} arrays on the device", [jnp.asarray(x) for x in small], False, 0),
        ("one array on the device", [jnp.asarray(packed[0])], False, 0),
        ("one array on the device, 100 more device arrays", [jnp.asarray(packed[0])], False, 100),
        ("one array on the device, 600 more device arrays", [jnp.asarray(packed[0])], False, 600),
        ("the packed host array, 600 more device arrays", packed, False, 600),
    ]
    client = "TFRT GPU client" if os.environ.get("XLA_PYTHON_CLIENT_USE_TFRT_GPU_CLIENT") == "1" else "default client"
    print(f"device: {jax.devices()[0].device_kind}; JAX {jax.__version__} ({client}); {args.calls} calls a form")
    print("| inputs | a call returns after µs (median) | µs a step, queued | one step µs |\n|---|---|---|---|")
    for name, inputs, ahead, extra in forms:
        weights = [jnp.full((1024,), i, jnp.float32) for i in range(extra)]
        _, _, _, cache = measure(step, cache, inputs, w, weights, 5, ahead)  # compiled, queue warm
        call, rate, one, cache = measure(step, cache, inputs, w, weights, args.calls, ahead)
        print(f"| {name} | {call:.1f} | {rate:.1f} | {one:.1f} |")


if __name__ == "__main__":
    main()
