"""The expert server: a stateless loop over one jitted round.

A round: poll (collect whatever requests have arrived, from any client, for
any layer) -> map each (layer, expert) slot to the group of a hosted expert ->
one grouped matmul per projection over all hosted groups -> gate-weighted sum
per token -> reply. Tokens from every client and every layer that arrived
together share one grouped matmul: batching across clients is where the
server's efficiency comes from.

Where the grouped matmul skips rows past its groups (tokamax on GPUs), a
round computes at full capacity: its cost follows the rows that arrived
anyway, and the round is one straight-line program the GPU runs as soon as the
poll returns. Elsewhere the compute is sized to the rows that arrived (the
smallest of a few compiled row buckets): computing every round at full
capacity was measured at 0.94 s per W1 decode step on 2 x H200 without
tokamax, the padding rows going through `lax.ragged_dot`. The bucket is picked
by a conditional, which on GPUs waits on the host for the poll before it
launches the compute kernels one by one. Dropping it with tokamax took W1
decode on 2 x H200 (double batching) from 11.7 to 8.3 ms per step at batch 64
and from 16.9 to 10.9 ms at batch 256 (bench/RESULTS.md, 2026-11-30).

On GPUs the next round is queued before the previous one's row count is
awaited, so the Python loop is not between a reply and the next poll.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import os
import signal
import socket
import threading
from typing import Mapping, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from eaas_jax.checkpoint.directory import load_config, load_expert_banks
from eaas_jax.kernels import grouped_matmul
from eaas_jax.model.config import ModelConfig
from eaas_jax.model.moe import routed_experts
from eaas_jax.model.precision import matmul_precision
from eaas_jax.attention_client.remote_backend import transport_anomalies
from eaas_jax.control_plane.deployment import Deployment, DeploymentError
from eaas_jax.expert_server.parent_watch import ParentWatch
from eaas_jax.control_plane.registry import (
    EtcdRegistry,
    Heartbeat,
    RegistryEntries,
    servers_prefix,
    spares_prefix,
)
from eaas_jax.transport import custom_calls, hidden_codec
from eaas_jax.transport.wire import default_deployment_id

log = logging.getLogger(__name__)


class HostedExperts(NamedTuple):
    """The routed experts one server hosts, stacked as groups.

    group_of: [num_moe_layers, num_experts] int32, the group of each hosted
      (MoE layer, expert), -1 where not hosted.
    gate_proj, up_proj: [G, d, f]; down_proj: [G, f, d].
    """

    group_of: np.ndarray
    gate_proj: jax.Array
    up_proj: jax.Array
    down_proj: jax.Array

    @property
    def hosted_mask(self) -> np.ndarray:
        return (self.group_of >= 0).astype(np.int32)


def select_experts(params: Mapping[str, jax.Array], hosted: Sequence[tuple[int, int]],
                   config: ModelConfig) -> HostedExperts:
    """Stacks the weights of the (MoE layer, expert) pairs in `hosted`.

    params: flat parameters holding at least `experts.banks.<layer>.*` of every
      hosted layer (`load_expert_banks`, or `flat_params(model)`).
    """
    num_layers, num_experts = config.num_moe_layers, config.num_experts
    pairs = sorted(set(hosted))
    if not pairs:
        raise ValueError("an expert server must host at least one (layer, expert)")
    for layer, expert in pairs:
        if not (0 <= layer < num_layers and 0 <= expert < num_experts):
            raise ValueError(
                f"(layer {layer}, expert {expert}) is outside the model's "
                f"{num_layers} MoE layers x {num_experts} experts"
            )
    group_of = np.full((num_layers, num_experts), -1, np.int32)
    for g, (layer, expert) in enumerate(pairs):
        group_of[layer, expert] = g

    def stack(name):
        return jnp.stack([params[f"experts.banks.{l}.{name}"][e] for l, e in pairs])

    return HostedExperts(group_of, stack("gate_proj"), stack("up_proj"), stack("down_proj"))


def _row_buckets(capacity: int, smallest: int = 16) -> tuple[int, ...]:
    """Row counts the server compiles its expert computation for: capacity
    alone where padding rows cost the grouped matmul nothing."""
    if grouped_matmul.skips_rows_past_groups():
        return (capacity,)
    sizes, n = [], smallest
    while n < capacity:
        sizes.append(n)
        n *= 2
    return tuple(sizes) + (capacity,)


def _server_round(group_of, gate_proj, up_proj, down_proj, hosted_mask, *, endpoint, capacity, timeout_us):
    """One poll/compute/reply round; returns the reply's token and the rows served."""
    request = custom_calls.poll(endpoint, hosted_mask, capacity=capacity, timeout_us=timeout_us)
    valid = (request.expert_ids >= 0) & (request.layer[:, None] >= 0)
    layer = jnp.maximum(request.layer, 0)[:, None]
    groups = jnp.where(valid, group_of[layer, jnp.maximum(request.expert_ids, 0)], -1)
    hidden = hidden_codec.decode(request.hidden, request.scales, gate_proj.dtype)

    # The poll fills rows [0, num_rows); compute only the smallest bucket that
    # holds them, so a few decode tokens do not pay for a full-capacity batch.
    def first_rows(n):
        def compute():
            out = routed_experts(hidden[:n], groups[:n], request.gates[:n], gate_proj, up_proj, down_proj)
            return jnp.zeros((capacity, out.shape[1]), jnp.float32).at[:n].set(out.astype(jnp.float32))
        return compute

    buckets = _row_buckets(capacity)
    if len(buckets) == 1:
        out = first_rows(capacity)()
    else:
        which = jnp.searchsorted(jnp.asarray(buckets), request.num_rows)
        out = jax.lax.switch(which, [first_rows(n) for n in buckets])
    return custom_calls.reply(endpoint, out, request.num_rows), request.num_rows


