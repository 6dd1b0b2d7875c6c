"""Probes: a server marked dead that stayed up is routed to again once it answers one.

A server marked dead by a failed exchange (a missed deadline, a bad reply)
whose process is still up may have paused, or may hang. Routing tokens to it
again to find out would cost a step a deadline when it hangs, so after its
probation the client sends it a probe instead: a one-token request whose
expert ids are all -1 (nothing to compute), through the same dispatch and
combine custom calls as a step, on MoE layer 0 and channel 0, and looks for
the reply at its next membership check. A reply proves that the server's
process polls the inbox the client maps; a missing one costs no step
anything. (A server that came up as a new process needs no probe: clusters
report it only once it said it is ready, with its inbox open.)

A probe must not share a (server, channel) mailbox with a step's exchange,
whose reply it would take or whose pending request it would replace: the
caller probes only servers that no step still queued on the device routes to.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from eaas_jax.transport import custom_calls, hidden_codec, wire


class AdmissionProbes:
    """Probes of servers, at most one outstanding per server endpoint, through
    client `endpoint` (an open transport endpoint)."""

    def __init__(self, endpoint):
        geometry = endpoint.geometry
        k = geometry.top_k
        hidden, scales = hidden_codec.encode(jnp.zeros((1, geometry.hidden_size), jnp.float32),
                                             geometry.dispatch_dtype)
        no_experts = jnp.full((1, k), -1, jnp.int32)
        no_gates = jnp.zeros((1, k), jnp.float32)

        def send(server):  # server: int32 [1]
            targets = jnp.broadcast_to(server, (1, k))
            return custom_calls.dispatch(endpoint, hidden, no_experts, no_gates, targets, server,
                                         layer=0, micro_batch=0, scales=scales)

        def status(sent, server):  # whatever came by now: no waiting
            targets = jnp.broadcast_to(server, (1, k))
            _, status, _ = custom_calls.combine(endpoint, sent, targets, server, layer=0, micro_batch=0,
                                                timeout_us=0, after=sent)
            return status[0]

        self._send, self._status = jax.jit(send), jax.jit(status)
        self._outstanding: dict[int, tuple[object, jax.Array]] = {}  # server -> (incarnation, sent)

    def start(self, server: int, incarnation) -> None:
        """Sends `server` (as process `incarnation`) a probe, replacing any earlier one."""
        self._outstanding[server] = (incarnation, self._send(jnp.asarray([server], jnp.int32)))

    def outstanding(self, server: int, incarnation) -> bool:
        """Whether a probe of `server` as `incarnation` awaits its answer."""
        probe = self._outstanding.get(server)
        return probe is not None and probe[0] == incarnation

    def answered(self, server: int) -> bool:
        """Whether `server` answered its outstanding probe by now; consumes it."""
        _, sent = self._outstanding.pop(server)
        server_index = jnp.asarray([server], jnp.int32)
        return int(self._status(sent, server_index)) == wire.STATUS_OK

    def forget(self, server: int) -> None:
        """Drops the probe of `server` (it went away): its reply, if any, is stale."""
        self._outstanding.pop(server, None)
