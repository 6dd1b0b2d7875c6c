"""The attention client's side of a deployment: routed experts behind the transport.

`RemoteExpertBackend` plugs into the engine's `ModelRunner` in place of the
in-graph experts. Its device arrays (routing table, liveness mask) are inputs
of the compiled step, so marking a server dead or changing the table never
recompiles; its `exchange` builds the per-trace `RemoteExperts`.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from eaas_jax.attention_client.deadlines import AdaptiveDeadline
from eaas_jax.model.experts_backend import ExchangeOutputs
from eaas_jax.attention_client.exchange import RemoteExperts
from eaas_jax.transport import wire


class RemoteArrays(NamedTuple):
    table: jax.Array  # [num_moe_layers, num_experts, replicas] int32 endpoints
    live: jax.Array  # [max_endpoints] bool, as the host last set it
    generation: jax.Array  # [max_endpoints] int32, bumped when the host re-admits a server
    # Deadline of each combine in microseconds: a host int, so the host reads
    # it without waiting; traced as an int32 scalar, so a new value does not
    # recompile.
    timeout_us: int


class RemoteExpertBackend:
    """Routed experts served by `servers` (endpoint indices) through `endpoint`."""

    def __init__(
        self,
        endpoint,
        servers: list[int],
        table: np.ndarray,
        *,
        timeout_us: int,
        double_batching: bool,
        min_timeout_us: int | None = None,
    ):
        """`timeout_us` is the deadline of each exchange; with `min_timeout_us`
        below it, deadlines adapt between the two (`AdaptiveDeadline`)."""
        self.endpoint = endpoint
        self.servers = list(servers)
        self.deadlines = (AdaptiveDeadline(min_us=min_timeout_us, max_us=timeout_us)
                          if min_timeout_us is not None and min_timeout_us < timeout_us else None)
        self.double_batching = double_batching
        # The host's copy of the liveness mask: reading or changing it must not
        # wait for the steps queued on the device.
        self._live = np.zeros(endpoint.geometry.max_endpoints, bool)
        self._live[self.servers] = True
        self._generation = np.zeros(endpoint.geometry.max_endpoints, np.int32)
        self._table = np.array(table, np.int32)
        if self._table.ndim == 2:
            self._table = self._table[..., None]
        self.arrays = RemoteArrays(jnp.asarray(self._table), jnp.asarray(self._live),
                                   jnp.asarray(self._generation), int(timeout_us))
        self._traced: RemoteExperts | None = None

    @property
    def table(self) -> np.ndarray:
        """The host's copy of the routing table, [layers, experts, replicas] endpoints (-1: none)."""
        return self._table.copy()

    def is_live(self, endpoint: int) -> bool:
        return bool(self._live[endpoint])

    def experts_without_live_replica(self) -> list[tuple[int, int]]:
        """The (MoE layer, expert) pairs no live server hosts now."""
        live = np.append(self._live, False)  # table entry -1 (no replica) reads the last: not live
        return [(int(layer), int(expert)) for layer, expert in np.argwhere(~live[self._table].any(axis=2))]

    def set_hosted(self, endpoint: int, hosted) -> None:
        """Makes server `endpoint` a replica of exactly the (MoE layer, expert)
        pairs in `hosted` (a server that joined on a spare endpoint, or another
        one taking that endpoint over), from the next step on; no recompile.
        Raises ValueError, changing nothing, for a pair outside the model or
        one whose replicas are all taken."""
        table = np.where(self._table == endpoint, -1, self._table)
        layers, experts, _ = table.shape
        for layer, expert in hosted:
            if not (0 <= layer < layers and 0 <= expert < experts):
                raise ValueError(f"(MoE layer {layer}, expert {expert}) is outside the model's "
                                 f"{layers} x {experts}")
            free = np.flatnonzero(table[layer, expert] < 0)
            if not len(free):
                raise ValueError(f"(MoE layer {layer}, expert {expert}) already has {table.shape[2]} replicas")
            table[layer, expert, free[0]] = endpoint
        self._table = table
        self.arrays = self.arrays._replace(table=jnp.asarray(table))

    def set_live(self, endpoint: int, live: bool) -> None:
        """Routes around (or back to) a server from the next step on; no recompile.
        Re-admitting a server also clears what steps found of it (the carry)."""
        if live and not self._live[endpoint]:
            self._generation[endpoint] += 1
        self._live[endpoint] = live
        self._publish_liveness()

    def clear_failure(self, endpoint: int) -> None:
        """Keeps `endpoint` live and has the steps dispatched from now on send
        to it again, whatever earlier steps found of it (its generation moves
        on, so their carry no longer applies)."""
        self._generation[endpoint] += 1
        self._live[endpoint] = True
        self._publish_liveness()

    def _publish_liveness(self) -> None:
        self.arrays = self.arrays._replace(live=jnp.asarray(self._live), generation=jnp.asarray(self._generation))

    def step_arrays(self, num_tokens: int) -> RemoteArrays:
        """The arrays for the next step, of `num_tokens` padded tokens: its deadline set."""
        if self.deadlines is not None:
            timeout_us = self.deadlines.deadline_us(num_tokens)
            if timeout_us != self.arrays.timeout_us:
                self.arrays = self.arrays._replace(timeout_us=timeout_us)
        return self.arrays

    def observe_step(self, num_tokens: int, seconds: float) -> None:
        """A step of `num_tokens` padded tokens that every server answered took `seconds`."""
        if self.deadlines is not None:
            self.deadlines.observe(num_tokens, seconds)

    def initial_carry(self) -> jax.Array:
        """[max_endpoints] int32: the generation in which a step saw each server
        fail, -1 for none (`RemoteExperts.carry`)."""
        return jnp.full(self._live.shape, -1, jnp.int32)

    def num_micro_batches(self, batch: int) -> int:
        return 2 if self.double_batching and batch >= 2 else 1

    def exchange(self, arrays: RemoteArrays, carry: jax.Array) -> RemoteExperts:
        self._traced = RemoteExperts(
            self.endpoint, self.servers, arrays.table, arrays.live, timeout_us=arrays.timeout_us,
            generation=arrays.generation, carry=carry,
        )
        return self._traced

    def outputs(self, exchange: RemoteExperts) -> ExchangeOutputs:
        return ExchangeOutputs(exchange.statuses, exchange.unserved_tokens, exchange.unserved_labels,
                               exchange.server_slots, exchange.server_wait_us, exchange.carry)

    def traced_exchanges(self) -> list[tuple[int, int]]:
        return list(self._traced.status_labels) if self._traced is not None else []


