"""The seam between the model runner and wherever the routed experts run.

A compiled step gets its routed experts from an `ExpertsBackend`: computed in
the step's own graph (`engine.runner.EmbeddedExperts`), sharded over local
devices (`engine.expert_parallel.ExpertParallelExperts`) or served by expert servers through
the transport (`attention_client.remote_backend.RemoteExpertBackend`). The
backend's device arrays are inputs of the step (so a new routing table or
deadline never recompiles), and its carry is device state one step hands the
next in dispatch order.

What a step's exchanges saw comes back as an `ExchangeReport`: built on the
device from the traced exchange's `ExchangeOutputs`, fetched with the step's
tokens. Backends without an exchange report nothing (empty arrays).

It lives beside the model's own `ExpertFn` / `ExpertExchange` (what the MoE
layers call) rather than in `engine/`, so that the backends outside the engine
(`attention_client`) import it without importing the engine.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Protocol, runtime_checkable

import jax
import jax.numpy as jnp
import numpy as np


class ExchangeOutputs(NamedTuple):
    """What one traced step's exchanges produce on the device.

    statuses: one [S] transport status vector per combine (failover re-sends
      included; the backend's `traced_exchanges()` names each one's
      (moe_layer, micro_batch));
    unserved_tokens: per exchange, [n] int32: each token's needed slots no
      server delivered, `unserved_labels` its (moe_layer, micro_batch);
    server_slots, server_wait_us: [S] token-expert slots sent to each server
      and microseconds waited on it;
    carry: the backend's carry for the next step (None without one).
    """

    statuses: list
    unserved_tokens: list
    unserved_labels: list
    server_slots: jax.Array
    server_wait_us: jax.Array
    carry: Any = None

    @classmethod
    def none(cls) -> "ExchangeOutputs":
        """A step with no exchange (experts in the graph)."""
        empty = jnp.zeros((0,), jnp.int32)
        return cls([], [], [], empty, empty)


class ExchangeReport(NamedTuple):
    """What one step's MoE layers reported, fetched to the host: the load on
    each expert and, with expert servers, what their exchanges did (empty
    arrays when the experts are embedded)."""

    statuses: np.ndarray  # [combines, servers] transport status codes (failover retries included)
    labels: list[tuple[int, int]]  # (moe_layer, micro_batch) of each combine
    unserved: np.ndarray  # [exchanges] token slots no server delivered (after failover)
    unserved_rows: np.ndarray  # [rows] bool: rows with a token whose slot no server delivered
    expert_tokens: np.ndarray  # [moe_layers, experts] real tokens routed to each expert
    server_slots: np.ndarray  # [servers] token-expert slots sent to each server (re-sends included)
    server_wait_us: np.ndarray  # [servers] microseconds the step's exchanges waited on each server

    @property
    def unserved_slots(self) -> int:
        return int(np.sum(self.unserved))

    def count(self, status: int) -> np.ndarray:
        """[servers] how many of the step's combines ended with `status` per server."""
        return np.sum(np.asarray(self.statuses) == status, axis=0)


@runtime_checkable
class ExpertsBackend(Protocol):
    """Where a `ModelRunner`'s routed experts run.

    `arrays` is the pytree of device arrays the compiled step takes;
    `step_arrays(num_tokens)` those for the next step of that many padded
    tokens (a new deadline, say; same structure). `exchange(arrays, carry)`,
    called while tracing, returns what the model's MoE layers call (an
    `ExpertFn` or an `ExpertExchange`), and `outputs(exchange)` what it
    reported. `traced_exchanges()` names the (moe_layer, micro_batch) of each
    status row of the last traced step.
    """

    arrays: Any

    def num_micro_batches(self, batch: int) -> int: ...

    def initial_carry(self) -> Any: ...

    def step_arrays(self, num_tokens: int) -> Any: ...

    def exchange(self, arrays: Any, carry: Any) -> Any: ...

    def outputs(self, exchange: Any) -> ExchangeOutputs: ...

    def traced_exchanges(self) -> list[tuple[int, int]]: ...
