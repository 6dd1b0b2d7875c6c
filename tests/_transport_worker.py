"""Helpers of the transport tests; run as a script it is an expert server.

A toy expert bank: expert (l, e) maps x to x @ W[l, e]; a server's answer for a
row is the gate-weighted sum over the row's experts (-1 = none).

    python tests/_transport_worker.py '<json config>'

runs an expert-server endpoint (`transport`: "shm", the default,
"cuda_ipc" or "ibgda": on the GPU where JAX runs on one) in its own process: poll -> compute -> reply in one jitted step,
until it has accepted `messages` requests (or `deadline_s` passed), then
closes its endpoint and exits 0 (1 on timeout). It prints "ready" once its
endpoint is open and its step compiled.
"""

from __future__ import annotations

import json
import sys
import time

import numpy as np


def make_weights(num_layers: int, num_experts: int, d: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((num_layers, num_experts, d, d)) / np.sqrt(d)).astype(np.float32)


def expert_compute(weights, hidden, expert_ids, gates, layer):
    """jnp: rows [C, d] -> [C, d] gate-weighted sum of their experts' outputs."""
    import jax.numpy as jnp

    w = jnp.asarray(weights)
    l_idx = jnp.maximum(layer, 0)[:, None]
    e_idx = jnp.maximum(expert_ids, 0)
    per_slot = jnp.einsum("cd,ckdf->ckf", hidden, w[l_idx, e_idx],
                          precision="highest")
    g = jnp.where(expert_ids >= 0, gates, 0.0)
    return (per_slot * g[..., None]).sum(axis=1)


def reference(weights, layer, hidden, expert_ids, gates, served=None) -> np.ndarray:
    """NumPy: per token, sum over slots j (where served[t, j]) of g * x @ W[layer, e]."""
    t, k = expert_ids.shape
    out = np.zeros_like(hidden, dtype=np.float64)
    for i in range(t):
        for j in range(k):
            e = expert_ids[i, j]
            if e < 0 or (served is not None and not served[i, j]):
                continue
            out[i] += gates[i, j] * (hidden[i].astype(np.float64) @ weights[layer, e])
    return out.astype(np.float32)


def open_endpoint(cfg: dict):
    geo = cfg["geometry"]
    if cfg.get("transport", "shm") == "cuda_ipc":
        from eaas_jax.transport.cuda_ipc import CudaIpcEndpoint

        return CudaIpcEndpoint(cfg["deployment"], cfg["endpoint"], **geo)
    if cfg.get("transport") == "ibgda":
        from eaas_jax.transport.ibgda import IbgdaEndpoint

        return IbgdaEndpoint(cfg["deployment"], cfg["endpoint"], **geo)
    from eaas_jax.transport.shm import ShmEndpoint

    return ShmEndpoint(cfg["deployment"], cfg["endpoint"], **geo)


def serve(cfg: dict) -> int:
    import jax
    import jax.numpy as jnp

    from eaas_jax.transport import hidden_codec

    geo = cfg["geometry"]
    weights = make_weights(geo["num_layers"], geo["num_experts"], geo["hidden_size"], cfg["seed"])
    hosted = np.asarray(cfg["hosted"], dtype=np.int32)
    with open_endpoint(cfg) as ep:

        @jax.jit
        def step(hosted):
            r = ep.poll(hosted, capacity=cfg["poll_capacity"], timeout_us=20_000)
            hidden = hidden_codec.decode(r.hidden, r.scales, jnp.float32)
            y = expert_compute(weights, hidden, r.expert_ids, r.gates, r.layer)
            return ep.reply(y, r.num_rows)

        jax.block_until_ready(step(hosted))  # compiles (an idle round)
        print("ready", flush=True)
        deadline = time.monotonic() + cfg["deadline_s"]
        while ep.stats()["requests_accepted"] < cfg["messages"]:
            if time.monotonic() > deadline:
                print("server: deadline passed", ep.stats(), file=sys.stderr, flush=True)
                return 1
            jax.block_until_ready(step(hosted))
        print("server stats", json.dumps(ep.stats()), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(serve(json.loads(sys.argv[1])))