class ExpertServer:
    """Serves `experts` on an open transport endpoint until stopped."""

    def __init__(
        self,
        endpoint,
        experts: HostedExperts,
        *,
        poll_timeout_us: int = 20_000,
    ):
        self.endpoint = endpoint
        # Room for both micro-batches of one client in a single round.
        capacity = endpoint.geometry.capacity * endpoint.geometry.num_channels
        self._round = jax.jit(_server_round, static_argnames=("endpoint", "capacity", "timeout_us"),
                              compiler_options=custom_calls.COMPILER_OPTIONS)
        self._static = dict(endpoint=endpoint, capacity=capacity, timeout_us=poll_timeout_us)
        self._args = (jnp.asarray(experts.group_of), experts.gate_proj, experts.up_proj, experts.down_proj,
                      jnp.asarray(experts.hosted_mask))
        # Compiled here, ahead of time, so that a server never compiles once it
        # is up: on GPUs the jitted call traced the round again at the serve
        # loop's first round (2026-11-30, tokamax), ~3 s in which a restarted
        # server that had announced itself ready missed its first exchange.
        with matmul_precision(experts.gate_proj.dtype):
            self._compiled = self._round.lower(*self._args, **self._static).compile()
        # Rounds queued at once: on the CPU the poll handler blocks one of
        # XLA's few host threads while it waits, so a second queued round
        # would starve the client's and other servers' handlers.
        self._max_in_flight = 1 if jax.default_backend() == "cpu" else 2
        self.stopped = threading.Event()
        self.rows_served = 0

    def _queue(self) -> jax.Array:
        """Queues a round; returns its row count (a device value)."""
        _, rows = self._compiled(*self._args)
        return rows

    def step(self) -> int:
        """One round, waited for; returns the rows it served (0 when idle)."""
        rows = int(self._queue())
        self.rows_served += rows
        return rows

    def serve(self) -> None:
        """Loops until `stop()` (on GPUs the next round is queued before the
        previous one's rows are awaited); each idle round waits at most
        poll_timeout_us."""
        log.info("expert server on endpoint %d serving", self.endpoint.endpoint)
        in_flight: collections.deque[jax.Array] = collections.deque()
        while not self.stopped.is_set():
            in_flight.append(self._queue())
            if len(in_flight) >= self._max_in_flight:
                self.rows_served += int(in_flight.popleft())
        while in_flight:
            self.rows_served += int(in_flight.popleft())

    def stop(self) -> None:
        self.stopped.set()


def run_expert_server(
    model_path: str,
    deployment_path: str,
    server_name: str,
    *,
    joining: tuple | None = None,
    endpoint: int | None = None,
    shm_name: str | None = None,
    registry: str | None = None,
    dtype=jnp.float32,
    parent: ParentWatch | None = None,
    poll_timeout_us: int = 20_000,
    announce=lambda: print("ready", flush=True),
) -> None:
    """The `eaas-jax serve-experts` process: load the hosted experts, open the
    server's endpoint, compile, register, serve until SIGTERM/SIGINT.

    A server of the deployment file is found there by name. A server that is
    not (`joining` = its (layers, experts), in the file's syntax) serves on a
    spare endpoint: `endpoint` if given (a LocalCluster picks it), else the
    first one it can claim in the registry, for as long as its lease lives.
    `announce` is called once the server answers requests (the engine that
    started it waits for the "ready" line on its stdout). With `parent`, the
    server goes when the process that started it does (`ParentWatch`).
    """
    deployment = Deployment.load(deployment_path)
    if parent is not None:
        parent.remove_when_gone(deployment.endpoint_paths(shm_name or deployment.name))
    config = load_config(model_path)
    deployment.check(config)
    # The lease is this process's heartbeat: the keys under it (its spare
    # endpoint's claim, its registration) go when the process does.
    heartbeat = Heartbeat(EtcdRegistry(registry)) if registry is not None else None
    try:
        _serve(model_path, deployment, config, server_name, heartbeat, joining=joining, endpoint=endpoint,
               shm_name=shm_name, dtype=dtype, parent=parent, poll_timeout_us=poll_timeout_us, announce=announce)
    finally:
        if heartbeat is not None:
            heartbeat.stop()
    if parent is not None and parent.gone.is_set():
        parent.remove_mailboxes()  # the engine that owned them died without cleaning up


