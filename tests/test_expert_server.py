"""Expert servers answer dispatched tokens exactly as the embedded experts would."""

from __future__ import annotations

import os
import threading
import uuid

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from eaas_jax.checkpoint import flat_params, load_client, load_expert_banks, load_model
from eaas_jax.kernels import grouped_matmul
from eaas_jax.expert_server.server import ExpertServer, select_experts
from eaas_jax.attention_client.exchange import RemoteExperts
from eaas_jax.transport import shm, wire

from conftest import TINY_CONFIG, XLA_COMPILATIONS, tiny_model

CLIENT, SERVERS = 0, (1, 2)
TOKENS = 12


@pytest.fixture(scope="module")
def model():
    return tiny_model(seed=5)


@pytest.fixture
def deployment(model, request, monkeypatch):
    """A client endpoint and two expert servers (even / odd experts) in threads.
    Parametrized (indirect) with True, the servers compute every round at full
    capacity, as they do on GPUs with tokamax."""
    if getattr(request, "param", False):
        monkeypatch.setattr(grouped_matmul, "skips_rows_past_groups", lambda: True)
    c = TINY_CONFIG
    name = f"t{uuid.uuid4().hex[:10]}"
    geometry = dict(max_endpoints=4, num_channels=2, capacity=TOKENS, hidden_size=c.hidden_size,
                    top_k=c.num_experts_per_tok, num_layers=c.num_moe_layers, num_experts=c.num_experts)
    table = np.zeros((c.num_moe_layers, c.num_experts), np.int32)
    endpoints, servers, threads = [shm.ShmEndpoint(name, CLIENT, **geometry)], [], []
    try:
        for i, ep_index in enumerate(SERVERS):
            hosted = [(l, e) for l in range(c.num_moe_layers) for e in range(c.num_experts) if e % 2 == i]
            for l, e in hosted:
                table[l, e] = ep_index
            ep = shm.ShmEndpoint(name, ep_index, **geometry)
            endpoints.append(ep)
            server = ExpertServer(ep, select_experts(flat_params(model), hosted, TINY_CONFIG), poll_timeout_us=2_000)
            servers.append(server)
            threads.append(threading.Thread(target=server.serve, daemon=True))
            threads[-1].start()
        yield endpoints[0], table, servers
    finally:
        for s in servers:
            s.stop()
        for t in threads:
            t.join(timeout=10)
        for ep in endpoints:
            ep.close()
    assert not [f for f in os.listdir("/dev/shm") if f.startswith(f"eaas-{name}-")]


def test_a_server_compiles_before_it_serves_and_never_after(model):
    """A server says it is ready once constructed and one round ran; a
    compile after that stalls its first exchanges past a client's deadline."""
    c = TINY_CONFIG
    geometry = dict(max_endpoints=2, num_channels=2, capacity=TOKENS, hidden_size=c.hidden_size,
                    top_k=c.num_experts_per_tok, num_layers=c.num_moe_layers, num_experts=c.num_experts)
    with shm.ShmEndpoint(f"t{uuid.uuid4().hex[:10]}", 1, **geometry) as endpoint:
        before = XLA_COMPILATIONS["jit(_server_round)"]
        server = ExpertServer(endpoint, select_experts(flat_params(model), [(0, 1), (1, 2)], c),
                              poll_timeout_us=1_000)
        assert XLA_COMPILATIONS["jit(_server_round)"] == before + 1
        assert server.step() == 0 and server.step() == 0  # idle rounds
        assert XLA_COMPILATIONS["jit(_server_round)"] == before + 1


def test_select_experts_rejects_unknown_experts(model):
    with pytest.raises(ValueError, match="outside"):
        select_experts(flat_params(model), [(0, 99)], TINY_CONFIG)
    with pytest.raises(ValueError, match="at least one"):
        select_experts(flat_params(model), [], TINY_CONFIG)


