"""eaas-jax: an Expert-as-a-Service Mixture-of-Experts serving stack on JAX.

Packages, one role each: `model/` (Flax NNX modules), `kernels/`,
`checkpoint/`, `transport/` (wire format and backends behind the XLA FFI
custom calls), `attention_client/` (remote experts in the client's step),
`expert_server/`, `control_plane/` (deployments, registry, server membership,
scaling), `engine/` (`Engine`: requests in, outputs out), `train/`.
"""

from eaas_jax.engine import Engine, SamplingParams

__all__ = ["Engine", "SamplingParams"]