class ExpertServerError(RuntimeError):
    """Expert servers did not deliver their part of some requests' steps.

    `outputs`, where `Engine.generate` raises it: every request's output in
    prompt order, the failed ones finished with `error` set and the others
    complete.
    """

    def __init__(self, message: str, outputs: list | None = None):
        super().__init__(message)
        self.outputs = outputs


_FAILURES = {code: status.text for code, status in wire.STATUSES.items() if status.failed}


def failed_servers(statuses: np.ndarray, labels, describe_server, timeout_ms: float) -> dict[int, str]:
    """Every server whose exchange failed in a step, with what happened.

    statuses: [combines, servers] from the step; labels: (moe_layer,
    micro_batch) of each combine; describe_server(endpoint) -> str.
    """
    failures = {}
    for row, (layer, micro_batch) in zip(np.asarray(statuses), labels):
        for server, status in enumerate(row.tolist()):
            if status in _FAILURES and server not in failures:
                what = _FAILURES[status].format(timeout_ms=timeout_ms)
                failures[server] = f"{describe_server(server)} {what} at MoE layer {layer}, micro-batch {micro_batch}"
    return failures


# Counters every healthy exchange moves; the others are worth naming in errors.
_ROUTINE_COUNTERS = frozenset({"requests_sent", "replies_sent", "requests_accepted", "replies_accepted",
                               "stale_replies", "deferred"})


def transport_anomalies(stats: dict[str, int]) -> str:
    """The unusual nonzero counters of an endpoint ('timeouts=1, drop_checksum=2'),
    for error messages: they say which check a failed exchange tripped."""
    return ", ".join(f"{name}={n}" for name, n in stats.items() if n and name not in _ROUTINE_COUNTERS)


def unserved_error(unserved: np.ndarray, failures: dict[int, str]) -> str:
    """What failed the requests of a step's unserved token slots (no live
    replica of their expert), naming the servers that failed."""
    cause = "; ".join(failures.values()) or "their servers were marked dead earlier"
    return f"{cause} ({int(np.sum(unserved))} token-expert slots had no live replica left)"