@pytest.mark.parametrize("deployment", [False, True], indirect=True, ids=["row buckets", "full capacity"])
def test_servers_match_the_embedded_experts(model, deployment, request):
    client, table, servers = deployment
    # The round picks its rows' bucket with a conditional unless it computes at full capacity.
    full_capacity = request.node.callspec.params["deployment"]
    round_jaxpr = str(servers[0]._round.trace(*servers[0]._args, **servers[0]._static).jaxpr)
    assert ("cond[" in round_jaxpr) != full_capacity
    servers_arr = jnp.asarray(SERVERS, jnp.int32)

    @jax.jit
    def exchange(x, ids, gates, targets, layer_channel_token):
        outs = []
        for layer, channel in ((0, 0), (1, 1), (1, 0)):
            sent = shm.dispatch(client, x, ids, gates, targets[layer], servers_arr,
                                layer=layer, micro_batch=channel, after=layer_channel_token)
            out, status, _ = shm.combine(client, sent, targets[layer], servers_arr, layer=layer,
                                      micro_batch=channel, timeout_us=5_000_000, after=sent)
            layer_channel_token = status
            outs.append((out, status))
        return outs

    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((TOKENS, TINY_CONFIG.hidden_size)), jnp.float32)
    moe_layer = model.client.layers[TINY_CONFIG.first_k_dense]
    routing = moe_layer.router(x)
    targets = jnp.asarray(table)[:, routing.expert_ids]  # [L, T, k]
    results = exchange(x, routing.expert_ids, routing.weights, targets, jnp.zeros((), jnp.int32))
    for (layer, _), (out, status) in zip(((0, 0), (1, 1), (1, 0)), results):
        assert np.asarray(status).tolist() == [wire.STATUS_OK] * 2
        expected = model.experts(layer, x, routing)
        np.testing.assert_allclose(np.asarray(out), np.asarray(expected), rtol=1e-5, atol=1e-5)
    # Both servers did work, and each token-slot was computed exactly once.
    assert all(s.rows_served > 0 for s in servers)


def test_model_forward_with_remote_experts_equals_embedded(model, deployment):
    client, table, servers = deployment
    tokens = jnp.asarray(np.random.default_rng(1).integers(1, 4096, size=(2, TOKENS // 2)), jnp.int32)
    positions = jnp.broadcast_to(jnp.arange(TOKENS // 2), tokens.shape)
    live = jnp.ones((4,), bool)

    @nnx.jit
    def forward(model, table, live):
        remote = RemoteExperts(client, SERVERS, table, live, timeout_us=5_000_000)
        hidden, _, _ = model.hidden_states(tokens, positions, experts=remote)
        return model.client.logits(hidden), jnp.stack(remote.statuses)

    logits, statuses = forward(model, jnp.asarray(table), live)
    assert statuses.shape == (TINY_CONFIG.num_moe_layers, len(SERVERS))
    assert (np.asarray(statuses) == wire.STATUS_OK).all()
    np.testing.assert_allclose(np.asarray(logits), np.asarray(model(tokens)), rtol=1e-4, atol=1e-5)

    # A dead server's experts are not dispatched (routing around it is the
    # failover's job): its status says nothing was sent, and the result differs.
    logits_dead, statuses_dead = forward(model, jnp.asarray(table), live.at[SERVERS[1]].set(False))
    assert (np.asarray(statuses_dead)[:, 1] == wire.STATUS_NOTHING_SENT).all()
    assert not np.allclose(np.asarray(logits_dead), np.asarray(logits), atol=1e-3)


def test_each_side_reads_only_its_parameters(tiny_checkpoint):
    full = load_model(tiny_checkpoint)
    config, banks = load_expert_banks(tiny_checkpoint, [1])
    assert sorted(banks) == [f"experts.banks.1.{p}" for p in ("down_proj", "gate_proj", "up_proj")]
    np.testing.assert_array_equal(np.asarray(banks["experts.banks.1.up_proj"]),
                                  np.asarray(full.experts.banks[1].up_proj[...]))
    hosted = select_experts(banks, [(1, 3), (1, 6)], config)
    np.testing.assert_array_equal(np.asarray(hosted.down_proj[1]),
                                  np.asarray(full.experts.banks[1].down_proj[...][6]))
    client = load_client(tiny_checkpoint)
    names = flat_params(client)
    assert names and not any("experts.banks" in k for k in names)
    np.testing.assert_array_equal(np.asarray(client.embed_tokens.embedding[...]),
                                  np.asarray(full.client.embed_tokens.embedding[...]))
