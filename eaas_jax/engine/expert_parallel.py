"""The monolithic multi-device baseline: routed experts sharded over the local
devices by expert, everything else replicated, one XLA program.

This is what a user with a static set of GPUs runs, and what disaggregation is
measured against. Each device holds `num_experts / N` experts of every MoE
layer; attention, routers, shared experts and the KV cache are replicated, so
every device already has every token: a device runs its own experts on the
tokens routed to them (the others' slots are skipped by the grouped matmul) and
one all-reduce (`psum` inside `shard_map`) sums the partial outputs. With
replicated tokens that all-reduce is the whole exchange; a data-parallel
attention, where each device holds different sequences, would send the tokens
with an all-to-all instead.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from eaas_jax.model.experts_backend import ExchangeOutputs
from eaas_jax.model.moe import Routing, routed_experts
from eaas_jax.model.transformer import ExpertStack

AXIS = "expert"


def expert_mesh(num_devices: int) -> Mesh:
    """A 1-D mesh over the first `num_devices` local devices."""
    devices = jax.local_devices()
    if not 1 <= num_devices <= len(devices):
        raise ValueError(
            f"expert parallelism over {num_devices} devices, but this process sees {len(devices)} "
            f"({devices[0].platform})"
        )
    return Mesh(np.array(devices[:num_devices]), (AXIS,))


class ExpertParallelExperts:
    """An `ExpertsBackend`: `experts` sharded by expert over `mesh`.

    `replicated` is the sharding for everything else (the runner's `sharding`).
    """

    def __init__(self, experts: ExpertStack, mesh: Mesh):
        num_experts, size = experts.banks[0].num_experts, mesh.shape[AXIS]
        if num_experts % size:
            raise ValueError(f"{num_experts} experts do not split evenly over {size} devices")
        self.mesh = mesh
        self.replicated = NamedSharding(mesh, P())
        self._graphdef, arrays = nnx.split(experts)
        # Every expert weight is [E, ...]: split the leading axis.
        self.arrays = jax.device_put(arrays, NamedSharding(mesh, P(AXIS)))

    def num_micro_batches(self, batch: int) -> int:
        return 1

    def step_arrays(self, num_tokens: int):
        return self.arrays

    def initial_carry(self):
        return None

    def exchange(self, arrays, carry) -> "_ShardedExperts":
        return _ShardedExperts(nnx.merge(self._graphdef, arrays), self.mesh)

    def outputs(self, exchange) -> ExchangeOutputs:
        return ExchangeOutputs.none()

    def traced_exchanges(self) -> list[tuple[int, int]]:
        return []


class _ShardedExperts:
    """`ExpertFn` for one traced step."""

    def __init__(self, experts: ExpertStack, mesh: Mesh):
        self._experts = experts
        self._mesh = mesh

    def __call__(self, moe_layer: int, x: jax.Array, routing: Routing) -> jax.Array:
        bank = self._experts.banks[moe_layer]

        def local(x, expert_ids, weights, gate_proj, up_proj, down_proj):
            # Ids of other devices' experts fall outside [0, local count): skipped.
            first = jax.lax.axis_index(AXIS) * gate_proj.shape[0]
            partial = routed_experts(x, expert_ids - first, weights, gate_proj, up_proj, down_proj,
                                     out_dtype=jnp.float32)
            return jax.lax.psum(partial, AXIS).astype(x.dtype)

        sharded = jax.shard_map(
            local,
            mesh=self._mesh,
            in_specs=(P(), P(), P(), P(AXIS), P(AXIS), P(AXIS)),
            out_specs=P(),
            # The Pallas expert kernel (the gathered path on GPUs) gives no
            # type for how its output varies over the mesh, which the check
            # requires; the psum above makes the result the same on every device.
            check_vma=False,
        )
        return sharded(x, routing.expert_ids, routing.weights,
                       bank.gate_proj[...], bank.up_proj[...], bank.down_proj[...])
