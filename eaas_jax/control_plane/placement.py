"""Placement planning: which experts each expert server hosts.

`plan_placement` gives every expert `replicas` copies on distinct servers
(and one more to the `hot_replicas` experts with the most measured load), and
balances the servers' load: experts are placed heaviest first, each copy on
the least-loaded server that does not hold that expert yet, an expert's load
being shared equally by its copies (clients spread tokens over replicas, see
`remote_experts.route`). Placement is by expert index, the same in every MoE
layer, as deployment files describe servers; a per-layer load is summed over
layers. `deployment_toml` writes the plan as a deployment file.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np


def plan_placement(num_experts: int, servers: Sequence[str], *, replicas: int = 1,
                   load: np.ndarray | None = None, hot_replicas: int = 0) -> dict[str, list[int]]:
    """{server name: sorted expert indices it hosts}.

    load: tokens routed to each expert, [num_experts] or [num_moe_layers,
      num_experts] (e.g. `engine.metrics.expert_tokens`); without it every
      expert weighs the same (servers then differ by at most one expert).
    """
    servers = list(servers)
    if num_experts < 1:
        raise ValueError(f"num_experts must be >= 1, got {num_experts}")
    if not servers or len(set(servers)) != len(servers):
        raise ValueError(f"servers must be distinct names, at least one, got {servers}")
    if not 1 <= replicas <= len(servers):
        raise ValueError(f"replicas must be in [1, {len(servers)}] (one copy per server at most), got {replicas}")
    if not 0 <= hot_replicas <= num_experts:
        raise ValueError(f"hot_replicas must be in [0, {num_experts}], got {hot_replicas}")
    if hot_replicas and replicas == len(servers):
        raise ValueError(f"hot_replicas need a server without a copy: replicas={replicas} already uses all")
    if load is None:
        if hot_replicas:
            raise ValueError("hot_replicas picks the most loaded experts: give the measured load")
        weight = np.ones(num_experts)
    else:
        weight = np.asarray(load, np.float64)
        if weight.ndim == 2:
            weight = weight.sum(axis=0)
        if weight.shape != (num_experts,):
            raise ValueError(f"load must be [num_experts={num_experts}] or [layers, {num_experts}], "
                             f"got shape {np.shape(load)}")
        if not np.all(np.isfinite(weight)) or (weight < 0).any():
            raise ValueError("load must be finite and non-negative")
    copies = np.full(num_experts, replicas)
    hottest = np.argsort(-weight, kind="stable")[:hot_replicas]
    copies[hottest] += 1

    hosted: list[set[int]] = [set() for _ in servers]
    server_load = np.zeros(len(servers))
    # Heaviest copies first (ties by expert index), each on the least-loaded
    # server that can take it (ties: fewest experts, then file order).
    for expert in sorted(range(num_experts), key=lambda e: (-weight[e] / copies[e], e)):
        for _ in range(copies[expert]):
            free = [s for s in range(len(servers)) if expert not in hosted[s]]
            target = min(free, key=lambda s: (server_load[s], len(hosted[s]), s))
            hosted[target].add(expert)
            server_load[target] += weight[expert] / copies[expert]
    empty = [name for name, h in zip(servers, hosted) if not h]
    if empty:
        raise ValueError(f"{len(servers)} servers for {int(copies.sum())} expert copies: {empty} would host nothing")
    return {name: sorted(h) for name, h in zip(servers, hosted)}


def deployment_toml(name: str, placement: dict[str, list[int]], **options) -> str:
    """A deployment file for `placement` (options: the file's top-level keys,
    e.g. capacity=256, timeout_ms=10000)."""
    def value(v):
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, str):
            return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
        return str(v)

    lines = [f"name = {value(name)}"] + [f"{k} = {value(v)}" for k, v in options.items()]
    for server, experts in placement.items():
        lines += ["", "[[servers]]", f"name = {value(server)}", f"experts = [{', '.join(map(str, experts))}]"]
    return "\n".join(lines) + "\n"
