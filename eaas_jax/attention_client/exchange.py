"""The client side of the token exchange: an `ExpertExchange` over expert servers.

Inside the client's jitted step each MoE layer routes its tokens in-graph
(`table[layer, expert, replica]` -> server endpoint; the live replicas of an
expert share its tokens, see `route`), dispatches them once per target server
and, later, combines the replies. The routing table and liveness mask are
ordinary device arrays, so changing them never recompiles. Every custom call
takes the previous one's output as its ordering token, so the calls run in
program order: that is what makes double batching ping-pong rather than race.

A micro-batch with more tokens than a mailbox holds is compacted (real tokens
first) and sent in mailbox-sized chunks one after another; chunks that hold no
real token send nothing and cost nothing.

In-step failover: with replicas (a table of R > 1 per expert), the token
slots a server failed to deliver (deadline missed, bad reply, unreachable) are
dispatched again to the next live replica right after the combine, up to R - 1
times, and their results added: the step's outputs stay exact. A server that
failed is not used again in this step, nor in the steps dispatched after it:
they take this step's `carry` (the generation in which each server was seen
failing) as input, so a step queued before the host fetched this one does not
wait out the dead server's deadline again; the host then marks it dead. Slots
that no live replica could serve are counted per token (`unserved_tokens`):
only the requests of those tokens lose their step.
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp

from eaas_jax.model.moe import Routing
from eaas_jax.transport import custom_calls, hidden_codec, wire


class _Chunk(NamedTuple):
    sent: jax.Array  # [S] dispatch output
    targets: jax.Array  # [c, k] endpoint of each slot, -1: not sent
    x: jax.Array  # [c, d] what was sent, kept to send again on failover
    ids: jax.Array  # [c, k]
    gates: jax.Array  # [c, k]
    needed: jax.Array  # [c, k] slots that must be served (real token, real expert)


class _Handle(NamedTuple):
    moe_layer: int
    micro_batch: int
    num_tokens: int
    order: jax.Array | None  # token of each compacted row, None when not compacted
    done: list  # outputs of the chunks already combined at send time
    lost: list  # [c, k] of those chunks: needed slots no server delivered
    last: _Chunk


def route(table: jax.Array, live: jax.Array, moe_layer: int, expert_ids: jax.Array) -> jax.Array:
    """Endpoint serving each (token, slot): one live replica of its expert, -1
    if none is live. Replicas share the load: (row, slot) takes the live
    replica number (row + slot) mod (live replicas), in table order.

    table: [L, E, R] int32 endpoints (-1 = no replica); live: [max_endpoints] bool;
    expert_ids: [N, k].
    """
    candidates = table[moe_layer][expert_ids]  # [N, k, R]
    ok = (candidates >= 0) & live[jnp.maximum(candidates, 0)]
    num_live = ok.sum(axis=-1)
    n, k = expert_ids.shape
    turn = (jnp.arange(n)[:, None] + jnp.arange(k)[None, :]) % jnp.maximum(num_live, 1)
    live_rank = jnp.cumsum(ok, axis=-1) - 1
    pick = jnp.argmax(ok & (live_rank == turn[..., None]), axis=-1)[..., None]
    chosen = jnp.take_along_axis(candidates, pick, axis=-1)[..., 0]
    return jnp.where(num_live > 0, chosen, -1)


class RemoteExperts:
    """An `ExpertExchange` for one traced step; create one per trace.

    Args:
      endpoint: this client's open transport endpoint (`ShmEndpoint`, `CudaIpcEndpoint`).
      servers: endpoint index of every expert server, fixed per deployment.
      table: [num_moe_layers, num_experts, replicas] (or without the replica
        axis) int32 device array, the endpoints serving each (layer, expert).
      live: [max_endpoints] bool device array; dead endpoints get no tokens.
      timeout_us: combine deadline of each exchange (an int, or an int32
        scalar traced from the host's current deadline).
      generation, carry: [max_endpoints] int32 device arrays: the host's
        re-admission count of each endpoint, and the generation in which an
        earlier step saw it fail (-1: never); an endpoint whose carry equals
        its generation is treated as dead.

    After tracing, `statuses` holds one [S] status vector per combine (failover
    retries included) and `status_labels` its (moe_layer, micro_batch);
    `unserved_tokens` per exchange [n] int32, each token's needed slots no
    server delivered, and `unserved_labels` its (moe_layer, micro_batch);
    `server_slots` [S] the token-expert slots dispatched to each server;
    `server_wait_us` [S] the microseconds the step's combines waited on each
    server, summed.
    """

    def __init__(
        self,
        endpoint,
        servers: Sequence[int],
        table: jax.Array,
        live: jax.Array,
        *,
        timeout_us: int | jax.Array = 5_000_000,
        generation: jax.Array | None = None,
        carry: jax.Array | None = None,
    ):
        self.endpoint = endpoint
        self.capacity = endpoint.geometry.capacity
        self.servers = jnp.asarray(list(servers), jnp.int32)
        self.table = table if table.ndim == 3 else table[..., None]
        self._generation = jnp.zeros(live.shape, jnp.int32) if generation is None else generation
        self._carry_in = jnp.full(live.shape, -1, jnp.int32) if carry is None else carry
        self.live = live & (self._carry_in != self._generation)
        # Each server's endpoint as a scatter index; unused (-1) entries fall out of range and are dropped.
        self._endpoint_index = jnp.where(self.servers >= 0, self.servers, live.shape[0])
        self.timeout_us = timeout_us
        self.statuses: list[jax.Array] = []
        self.status_labels: list[tuple[int, int]] = []
        # Per receive: (moe_layer, micro_batch) and [n] each token's needed
        # slots no server delivered (after failover).
        self.unserved_labels: list[tuple[int, int]] = []
        self.unserved_tokens: list[jax.Array] = []
        self.server_slots = jnp.zeros(self.servers.shape, jnp.int32)
        self.server_wait_us = jnp.zeros(self.servers.shape, jnp.int32)
        self._chain = None  # output of the last custom call
        self._failed = jnp.zeros(self.servers.shape, bool)  # servers that failed in this step

    def _dispatch(self, moe_layer, micro_batch, x, ids, gates, targets, needed) -> _Chunk:
        payload, scales = hidden_codec.encode(x, self.endpoint.geometry.dispatch_dtype)
        sent = custom_calls.dispatch(
            self.endpoint, payload, ids, gates, targets, self.servers,
            layer=moe_layer, micro_batch=micro_batch, scales=scales, after=self._chain,
        )
        self._chain = sent
        to_server = (targets[..., None] == self.servers) & (self.servers >= 0)
        self.server_slots = self.server_slots + jnp.sum(to_server, axis=(0, 1), dtype=jnp.int32)
        return _Chunk(sent, targets, x, ids, gates, needed)

    def _combine(self, moe_layer, micro_batch, chunk: _Chunk) -> jax.Array:
        # A server that failed once in this step is neither waited for again
        # (tokens already dispatched to it count as not sent) nor sent more:
        # a dead server costs one deadline per step, not one per exchange.
        sent = jnp.where(self._failed, 0, chunk.sent)
        out, status, waited_us = custom_calls.combine(
            self.endpoint, sent, chunk.targets, self.servers, layer=moe_layer,
            micro_batch=micro_batch, timeout_us=self.timeout_us, after=self._chain,
        )
        self._chain = status
        self.server_wait_us = self.server_wait_us + waited_us
        self.statuses.append(status)
        self.status_labels.append((moe_layer, micro_batch))
        self._failed = self._failed | (status[:, None] == jnp.asarray(wire.FAILED_STATUSES)).any(axis=1)
        self.live = self.live.at[self._endpoint_index].set(
            self.live[jnp.maximum(self.servers, 0)] & ~self._failed, mode="drop")
        return out

    def _combine_with_failover(self, moe_layer, micro_batch, chunk: _Chunk) -> tuple[jax.Array, jax.Array]:
        """The chunk's combined output, failed slots re-sent to other replicas;
        and [c, k] the needed slots no server delivered."""
        out = self._combine(moe_layer, micro_batch, chunk)
        targets = chunk.targets
        for _ in range(self.table.shape[-1] - 1):
            # Slots whose server failed (it is no longer live) go to the next
            # live replica; when nothing failed this sends and waits for nothing.
            lost = (targets >= 0) & ~self.live[jnp.maximum(targets, 0)]
            retry_targets = jnp.where(lost, route(self.table, self.live, moe_layer, chunk.ids), -1)
            retry = self._dispatch(moe_layer, micro_batch, chunk.x, chunk.ids, chunk.gates, retry_targets,
                                   chunk.needed)
            out = out + self._combine(moe_layer, micro_batch, retry)
            targets = jnp.where(lost, retry_targets, targets)
        served = (targets >= 0) & self.live[jnp.maximum(targets, 0)]
        return out, chunk.needed & ~served

    @property
    def carry(self) -> jax.Array:
        """For the next step: the input carry with this step's failed servers
        stamped with their current generation."""
        failed = jnp.zeros(self.live.shape, bool).at[self._endpoint_index].set(self._failed, mode="drop")
        return jnp.where(failed, self._generation, self._carry_in)

    def send(self, moe_layer: int, micro_batch: int, x: jax.Array, routing: Routing,
             token_mask: jax.Array) -> _Handle:
        n = x.shape[0]
        ids, gates = routing.expert_ids, routing.weights.astype(jnp.float32)
        needed = token_mask[:, None] & (ids >= 0)
        targets = jnp.where(needed, route(self.table, self.live, moe_layer, ids), -1)
        order = None
        if n > self.capacity:
            order = jnp.argsort(~token_mask, stable=True)
            x, ids, gates, targets, needed = (a[order] for a in (x, ids, gates, targets, needed))
        bounds = list(range(0, n, self.capacity)) + [n]
        done, lost = [], []
        for lo, hi in zip(bounds[:-2], bounds[1:-1]):  # every chunk but the last: now
            chunk = self._dispatch(moe_layer, micro_batch, x[lo:hi], ids[lo:hi], gates[lo:hi], targets[lo:hi],
                                   needed[lo:hi])
            out, chunk_lost = self._combine_with_failover(moe_layer, micro_batch, chunk)
            done.append(out)
            lost.append(chunk_lost)
        lo = bounds[-2]
        last = self._dispatch(moe_layer, micro_batch, x[lo:], ids[lo:], gates[lo:], targets[lo:], needed[lo:])
        return _Handle(moe_layer, micro_batch, n, order, done, lost, last)

    def receive(self, handle: _Handle) -> jax.Array:
        out, last_lost = self._combine_with_failover(handle.moe_layer, handle.micro_batch, handle.last)
        out, lost = (jnp.concatenate(parts) for parts in (handle.done + [out], handle.lost + [last_lost]))
        lost = jnp.sum(lost, axis=1, dtype=jnp.int32)
        if handle.order is not None:
            out = jnp.zeros_like(out).at[handle.order].set(out)
            lost = jnp.zeros_like(lost).at[handle.order].set(lost)
        self.unserved_labels.append((handle.moe_layer, handle.micro_batch))
        self.unserved_tokens.append(lost)
        return out
