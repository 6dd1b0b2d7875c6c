"""The experts-backend protocol: every backend the model runner takes
implements all of it, and an `ExchangeReport` counts statuses per server."""

import inspect

import numpy as np
import pytest

from eaas_jax.attention_client.remote_backend import RemoteExpertBackend
from eaas_jax.engine.expert_parallel import ExpertParallelExperts
from eaas_jax.model.experts_backend import ExchangeOutputs, ExchangeReport, ExpertsBackend
from eaas_jax.engine.runner import EmbeddedExperts
from eaas_jax.transport import wire

PROTOCOL_METHODS = sorted(name for name, member in vars(ExpertsBackend).items()
                          if inspect.isfunction(member) and not name.startswith("_"))


def test_the_protocol_names_what_the_runner_calls():
    # A backend missing any of these fails inside a trace, far from its cause.
    assert PROTOCOL_METHODS == ["exchange", "initial_carry", "num_micro_batches", "outputs", "step_arrays",
                                "traced_exchanges"]


@pytest.mark.parametrize("backend", [EmbeddedExperts, ExpertParallelExperts, RemoteExpertBackend])
def test_every_backend_implements_the_protocol(backend):
    missing = [name for name in PROTOCOL_METHODS if not callable(getattr(backend, name, None))]
    assert not missing, f"{backend.__name__} lacks {missing}"
    for name in PROTOCOL_METHODS:  # same arguments as the protocol's
        expected = list(inspect.signature(getattr(ExpertsBackend, name)).parameters)
        assert list(inspect.signature(getattr(backend, name)).parameters) == expected, (backend, name)


def test_backends_without_an_exchange_report_nothing():
    outputs = ExchangeOutputs.none()
    assert outputs.statuses == [] and outputs.unserved_tokens == [] and outputs.carry is None
    assert outputs.server_slots.shape == (0,) and outputs.server_wait_us.shape == (0,)


def test_a_report_counts_each_servers_statuses_and_unserved_slots():
    ok, timeout, bad = wire.STATUS_OK, wire.STATUS_TIMEOUT, wire.STATUS_BAD_REPLY
    report = ExchangeReport(statuses=np.array([[ok, timeout, bad], [ok, timeout, ok]]), labels=[(0, 0), (0, 0)],
                            unserved=np.array([2, 3]), unserved_rows=np.array([True, False]),
                            expert_tokens=np.zeros((1, 2)), server_slots=np.array([1, 2, 3]),
                            server_wait_us=np.zeros(3))
    assert report.count(timeout).tolist() == [0, 2, 0]
    assert report.count(bad).tolist() == [0, 0, 1]
    assert report.count(ok).tolist() == [2, 0, 1]
    assert report.unserved_slots == 5


def _attribute_chains(path: str) -> set[str]:
    """Every dotted attribute chain read in the module at `path` ('self.runner.experts.is_live', ...)."""
    import ast

    def chain(node):
        parts = []
        while isinstance(node, ast.Attribute):
            parts.append(node.attr)
            node = node.value
        if isinstance(node, ast.Name):
            parts.append(node.id)
        return ".".join(reversed(parts))

    with open(path) as f:
        tree = ast.parse(f.read())
    return {chain(node) for node in ast.walk(tree) if isinstance(node, ast.Attribute)}


def test_the_engine_reaches_servers_only_through_its_server_pool():
    """engine/ asks the ServerPool (control_plane) about servers: it never
    reads into the experts backend, a cluster or a transport endpoint (it may
    hand the pool's cluster to its users: `Engine.cluster`)."""
    import os

    import eaas_jax.engine

    folder = os.path.dirname(eaas_jax.engine.__file__)
    reaching = {}
    for name in sorted(os.listdir(folder)):
        if name.endswith(".py"):
            found = {c for c in _attribute_chains(os.path.join(folder, name))
                     if any(f".{part}." in f".{c}" for part in ("cluster", "client_endpoint", "endpoint"))
                     or ".runner.experts" in c or c.startswith("runner.experts")}
            if found:
                reaching[name] = sorted(found)
    assert not reaching, reaching


def test_the_package_exports_the_engine_and_its_sampling_params():
    """`from eaas_jax import Engine, SamplingParams` (the package was empty before)."""
    import eaas_jax
    from eaas_jax.engine import Engine, SamplingParams

    assert eaas_jax.Engine is Engine and eaas_jax.SamplingParams is SamplingParams
