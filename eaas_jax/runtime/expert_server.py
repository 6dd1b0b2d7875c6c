"""The expert server: a stateless loop over one jitted step.

poll (collect whatever requests have arrived, from any client, for any layer)
-> map each (layer, expert) slot to the group of a hosted expert -> one grouped
matmul per projection over all hosted groups -> gate-weighted sum per token ->
reply. Tokens from every client and every layer that arrived together share
one grouped matmul: batching across clients is where the server's efficiency
comes from.
"""

from __future__ import annotations

import logging
import threading
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from eaas_jax.model.moe import routed_experts
from eaas_jax.model.transformer import ExpertStack
from eaas_jax.transport import shm

log = logging.getLogger(__name__)


class HostedExperts(NamedTuple):
    """The routed experts one server hosts, stacked as groups.

    group_of: [num_moe_layers, num_experts] int32, the group of each hosted
      (MoE layer, expert), -1 where not hosted.
    gate_proj, up_proj: [G, d, f]; down_proj: [G, f, d].
    """

    group_of: np.ndarray
    gate_proj: jax.Array
    up_proj: jax.Array
    down_proj: jax.Array

    @property
    def hosted_mask(self) -> np.ndarray:
        return (self.group_of >= 0).astype(np.int32)


def select_experts(experts: ExpertStack, hosted: Sequence[tuple[int, int]]) -> HostedExperts:
    """Stacks the weights of the (MoE layer, expert) pairs in `hosted`."""
    num_layers = len(experts.banks)
    num_experts = experts.banks[0].num_experts if num_layers else 0
    pairs = sorted(set(hosted))
    if not pairs:
        raise ValueError("an expert server must host at least one (layer, expert)")
    for layer, expert in pairs:
        if not (0 <= layer < num_layers and 0 <= expert < num_experts):
            raise ValueError(
                f"(layer {layer}, expert {expert}) is outside the model's "
                f"{num_layers} MoE layers x {num_experts} experts"
            )
    group_of = np.full((num_layers, num_experts), -1, np.int32)
    for g, (layer, expert) in enumerate(pairs):
        group_of[layer, expert] = g

    def stack(name):
        return jnp.stack([getattr(experts.banks[l], name)[...][e] for l, e in pairs])

    return HostedExperts(group_of, stack("gate_proj"), stack("up_proj"), stack("down_proj"))


def _server_step(group_of, gate_proj, up_proj, down_proj, hosted_mask, *, endpoint, capacity, timeout_us):
    request = shm.poll(endpoint, hosted_mask, capacity=capacity, timeout_us=timeout_us)
    valid = (request.expert_ids >= 0) & (request.layer[:, None] >= 0)
    layer = jnp.maximum(request.layer, 0)[:, None]
    groups = jnp.where(valid, group_of[layer, jnp.maximum(request.expert_ids, 0)], -1)
    out = routed_experts(
        request.hidden.astype(gate_proj.dtype), groups, request.gates, gate_proj, up_proj, down_proj
    )
    return shm.reply(endpoint, out.astype(jnp.float32), request.num_rows), request.num_rows


class ExpertServer:
    """Serves `experts` on an open shm endpoint until stopped."""

    def __init__(
        self,
        endpoint: shm.ShmEndpoint,
        experts: HostedExperts,
        *,
        poll_timeout_us: int = 20_000,
    ):
        self.endpoint = endpoint
        self.experts = experts
        self._hosted_mask = jnp.asarray(experts.hosted_mask)
        self._group_of = jnp.asarray(experts.group_of)
        # Room for both micro-batches of one client in a single round.
        capacity = endpoint.geometry.capacity * endpoint.geometry.num_channels
        self._step = jax.jit(
            _server_step,
            static_argnames=("endpoint", "capacity", "timeout_us"),
        )
        self._static = dict(endpoint=endpoint.endpoint, capacity=capacity, timeout_us=poll_timeout_us)
        self._stop = threading.Event()
        self.rows_served = 0

    def step(self) -> int:
        """One poll/compute/reply round; returns the rows it served (0 when idle)."""
        e = self.experts
        _, rows = self._step(self._group_of, e.gate_proj, e.up_proj, e.down_proj, self._hosted_mask, **self._static)
        rows = int(rows)
        self.rows_served += rows
        return rows

    def serve(self) -> None:
        """Loops until `stop()`; each idle round waits at most poll_timeout_us."""
        log.info("expert server on endpoint %d serving", self.endpoint.endpoint)
        while not self._stop.is_set():
            self.step()

    def stop(self) -> None:
        self._stop.set()
