"""How long a jitted call takes to return when one of its arguments is a host
(numpy) array, against the same call with every argument on the device,
with and without a donated buffer: what the runner's one-buffer inputs
(eaas_jax.engine.packed) are for.

The step: 40 chained 64 x 2048 by 2048 x 2048 float32 products (about a
millisecond on an H100) and an update of a donated 256 MiB "cache", called
back to back as the engine calls its steps (each call queued behind the one
still running). Reported: the median time a call takes to return (the
host's dispatch; the device runs on), and one step waited for.

    python bench/dispatch_host_arrays.py [--calls 30]
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np


def work(cache, x, w):
    y = x.astype(jnp.float32)
    for _ in range(40):
        y = jnp.tanh(y @ w)
    return cache.at[0].add(y.sum()), y.sum()


def measure(fn, cache, host_input: bool, w, calls: int) -> tuple[float, float, jax.Array]:
    """(median µs a call takes to return, µs of one step waited for from
    its call (its input made as the calls' are), the cache)."""
    x = np.ones((64, 2048), np.float32)
    on_device = jnp.asarray(x)
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        cache, _ = fn(cache, x if host_input else on_device, w)
        times.append(time.perf_counter() - start)
    jax.block_until_ready(cache)
    start = time.perf_counter()
    cache, total = fn(cache, x if host_input else on_device, w)
    jax.block_until_ready(total)
    one = time.perf_counter() - start
    return statistics.median(times[2:]) * 1e6, one * 1e6, cache


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--calls", type=int, default=30)
    args = parser.parse_args()
    w = jnp.ones((2048, 2048), jnp.float32) * 1e-3
    cache = jnp.zeros((64, 1 << 20), jnp.float32)
    print(f"device: {jax.devices()[0].device_kind}; JAX {jax.__version__}")
    print("| cache | input | a call returns after µs (median) | one step µs |\n|---|---|---|---|")
    for name, fn in (("donated", jax.jit(work, donate_argnums=(0,))), ("not donated", jax.jit(work))):
        for host_input in (True, False):
            _, _, cache = measure(fn, cache, host_input, w, 5)  # compiled, queue warm
            call, one, cache = measure(fn, cache, host_input, w, args.calls)
            print(f"| {name} | {'numpy (host)' if host_input else 'on the device'} | {call:.1f} | {one:.1f} |")


if __name__ == "__main__":
    main()