def _serve(model_path, deployment, config, server_name, heartbeat, *, joining, endpoint, shm_name, dtype,
           parent, poll_timeout_us, announce) -> None:
    """run_expert_server's body once the registry lease exists."""
    if joining is None:
        endpoint_index = deployment.server_endpoint(server_name)
        spec = deployment.servers[endpoint_index]
    else:
        spec = deployment.joining_server(server_name, *joining)
        deployment.check_server(spec, config)
        if endpoint is not None:
            if endpoint not in deployment.spare_range:
                raise DeploymentError(f"{deployment.source}: endpoint {endpoint} is not a spare one "
                                      f"({list(deployment.spare_range)})")
            endpoint_index = endpoint
        elif heartbeat is not None:
            endpoint_index = _claim_spare(heartbeat.registry, deployment, server_name, heartbeat.lease)
        else:
            raise DeploymentError(f"server {server_name!r} is not in {deployment.source}: joining needs a "
                                  "registry to claim a spare endpoint in (or an endpoint)")
    hosted = spec.hosted(config)
    _, params = load_expert_banks(model_path, {l for l, _ in hosted}, dtype=dtype)
    experts = select_experts(params, hosted, config)
    del params  # the unhosted experts of the loaded layers
    shm_name = shm_name or deployment.name
    # Registered: peers on other hosts find its transport entry in the registry.
    entries = (None if heartbeat is None
               else RegistryEntries(heartbeat.registry, deployment.name, endpoint_index, heartbeat.lease))
    with deployment.open_endpoint(shm_name, endpoint_index, config, entries) as endpoint:
        server = ExpertServer(endpoint, experts, poll_timeout_us=poll_timeout_us)
        server.step()  # an idle round: the transport answers before the server says it is ready
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: server.stop())
        if parent is not None:
            parent.serving(server)
        if heartbeat is not None:
            heartbeat.registry.put(servers_prefix(deployment.name) + server_name, {
                "endpoint": endpoint_index, "shm_name": shm_name, **deployment.backend.describe(endpoint),
                "pid": os.getpid(), "host": socket.gethostname(), "hosted": hosted,
                "deployment_id": default_deployment_id(shm_name),
            }, lease=heartbeat.lease)
        try:
            announce()
            with _profiled(server_name):
                server.serve()
        finally:
            if heartbeat is not None:
                heartbeat.stop()  # deregistered before the mailbox closes
            anomalies = transport_anomalies(endpoint.stats())
    log.info("expert server %s stopped after %d rows%s", server_name, server.rows_served,
             f" (transport counters: {anomalies})" if anomalies else "")


def _claim_spare(etcd: EtcdRegistry, deployment: Deployment, server_name: str, lease: int) -> int:
    """The first spare endpoint of `deployment` this server could claim in the
    registry (the key goes when `lease` does)."""
    prefix = spares_prefix(deployment.name)
    for endpoint in deployment.spare_range:
        if etcd.create(f"{prefix}{endpoint}", {"server": server_name, "pid": os.getpid()}, lease=lease):
            return endpoint
    raise DeploymentError(f"every spare endpoint of deployment {deployment.name!r} "
                          f"({len(deployment.spare_range)}) is taken in {etcd.url}")


@contextlib.contextmanager
def _profiled(server_name: str):
    """Traces the serve loop with the JAX profiler when EAAS_JAX_PROFILE_DIR is
    set (into <dir>/<server name>; a perfetto trace beside the xplane), so a
    server started by an engine or a deployment can be profiled in place."""
    directory = os.environ.get("EAAS_JAX_PROFILE_DIR")
    if not directory:
        yield
        return
    path = os.path.join(directory, server_name)
    jax.profiler.start_trace(path, create_perfetto_trace=True)
    try:
        yield
    finally:
        jax.profiler.stop_trace()
        log.info("expert server %s: profile written to %s", server_name, path)
