"""Model parameters as a flat `{"client.layers.0.self_attn.q_proj.kernel": array}` dict.

Flat dotted names are what the checkpoint stores and what error messages show;
an expert server can select its subset by prefix (`experts.banks.<i>.`).
"""

from __future__ import annotations

import jax
from flax import nnx


def param_name(path: tuple) -> str:
    return ".".join(str(p) for p in path)


def flat_params(model: nnx.Module) -> dict[str, jax.Array]:
    """Every parameter of `model` (arrays or ShapeDtypeStructs) by dotted name."""
    state = nnx.state(model, nnx.Param)
    return {param_name(path): var.get_value() for path, var in nnx.to_flat_state(state)}


def with_params(model: nnx.Module, params: dict[str, jax.Array]) -> nnx.Module:
    """A module like `model` (which may be abstract, from `nnx.eval_shape`) holding
    `params`, given for every parameter by dotted name."""
    graphdef, state = nnx.split(model)
    for path, var in nnx.to_flat_state(state):
        var.set_value(params[param_name(path)])
    return nnx.merge(graphdef, state)
