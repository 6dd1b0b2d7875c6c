"""The client side of the token exchange: an `ExpertFn` backed by expert servers.

Inside the client's jitted step each MoE layer routes its tokens in-graph
(`table[layer, expert]` -> server endpoint, masked by the liveness vector),
dispatches them once per target server and combines the replies. The routing
table and liveness mask are ordinary device arrays, so changing them never
recompiles. Each combine's per-server status is collected so the step can
return it and the host can name a server that missed its deadline.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp

from eaas_jax.model.moe import Routing
from eaas_jax.transport import shm


class RemoteExperts:
    """An `ExpertFn` for one traced step; create one per trace.

    Args:
      endpoint: this client's open shm endpoint (or its index).
      servers: endpoint index of every expert server, fixed per deployment.
      table: [num_moe_layers, num_experts] int32 device array, the endpoint
        serving each (layer, expert).
      live: [max_endpoints] bool device array; experts on dead endpoints are
        not dispatched.
      micro_batch: mailbox channel of this exchange.
      timeout_us: combine deadline per layer.
    """

    def __init__(
        self,
        endpoint,
        servers: Sequence[int],
        table: jax.Array,
        live: jax.Array,
        *,
        micro_batch: int = 0,
        timeout_us: int = 5_000_000,
    ):
        self.endpoint = endpoint
        self.servers = jnp.asarray(list(servers), jnp.int32)
        self.table = table
        self.live = live
        self.micro_batch = micro_batch
        self.timeout_us = timeout_us
        self.statuses: list[jax.Array] = []  # one [S] status vector per MoE layer

    def __call__(self, moe_layer: int, x: jax.Array, routing: Routing) -> jax.Array:
        targets = self.table[moe_layer][routing.expert_ids]
        targets = jnp.where(self.live[jnp.maximum(targets, 0)] & (targets >= 0), targets, -1)
        after = self.statuses[-1] if self.statuses else None
        sent = shm.dispatch(
            self.endpoint, x.astype(jnp.float32), routing.expert_ids, routing.weights,
            targets, self.servers, layer=moe_layer, micro_batch=self.micro_batch, after=after,
        )
        out, status = shm.combine(
            self.endpoint, sent, targets, self.servers, layer=moe_layer,
            micro_batch=self.micro_batch, timeout_us=self.timeout_us, after=sent,
        )
        self.statuses.append(status)
        return out.astype(x.dtype)
